"""The queries of one sequence in one forward pass (:class:`SeqQueries`) and what each of them sees (SPEC
section 4); :class:`~pd_kernels.SpanLayout` packs them. See :mod:`pd_kernels.layout` for the table of ranges."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeqQueries:
    """The queries of one sequence in one forward pass. Build with :meth:`causal` or :meth:`spans`."""

    kind: str
    start: int = 0
    length: int = 0
    prefix: int = 0
    span_lens: tuple[int, ...] = ()
    active: tuple[bool, ...] = ()
    mode: str = "pd"

    @staticmethod
    def causal(start: int, length: int) -> "SeqQueries":
        """Queries at positions ``[start, start + length)``; position ``i`` sees keys ``[0, i]``.

        Prefill: ``start`` = tokens already cached (often 0). AR decode and ``<sync/>``: ``length = 1``.
        """
        start, length = _as_int(start, "start"), _as_int(length, "length")
        if start < 0 or length < 0:
            raise ValueError(f"SeqQueries.causal needs start >= 0 and length >= 0, got ({start}, {length})")
        return SeqQueries("causal", start=start, length=length)

    @staticmethod
    def spans(prefix: int, span_lens, active=None, mode: str = "pd") -> "SeqQueries":
        """The spans of a diffusion round, right after a prefix of ``prefix`` tokens.

        Span ``j`` covers ``[prefix + sum(span_lens[:j]), + span_lens[j])`` (tags included). The queries
        are every token of every active span (``active`` defaults to all), in position order.
        ``mode="pd"``: a span token sees ``[0, prefix)`` and its own span; ``"pd-da"``: it sees
        ``[0, prefix + sum(span_lens))`` (all spans of the round, active or finished).
        """
        prefix = _as_int(prefix, "prefix")
        if prefix < 0:
            raise ValueError(f"SeqQueries.spans needs prefix >= 0, got {prefix}")
        lens = tuple(_as_int(n, "span length") for n in span_lens)
        bad = [(j, n) for j, n in enumerate(lens) if n < 1]
        if bad:
            raise ValueError(f"SeqQueries.spans: span lengths must be >= 1 (spans are laid out one after "
                             f"another and may not overlap or be empty), got (index, length) {bad}")
        if active is None:
            act = (True,) * len(lens)
        else:
            try:
                act = tuple(active)
            except TypeError:
                raise TypeError(f"SeqQueries.spans: active must be a sequence of bools, one per span, got "
                                f"{type(active).__name__}") from None
            bad = [x for x in act if not isinstance(x, (bool, np.bool_)) and not (isinstance(x, (int, np.integer))
                                                                                  and x in (0, 1))]
            if bad:
                raise TypeError(f"SeqQueries.spans: active flags must be bools (or 0 / 1), got {bad[:4]}")
            act = tuple(bool(x) for x in act)
            if len(act) != len(lens):
                raise ValueError(f"SeqQueries.spans: {len(act)} active flags for {len(lens)} spans")
        if mode not in ("pd", "pd-da"):
            raise ValueError(f"SeqQueries.spans: mode must be 'pd' or 'pd-da', got {mode!r}")
        return SeqQueries("spans", prefix=prefix, span_lens=lens, active=act, mode=mode)

    @functools.cached_property
    def _parts(self) -> tuple[tuple, tuple, int]:
        """``(runs, segments, max_key)`` of this sequence, rows counted from its first query (computed once per
        object: the decoder keeps a request's :class:`SeqQueries` while the request does not change).

        A *run* ``(row, n, pos0, a, b, c, causal)`` is ``n`` query rows at consecutive positions from ``pos0``
        with the same key ranges (a causal run: row ``i`` sees ``[0, pos0 + i + 1)``, its ``a, b, c`` are 0);
        a *segment* has the same columns (see the module docstring; a PD-DA round is one segment made of one
        run per active span, its ``pos0`` the first run's). ``max_key``: the largest visible key + 1."""
        if self.kind == "causal":
            if not self.length:
                return (), (), 0
            run = (0, self.length, self.start, 0, 0, 0, 1)
            return (run,), (run,), self.start + self.length
        p = pos = self.prefix
        runs, row = [], 0
        if self.mode == "pd":
            for n, act in zip(self.span_lens, self.active):
                if act:
                    runs.append((row, n, pos, p, pos, pos + n, 0))
                    row += n
                pos += n
            return tuple(runs), tuple(runs), max((max(p, r[5]) for r in runs), default=0)
        end = p + sum(self.span_lens)   # pd-da: every active query sees the same keys
        for n, act in zip(self.span_lens, self.active):
            if act:
                runs.append((row, n, pos, end, end, end, 0))
                row += n
            pos += n
        if not runs:
            return (), (), 0
        return tuple(runs), ((0, row, runs[0][2], end, end, end, 0),), end

    def segments(self) -> list[tuple[int, int, int, int, int, int]]:
        """``(pos0, n, a, b, c, causal)`` of each segment (a causal segment's ``a, b, c`` are per tile)."""
        return [sg[1:] for sg in self._parts[1]]

    def positions(self) -> np.ndarray:
        if self.kind == "causal":
            return np.arange(self.start, self.start + self.length, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(self.span_lens, dtype=np.int64)]) + self.prefix
        parts = [np.arange(starts[j], starts[j] + n, dtype=np.int64)
                 for j, n in enumerate(self.span_lens) if self.active[j]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def num_queries(self) -> int:
        if self.kind == "causal":
            return self.length
        return sum(n for n, a in zip(self.span_lens, self.active) if a)


def _as_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return int(x)
