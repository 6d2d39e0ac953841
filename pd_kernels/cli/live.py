"""The demo's live view of one request, drawn from the decoder's stream of events."""
from __future__ import annotations

import shutil
import sys

from ..decoder import RoundFinished, RoundStarted, SpanCommit, SpanFinished

COLORS = ["\x1b[36m", "\x1b[33m", "\x1b[35m", "\x1b[32m", "\x1b[34m", "\x1b[31m"]
DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"


class Live:
    """The live view of request 0, drawn from the decoder's stream events (:meth:`pd_kernels.Decoder.stream`).

    Per round: the plan, then the spans filling in (one line per span, redrawn in place on a terminal). A span's
    text is final when it finishes, so the finished spans are shown in order as soon as every span before them
    is final, while later ones are still diffusing: on a terminal in a "final so far" line, otherwise as one
    ``span j final: ...`` line each, saying which spans are still diffusing."""

    def __init__(self, decode, tags, tty: bool):
        self.decode, self.mask, self.tty = decode, tags.mask, tty
        self.hidden = set(tags.specials)   # not part of the answer text
        self.drawn = 0

    def __call__(self, ev) -> None:
        if ev.request != 0:
            return
        if isinstance(ev, RoundStarted):
            plan = self.decode(list(ev.plan)) if ev.plan else f"(none: one answer block of {ev.span_lengths[0]} masks)"
            print(f"{BOLD if self.tty else ''}round {ev.round}: plan{RESET if self.tty else ''} {plan}")
            self.spans = [[self.mask] * n for n in ev.span_lengths]
            self.starts, self.final, self.shown, self.drawn = ev.span_starts, [False] * len(ev.span_lengths), 0, 0
        elif isinstance(ev, SpanCommit):
            for p, t in zip(ev.positions, ev.tokens):
                self.spans[ev.span][p - self.starts[ev.span]] = t
        elif isinstance(ev, SpanFinished):
            self.spans[ev.span], self.final[ev.span] = list(ev.tokens), True
            while self.shown < len(self.final) and self.final[self.shown]:   # finished spans, in order
                if not self.tty:
                    busy = [str(j) for j, f in enumerate(self.final) if not f]
                    tail = f"   (span {', '.join(busy)} still diffusing)" if busy else ""
                    print(f"  span {self.shown} final: {self._text(self.spans[self.shown])}{tail}")
                self.shown += 1
        elif not isinstance(ev, RoundFinished):
            return
        if self.tty:
            self._draw()

    def _text(self, toks) -> str:
        return self.decode([t for t in toks if t not in self.hidden])

    def _draw(self) -> None:
        width = shutil.get_terminal_size().columns
        lines = []
        for j, toks in enumerate(self.spans):   # one terminal row per span (a wrapped row breaks the redraw)
            c, room, parts = COLORS[j % len(COLORS)], width - 22, []
            for t in toks:
                piece = "_" if t == self.mask else self.decode([t])
                room -= len(piece)
                if room < 1:
                    parts.append("...")
                    break
                parts.append(f"{DIM}_{RESET}" if t == self.mask else f"{c}{piece}{RESET}")
            done = sum(t != self.mask for t in toks)
            lines.append(f"  span {j} [{done:3d}/{len(toks)}]{'*' if self.final[j] else ' '}{''.join(parts)}")
        final = "".join(self._text(self.spans[j]) for j in range(self.shown))
        lines.append(f"  {BOLD}final so far:{RESET} {final[-(width - 16):] if final else '...'}")
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}A")
        for ln in lines:
            sys.stdout.write("\x1b[2K" + ln + "\n")
        self.drawn = len(lines)
        sys.stdout.flush()
