"""``PagedKVCache``: page pools for every layer, a page allocator and per-sequence block tables."""
from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, cdiv
from .reference.paged_kv_write import gather_pages


class OutOfPages(RuntimeError):
    """Not enough free pages (or block-table columns) for a reservation; the cache is unchanged."""


class PagedKVCache:
    """Paged K/V storage for a whole model (SPEC section 6), vLLM/FlashInfer NHD layout.

    Attributes:
        k_cache, v_cache: ``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``; keys are stored
            after RoPE. ``k_cache[l]`` is the layer-``l`` cache the ops take.
        block_table: int32 ``[max_seqs, max_pages_per_seq]`` on the cache's device; row ``s`` lists the pages
            of sequence ``s`` (entries past its length are 0 and never read). Kernels read it directly.

    Sequence ids are rows of ``block_table``. All bookkeeping is on the host; each ``reserve`` that takes
    new pages writes the changed row with one host-to-device copy, and returns its slot mapping with one more
    (unless ``slots=False``).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int = 16,
                 *, max_seqs: int = 64, max_pages_per_seq: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda"):
        sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages,
                     page_size=page_size, max_seqs=max_seqs,
                     max_pages_per_seq=num_pages if max_pages_per_seq is None else max_pages_per_seq)
        num_layers, num_kv_heads, head_dim, num_pages, page_size, max_seqs, max_pages_per_seq = (
            _count(x, f"PagedKVCache: {name}", 1) for name, x in sizes.items())
        if num_pages * page_size >= 2**31:
            raise ValueError(f"PagedKVCache: num_pages * page_size = {num_pages * page_size} slots; at most 2^31 - 1 "
                             f"(page ids are int32 in the block table, positions int32 in the layouts)")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"PagedKVCache: dtype must be one of {[str(d) for d in FLOAT_DTYPES]} (what the ops "
                            f"take), got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.max_seqs = num_pages, page_size, max_seqs
        self.max_pages_per_seq = max_pages_per_seq
        self.device = torch.device(device)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.block_table = torch.zeros(max_seqs, self.max_pages_per_seq, dtype=torch.int32, device=self.device)
        self._free_pages = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._len: dict[int, int] = {}

    # ---- sequences -------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (its row in ``block_table``)."""
        if not self._free_rows:
            raise OutOfPages(f"all {self.max_seqs} sequence rows are in use")
        s = self._free_rows.pop()
        self._pages[s], self._len[s] = [], 0
        return s

    def free(self, seq: int) -> None:
        """Release a sequence and return its pages to the pool."""
        pages = self._pages.pop(self._check(seq))
        del self._len[seq]
        self._free_pages.extend(reversed(pages))
        self._free_rows.append(seq)

    def seq_len(self, seq: int) -> int:
        return self._len[self._check(seq)]

    def pages(self, seq: int) -> list[int]:
        return list(self._pages[self._check(seq)])

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def sequences(self) -> list[int]:
        return sorted(self._pages)

    def _check(self, seq: int) -> int:
        if isinstance(seq, bool) or seq not in self._pages:
            raise KeyError(f"sequence {seq} is not in the cache (live: {self.sequences})")
        return seq

    # ---- slots -----------------------------------------------------------------------------------
    def reserve(self, seq: int, n: int, *, slots: bool = True) -> torch.Tensor | None:
        """Append ``n`` positions to ``seq`` (an AR token, a prompt, a round of spans); return their slot
        mapping, int64 ``[n]`` on the cache device (``slots=False``: return ``None`` and skip that
        host-to-device copy, for callers that compute slots themselves, e.g. the decoder). Raises
        :class:`OutOfPages` and changes nothing if the pool or the block-table row is too small."""
        self._check(seq)
        n = _count(n, "reserve: n")
        start = self._len[seq]
        need = cdiv(start + n, self.page_size) - len(self._pages[seq])
        if need > len(self._free_pages):
            raise OutOfPages(f"sequence {seq} needs {need} more pages of {self.page_size} tokens for "
                             f"{n} new tokens, {len(self._free_pages)} free of {self.num_pages}")
        if len(self._pages[seq]) + need > self.max_pages_per_seq:
            raise OutOfPages(f"sequence {seq} would exceed max_pages_per_seq={self.max_pages_per_seq} "
                             f"({start + n} tokens of page size {self.page_size})")
        if need > 0:
            first = len(self._pages[seq])
            new = [self._free_pages.pop() for _ in range(need)]
            self._pages[seq].extend(new)
            self.block_table[seq, first:first + need] = torch.tensor(new, dtype=torch.int32).to(self.device)
        self._len[seq] = start + n
        return self.slot_mapping(seq, start, n) if slots else None

    def slot_mapping(self, seq: int, start: int, n: int) -> torch.Tensor:
        """Slots of positions ``[start, start + n)`` of ``seq`` (already reserved): int64 ``[n]``."""
        self._check(seq)
        start, n = _count(start, "slot_mapping: start"), _count(n, "slot_mapping: n")
        if start + n > self._len[seq]:
            raise IndexError(f"positions [{start}, {start + n}) outside sequence {seq} of length {self._len[seq]}")
        pos = torch.arange(start, start + n, dtype=torch.int64)
        pages = torch.tensor(self._pages[seq], dtype=torch.int64)
        slots = pages[pos // self.page_size] * self.page_size + pos % self.page_size if n else pos
        return slots.to(self.device)

    def truncate(self, seq: int, new_len: int) -> None:
        """Shorten ``seq`` to ``new_len`` tokens (e.g. drop a plan terminator); frees pages no longer used."""
        self._check(seq)
        new_len = _count(new_len, "truncate: new_len")
        if new_len > self._len[seq]:
            raise ValueError(f"truncate to {new_len}: sequence {seq} has {self._len[seq]} tokens")
        keep = cdiv(new_len, self.page_size)
        pages = self._pages[seq]
        self._free_pages.extend(reversed(pages[keep:]))
        del pages[keep:]
        self._len[seq] = new_len

    # ---- views -----------------------------------------------------------------------------------
    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache[layer], v_cache[layer])``, each ``[num_pages, page_size, Hkv, D]`` (views).

        ``layer`` must be in ``[0, num_layers)``: a negative index is an error, not the last layer (a model's
        ``layer_idx`` is never negative, so one here is a bug upstream)."""
        n = self.k_cache.shape[0]
        if isinstance(layer, bool) or not hasattr(layer, "__index__") or not 0 <= layer.__index__() < n:
            raise IndexError(f"PagedKVCache.layer: layer must be an int in [0, {n}), got {layer!r}")
        return self.k_cache[layer], self.v_cache[layer]

    def block_tables(self, seqs: list[int]) -> torch.Tensor:
        """Block-table rows of ``seqs`` in that order: int32 ``[len(seqs), max_pages_per_seq]``."""
        for s in seqs:
            self._check(s)
        if seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))):
            return self.block_table[seqs[0]:seqs[0] + len(seqs)]  # a view: no copy
        return self.block_table[torch.tensor(seqs, dtype=torch.long, device=self.device)]

    def gather(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(K, V)`` of a sequence at a layer, each ``[seq_len, Hkv, D]`` (tests, torch fallback)."""
        n = self.seq_len(seq)
        k, v = self.layer(layer)
        return gather_pages(k, self.block_table[seq], n), gather_pages(v, self.block_table[seq], n)


def _count(x, name: str, minimum: int = 0) -> int:
    """``x`` as an int ``>= minimum`` (any integer type, not bool), else a clear error naming it."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise TypeError(f"{name} must be an int, got {x!r}")
    x = x.__index__()
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x
