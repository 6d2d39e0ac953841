"""pd_kernels: GPU kernels for planned-diffusion language-model inference.

Ops (each a ``torch.library`` op in the ``pd_kernels::`` namespace, with torch / Triton / CUDA backends):

* :func:`paged_kv_write` - write new keys/values into the paged KV cache (:class:`PagedKVCache`).
* :func:`span_attention` - block-sparse span-isolated attention over the paged KV cache, driven by a
  :class:`SpanLayout` built from one :class:`SeqQueries` per sequence (:class:`StaticSpanLayout`: the
  fixed-buffer, per-bucket form for CUDA graphs).

Decoding: :func:`generate` / :class:`Decoder` (modes ``ar``, ``pd``, ``pd-da``, ``diffusion``) on a
transformers causal LM; :func:`enable` / :func:`disable` / :func:`enabled` switch a model's attention to
pd_kernels and back (:class:`UnsupportedModelError` for a model with features the kernels do not implement);
:func:`load_checkpoint` loads a checkpoint directory (Dream, any supported transformers family, or the tiny
planned-diffusion model), :func:`tags_from_tokenizer` reads its :class:`ControlTags` from its tokenizer.

Backends: see :mod:`pd_kernels._backend` (``backend=``, :func:`use_backend`, :func:`set_backend`,
``PD_KERNELS_BACKEND``).
"""
from ._backend import BackendUnavailable, current_backend, set_backend, use_backend
from .ops import paged_kv_write
from .ops import span_attention
from .ops import SpanState, commit_spans, token_confidence
from .layout import SeqQueries, SpanLayout, StaticSpanLayout
from .paged_cache import OutOfPages, PagedKVCache
from .decoder import ControlTags, DecodeConfig, Decoder, generate
from .integrations.transformers import UnsupportedModelError, disable, enable, enabled
from .integrations.checkpoints import Checkpoint, load_checkpoint
from .integrations.tags import missing_tags, tags_from_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "current_backend", "set_backend", "use_backend",
    "paged_kv_write", "PagedKVCache", "OutOfPages",
    "span_attention", "SpanLayout", "SeqQueries", "StaticSpanLayout",
    "token_confidence", "commit_spans", "SpanState",
    "ControlTags", "DecodeConfig", "Decoder", "generate",
    "enable", "disable", "enabled", "UnsupportedModelError",
    "load_checkpoint", "Checkpoint", "tags_from_tokenizer", "missing_tags",
]
