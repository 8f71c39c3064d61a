"""Stop sequences in streamed text: hand out text as soon as it cannot be the start of a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Feed text pieces; get back what is safe to show. Once a stop sequence appears, ``stopped`` is True and
    nothing from the stop sequence on is ever handed out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed so far
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the newly safe text."""
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit_to(cut)
        return self._emit_to(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The generation ended: hand out what was held back (it did not turn into a stop sequence)."""
        return "" if self.stopped else self._emit_to(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit_to(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
