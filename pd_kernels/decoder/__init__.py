"""The planned-diffusion decoder loop on the pd_kernels ops (SPEC sections 3-6).

* :class:`DecodeConfig` / :class:`ControlTags` - knobs and control-tag ids (Dream defaults);
* :func:`parse_plan` / :func:`make_plan` - plan entries <-> span lengths (forced plans for tests/demos);
* :class:`Decoder` / :func:`generate` - batched decoding in modes ``ar``, ``pd``, ``pd-da``, ``diffusion``;
* :class:`RequestStats` - critical path, tokens and wall time per phase.
"""
from .config import CONFIDENCES, MODES, POLICIES, ControlTags, DecodeConfig
from .loop import Decoder, GenerationResult, generate
from .plan import PlanEntry, make_plan, parse_plan
from .stats import RequestStats, format_table

__all__ = ["ControlTags", "DecodeConfig", "MODES", "POLICIES", "CONFIDENCES", "Decoder", "GenerationResult",
           "generate", "PlanEntry", "make_plan", "parse_plan", "RequestStats", "format_table"]
