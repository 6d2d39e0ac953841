"""The decoder on a tensor-parallel model, 2 gloo ranks against one process: the same tokens in every mode (ar, pd,
pd-da, diffusion), greedy and seeded sampling (top-k / top-p too), a batch of requests of different plans, the
dynamic and the static step, the vocabulary-parallel token choice and the gathered one; for a model loaded by
transformers (``DistributedConfig(tp_size=2)``, ``tp_plan="auto"``) and one parallelized by hand with
``parallelize_module``; and the errors (layouts, heads, no process group, ranks that disagree or diverge).

Two ranks are spawned once (a module fixture, one intra-op thread each) and run every case; the tests compare what
came back with the same cases run here on the same weights in one process."""
from __future__ import annotations

import os

import pytest
import torch

from pd_kernels.cli.check_batch import fingerprint, scenario_plans, scenario_prompts
from pd_kernels.decoder import DecodeConfig, Decoder
from pd_kernels.models import TINY_TAGS, tiny_config, tiny_model

from _dist import dist_skip_reason, run_ranks
from test_integration_transformers import _write_dream

T = TINY_TAGS
SEED = 3
_PROMPTS = scenario_prompts(list(range(40, 60)))
_PLANS = scenario_plans(T)
PICK = [0, 3, 4]   # two / three rounds, and a plan with no usable entry
PROMPTS = [_PROMPTS[i] for i in PICK]
PLANS = [_PLANS[i] for i in PICK]
KW = dict(length_scale=2, max_new_tokens=24, tau=0.3, diffusion_len=8)
POLICY = {"pd": "threshold", "pd-da": "pd_threshold", "ar": "schedule", "diffusion": "schedule"}
_SKIP = dist_skip_reason()
needs_dist = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _cfg(mode, **kw):
    return DecodeConfig(mode=mode, policy=POLICY[mode], tags=T, **dict(KW, **kw))


# name -> (model, mode, config overrides, Decoder kwargs, seeds)
CASES = {}
for _mode in ("pd", "pd-da", "ar", "diffusion"):
    CASES[f"hf-{_mode}-greedy"] = ("hf", _mode, {}, {}, None)
    CASES[f"hf-{_mode}-sampled"] = ("hf", _mode, dict(temperature=1.0, seed=11), {}, [5, 6, 7])
CASES["hf-pd-greedy-gathered"] = ("hf", "pd", {}, dict(vocab_parallel=False), None)
CASES["hf-pd-sampled-gathered"] = ("hf", "pd", dict(temperature=1.0, seed=11), dict(vocab_parallel=False), [5, 6, 7])
CASES["hf-pd-topk-topp"] = ("hf", "pd", dict(temperature=0.8, top_k=5, top_p=0.9, seed=2), {}, None)
CASES["hf-pd-topk-topp-gathered"] = ("hf", "pd", dict(temperature=0.8, top_k=5, top_p=0.9, seed=2),
                                     dict(vocab_parallel=False), None)
CASES["hf-pd-topp-alone"] = ("hf", "pd", dict(temperature=0.8, top_p=0.8, seed=2), {}, None)
CASES["hf-pd-greedy-static"] = ("hf", "pd", {}, dict(static_step=True, buckets=(16, 64)), None)
CASES["hf-diffusion-sampled-static"] = ("hf", "diffusion", dict(temperature=1.0, seed=4),
                                        dict(static_step=True, buckets=(16, 64)), [1, 2, 3])
CASES["hand-pd-greedy"] = ("hand", "pd", {}, {}, None)
CASES["hand-pd-da-sampled"] = ("hand", "pd-da", dict(temperature=1.0, seed=11), {}, [5, 6, 7])
CASES["auto-pd-greedy"] = ("auto", "pd", {}, {}, None)
CASES["dream-pd-greedy"] = ("dream", "pd", {}, {}, None)
CASES["dream-diffusion-sampled"] = ("dream", "diffusion", dict(temperature=1.0, seed=4), {}, [1, 2, 3])


def _run_case(model, case) -> list:
    _, mode, cfg_kw, dec_kw, seeds = case
    plans = None if mode == "diffusion" else PLANS
    dec = Decoder(model, _cfg(mode, **cfg_kw), backend="torch", **dec_kw)
    return [fingerprint(r) for r in dec.generate(PROMPTS, plans, seeds=seeds)]


# ---------------------------------------------------------------------------------------------------
# on the ranks
# ---------------------------------------------------------------------------------------------------
def _hand_parallel(model, mesh, *, sequence_parallel=False):
    """The transformers layout by hand: q/k/v/gate/up column-parallel, o/down row-parallel, LM head by vocabulary."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, \
        parallelize_module

    plan = {"lm_head": ColwiseParallel()}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                     p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                     p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                     p + "mlp.down_proj": RowwiseParallel()})
        if sequence_parallel:
            plan[p + "input_layernorm"] = SequenceParallel()
    return parallelize_module(model, mesh, plan)


def _errors(rank, world, mesh) -> dict:
    """Each error case's message on this rank (``None``: nothing raised)."""
    import torch.distributed as dist

    from pd_kernels.parallel import TensorParallelError

    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except (TensorParallelError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"

    def build(**kw):
        return tiny_model(tiny_config(num_layers=1, **kw), seed=SEED)

    catch("kv-heads", lambda: Decoder(_hand_parallel(build(num_kv_heads=1), mesh), _cfg("pd")))
    catch("heads", lambda: Decoder(_hand_parallel(build(hidden_size=48, num_heads=3, num_kv_heads=3), mesh),
                                   _cfg("pd")))
    catch("sequence-parallel", lambda: Decoder(_hand_parallel(build(), mesh, sequence_parallel=True), _cfg("pd")))
    model = _hand_parallel(build(), mesh)
    model._tp_plan = {"model.norm": "sequence_parallel"}   # a transformers plan with a style the decoder does not run
    catch("plan-style", lambda: Decoder(model, _cfg("pd")))
    del model._tp_plan
    catch("vocab-parallel-true-replicated", lambda: Decoder(tiny_model(tiny_config(num_layers=1)), _cfg("pd"),
                                                            vocab_parallel=True))
    real = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        catch("no-group", lambda: Decoder(model, _cfg("pd")))
    finally:
        dist.is_initialized = real
    dec = Decoder(model, _cfg("ar", max_new_tokens=4), backend="torch")
    # ranks that disagree on the requests: both raise (fixed-size hashes: no hang)
    catch("prompts", lambda: dec.generate([[1, 2, 3 + rank]]))
    catch("config", lambda: Decoder(model, _cfg("ar", max_new_tokens=4 + rank)).generate([[1, 2, 3]]))
    # a rank whose tokens diverge: noticed with PD_KERNELS_DEBUG=1 at the step it happens
    run = dec.runner.run

    def bad_run(desc):
        read, at = run(desc)
        if rank == 1 and dec.step_index == 2:
            read = read.copy()
            read[0] += 1
        return read, at

    dec.runner.run = bad_run   # (without PD_KERNELS_DEBUG the ranks would go on apart: not run, it may hang)
    os.environ["PD_KERNELS_DEBUG"] = "1"
    try:
        catch("diverged-debug", lambda: dec.generate([[1, 2, 3]]))
    finally:
        del os.environ["PD_KERNELS_DEBUG"]
    return out


def _ranks(rank, world, path, dream_path, names):
    for k, v in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank)):
        os.environ[k] = str(v)   # transformers' tp_plan="auto" reads the world size from the environment
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    mesh = init_device_mesh("cpu", (world,))
    models = {"hf": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         distributed_config=DistributedConfig(tp_size=world)),
              "hand": _hand_parallel(tiny_model(seed=SEED), mesh)}
    if any(CASES[n][0] == "auto" for n in names):
        models["auto"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto")
    if any(CASES[n][0] == "dream" for n in names):
        from pd_kernels.integrations.dream import load_dream

        models["dream"] = load_dream(dream_path, distributed_config=DistributedConfig(tp_size=world))
    out = {n: _run_case(models[CASES[n][0]].eval(), CASES[n]) for n in names}
    geo = Decoder(models["hf"], _cfg("pd"))
    out["_local"] = (geo.geo["num_kv_heads"], geo.tp.vocab_start, geo.tp.vocab_local, geo.vocab_parallel)
    out["_errors"] = _errors(rank, world, mesh)
    out["_demo"] = _demo()
    return out


def _demo() -> str:
    """``torchrun --nproc-per-node 2 -m pd_kernels demo --model random`` on this rank: what it printed."""
    import contextlib
    import io

    from pd_kernels.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--model", "random", "--plain", "--max-new-tokens", "24", "--no-baseline"]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path, dream = tmp_path_factory.mktemp("tiny_tp"), tmp_path_factory.mktemp("tiny_dream_tp")
    tiny_model(seed=SEED).save_pretrained(str(path))
    _write_dream(dream, tiny_model(seed=SEED))   # sharded safetensors with Dream's rotary buffers
    return run_ranks(_ranks, 2, str(path), str(dream), list(CASES), timeout=600)


@pytest.fixture(scope="module")
def one_process():
    model = tiny_model(seed=SEED)
    return {n: _run_case(model, c) for n, c in CASES.items()}


# ---------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------
@needs_dist
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_give_the_tokens_of_one_process(ranks, one_process, name):
    assert ranks[0][name] == ranks[1][name], f"{name}: the ranks disagree"
    assert ranks[0][name] == one_process[name], f"{name}: 2 ranks differ from one process"


@needs_dist
def test_the_cases_ran_plans_and_sampling(one_process):
    pd = one_process["hf-pd-greedy"]
    assert [len(f[3]) for f in pd] == [2, 3, 0]                  # rounds per request: the plans really ran
    assert one_process["hf-pd-sampled"] != pd                   # the noise changed the tokens
    assert one_process["hf-pd-topk-topp"] != one_process["hf-pd-sampled"]


@needs_dist
def test_cache_holds_local_heads_and_vocab_slices(ranks):
    # tiny model: 2 KV heads, vocabulary 256: each rank holds 1 KV head and half the LM head
    assert ranks[0]["_local"] == (1, 0, 128, True)
    assert ranks[1]["_local"] == (1, 128, 128, True)


@needs_dist
@pytest.mark.parametrize("case,words", [
    ("kv-heads", ["1 KV heads", "fewer than the 2", "replicated KV heads are not implemented"]),
    ("heads", ["3 attention heads and 3 KV heads are not both divisible by the 2"]),
    ("sequence-parallel", ["input_layernorm", "sequence parallel"]),
    ("plan-style", ["style 'sequence_parallel' on 'model.norm'", "is not implemented"]),
    ("vocab-parallel-true-replicated", ["vocab_parallel=True needs a tensor-parallel model"]),
    ("no-group", ["no torch.distributed process group is initialized"]),
    ("prompts", ["ranks disagree on the Decoder call", "ranks [1] differ from rank 0"]),
    ("config", ["ranks disagree on the Decoder call", "ranks [1] differ from rank 0"]),
    ("diverged-debug", ["the tokens read at step 2 (a rank diverged)", "ranks [1] differ from rank 0"]),
])
def test_errors_name_the_problem(ranks, case, words):
    for r in (0, 1):
        msg = ranks[r]["_errors"][case]
        assert msg is not None, f"{case}: rank {r} raised nothing"
        assert "TensorParallelError" in msg or case == "vocab-parallel-true-replicated", msg
        for w in words:
            assert w in msg, (case, r, msg)



@needs_dist
def test_demo_on_two_ranks(ranks, capsys):
    """The demo under torchrun: the model sharded (the same answer as one process), only rank 0 prints."""
    from pd_kernels.cli import main

    assert main(["demo", "--model", "random", "--plain", "--max-new-tokens", "24", "--no-baseline"]) == 0
    alone = capsys.readouterr().out
    out = ranks[0]["_demo"]
    assert "tensor-parallel on 2 ranks" in out and ranks[1]["_demo"] == ""
    answer = [line for line in out.splitlines() if line.startswith("answer")]
    assert answer and answer == [line for line in alone.splitlines() if line.startswith("answer")]
