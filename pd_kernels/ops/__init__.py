"""Public ops. Each module defines the ``pd_kernels::<op>`` torch.library op(s), the public function
(validation + backend choice + dispatch, see :func:`pd_kernels._backend.eager`) and the list of backends it
implements. Everything the rest of the package uses from the ops is exported here."""
from .commit_spans import SpanState, commit_spans
from .paged_kv_write import paged_kv_write
from .span_attention import span_attention
from .token_confidence import check_temperature, token_confidence
from ..reference.commit_spans import POLICIES
from ..reference.token_confidence import CONFIDENCE_KINDS

__all__ = ["paged_kv_write", "span_attention", "token_confidence", "commit_spans", "SpanState",
           "check_temperature", "CONFIDENCE_KINDS", "POLICIES"]
