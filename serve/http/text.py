"""Token ids -> streamed text: incremental detokenisation and stop strings.

`TextStream` turns a completion's token ids, as they arrive round by round, into text
deltas. A delta never ends inside a multi-byte UTF-8 character: while the newest tokens
decode to a replacement character (a byte sequence cut short), their text is held back
until the tokens that complete it arrive. Only a short window of recent tokens is
re-decoded each time, so the cost per round does not grow with the completion.

With stop strings, text that might be the start of a stop string is held back too; when
a stop string appears, the text before it is the last delta, the stream is `stopped`
and `tokens` counts the ids up to and including the one that completed the match.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Detokenise one completion incrementally; cut it at the first stop string."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self._start = 0      # first id of the decode window
        self._read = 0       # ids before this one have been turned into text
        self._held = ""      # decoded text not yet sent: it may begin a stop string
        self.text = ""       # everything sent so far
        self.stopped = False  # a stop string was found (the text ends before it)
        self.tokens = 0      # ids that count towards the completion (all, or up to the stop)

    def add(self, tokens: Sequence[int]) -> str:
        """Take a round's new ids; return the text that may be sent now ("" if none)."""
        if self.stopped:
            return ""
        if not self.stops:
            self.ids.extend(tokens)
            self.tokens = len(self.ids)
            return self._send(self._decode_new())
        out = []
        for t in tokens:  # one id at a time, so a stop string is found at the id that completes it
            self.ids.append(t)
            self.tokens = len(self.ids)
            out.append(self._send(self._decode_new()))
            if self.stopped:
                break
        return "".join(out)

    def finish(self) -> str:
        """The completion ended: return whatever is still held back (the stop check applies)."""
        if self.stopped:
            return ""
        prev = self.tokenizer.decode(self.ids[self._start:self._read])
        tail = self.tokenizer.decode(self.ids[self._start:])[len(prev):]
        self._read = len(self.ids)
        text = self._send(tail)
        if not self.stopped and self._held:  # a stop string's prefix that no stop string followed
            held, self._held = self._held, ""
            self.text += held
            text += held
        return text

    def _decode_new(self) -> str:
        """Text of the ids past `_read`, or "" while it would end in a broken character."""
        if len(self.ids) == self._read:
            return ""
        prev = self.tokenizer.decode(self.ids[self._start:self._read])
        full = self.tokenizer.decode(self.ids[self._start:])
        if len(full) <= len(prev) or full.endswith(REPLACEMENT):
            return ""  # the newest ids do not finish a character yet
        self._start, self._read = self._read, len(self.ids)
        return full[len(prev):]

    def _send(self, new: str) -> str:
        """Apply the stop strings to held + new text; keep back a possible stop prefix."""
        if not new:
            return ""
        text = self._held + new
        if self.stops:
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self._held, self.stopped = "", True
                self.text += text[:cut]
                return text[:cut]
            keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self.text += text
        return text
