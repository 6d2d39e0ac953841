"""Dispatch of the public op functions: direct to the implementation in plain eager mode, through the
registered ``torch.ops.pd_kernels.*`` op whenever something above eager execution must see the op (a
``TorchDispatchMode`` such as fake tensors, ``torch.compile``, meta tensors). Both paths give the same result.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import pd_kernels as pk
from pd_kernels import _backend


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_truth_table():
    t = torch.zeros(3)
    assert _backend.eager(t)
    assert not _backend.eager(torch.zeros(3, device="meta"))
    with FakeTensorMode() as m:
        assert not _backend.eager(m.from_tensor(t))
    with _Recorder():
        assert not _backend.eager(t)


def _kv_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(5, 2, 16, generator=g)
    v = torch.randn(5, 2, 16, generator=g)
    kc = torch.zeros(4, 4, 2, 16)
    vc = torch.zeros(4, 4, 2, 16)
    slots = torch.tensor([3, -1, 0, 9, 15])
    return k, v, kc, vc, slots


def test_kv_write_registered_path_under_a_mode_matches_eager():
    k, v, kc1, vc1, slots = _kv_inputs(0)
    kc2, vc2 = kc1.clone(), vc1.clone()
    pk.paged_kv_write(k, v, kc1, vc1, slots, backend="torch")
    rec = _Recorder()
    with rec:
        pk.paged_kv_write(k, v, kc2, vc2, slots, backend="torch")
    assert any("pd_kernels.paged_kv_write" in o for o in rec.ops), rec.ops[:5]
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert kc1.abs().sum() > 0


def test_token_confidence_and_commit_registered_path_under_a_mode():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    t1, c1 = pk.token_confidence(logits, backend="torch")
    rec = _Recorder()
    with rec:
        t2, c2 = pk.token_confidence(logits, backend="torch")
    assert any("pd_kernels.token_confidence" in o for o in rec.ops)
    assert torch.equal(t1, t2) and torch.equal(c1, c2)


@pytest.mark.parametrize("backend", ["torch"])
def test_compiled_caller_uses_the_registered_op(backend):
    """A torch.compile'd function calling the public op traces it as one opaque op (fullgraph) and gives the
    eager result."""
    k, v, kc1, vc1, slots = _kv_inputs(2)
    kc2, vc2 = kc1.clone(), vc1.clone()

    def write(k, v, kc, vc, slots):
        pk.paged_kv_write(k * 2.0, v, kc, vc, slots, backend=backend)
        return kc.sum()

    torch._dynamo.reset()
    compiled = torch.compile(write, backend="aot_eager", fullgraph=True)
    s2 = compiled(k, v, kc2, vc2, slots)
    s1 = write(k, v, kc1, vc1, slots)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert torch.equal(s1, s2)
