"""Tensor parallelism: pieces that run on every rank of a ``torch.distributed`` process group.

* :func:`token_confidence_vocab_parallel` - :func:`pd_kernels.token_confidence` of logits sharded by vocabulary
  (the column-parallel LM head's local output), from per-shard partials and one small collective: no ``[N, V]``
  gather.
* :func:`tensor_parallel` - the decoder's view of a tensor-parallel model (mesh, local heads, vocabulary slice), its
  layout checked (:class:`TensorParallelError`), and the cross-rank agreement checks (:mod:`.tp`).
* :func:`vocab_shard` - the ``(vocab_start, size)`` of a rank's slice under DTensor ``Shard(0)`` (transformers'
  ``colwise`` LM head).
"""
from .tp import TensorParallel, TensorParallelError, tensor_parallel
from .vocab import token_confidence_vocab_parallel, vocab_shard

__all__ = ["token_confidence_vocab_parallel", "vocab_shard", "tensor_parallel", "TensorParallel",
           "TensorParallelError"]
