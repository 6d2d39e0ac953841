"""Run a function on several gloo ranks from a test: ``run_ranks(fn, world_size, *args)``.

Each rank is a fresh process (``multiprocessing`` spawn: no fork of pytest's state), one intra-op thread, joined
into a gloo process group through a file store in a temporary directory (no ports). ``fn(rank, world_size,
*args)`` runs on every rank; its return values (picklable: tensors, numbers, strings, containers) come back as a
list indexed by rank. An exception on any rank, a rank that dies, or a run longer than ``timeout`` seconds fails
the call with every rank's traceback. ``fn`` must be importable by name (a module-level function of a test
module or of this one).

``dist_skip_reason()`` says why multi-process tests cannot run here (``None`` when they can); use it with
``pytest.mark.skipif``.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch

_TIMEOUT = 120.0


def dist_skip_reason() -> str | None:
    """Why ``run_ranks`` cannot run in this environment, or None."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this torch build"
    return None


def _worker(fn, rank: int, world: int, store: str, args: tuple, results) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=_TIMEOUT))
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # as bytes: queued tensors would otherwise travel as shared-memory handles that die with this process
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test, with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = _TIMEOUT) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each on its own gloo rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pd_dist_") as tmp:
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"   # the children's OpenMP pools start with one thread
        try:
            procs = [ctx.Process(target=_worker, args=(fn, r, world_size, os.path.join(tmp, "store"), args, results),
                                 daemon=True) for r in range(world_size)]
            for p in procs:
                p.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        got: dict[int, tuple[bool, object]] = {}
        try:
            while len(got) < world_size:
                try:
                    rank, ok, out = results.get(timeout=timeout)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in got]
                    raise AssertionError(f"run_ranks: ranks {dead} gave no result within {timeout} s") from None
                got[rank] = (ok, out)
                if not ok:   # one rank failed: the others may wait for it in a collective; stop them
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if len(got) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    failed = {r: out for r, (ok, out) in got.items() if not ok}
    if failed:
        raise AssertionError("run_ranks: " + "\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())))
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]
