"""The planned-diffusion decoder loop on the pd_kernels ops (SPEC sections 3-6).

* :class:`DecodeConfig` / :class:`ControlTags` - knobs and control-tag ids (Dream defaults), presets;
* :func:`parse_plan` / :func:`make_plan` - plan entries <-> span lengths (forced plans for tests/demos);
* :class:`Decoder` / :func:`generate` - batched decoding in modes ``ar``, ``pd``, ``pd-da``, ``diffusion``;
  :meth:`Decoder.stream` - the same as a stream of :mod:`~pd_kernels.decoder.events`;
* :class:`RequestStats` - critical path, tokens and wall time per phase.

Inside: :mod:`.loop` (the loop), :mod:`.scheduler` (admission, the step description, advancing requests),
:mod:`.request` (request and round state), :mod:`.step` (the step description and its device form),
:mod:`.runner` (device buffers, the one device step), :mod:`.graphs` (buckets and CUDA graphs).
"""
from . import events
from .config import CONFIDENCES, MODES, POLICIES, PRESETS, ControlTags, DecodeConfig
from .events import PlanToken, RequestFinished, RoundFinished, RoundStarted, SpanCommit, SpanFinished
from .loop import Decoder, generate
from .plan import PlanEntry, make_plan, parse_plan
from .request import GenerationResult
from .stats import RequestStats, format_table

__all__ = ["ControlTags", "DecodeConfig", "MODES", "POLICIES", "CONFIDENCES", "PRESETS", "Decoder",
           "GenerationResult", "generate", "PlanEntry", "make_plan", "parse_plan", "RequestStats", "format_table",
           "events", "PlanToken", "RoundStarted", "SpanCommit", "SpanFinished", "RoundFinished", "RequestFinished"]
