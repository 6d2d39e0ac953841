"""Plain-torch references: the semantics of every op, used by tests, benchmarks and the CPU path."""
from .commit_spans import (POLICIES, POLICY_ID, SpanState, commit_spans_ref, pd_threshold_budget, schedule_count,
                           span_row_range)
from .paged_kv_write import gather_pages, paged_kv_write_ref, slots_for_positions
from .span_attention import span_attention_ref, span_attention_ref_tensors
from .token_confidence import CONFIDENCE_KIND_ID, CONFIDENCE_KINDS, filter_threshold, token_confidence_ref

__all__ = ["gather_pages", "paged_kv_write_ref", "slots_for_positions",
           "span_attention_ref", "span_attention_ref_tensors",
           "CONFIDENCE_KINDS", "CONFIDENCE_KIND_ID", "filter_threshold", "token_confidence_ref",
           "POLICIES", "POLICY_ID", "SpanState", "commit_spans_ref", "pd_threshold_budget", "schedule_count", "span_row_range"]
