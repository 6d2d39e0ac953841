"""The tensor-parallel axis of ``bench_decoder.py --tp 1,2,4,8``: PD step latency at each TP size as a ratio to TP 1.

Each size N runs N spawned ranks (NCCL on GPUs 0..N-1; gloo on the CPU, only with ``--smoke``), every rank builds
the same random-weight model (``--model tiny | dream``, the seed fixed), shards it
(:func:`pd_kernels.parallel.tp.parallelize`: q/k/v/gate/up column-, o/down row-parallel, LM head by vocabulary) and
decodes the workload's first ``--tp-requests`` requests one at a time in ``pd`` mode (batch 1; CUDA graphs per
``--graphs``), after one warm-up request. The row: milliseconds per step (the summed wall time over the summed
critical paths), ``vs_tp1`` = TP 1's ms per step over this size's (higher is better), and whether the tokens equal
TP 1's. TP 1 runs in one spawned process without a process group (the single-process decoder).

A size larger than the GPUs here (or than 2 on a CPU smoke run) gives a row with ``skipped`` saying why; so does a
size the model's heads do not allow (Dream-7B's 4 KV heads: at most TP 4), with the decoder's own message.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
from datetime import timedelta

import torch


def available_ranks(smoke: bool) -> int:
    """Ranks a TP size may use here: the GPUs, or 2 gloo ranks for a CPU smoke run (else 1)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if smoke else 1


def _rank(rank: int, world: int, store: str, job: dict, results) -> None:
    try:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        import torch.distributed as dist

        if world > 1:
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=600))
        try:
            out = _measure(job, world)
        finally:
            if world > 1:
                dist.destroy_process_group()
        if rank == 0:
            results.put((True, out))
    except BaseException as e:  # noqa: BLE001 - the size's row says what went wrong
        results.put((False, f"rank {rank}: {type(e).__name__}: {e}"))


def _measure(job: dict, world: int) -> dict:
    import argparse

    from benchmarks.bench_decoder import load_model
    from pd_kernels.decoder import DecodeConfig, Decoder
    from pd_kernels.parallel.tp import TensorParallelError, parallelize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)   # every rank (and every size) builds the same weights
    model, tags = load_model(argparse.Namespace(**job["model_args"]), device)
    if world > 1:
        model = parallelize(model)
    reqs = job["reqs"]
    try:
        kw = {"cuda_graphs": True} if job["graphs"] and device == "cuda" else {}
        dec = Decoder(model, DecodeConfig(mode="pd", tags=tags, **job["cfg"]), backend=job["backend"], **kw)
    except TensorParallelError as e:
        return {"skipped": str(e)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dec.generate([reqs[0][0]], [reqs[0][1]])   # warm-up (kernel compiles, graph capture)
    wall, steps, tokens = 0.0, 0, []
    for prompt, plan in reqs:
        sync()
        t0 = time.perf_counter()
        res = dec.generate([prompt], [plan])[0]
        sync()
        wall += time.perf_counter() - t0
        steps += res.stats.critical_path
        tokens.append(res.sequence)
    return {"ms_per_step": round(1e3 * wall / max(1, steps), 4), "steps": steps, "wall_s": round(wall, 4),
            "tokens": tokens}


def run_size(world: int, job: dict, timeout: float = 900.0) -> dict:
    """Rank 0's measurement for TP size ``world`` (spawned ranks), or ``{"skipped": why}``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pd_tp_bench_") as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "store"), job, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            ok, out = results.get(timeout=timeout)
        except queue.Empty:
            ok, out = False, f"no result within {timeout:.0f} s"
        finally:
            for p in procs:
                p.join(timeout=10 if ok else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    return out if ok else {"skipped": f"failed: {out}"}


def tp_axis(bench, args, reqs, tags, cfg: dict) -> None:
    """Rows ``part="tp"`` for each size of ``args.tp`` (see the module docstring)."""
    sizes = [int(s) for s in args.tp.split(",") if s]
    if not sizes or sizes[0] != 1:
        raise SystemExit("--tp must start with 1 (every ratio is to TP 1)")
    have = available_ranks(args.smoke)
    job = {"model_args": {"model": args.model, "dtype": args.dtype, "layers": args.layers},
           "reqs": [(r.prompt, r.forced("pd", tags)) for r in reqs[:max(1, args.tp_requests)]],
           "cfg": cfg, "backend": args.backend, "graphs": args.graphs != "off"}
    base = None
    for n in sizes:
        if n > have:
            why = (f"TP {n} needs {n} GPUs, this machine has {have}" if torch.cuda.is_available() else
                   f"TP {n}: no GPUs here (a CPU smoke run checks TP <= 2 on gloo ranks)")
            print(f"tp {n}: skipped: {why}", flush=True)
            bench.row(impl=f"pd tp{n}", timing=None, part="tp", tp=n, skipped=why)
            continue
        out = run_size(n, job)
        if "skipped" in out:
            print(f"tp {n}: skipped: {out['skipped']}", flush=True)
            bench.row(impl=f"pd tp{n}", timing=None, part="tp", tp=n, skipped=out["skipped"])
            continue
        if n == 1:
            base = out
        ratio = round(base["ms_per_step"] / out["ms_per_step"], 3) if base and out["ms_per_step"] else None
        same = base is not None and out["tokens"] == base["tokens"]
        print(f"tp {n}: {out['ms_per_step']:.3f} ms/step over {out['steps']} steps, vs TP 1 {ratio}x, tokens "
              f"{'equal to' if same else 'DIFFERENT from'} TP 1", flush=True)
        bench.row(impl=f"pd tp{n}", timing=None, part="tp", tp=n, ms_per_step=out["ms_per_step"],
                  steps=out["steps"], wall_s=out["wall_s"], vs_tp1=ratio, tokens_match_tp1=same)
