"""Training inputs of a planned-diffusion model, built from token ids (SPEC section 9).

A planned-diffusion training sequence holds the whole answer: prompt, plan, one
``<async>`` span ``</async>`` *block* per plan entry (spans padded with ``[PAD]``), ``<sync/>`` and the next
round where needed, EOS. From the ids alone this module builds what a fine-tuning loop needs:

* :func:`attention_mask` - who sees whom (bool ``[T, T]``, ``True`` = query row may attend to key column):
  causal by default; every token of a block sees every token of its block; a block sees everything before
  it except the other blocks of its round (``dense=True``, the PD-DA variant: it sees every block of its
  round); no token outside a block sees into it until a ``<sync/>``: from a ``<sync/>`` on, every token sees
  the blocks before it. This is the decoder's visibility (SPEC section 4) for all rounds at once.
* :func:`ar_labels` - the next-token target of every token outside a block, the *next token outside a
  block* (blocks are skipped: the last plan token of a round predicts its ``<sync/>`` or EOS).
* :func:`mask_spans` - the masked-diffusion targets: each block token (tags excluded) is replaced by MASK
  with probability ``t``; a masked position ``p`` is predicted from the hidden state at ``p - 1`` (the Dream
  shift), weight ``1 / t``.
* :func:`training_example` - all three for one sequence in one of the decoder's formats (``ar``, ``pd``,
  ``pd-da``, ``diffusion``), and :func:`collate` - a padded batch with an additive float mask for SDPA.

The loss of a batch is ``sum(weights * cross_entropy(logits, labels)) / normalizer`` (labels ``-100`` are
ignored); ``normalizer`` counts the AR targets plus every block token that may be masked, so the diffusion
term is an unbiased estimate of the per-token loss whatever ``t`` is.
"""
from __future__ import annotations

import torch

from .decoder.config import ControlTags

IGNORE = -100
FORMATS = ("ar", "pd", "pd-da", "diffusion")


def _ids(ids) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be a 1-D int32/int64 tensor (one sequence), got {tuple(t.shape)} {t.dtype}")
    return t.to(torch.int64)


def block_structure(ids, tags: ControlTags, *, diffusion_start: int | None = None):
    """Per token: ``block`` (int64 ``[T]``, index of the ``<async>...</async>`` block holding it, tags included,
    ``-1`` outside) and ``round`` (int64 ``[T]``, number of ``<sync/>`` tags at or before it).

    ``diffusion_start``: the diffusion format instead (no tags): tokens from ``diffusion_start`` to the end
    are one block (the prompt's last token, then the answer masks). Raises ``ValueError`` on unbalanced or
    nested tags."""
    ids = _ids(ids)
    T = ids.numel()
    opens, closes = ids == tags.async_open, ids == tags.async_close
    rnd = torch.cumsum((ids == tags.sync).long(), 0)
    if diffusion_start is not None:
        if not 0 <= diffusion_start < T:
            raise ValueError(f"diffusion_start={diffusion_start} outside the sequence of {T} tokens")
        if bool(opens.any() | closes.any()):
            raise ValueError("the diffusion format has no <async>/</async> blocks, found some")
        block = torch.full((T,), -1, dtype=torch.int64)
        block[diffusion_start:] = 0
        return block, rnd
    n_open = torch.cumsum(opens.long(), 0)                  # opens at or before t
    n_close_before = torch.cumsum(closes.long(), 0) - closes.long()
    depth = n_open - n_close_before                          # 1 inside a block (tags included), 0 outside
    if bool((depth < 0).any() | (depth > 1).any()) or int(opens.sum()) != int(closes.sum()):
        raise ValueError("unbalanced or nested <async>/</async> tags")
    if bool((closes & (depth != 1)).any()):
        raise ValueError("</async> without an open block")
    inside = depth == 1
    if bool((inside & (ids == tags.sync)).any()):
        raise ValueError("<sync/> inside an <async> block")
    block = torch.where(inside, n_open - 1, torch.full_like(n_open, -1))
    return block, rnd


def attention_mask(ids, tags: ControlTags, *, dense: bool = False, diffusion_start: int | None = None):
    """Bool ``[T, T]``: ``mask[q, k]`` is True when token ``q`` may attend to token ``k`` (module docstring).
    ``dense=True``: blocks of one round see each other (PD-DA). ``diffusion_start``: see :func:`block_structure`."""
    block, rnd = block_structure(ids, tags, diffusion_start=diffusion_start)
    T = block.numel()
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]
    kb = (block >= 0)[None, :]
    qb = (block >= 0)[:, None]
    same = kb & (block[:, None] == block[None, :])
    if dense:
        same = same | (kb & qb & (rnd[:, None] == rnd[None, :]))
    later_round = rnd[:, None] > rnd[None, :]   # a <sync/> lies between the key and the query
    return torch.where(kb, same | later_round, causal)


def ar_labels(ids, tags: ControlTags, *, response_start: int, diffusion_start: int | None = None):
    """Int64 ``[T]``: for each token outside a block at or after ``response_start - 1`` (the prompt's last
    token predicts the first response token), the id of the next token outside a block; ``-100`` elsewhere
    (prompt, blocks, the last token)."""
    ids = _ids(ids)
    block, _ = block_structure(ids, tags, diffusion_start=diffusion_start)
    labels = torch.full_like(ids, IGNORE)
    outside = torch.nonzero(block < 0).flatten()
    if outside.numel() > 1:
        src, dst = outside[:-1], outside[1:]
        keep = src >= response_start - 1
        labels[src[keep]] = ids[dst[keep]]
    return labels


def mask_spans(ids, tags: ControlTags, t: float, *, generator: torch.Generator | None = None,
               diffusion_start: int | None = None):
    """Masked-diffusion inputs: ``(noised [T], labels [T], weights [T], n_content)``.

    Every block token except the tags (diffusion format: every token after ``diffusion_start``) is replaced
    by MASK with probability ``t`` (``0 < t <= 1``); for each masked position ``p``, ``labels[p - 1]`` is the
    original token and ``weights[p - 1] = 1 / t``. ``n_content`` = the number of maskable tokens."""
    ids = _ids(ids)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    block, _ = block_structure(ids, tags, diffusion_start=diffusion_start)
    content = block >= 0
    if diffusion_start is not None:
        content[diffusion_start] = False
    else:
        content &= (ids != tags.async_open) & (ids != tags.async_close)
    masked = content & (torch.rand(ids.shape, generator=generator) < t)
    noised = torch.where(masked, torch.full_like(ids, tags.mask), ids)
    labels = torch.full_like(ids, IGNORE)
    weights = torch.zeros(ids.shape, dtype=torch.float32)
    p = torch.nonzero(masked).flatten()
    labels[p - 1] = ids[p]
    weights[p - 1] = 1.0 / t
    return noised, labels, weights, int(content.sum())


def training_example(ids, tags: ControlTags, *, fmt: str, response_start: int, t: float,
                     generator: torch.Generator | None = None) -> dict:
    """One sequence of format ``fmt`` (``"ar"``: plain causal LM; ``"pd"`` / ``"pd-da"``: planned diffusion
    with isolated / dense blocks; ``"diffusion"``: the response is one block anchored on the prompt's last
    token) -> ``{"input_ids", "mask" (bool [T, T]), "labels", "weights", "normalizer"}``.
    ``response_start``: index of the first token after the prompt."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    ids = _ids(ids)
    if not 1 <= response_start < ids.numel():
        raise ValueError(f"response_start={response_start} must leave a prompt token and a response token "
                         f"in a sequence of {ids.numel()}")
    if fmt == "ar":
        if bool(((ids == tags.async_open) | (ids == tags.async_close)).any()):
            raise ValueError("the ar format has no <async> blocks")
        labels = torch.full_like(ids, IGNORE)
        labels[response_start - 1:-1] = ids[response_start:]
        mask = torch.ones(ids.numel(), ids.numel(), dtype=torch.bool).tril()
        weights = (labels != IGNORE).float()
        return {"input_ids": ids, "mask": mask, "labels": labels, "weights": weights,
                "normalizer": float(weights.sum())}
    ds = response_start - 1 if fmt == "diffusion" else None
    mask = attention_mask(ids, tags, dense=fmt == "pd-da", diffusion_start=ds)
    noised, d_labels, d_weights, n_content = mask_spans(ids, tags, t, generator=generator, diffusion_start=ds)
    a_labels = ar_labels(ids, tags, response_start=response_start, diffusion_start=ds)
    is_ar = a_labels != IGNORE
    if bool((is_ar & (d_labels != IGNORE)).any()):  # cannot happen for well-formed ids: a label slot is one or the other
        raise AssertionError("an AR target and a diffusion target share a position")
    labels = torch.where(is_ar, a_labels, d_labels)
    weights = torch.where(is_ar, torch.ones_like(d_weights), d_weights)
    return {"input_ids": noised, "mask": mask, "labels": labels, "weights": weights,
            "normalizer": float(is_ar.sum()) + n_content}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Pad :func:`training_example` outputs to one batch: ``input_ids [B, T]``, ``attention_mask`` float
    ``[B, 1, T, T]`` (0 = visible, -inf = hidden; a padding query sees only itself), ``labels [B, T]``,
    ``weights [B, T]``, ``normalizer`` (a float, summed)."""
    B, T = len(examples), max(e["input_ids"].numel() for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    labels = torch.full((B, T), IGNORE, dtype=torch.int64)
    weights = torch.zeros(B, T)
    vis = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    for b, e in enumerate(examples):
        n = e["input_ids"].numel()
        ids[b, :n], labels[b, :n], weights[b, :n] = e["input_ids"], e["labels"], e["weights"]
        vis[b, :n, :n] = e["mask"]
    bias = torch.zeros(B, 1, T, T).masked_fill_(~vis[:, None], float("-inf"))
    return {"input_ids": ids, "attention_mask": bias, "labels": labels, "weights": weights,
            "normalizer": sum(e["normalizer"] for e in examples)}
