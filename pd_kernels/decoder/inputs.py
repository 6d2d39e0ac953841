"""Validation of what users hand to :class:`~pd_kernels.decoder.Decoder` and ``generate``: each bad value gets a
clear error naming the argument and the value, before anything is allocated or launched."""
from __future__ import annotations

import numpy as np
import torch

BACKENDS = (None, "auto", "torch", "triton", "cuda")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_ids(x, what: str, vocab: int, *, allow_empty: bool = False) -> list[int]:
    """``x`` (a list / tuple / 1-D tensor or array of ints) as a list of token ids in ``[0, vocab)``."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} is a {type(x).__name__} ({x[:40]!r}): token ids are needed, tokenize it first")
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim != 1:
            raise ValueError(f"{what} must be 1-D token ids, got a {type(x).__name__} of shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            integral = not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
        else:
            integral = np.issubdtype(x.dtype, np.integer)
        if not integral:
            raise TypeError(f"{what} must hold integer token ids, got dtype {x.dtype}")
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise ValueError(f"{what} is a tensor on the meta device: it holds no token ids")
        ids = [int(t) for t in x.tolist()]
    elif isinstance(x, (list, tuple)):
        for j, t in enumerate(x):
            if not _is_int(t):
                raise TypeError(f"{what}: token ids must be ints, got {type(t).__name__} {t!r} at position {j}")
        ids = [int(t) for t in x]
    else:
        raise TypeError(f"{what} must be a list of token ids, got {type(x).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"{what} is empty: a prompt needs at least one token")
    if ids:
        try:
            a = np.asarray(ids, dtype=np.int64)
            bad = np.nonzero((a < 0) | (a >= vocab))[0].tolist()
        except OverflowError:   # an id beyond int64: find it in Python
            bad = [j for j, t in enumerate(ids) if not 0 <= t < vocab]
        if bad:
            j = int(bad[0])
            raise ValueError(f"{what}: token id {ids[j]} at position {j} is outside the model's vocabulary "
                             f"[0, {vocab})")
    return ids


def check_prompts(prompts, vocab: int) -> list[list[int]]:
    """A list of prompts, each a list of token ids (a 2-D tensor / array: one prompt per row)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be a list of prompts (each a list of token ids), got a {type(prompts).__name__}:"
                        f" tokenize it first and pass [ids]")
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        if prompts.ndim == 1:
            raise TypeError(f"prompts must be a list of prompts, got a 1-D {type(prompts).__name__} of "
                            f"{prompts.shape[0]} ids: pass [ids] for one prompt")
        if prompts.ndim != 2:
            raise ValueError(f"prompts as a tensor must be 2-D [batch, length], got shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of prompts (each a list of token ids), got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("generate needs at least one prompt, got an empty list")
    if all(_is_int(t) for t in prompts):
        raise TypeError(f"prompts must be a list of prompts, got a flat list of {len(prompts)} token ids: "
                        f"pass [ids] for one prompt")
    return [_as_ids(p, f"prompt {i}", vocab) for i, p in enumerate(prompts)]


def check_forced_plans(forced_plans, n: int, vocab: int, mode: str) -> list:
    """``None`` or one entry per prompt: ``None`` or a list of rounds, each a list of token ids. ``mode="diffusion"``
    has no plan: an entry other than ``None`` is refused (it would be ignored)."""
    if forced_plans is None:
        return [None] * n
    if not isinstance(forced_plans, (list, tuple)):
        raise TypeError(f"forced_plans must be a list (one entry per prompt), got {type(forced_plans).__name__}")
    if len(forced_plans) != n:
        raise ValueError(f"{len(forced_plans)} forced plans for {n} prompts")
    out = []
    for i, f in enumerate(forced_plans):
        if f is None:
            out.append(None)
            continue
        if mode == "diffusion":
            raise ValueError(f"forced_plans[{i}] is given, but mode='diffusion' writes no plan (its answer is one "
                             f"canvas of masks): pass None for it, or forced_plans=None")
        if not isinstance(f, (list, tuple)) or any(_is_int(t) for t in f):
            raise TypeError(f"forced_plans[{i}] must be None or a list of rounds (each a list of token ids), "
                            f"got {f!r:.80}")
        out.append([_as_ids(rnd, f"forced_plans[{i}][{k}]", vocab, allow_empty=True) for k, rnd in enumerate(f)])
    return out


def check_seeds(seeds, n: int, default: int) -> list[int]:
    """One RNG seed per prompt (ints in ``[0, 2^63)``); ``None``: every request gets ``default``."""
    if seeds is None:
        return [default] * n
    if isinstance(seeds, (torch.Tensor, np.ndarray)):
        integral = (not (seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool)
                    if isinstance(seeds, torch.Tensor) else np.issubdtype(seeds.dtype, np.integer))
        if seeds.ndim != 1 or not integral:
            raise TypeError(f"seeds as a {type(seeds).__name__} must be 1-D integers (one per prompt), got shape "
                            f"{tuple(seeds.shape)} and dtype {seeds.dtype}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)):
        raise TypeError(f"seeds must be a list of ints (one per prompt), got {type(seeds).__name__}")
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    for i, s in enumerate(seeds):
        if not _is_int(s) or not 0 <= s < 2**63:
            raise ValueError(f"seeds[{i}] must be an int in [0, 2^63), got {s!r}")
    return [int(s) for s in seeds]


def check_decoder_args(model, config, max_batch, backend, on_step, buckets) -> tuple:
    from .config import DecodeConfig

    if config is None:
        config = DecodeConfig()
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    if not _is_int(max_batch) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable or None, got {type(on_step).__name__}")
    if buckets is not None:
        if isinstance(buckets, (str, bytes)) or not isinstance(buckets, (list, tuple)) or \
                not all(_is_int(b) for b in buckets):
            raise ValueError(f"buckets must be distinct positive sizes in ascending order, got {buckets!r}")
    return config, int(max_batch)


def check_model_state(model, device: torch.device | None = None, dtype: torch.dtype | None = None) -> tuple:
    """The model's parameter device and dtype, checked: eval mode, real weights (not the meta device), and, when
    ``device`` / ``dtype`` are given (what a :class:`~pd_kernels.decoder.Decoder` sized its buffers for), the
    same as then. Returns ``(device, dtype)``."""
    if getattr(model, "training", False):
        raise ValueError(f"{type(model).__name__} is in training mode: call model.eval() before decoding")
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError(f"{type(model).__name__} has no parameters")
    if p.device.type == "meta":
        raise ValueError(f"{type(model).__name__} is on the meta device (its weights are not loaded): load or "
                         f"materialize it before decoding")
    if device is not None and (p.device, p.dtype) != (device, dtype):
        raise ValueError(f"{type(model).__name__} is now {p.dtype} on {p.device}, but this Decoder was made for "
                         f"{dtype} on {device} (its cache and buffers are): make a new Decoder after moving or "
                         f"casting the model")
    return p.device, p.dtype


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


def check_cache_fits(*, what: str, nb: int, cap: int, num_pages: int, page_size: int, pages_per_seq: int,
                     n_scratch: int, geo: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Raise before allocating when the KV cache and token buffer of a ``generate`` call do not fit."""
    elem = torch.empty(0, dtype=dtype).element_size()
    kv = 2 * geo["num_layers"] * num_pages * page_size * geo["num_kv_heads"] * geo["head_dim"] * elem
    need = kv + (nb * cap + n_scratch) * 8 + nb * pages_per_seq * 4
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{what}: the KV cache and token buffer need {need / 2**30:.2f} GiB (batch {nb}, {cap} "
                         f"positions per request, {num_pages} pages of {page_size} tokens x {geo['num_layers']} "
                         f"layers x {geo['num_kv_heads']} KV heads x head dim {geo['head_dim']}, {dtype}), but "
                         f"only {free / 2**30:.2f} GiB are free on {device}: lower max_new_tokens / max_length, "
                         f"max_batch or num_pages")
