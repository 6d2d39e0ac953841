"""Plain-torch references: the semantics of every op, used by tests, benchmarks and the CPU path."""
from .paged_kv_write import gather_pages, paged_kv_write_ref, slots_for_positions
from .span_attention import span_attention_ref, span_attention_ref_tensors
from .token_confidence import SpanState, commit_spans_ref, token_confidence_ref

__all__ = ["gather_pages", "paged_kv_write_ref", "slots_for_positions",
           "span_attention_ref", "span_attention_ref_tensors",
           "SpanState", "commit_spans_ref", "token_confidence_ref"]
