"""Built-in models: a tiny random-weight Qwen2 for tests, the demo and smoke benchmarks."""
from .tiny import TINY_TAGS, ToyTokenizer, dream_shaped_config, tiny_config, tiny_model

__all__ = ["TINY_TAGS", "ToyTokenizer", "tiny_config", "tiny_model", "dream_shaped_config"]
