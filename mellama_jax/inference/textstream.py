"""Token ids to text as they arrive: whole characters only, and nothing past a stop string.

The text is always the decoding of every id so far (so streamed pieces join to what one `decode` gives);
a piece is released once the decoding has settled (no trailing replacement character from a half UTF-8
sequence) and once it cannot be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, decode, stop: Sequence[str] = (), prefix: Sequence[int] = ()):
        """`prefix`: ids decoded before the new ones but not released (echo's prompt: its text is sent apart,
        and the new text then keeps the space a word-initial token carries after it)."""
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = list(prefix)
        self.sent = decode(self.ids) if self.ids else ""  # text released so far (with the prefix's)
        self.start = len(self.sent)  # stop strings are looked for after the prefix
        self.stopped = False  # a stop string was reached: the text ends before it

    def push(self, token: int) -> str:
        """The new text `token` releases ("" while held back)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character
            return ""
        for s in self.stop:
            at = text.find(s, max(self.start, len(self.sent) - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._release(text[:at])
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(text[: len(text) - hold])

    def finish(self) -> str:
        """What is still held back once no token will follow."""
        return "" if self.stopped else self._release(self.decode(self.ids))

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new
