"""Public ops. Each module defines the ``pd_kernels::<op>`` torch.library op(s), the public function
(validation + backend choice + dispatch, see :func:`pd_kernels._backend.eager`) and the list of backends it
implements."""
from .paged_kv_write import paged_kv_write
from .span_attention import span_attention
from .token_confidence import SpanState, commit_spans, token_confidence

__all__ = ["paged_kv_write", "span_attention", "token_confidence", "commit_spans", "SpanState"]
