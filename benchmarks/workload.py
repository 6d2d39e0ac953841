"""A seeded planned-diffusion workload following SPEC section 8 (released PD model on AlpacaEval).

Random-weight models plan nothing, so every request carries *forced* plans: the AR tokens of each round
(``<promise> topic... N </topic>`` entries, then ``<sync/>`` or EOS) are given, the model still forwards
them, and everything after the plan (the spans, their diffusion, the next round) is the decoder's. The
step structure (plan lengths, spans per round, span lengths, rounds) is then that of the released model's
answers; the tokens are not.

What SPEC section 8 fixes, and how it is drawn here (all from ``random.Random(seed).random()``, whose
sequence Python guarantees across versions; no other generator is used). The per-request variables (prompt
length, rounds, spans of the first plan, AR length) are Latin-hypercube sampled over the requests: with the
8 requests a GPU run can afford, iid draws left the critical-path ratio anywhere from about 1.5x to 3x at
steps ratio 0.5; stratified draws keep each distribution and narrow that, and a small workload is further
the most representative of 64 candidate samples (:func:`make_workload`):

* spans per plan: median 2, mean 3.14, 90th percentile 6, 34% of plans with one span -> the discrete
  distribution :data:`SPANS_PMF` on 1..16 (mean 3.13);
* tokens per span: about 81 on average, 10 to 200 -> the plan number N in 1..20 (``N * length_scale``
  masks, length_scale 10) from a log-normal (sigma 0.6) discretised on 1..20, mean N = 8.1;
* rounds: 60% of first plans end in ``<sync/>``; a full answer takes 2 to 12 rounds, mean 2.23 -> one
  round with probability 0.4, else 2 + a geometric number of further rounds (at most 12 in all) whose
  continuation probability is solved so that the mean is 2.23;
* AR answers: about 367 tokens on average -> log-normal, sigma 0.5, mean 367, clipped to [32, 1024];
* prompts: tens to a few hundred tokens -> log-normal, median 96, sigma 0.7, clipped to [16, 400].

Not in SPEC (assumptions, stored with the parameters): 2 to 6 topic tokens per plan entry (uniform), later
rounds drawn like the first, token ids uniform over the ordinary vocabulary (``[30, min(tag ids))``: no tag,
no digit). ``ar`` requests are forced too (their answer tokens, then EOS) so the AR baseline runs exactly
its drawn length; ``diffusion`` requests all answer with the workload's mean PD span tokens
(:func:`diffusion_length`: one fixed canvas length, as Dream's diffusion decodes).

``WorkloadParams.smoke()`` scales everything down for CPU smoke runs of the tiny model.
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
from dataclasses import dataclass, field
from statistics import NormalDist

from pd_kernels.decoder import ControlTags, make_plan

# spans per plan (SPEC 8: median 2, mean 3.14, p90 6, 34% one span)
SPANS_PMF = ((1, .340), (2, .211), (3, .120), (4, .080), (5, .070), (6, .090), (7, .030), (8, .020), (9, .012),
             (10, .008), (11, .006), (12, .004), (13, .003), (14, .002), (15, .002), (16, .002))
ID_LOW = 30  # ordinary token ids start here (Dream digits are 15..24)


def _lognormal_pmf(mean: float, sigma: float, lo: int, hi: int) -> tuple:
    """A log-normal(mu, sigma) discretised to the integers lo..hi (tails folded into the ends), mu solved so
    the discrete mean is ``mean``."""
    nd = NormalDist()

    def pmf(mu):
        cdf = lambda x: nd.cdf((math.log(x) - mu) / sigma) if x > 0 else 0.0  # noqa: E731
        out = []
        for k in range(lo, hi + 1):
            a = cdf(k - 0.5) if k > lo else 0.0
            b = cdf(k + 0.5) if k < hi else 1.0
            out.append((k, b - a))
        return out

    a, b = -5.0, 10.0
    for _ in range(80):
        mu = (a + b) / 2
        if sum(k * p for k, p in pmf(mu)) < mean:
            a = mu
        else:
            b = mu
    return tuple((k, round(p, 6)) for k, p in pmf((a + b) / 2))


def _continue_prob(mean_rounds: float, p_sync: float, max_rounds: int) -> float:
    """Continuation probability c of the geometric tail: E[rounds] = mean_rounds, rounds <= max_rounds."""
    if max_rounds <= 1 or p_sync <= 0:
        return 0.0
    target = (mean_rounds - (1 - p_sync)) / p_sync  # mean rounds of a request with more than one

    def mean(c):  # rounds = 2 + G, P(G = g) proportional to c^g, g <= max_rounds - 2
        w = [c ** g for g in range(max_rounds - 1)]
        return 2 + sum(g * x for g, x in enumerate(w)) / sum(w)

    if target <= 2:
        return 0.0
    a, b = 0.0, 0.999
    for _ in range(80):
        c = (a + b) / 2
        if mean(c) < target:
            a = c
        else:
            b = c
    return (a + b) / 2


@dataclass(frozen=True)
class WorkloadParams:
    """Parameters of :func:`make_workload` (all stored with every result, see :meth:`as_dict`)."""
    seed: int = 0
    requests: int = 8
    length_scale: int = 10                      # masks per unit of the plan number N
    span_n_mean: float = 8.1                    # mean N (81 tokens at length_scale 10)
    span_n_sigma: float = 0.6
    span_n_max: int = 20                        # 200 tokens
    spans_pmf: tuple = SPANS_PMF
    p_sync: float = 0.6                         # first plans ending in <sync/>
    mean_rounds: float = 2.23
    max_rounds: int = 12
    topic_tokens: tuple = (2, 6)                # per plan entry, uniform (assumption)
    ar_mean: float = 367.0
    ar_sigma: float = 0.5
    ar_range: tuple = (32, 1024)
    prompt_median: float = 96.0
    prompt_sigma: float = 0.7
    prompt_range: tuple = (16, 400)
    representative: bool = True                 # small workloads: the most SPEC-like of `candidates` samples
    candidates: int = 64
    note: str = "SPEC section 8 (released PD model, AlpacaEval)"

    def __post_init__(self):
        if self.requests < 1 or self.length_scale < 1 or self.max_rounds < 1:
            raise ValueError(f"WorkloadParams: requests, length_scale and max_rounds must be >= 1: {self}")
        if not 0 <= self.p_sync <= 1:
            raise ValueError(f"WorkloadParams.p_sync must be in [0, 1], got {self.p_sync}")
        if not 1 <= self.span_n_max <= 99:
            raise ValueError(f"WorkloadParams.span_n_max must be in [1, 99] (two plan digits), got {self.span_n_max}")
        if abs(sum(p for _, p in self.spans_pmf) - 1) > 1e-6 or min(k for k, _ in self.spans_pmf) < 1:
            raise ValueError("WorkloadParams.spans_pmf must be ((spans >= 1, probability), ...) summing to 1")
        for name in ("topic_tokens", "ar_range", "prompt_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"WorkloadParams.{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")

    @classmethod
    def smoke(cls, **kw) -> "WorkloadParams":
        """The same kind of workload, scaled down for CPU smoke runs of the tiny model: 2 masks per plan
        number N (N at most 6), at most 4 spans a plan, always 2 rounds (the ``<sync/>`` path), AR answers and
        prompts about a tenth as long, 2 requests. Its statistics are not SPEC's; it only exercises every code path."""
        pmf = tuple((k, p) for k, p in SPANS_PMF if k <= 4)
        tot = sum(p for _, p in pmf)
        base = dict(requests=2, length_scale=2, representative=False, span_n_mean=3.5, span_n_max=6,
                    spans_pmf=tuple((k, round(p / tot, 6)) for k, p in pmf[:-1]) + ((4, round(1 - sum(
                        round(p / tot, 6) for _, p in pmf[:-1]), 6)),),
                    max_rounds=2, p_sync=1.0, mean_rounds=2.0, ar_mean=20.0, ar_range=(4, 60), prompt_median=9.6,
                    prompt_range=(3, 40),
                    note="SPEC section 8 scaled down for CPU smoke runs (not SPEC's statistics)")
        base.update(kw)
        return cls(**base)

    def replace(self, **kw) -> "WorkloadParams":
        return dataclasses.replace(self, **kw)

    @property
    def span_n_pmf(self) -> tuple:
        return _lognormal_pmf(self.span_n_mean, self.span_n_sigma, 1, self.span_n_max)

    @property
    def continue_prob(self) -> float:
        return _continue_prob(self.mean_rounds, self.p_sync, self.max_rounds)

    @property
    def rounds_pmf(self) -> tuple:
        """Rounds per request: 1 with probability 1 - p_sync, else 2 + a geometric number (at most max_rounds)."""
        if self.max_rounds == 1 or self.p_sync == 0:
            return ((1, 1.0),)
        c = self.continue_prob
        w = [c ** g for g in range(self.max_rounds - 1)]
        return ((1, 1 - self.p_sync),) + tuple((2 + g, self.p_sync * x / sum(w)) for g, x in enumerate(w))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["span_n_pmf"] = [list(x) for x in self.span_n_pmf]
        d["spans_pmf"] = [list(x) for x in self.spans_pmf]
        d["continue_prob"] = round(self.continue_prob, 6)
        d["rounds_pmf"] = [[k, round(p, 6)] for k, p in self.rounds_pmf]
        d["sampling"] = "Latin hypercube over requests (prompt, rounds, first-plan spans, AR length); the rest iid"
        return d


@dataclass
class Request:
    """One request: prompt ids, the plan of every round (numbers N and topic ids per entry), the forced AR
    answer. ``rounds[r]`` lists the N of each plan entry of round ``r``; the span of an entry has
    ``N * length_scale`` masks."""
    idx: int
    prompt: list
    rounds: list
    topics: list
    ar_answer: list
    length_scale: int = 10
    meta: dict = field(default_factory=dict)

    def span_lengths(self) -> list:
        return [[n * self.length_scale for n in r] for r in self.rounds]

    @property
    def span_tokens(self) -> int:
        return sum(sum(r) for r in self.span_lengths())

    def plans(self, tags: ControlTags) -> list:
        """Forced plans of ``pd`` / ``pd-da``: one token list per round, ``<sync/>`` after every round but the
        last, EOS after the last."""
        last = len(self.rounds) - 1
        return [make_plan(tags, r, topic_tokens=t, terminator="sync" if i < last else "eos")
                for i, (r, t) in enumerate(zip(self.rounds, self.topics))]

    def forced(self, mode: str, tags: ControlTags):
        """``forced_plans`` entry of this request for ``Decoder.generate`` in ``mode``."""
        if mode in ("pd", "pd-da"):
            return self.plans(tags)
        if mode == "ar":
            return [list(self.ar_answer) + [tags.eos]]
        return None

    def new_tokens(self, mode: str, tags: ControlTags, diffusion_len: int | None = None) -> int:
        """Tokens the request adds after its prompt in ``mode`` (what ``max_new_tokens`` must allow);
        ``diffusion_len``: the answer length of ``diffusion`` (default: this request's span tokens)."""
        if mode == "ar":
            return len(self.ar_answer) + 1
        if mode == "diffusion":
            return (diffusion_len or self.span_tokens) + 1
        plans = self.plans(tags)
        return (sum(len(p) - 1 for p in plans) + sum(L + 2 for r in self.span_lengths() for L in r)
                + len(plans) - 1 + 1)

    def critical_path(self, mode: str, tags: ControlTags, steps_ratio: float = 1.0,
                      diffusion_len: int | None = None) -> int:
        """Sequential forward passes of this request under the ``schedule`` policy (exact: that policy's step
        count depends only on the span lengths): prefill + one per AR token + the diffusion steps."""
        if mode == "ar":
            return 1 + len(self.ar_answer)
        if mode == "diffusion":
            return (1 if len(self.prompt) > 1 else 0) + max(1, int(steps_ratio * (diffusion_len or self.span_tokens)))
        plans = self.plans(tags)
        return sum(len(p) + max(1, int(steps_ratio * max(L))) for p, L in zip(plans, self.span_lengths()))

    def as_dict(self) -> dict:
        return {"idx": self.idx, "prompt_len": len(self.prompt), "rounds": self.rounds,
                "ar_len": len(self.ar_answer), "span_tokens": self.span_tokens}


def _discrete(u: float, pmf) -> int:
    """Inverse CDF of a discrete ``((value, probability), ...)`` at ``u`` in [0, 1)."""
    u = u * sum(p for _, p in pmf)
    c = 0.0
    for k, p in pmf:
        c += p
        if u < c:
            return k
    return pmf[-1][0]


def _lognormal_int(u: float, median: float, sigma: float, lo: int, hi: int) -> int:
    u = min(max(u, 1e-12), 1 - 1e-12)
    return int(min(hi, max(lo, round(median * math.exp(sigma * NormalDist().inv_cdf(u))))))


POPULATION = 2000   # requests of the reference sample a representative workload is matched to


def _shape(reqs: list, tags: ControlTags) -> tuple:
    """What a representative sample must match: mean rounds, spans of the first plan, span tokens, AR tokens,
    and the schedule critical-path ratio AR / PD at steps ratio 0.5 and 1.0."""
    f = statistics.fmean
    cp = lambda m, r: sum(q.critical_path(m, tags, r) for q in reqs)  # noqa: E731
    return (f(len(q.rounds) for q in reqs), f(len(q.rounds[0]) for q in reqs),
            f(n for q in reqs for rnd in q.rounds for n in rnd), f(len(q.ar_answer) for q in reqs),
            cp("ar", 1.0) / cp("pd", 0.5), cp("ar", 1.0) / cp("pd", 1.0))


def make_workload(params: WorkloadParams, tags: ControlTags, vocab_size: int) -> list:
    """``params.requests`` seeded :class:`Request` s for a model with ``vocab_size`` ids and control ``tags``.

    With ``params.representative`` and fewer than ``params.candidates`` requests, ``candidates`` samples are
    drawn (sub-seeds ``seed * 1000 + k``) and the one whose :func:`_shape` is closest (sum of relative
    errors) to that of a 2000-request sample of the same parameters is returned: its critical-path ratio and
    mix are the population's, not a lucky or unlucky draw's. The choice depends on the parameters and the
    seed only (never on a measurement); ``Request.meta`` records it."""
    if params.representative and params.requests < params.candidates:
        ref = _shape(_sample(params.replace(requests=POPULATION), params.seed * 1000 + 999_999, tags, vocab_size), tags)
        best = None
        for k in range(params.candidates):
            reqs = _sample(params, params.seed * 1000 + k, tags, vocab_size)
            err = sum(abs(a - b) / b for a, b in zip(_shape(reqs, tags), ref))
            if best is None or err < best[0]:
                best = (err, k, reqs)
        err, k, reqs = best
        for q in reqs:
            q.meta.update(sample_seed=params.seed * 1000 + k, shape_error=round(err, 4),
                          population_shape=[round(x, 3) for x in ref])
        return reqs
    return _sample(params, params.seed, tags, vocab_size)


def _sample(params: WorkloadParams, seed: int, tags: ControlTags, vocab_size: int) -> list:
    hi = min(min(tags.specials), vocab_size)
    if hi - ID_LOW < 16 or max(tags.digits) >= ID_LOW:
        raise ValueError(f"make_workload: ordinary token ids [{ID_LOW}, {hi}) leave too little room for this "
                         f"vocabulary / tag layout ({tags})")
    rng = random.Random(seed)
    n_pmf = params.span_n_pmf
    c = params.continue_prob
    ar_median = params.ar_mean * math.exp(-params.ar_sigma ** 2 / 2)  # log-normal with this mean
    tok = lambda: ID_LOW + int(rng.random() * (hi - ID_LOW))  # noqa: E731
    n = params.requests
    # Latin hypercube over the requests for the per-request draws (prompt length, rounds, spans of the first
    # plan, AR length): each variable's n draws take one value from each of n equal-probability strata, in a
    # random order. Every draw keeps its distribution; a small workload's statistics stay close to SPEC's.
    strata = {v: [(j + rng.random()) / n for j in sorted(range(n), key=lambda _: rng.random())]
              for v in ("prompt", "rounds", "spans", "ar")}
    rounds_pmf = params.rounds_pmf
    out = []
    for i in range(n):
        prompt = [tok() for _ in range(_lognormal_int(strata["prompt"][i], params.prompt_median, params.prompt_sigma,
                                                      *params.prompt_range))]
        n_rounds = _discrete(strata["rounds"][i], rounds_pmf)
        rounds, topics = [], []
        for r in range(n_rounds):
            k = _discrete(strata["spans"][i] if r == 0 else rng.random(), params.spans_pmf)
            rounds.append([_discrete(rng.random(), n_pmf) for _ in range(k)])
            lo, hi_t = params.topic_tokens
            topics.append([[tok() for _ in range(lo + int(rng.random() * (hi_t - lo + 1)))] for _ in range(k)])
        ar = [tok() for _ in range(_lognormal_int(strata["ar"][i], ar_median, params.ar_sigma, *params.ar_range))]
        out.append(Request(i, prompt, rounds, topics, ar, params.length_scale))
    return out


def diffusion_length(requests: list) -> int:
    """Answer length of ``diffusion`` mode for a workload: the mean of its requests' PD span tokens (Dream's
    diffusion decodes one fixed-length canvas, so every request gets the same length)."""
    return max(1, round(statistics.fmean(r.span_tokens for r in requests)))


def summarize(requests: list, tags: ControlTags, steps_ratio: float = 1.0) -> dict:
    """Workload statistics next to SPEC section 8's (and the ``schedule`` critical paths at ``steps_ratio``)."""
    first = [len(r.rounds[0]) for r in requests]
    spans = [L for r in requests for rnd in r.span_lengths() for L in rnd]
    rounds = [len(r.rounds) for r in requests]
    q = lambda v, f: sorted(v)[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    cp_ar = [r.critical_path("ar", tags) for r in requests]
    cp_pd = [r.critical_path("pd", tags, steps_ratio) for r in requests]
    return {
        "requests": len(requests),
        "spans_per_plan": {"median": statistics.median(first), "mean": round(statistics.fmean(first), 3),
                           "p90": q(first, 0.9), "one_span": round(sum(x == 1 for x in first) / len(first), 3),
                           "spec": "median 2, mean 3.14, p90 6, 34% one span"},
        "tokens_per_span": {"mean": round(statistics.fmean(spans), 1), "min": min(spans), "max": max(spans),
                            "spec": "about 81, 10 to 200"},
        "rounds": {"mean": round(statistics.fmean(rounds), 3), "max": max(rounds),
                   "more_than_one": round(sum(x > 1 for x in rounds) / len(rounds), 3),
                   "spec": "60% end in <sync/>, 2 to 12 rounds, mean 2.23"},
        "ar_tokens": {"mean": round(statistics.fmean(len(r.ar_answer) for r in requests), 1), "spec": "about 367"},
        "prompt_tokens": {"median": statistics.median(len(r.prompt) for r in requests),
                          "min": min(len(r.prompt) for r in requests), "max": max(len(r.prompt) for r in requests),
                          "spec": "tens to a few hundred"},
        "pd_span_tokens": {"mean": round(statistics.fmean(r.span_tokens for r in requests), 1)},
        "selection": {k: requests[0].meta[k] for k in ("sample_seed", "shape_error", "population_shape")
                      if k in requests[0].meta},
        "critical_path_schedule": {"steps_ratio": steps_ratio, "ar_mean": round(statistics.fmean(cp_ar), 1),
                                   "pd_mean": round(statistics.fmean(cp_pd), 1),
                                   "ar_over_pd": round(sum(cp_ar) / sum(cp_pd), 3),
                                   "spec": "paper: AR 367 vs PD about 155 (about 2.4x)"},
    }
