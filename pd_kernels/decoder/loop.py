"""The planned-diffusion decoder loop (SPEC sections 3-6) on the pd_kernels ops, batched.

One :class:`Decoder` step is one forward pass of the model over the packed queries of every running
request, whatever its phase:

* ``prefill``   - the prompt, causal (one step);
* ``plan``      - one AR token (a plan token, the AR baseline's next token, or the ``<sync/>`` tag), causal;
* ``diffusion`` - every token of every unfinished span of the request's current round (PD / PD-DA);
* ``refresh``   - (``refresh_spans=True``) every span of a finished round once more, before its ``<sync/>``.

A step (:meth:`Decoder._step`): the scheduler describes it (:mod:`pd_kernels.decoder.step`: one
:class:`~pd_kernels.decoder.step.StepDesc`, reused while no request changes state), the runner runs it (dynamic:
exactly the description; static: padded into a bucket, a CUDA graph per bucket) and reads back every LM-head
row's token and every span's ``masks_left`` (the step's one device-to-host read), the scheduler advances the
requests from that read (plan parsing, finished spans and rounds, events).

Batch invariance: nothing a request computes depends on the other requests of its batch or on when it was
admitted. Its positions, cache slots and token-buffer row are its own; its RNG noise is keyed by (its seed,
its own step counter, the absolute position); the ops treat rows independently. What remains is the model's
own arithmetic: its matmuls run over the packed tokens of the whole step, and a BLAS library may pick another
kernel (another summation order) for another row count, so greedy near-ties can still flip with the batch
(see the README, "Batch invariance").

Forced plans (``forced_plans``) replace the sampled plan tokens (the model still forwards them, so the
critical path and the cache are those of a real plan): random-weight models then run multi-span,
multi-round generations.
"""
from __future__ import annotations

import time

import torch

from .._checks import debug_enabled
from ..integrations.transformers import check_model, enabled, graph_capture_issues, is_enabled, model_geometry
from ..parallel.tp import local_geometry, tensor_parallel
from .._checks import cdiv
from .config import DecodeConfig
from .graphs import DEFAULT_BUCKETS
from .inputs import check_decoder_args, check_forced_plans, check_model_state, check_prompts, check_seeds
from .request import GenerationResult, Request
from .runner import CallGeometry, ModelRunner
from .scheduler import Scheduler

_ENDED = ("this Decoder.stream iterator has ended: a later generate / stream call on its Decoder (or a new "
          "Decoder.cfg) replaced its state; a Decoder decodes one call at a time (use a second Decoder to interleave)")


class Decoder:
    """Batched planned-diffusion / AR / diffusion decoding of a transformers model on pd_kernels.

    Args:
        model: a transformers causal LM in eval mode (families in
            :data:`~pd_kernels.integrations.transformers.VERIFIED_MODEL_TYPES`; a feature the kernels do not
            implement raises ``UnsupportedModelError`` here). :meth:`generate` / :meth:`stream` switch it to
            pd_kernels attention while they run and restore its own attention afterwards.
        config: :class:`DecodeConfig`.
        max_batch: most requests decoded together; further prompts wait and join as others finish.
        backend: pd_kernels backend of every op (``None``: the current default, see :func:`pd_kernels.use_backend`).
        on_step: optional ``callable(decoder)`` run after every step.
        cuda_graphs: run each step's device work as a CUDA graph, captured once per bucket (CUDA models
            only: a model on another device raises ``ValueError``). Implies ``static_step``.
        static_step: run each step from the fixed buffers of a bucket (the capturable step) without
            capturing it (default: ``cuda_graphs``). Same tokens as the default dynamic step; works on CPU.
        buckets: ascending bucket sizes, used for both the packed query count and the LM-head row count
            (default 16, 32, ..., 2048). A step is padded up to the smallest bucket that holds it.
        vocab_parallel: on a tensor-parallel model whose LM head is sharded by vocabulary, choose tokens from each
            rank's logits slice with one small collective (:func:`~pd_kernels.parallel.token_confidence_vocab_parallel`)
            instead of gathering ``[N, V]`` logits (``False``; same tokens). Default ``None``: on when the head is
            sharded. ``True`` on any other model raises ``ValueError``.

    **Tensor parallelism** (:mod:`pd_kernels.parallel.tp`): a model whose weights are DTensors (transformers'
    ``DistributedConfig(tp_size=N)`` / ``tp_plan="auto"``, or ``parallelize_module`` in the same column/row-wise
    layout) runs unchanged: every rank makes the same Decoder and calls it with the same arguments (checked at the
    start of each call by a hash gathered from every rank), the cache holds this rank's KV heads, and every rank
    reads the same tokens (with ``PD_KERNELS_DEBUG=1`` also checked every step). Layouts the decoder does not run
    are refused with :class:`~pd_kernels.parallel.tp.TensorParallelError`.

    Parts (each its own module): the :class:`~pd_kernels.decoder.scheduler.Scheduler` (admission, the step
    description, advancing the requests of :mod:`~pd_kernels.decoder.request` from the step's read), the
    :class:`~pd_kernels.decoder.runner.ModelRunner` (the call's device buffers and the one device step) and its
    :class:`~pd_kernels.decoder.graphs.GraphManager` (buckets, CUDA graphs).

    Both steps run the same :class:`~pd_kernels.decoder.step.StepDesc` through the same device step
    (:meth:`~pd_kernels.decoder.runner.ModelRunner.device_step`: the model, the LM head on the description's
    rows, :func:`~pd_kernels.token_confidence`, the AR token write, :func:`~pd_kernels.commit_spans`, the read
    buffer) and one device-to-host read. Dynamic step (default): a :class:`~pd_kernels.SpanLayout` and index
    tensors of exactly the step's size (two host-to-device copies).

    Static step: a step with ``nq`` packed queries and ``nr`` LM-head rows uses the bucket ``(Q, R)`` =
    (smallest bucket >= ``nq``, smallest bucket >= ``max(nr, 1)``), with ``max_batch`` sequences and
    ``max_batch * max_spans`` segments: a :class:`~pd_kernels.StaticSpanLayout` (layout sequence ``b`` = cache
    row ``b``, so the cache's own block table is the graph's) and fixed index / output buffers
    (:class:`~pd_kernels.decoder.graphs.Bucket`, which also documents the padding). The token buffer has a scratch
    area (``buckets[-1]`` elements past the ``[max_batch, cap]`` rows, always ``PAD``, never ``MASK``) that
    padding rows read and write.

    **Captured** in the CUDA graph of a bucket (all graphs share one memory pool): the token gather, the whole
    model forward (each layer's :func:`~pd_kernels.paged_kv_write` + :func:`~pd_kernels.span_attention` on the
    static layout), the LM head on the ``R`` rows, :func:`~pd_kernels.token_confidence` (``out=``, per-row RNG
    keys read on the device), the AR token write, :func:`~pd_kernels.commit_spans` (``out=``) and the gather of
    the read buffer (every row's token, every span's ``masks_left``).

    **Not captured** (host, between replays): admission, plan parsing, span/round bookkeeping and the cache
    ``reserve`` / token-template / ``SpanState.reset`` writes of a state change; choosing the bucket; packing
    the description into the pinned staging buffer (only the RNG offsets while nothing changed) and its one
    non-blocking host-to-device copy; :meth:`~pd_kernels.StaticSpanLayout.update` (only when the description
    changed); the step's one device-to-host read. The first step of a bucket runs eagerly (warm-up: Triton
    compilation, cuBLAS handles, and the attention's split-K workspace, sized by the bucket), the second
    captures the graph and replays it, later ones replay. ``graph_counts`` counts ``captured`` graphs,
    ``replayed`` steps, ``static_eager`` steps and ``dynamic`` (overflow) steps. A step larger than the largest
    bucket runs on the dynamic path. Buffers (cache, token buffer, span state, buckets) are kept across
    :meth:`generate` calls while their geometry is unchanged, so graphs captured in one call replay in the next.
    """

    def __init__(self, model, config=None, *, max_batch: int = 8, backend: str | None = None, on_step=None,
                 cuda_graphs: bool = False, static_step: bool | None = None, buckets=None,
                 vocab_parallel: bool | None = None):
        config, max_batch = check_decoder_args(model, config, max_batch, backend, on_step, buckets)
        if not is_enabled(model):  # refuse what pd_kernels cannot run; generate() enables it and restores it
            check_model(model)
        self._call_id, self._stepping, self._generating = 0, False, False   # see _start / _loop
        self.model = model
        self.cfg = config
        self.max_batch = max_batch
        self.backend = backend
        self.on_step = on_step
        self.device, self.dtype = check_model_state(model)
        self.geo = model_geometry(model)
        self._check_tags()
        # tensor parallelism: the mesh, the layout checked, the cache sized from this rank's heads
        self.tp = tensor_parallel(model, self.geo)
        self.geo = local_geometry(self.geo, self.tp)
        if vocab_parallel not in (None, True, False):
            raise TypeError(f"vocab_parallel must be None, True or False, got {vocab_parallel!r}")
        if vocab_parallel and not (self.tp is not None and self.tp.head_sharded):
            raise ValueError("vocab_parallel=True needs a tensor-parallel model whose LM head is sharded by "
                             "vocabulary (DTensor Shard(0)); this model's is not")
        self.vocab_parallel = self.tp is not None and self.tp.head_sharded and vocab_parallel is not False
        self.cuda_graphs = bool(cuda_graphs)
        self.static_step = self.cuda_graphs if static_step is None else bool(static_step)
        if self.cuda_graphs and not self.static_step:
            raise ValueError("cuda_graphs=True captures the static step: static_step=False contradicts it")
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, the model is on {self.device} "
                             f"(static_step=True runs the same fixed-buffer step without capture)")
        if self.cuda_graphs and debug_enabled():
            raise ValueError("cuda_graphs=True cannot run with PD_KERNELS_DEBUG=1 (its checks read device values "
                             "on the host); use static_step=True to debug the same step eagerly")
        if self.cuda_graphs:
            with enabled(self.model):
                issues = graph_capture_issues(self.model)
            if issues:
                raise ValueError("cuda_graphs=True: this model's forward cannot be captured: " + "; ".join(issues))
        b = DEFAULT_BUCKETS if buckets is None else tuple(int(x) for x in buckets)
        if not b or b[0] < 1 or list(b) != sorted(set(b)):
            raise ValueError(f"buckets must be distinct positive sizes in ascending order, got {buckets!r}")
        self.buckets = b
        self._fixed = (self.cuda_graphs, self.static_step, self.buckets)   # checked above: fixed for the Decoder
        self.runner = ModelRunner(model, self.device, self.dtype, self.geo, static_step=self.static_step,
                                  cuda_graphs=self.cuda_graphs, buckets=b, tp=self.tp,
                                  vocab_parallel=self.vocab_parallel)
        self.scheduler: Scheduler | None = None
        self.step_index = 0

    # ---- public entry points ---------------------------------------------------------------------------
    def generate(self, prompts, forced_plans=None, *, seeds=None, on_event=None) -> list[GenerationResult]:
        """Decode every prompt (each a list of token ids, or one row of a 2-D tensor) and return one
        :class:`GenerationResult` per prompt, in order.

        ``forced_plans[i]``: ``None`` or a list of rounds, each the AR tokens to force in that round (usually
        ending with ``<sync/>`` or EOS, see :func:`~pd_kernels.decoder.make_plan`); rounds past the list, or tokens
        past a round's list, are sampled (``mode="diffusion"`` has no plan: a forced plan there raises
        ``ValueError``). ``seeds[i]``: the RNG seed of request ``i`` (default: the config's ``seed``).
        ``on_event``: ``callable(event)`` for each :mod:`~pd_kernels.decoder.events` event. The model runs on
        pd_kernels attention only during the call: its own attention is restored when it returns or raises.

        A Decoder decodes one call at a time: calling :meth:`generate` or :meth:`stream` on it from ``on_event`` or
        ``on_step`` raises ``RuntimeError`` (use a second Decoder); a call made while a :meth:`stream` iterator of
        it is still open ends that stream (resuming it raises ``RuntimeError``)."""
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable or None, got {type(on_event).__name__}")
        self._start(prompts, forced_plans, seeds)
        self._generating = True
        try:
            for e in self._loop(on_event is not None, self._call_id):
                on_event(e)
        finally:
            self._generating = False
        return [r.result for r in self.scheduler.reqs]

    def stream(self, prompts, forced_plans=None, *, seeds=None):
        """Like :meth:`generate`, but returns an iterator over the events (:mod:`pd_kernels.decoder.events`) as
        they happen: plan tokens, span commits, finished spans and rounds, finished requests (each with its
        :class:`GenerationResult`). Arguments are checked now; decoding runs as the iterator is consumed, with the
        model on pd_kernels attention until the iterator is exhausted or closed. A later :meth:`generate` /
        :meth:`stream` call on this Decoder, or a new :attr:`cfg`, ends an open stream: resuming it then raises
        ``RuntimeError`` (its requests' state is gone); breaking out of the loop needs nothing else."""
        self._start(prompts, forced_plans, seeds)
        return self._loop(True, self._call_id)   # the call's id, taken now (the body starts at the first next())

    @property
    def cfg(self) -> DecodeConfig:
        """The :class:`DecodeConfig` of the next :meth:`generate` / :meth:`stream` call (may be replaced between
        calls; replacing it ends an open stream, and is refused during a call)."""
        return self._cfg

    @cfg.setter
    def cfg(self, config: DecodeConfig) -> None:
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"Decoder.cfg must be a DecodeConfig, got {type(config).__name__}")
        if self._stepping or self._generating:
            raise RuntimeError("Decoder.cfg cannot change during a generate / stream call of this Decoder")
        self._cfg = config
        self._call_id += 1   # an open stream decoded with the old config: it ends

    # ---- the loop ----------------------------------------------------------------------------------------
    def _loop(self, events: bool, call: int):
        """Admit and step until every request is done; yields the events of each step when ``events``. ``call``:
        the id of the call (:meth:`_start`); a later call ends this one (it raises when resumed)."""
        self._check_call(call)
        sched = self.scheduler
        sched.events = [] if events else None
        with enabled(self.model):
            while True:
                self._check_call(call)
                if sched.done:
                    return
                self._stepping = True
                try:
                    sched.admit()
                    with torch.no_grad():
                        self._step()
                    if self.on_step is not None:
                        self.on_step(self)
                finally:
                    self._stepping = False
                for e in sched.take_events():
                    self._check_call(call)
                    yield e

    def _step(self) -> None:
        """One forward pass of every running request: schedule, run (static bucket or dynamic), update."""
        t0 = time.perf_counter()
        desc = self.scheduler.schedule()
        read, masks_at = self.runner.run(desc)
        if self.tp is not None and debug_enabled():   # a rank whose tokens diverged (one sync: debug only)
            self.tp.check_read(read, self.step_index, self.device)
        self.step_index += 1
        self.scheduler.update_from_output(desc, read, masks_at, time.perf_counter() - t0)

    def _check_call(self, call: int) -> None:
        if self._call_id != call:
            raise RuntimeError(_ENDED)

    # ---- setup -------------------------------------------------------------------------------------------
    def _check_tags(self) -> None:
        if self.cfg.tags.max_id() >= self.geo["vocab_size"]:
            raise ValueError(f"control-tag ids {self.cfg.tags} do not fit the model's vocabulary "
                             f"({self.geo['vocab_size']}): pass DecodeConfig(tags=ControlTags(...))")

    def _start(self, prompts, forced_plans, seeds) -> None:
        """Check a call's arguments, then (only then) reset the decoder's state for it."""
        if self._stepping or self._generating:
            raise RuntimeError("Decoder.generate / stream was called while this Decoder is decoding (from on_step or "
                               "on_event?): a Decoder decodes one call at a time; use a second Decoder")
        cfg, V = self.cfg, self.geo["input_vocab_size"]   # prompts and forced plans are read by the embeddings
        if (self.cuda_graphs, self.static_step, self.buckets) != self._fixed:
            raise ValueError("Decoder.cuda_graphs / static_step / buckets are fixed when the Decoder is made (its "
                             "checks and buffers depend on them): make a new Decoder")
        check_decoder_args(self.model, cfg, self.max_batch, self.backend, self.on_step, self.buckets)
        check_model_state(self.model, self.device, self.dtype)
        self._check_tags()
        prompts = check_prompts(prompts, V)
        forced_plans = check_forced_plans(forced_plans, len(prompts), V, cfg.mode)
        seeds = check_seeds(seeds, len(prompts), cfg.seed)
        budgets = [cfg.budget(len(p)) for p in prompts]
        for i, (p, bud) in enumerate(zip(prompts, budgets)):
            if bud < 1:
                raise ValueError(f"prompt {i} has {len(p)} tokens: no room left under max_length={cfg.max_length}")
        g = CallGeometry.of(cfg, prompts, budgets, self.max_batch)
        if self.tp is not None:   # every rank must decode the same call: one fixed-size hash gathered
            self.tp.agree("the Decoder call (its settings, config, prompts, forced plans or seeds)",
                          (self._fixed, self.max_batch, self.backend, self.vocab_parallel, self.geo, cfg, prompts,
                           forced_plans, seeds), self.device)
        self._call_id += 1   # from here on the state is this call's: an open stream of an earlier call ends
        budget_name = "max_length" if cfg.max_length is not None else "max_new_tokens"
        buffers = self.runner.prepare(cfg, self.backend, g, budget_name)
        reqs = [Request(i, p, f, s, b, cdiv(len(p) + a, g.page_size))
                for i, (p, f, s, b, a) in enumerate(zip(prompts, forced_plans, seeds, budgets, g.answer))]
        self.scheduler = Scheduler(cfg, reqs, buffers)
        self.step_index = 0

    # ---- what on_step callbacks and tests look at ---------------------------------------------------------
    @property
    def running(self) -> list:
        """The requests being decoded now (:class:`~pd_kernels.decoder.request.Request`)."""
        return self.scheduler.running if self.scheduler is not None else []

    @property
    def graph_counts(self) -> dict:
        """Steps run ``dynamic``, ``static_eager`` and ``replayed``, graphs ``captured`` (over the Decoder's life)."""
        return self.runner.counts

    @property
    def cache(self):
        """The current call's :class:`~pd_kernels.PagedKVCache`."""
        return self.runner.buffers.cache

    @property
    def state(self):
        """The current call's :class:`~pd_kernels.SpanState`."""
        return self.runner.buffers.state

    @property
    def tokens(self) -> torch.Tensor:
        """The current call's token buffer ``[max_batch, cap]`` (row = a request's ``buffer_row``)."""
        return self.runner.buffers.tokens

    @property
    def tokens_flat(self) -> torch.Tensor:
        """The token buffer's rows, then the static step's scratch area (flat)."""
        return self.runner.buffers.tokens_flat

    # benchmarks/bench_overhead.py times the host side alone: it swaps the static device step for a recorded one
    # and reads whether a step reused the previous description
    @property
    def _static_body(self):
        return self.runner.static_body

    @_static_body.setter
    def _static_body(self, fn) -> None:
        self.runner.static_body = fn

    @property
    def _desc(self):
        return self.scheduler.desc if self.scheduler is not None else None


def generate(model, prompts, config=None, *, forced_plans=None, seeds=None, on_event=None, max_batch: int = 8,
             backend: str | None = None, on_step=None, cuda_graphs: bool = False, static_step: bool | None = None,
             buckets=None, vocab_parallel: bool | None = None) -> list[GenerationResult]:
    """Functional form of :meth:`Decoder.generate` (arguments as :class:`Decoder` and :meth:`Decoder.generate`)."""
    dec = Decoder(model, config, max_batch=max_batch, backend=backend, on_step=on_step, cuda_graphs=cuda_graphs,
                  static_step=static_step, buckets=buckets, vocab_parallel=vocab_parallel)
    return dec.generate(prompts, forced_plans, seeds=seeds, on_event=on_event)
