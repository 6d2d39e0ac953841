"""Backend selection: explicit, context, process, environment, auto; clear errors, no silent fallback."""
import pytest
import torch

import pd_kernels as pk
from pd_kernels import _backend

from conftest import DEVICE, HAS_GPU, INTERPRET, triton_dtypes

OP = "paged_kv_write"


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("PD_KERNELS_BACKEND", raising=False)
    assert _backend.resolve(OP, None, torch.device("cpu")) == "torch"


def test_environment_flags_follow_every_change(monkeypatch):
    """The flags the ops read on every call see each change made through os.environ at once (set, change,
    delete, update, pop), from another thread too."""
    import os
    import threading

    from pd_kernels._checks import debug_enabled, getenv

    name = "PD_KERNELS_TEST_FLAG"
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PD_KERNELS_DEBUG", raising=False)
    assert getenv(name, "unset") == "unset" and not debug_enabled()
    monkeypatch.setenv(name, "a")
    monkeypatch.setenv("PD_KERNELS_DEBUG", "1")
    assert getenv(name) == "a" and debug_enabled()
    os.environ.update({name: "b", "PD_KERNELS_DEBUG": "0"})
    assert getenv(name) == "b" and not debug_enabled()
    t = threading.Thread(target=lambda: os.environ.__setitem__(name, "c"))
    t.start()
    t.join()
    assert getenv(name) == "c"
    os.environ.pop(name)
    del os.environ["PD_KERNELS_DEBUG"]
    assert getenv(name, "gone") == "gone" and not debug_enabled()


def test_precedence(monkeypatch):
    cpu, dev = torch.device("cpu"), torch.device(DEVICE)
    monkeypatch.setenv("PD_KERNELS_BACKEND", "torch")
    assert _backend.current_backend() == "torch"
    pk.set_backend("triton")
    try:
        assert _backend.current_backend() == "triton"
        with pk.use_backend("torch"):
            assert _backend.current_backend() == "torch"
            with pk.use_backend("auto"):
                assert _backend.resolve(OP, None, cpu) == "torch"
            assert _backend.resolve(OP, "triton", dev) == "triton"   # the argument wins
        assert _backend.current_backend() == "triton"
    finally:
        pk.set_backend(None)
    assert _backend.current_backend() == "torch"


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="unknown pd_kernels backend"):
        pk.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown pd_kernels backend"):
        with pk.use_backend("flash"):
            pass


def test_cuda_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(pk.BackendUnavailable, match="needs CUDA tensors"):
        _backend.resolve(OP, "cuda", torch.device("cpu"))


def test_triton_without_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pk.BackendUnavailable, match="TRITON_INTERPRET=1"):
        _backend.resolve(OP, "triton", torch.device("cpu"))


def test_unimplemented_backend_for_an_op():
    _backend.register_op_backends("_test_only_op", ("torch",))
    with pytest.raises(pk.BackendUnavailable, match="no 'triton' implementation"):
        _backend.resolve("_test_only_op", "triton", torch.device("cpu"))


def test_env_var_reaches_the_op(monkeypatch):
    """PD_KERNELS_BACKEND picks the backend an op call runs, with no argument."""
    seen = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda op, req, dev: seen.append(real(op, req, dev)) or seen[-1])
    monkeypatch.setenv("PD_KERNELS_BACKEND", "triton")
    c = pk.PagedKVCache(1, 1, 64, num_pages=2, page_size=4, dtype=torch.float32, device=DEVICE)
    s = c.add_sequence()
    k = torch.randn(3, 1, 64, device=DEVICE)
    pk.paged_kv_write(k, k, c.k_cache[0], c.v_cache[0], c.reserve(s, 3))
    assert seen == ["triton"]
    assert torch.equal(c.gather(s, 0)[0], k)


def test_the_test_device_runs_every_kernel_backend(device):
    """The one test device (tests/conftest.py) is CUDA wherever torch sees a GPU, and the Triton backend
    accepts tensors on it as the process is set up (compiled on a GPU, interpreted on the CPU): a kernel test
    that makes its tensors on ``device`` never fails for the wrong reason. bf16 is tested unless Triton is
    interpreted."""
    assert device == DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _backend.resolve(OP, "triton", torch.device(device)) == "triton"
    assert INTERPRET == (device == "cpu")
    assert (torch.bfloat16 in triton_dtypes()) == (not INTERPRET)


def test_import_needs_no_cuda():
    import importlib

    import pd_kernels._cuda_ext as ext

    importlib.reload(ext)
    assert ext._tried is False  # importing never builds or loads the extension
    if not HAS_GPU:
        assert "no CUDA device" in ext.load_problem()
