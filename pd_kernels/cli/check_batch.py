"""Batch invariance: one scenario, run by ``demo --check-batch`` and by tests/test_decoder_invariance.py.

A request's tokens must not depend on the rest of its batch, nor on when it was admitted. The scenario:
:data:`N_REQUESTS` requests of different prompt lengths (:func:`scenario_prompts`) and, where plans are
forced, different plans (:func:`scenario_plans`: one, two or three rounds; one to three spans; topic tokens;
one plan with no usable entry), each decoded alone, then together in every way of :data:`ARRIVALS` (all
admitted at once, in reverse order, and joining while others run: ``max_batch`` :data:`JOINING_BATCH`, so
requests enter freed rows at every phase of the others); greedy and sampled (a seed per request), dynamic
and static step (:data:`CASES`). :func:`batch_invariance` runs one case and says which requests differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .._checks import cdiv
from ..decoder import ControlTags, Decoder, make_plan

N_REQUESTS = 8
PROMPT_LENGTHS = (3, 9, 1, 14, 5, 20, 7, 11)
ARRIVALS = ("together", "reversed", "joining")
JOINING_BATCH = 3
#: ``(sampling, step)`` of every case ``--check-batch`` runs
CASES = tuple((s, st) for s in ("greedy", "sampled") for st in ("dynamic", "static"))
#: ordinary (non-tag) ids of the tiny models' vocabulary: topic tokens and plan text of the forced plans
PLAN_WORDS = (77, 100, 101, 102, 60, 61, 62, 90, 91, 92)


def scenario_prompts(prompt: list[int]) -> list[list[int]]:
    """The :data:`N_REQUESTS` prompts: the first :data:`PROMPT_LENGTHS` tokens of ``prompt`` (repeated as
    often as a length needs)."""
    if not prompt:
        raise ValueError("scenario_prompts: the prompt is empty")
    return [(list(prompt) * cdiv(n, len(prompt)))[:n] for n in PROMPT_LENGTHS]


def scenario_plans(tags: ControlTags, words: tuple[int, ...] = PLAN_WORDS) -> list[list[list[int]]]:
    """Forced plans of the :data:`N_REQUESTS` requests, one list of rounds each. Spans per request: 2, 1, 1, 3
    rounds, then none (request 4's plan has no usable entry: its text ``words[4:7]`` is the answer), 1, 2, 1
    rounds; ``words``: 10 ordinary token ids for the topics and that text."""
    def plan(nums, end="eos", topics=None):
        return make_plan(tags, nums, topic_tokens=topics, terminator=end)

    w = words
    return [
        [plan([1, 2], "sync"), plan([2], topics=[[w[0]]])],
        [plan([3])],
        [plan([1, 1, 1], topics=[[w[1]], [], [w[2], w[3]]])],
        [plan([2], "sync"), plan([1], "sync"), plan([1])],
        [[w[4], w[5], w[6], tags.eos]],
        [plan([2, 3])],
        [plan([1], "sync"), plan([2, 1])],
        [plan([3, 1], topics=[[w[7], w[8]], [w[9]]])],
    ]


def fingerprint(r) -> tuple:
    """What must not depend on the batch: ``(sequence, answer, plans, spans, steps per phase, finish reason)``
    of a :class:`~pd_kernels.decoder.GenerationResult`."""
    s = r.stats
    return (r.sequence, r.answer, r.plans, r.spans, dict(s.steps), s.finish_reason)


@dataclass
class Invariance:
    """The outcome of :func:`batch_invariance`.

    Attributes:
        alone: :func:`fingerprint` of each request decoded alone.
        differs: ``(arrival, request)`` of every request whose result in that arrival differs from alone.
        steps: arrival -> ``(decoder steps run, sum of the requests' critical paths)``: fewer steps than the
            sum means the requests really shared steps.
    """
    alone: list
    differs: list = field(default_factory=list)
    steps: dict = field(default_factory=dict)


def batch_invariance(model, cfg, prompts, plans=None, *, seeds=None, arrivals=ARRIVALS, **decoder_kw) -> Invariance:
    """Decode each request alone, then together in each way of ``arrivals`` (``"together"``: ``max_batch`` =
    all, ``"reversed"``: the same in reverse order, ``"joining"``: ``max_batch`` :data:`JOINING_BATCH`), and
    compare every request's :func:`fingerprint` with its run alone. ``plans``: forced plans per request (or
    ``None``: the model writes its own; not used in ``mode="diffusion"``, which writes no plan); ``seeds``: one per request (or ``None``: ``cfg.seed``);
    ``decoder_kw``: :class:`~pd_kernels.Decoder` options (``backend``, ``static_step``, ...)."""
    n = len(prompts)
    plans = [None] * n if plans is None or cfg.mode == "diffusion" else plans
    seed = (lambda i: None) if seeds is None else (lambda i: [seeds[i]])
    res = Invariance([fingerprint(Decoder(model, cfg, **decoder_kw).generate([prompts[i]], [plans[i]],
                                                                            seeds=seed(i))[0]) for i in range(n)])
    for arrival in arrivals:
        if arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
        order = list(range(n))[::-1] if arrival == "reversed" else list(range(n))
        dec = Decoder(model, cfg, max_batch=JOINING_BATCH if arrival == "joining" else n, **decoder_kw)
        out = dec.generate([prompts[i] for i in order], [plans[i] for i in order],
                           seeds=None if seeds is None else [seeds[i] for i in order])
        res.differs += [(arrival, i) for k, i in enumerate(order) if fingerprint(out[k]) != res.alone[i]]
        res.steps[arrival] = (dec.step_index, sum(r.stats.critical_path for r in out))
    return res


def check_batch(model, cfg, prompt: list[int], *, forced_plans: bool, backend) -> bool:
    """``demo --check-batch``: the scenario on the demo's model around its prompt (forced plans for a model that
    plans nothing sensible), every case of :data:`CASES`, one line each. Returns False when a request differs."""
    prompts = scenario_prompts(prompt)
    plans = scenario_plans(cfg.tags) if forced_plans else None
    print(f"\nbatch invariance: {len(prompts)} requests (prompt lengths {[len(p) for p in prompts]}), each decoded "
          f"alone vs all together (max_batch {len(prompts)}), in reverse order, and joining while others run "
          f"(max_batch {JOINING_BATCH})")
    ok = True
    for sampling, step in CASES:
        temp = 0.0 if sampling == "greedy" else (cfg.temperature or 1.0)
        seeds = [cfg.seed + k for k in range(len(prompts))] if temp else None   # one seed per request
        res = batch_invariance(model, cfg.replace(temperature=temp), prompts, plans, seeds=seeds, backend=backend,
                               static_step=step == "static")
        verdict = "identical"
        if res.differs:
            verdict = f"DIFFERS: {', '.join(f'request {i} ({arrival})' for arrival, i in res.differs)}"
            ok = False
        print(f"  {sampling:8s}{'' if not temp else f' T={temp:g}':7s} {step:8s} {verdict}")
    return ok
