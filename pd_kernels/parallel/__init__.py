"""Tensor parallelism: pieces that run on every rank of a ``torch.distributed`` process group.

* :func:`token_confidence_vocab_parallel` - :func:`pd_kernels.token_confidence` of logits sharded by vocabulary
  (the column-parallel LM head's local output), from per-shard partials and one small collective: no ``[N, V]``
  gather.
* :func:`vocab_shard` - the ``(vocab_start, size)`` of a rank's slice under DTensor ``Shard(0)`` (transformers'
  ``colwise`` LM head).
"""
from .vocab import token_confidence_vocab_parallel, vocab_shard

__all__ = ["token_confidence_vocab_parallel", "vocab_shard"]
