"""A completion's text as its tokens come, with the one stop-string rule of every door (OpenAI's).

The text ends before the first stop string, whole or streamed: streamed pieces hold back half a
UTF-8 character and any tail that may begin a stop string, so that the pieces joined equal the
whole text. ``Runtime.generate_text``, the CLI, the OpenAI server, the Triton model and
``sd_generate_text`` all cut their text here.
"""

from __future__ import annotations

from typing import Callable, Sequence


class CompletionText:
    """One choice's text as its tokens come, with OpenAI's stop semantics: the text ends before the
    first stop string. ``add`` returns what can be sent now (it holds back half a UTF-8 character and
    any tail that may begin a stop string); ``rest`` the remainder once the request is done. The
    deltas join to ``text()``."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: tuple[str, ...] = (),
                 tokens: Sequence[int] = ()) -> None:
        self.decode, self.stop = decode, stop
        self.tokens: list[int] = list(tokens)
        self.sent = ""

    def add(self, token: int) -> str:
        return self.extend([token])

    def extend(self, tokens: Sequence[int]) -> str:
        """Add several tokens; what can be sent now."""
        self.tokens.extend(tokens)
        if self.decode is None:
            return ""
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is None:
            cut = len(text) - self._unsafe_tail(text)
        return self._delta(text[:cut])

    def rest(self) -> str:
        return self._delta(self.text())

    def text(self) -> str:
        if self.decode is None:
            return ""
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        return text if cut is None else text[:cut]

    def _delta(self, visible: str) -> str:
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _unsafe_tail(self, text: str) -> int:
        tail = len(text) - len(text.rstrip("\ufffd"))  # an incomplete multi-byte character so far
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    tail = max(tail, k)
                    break
        return tail
