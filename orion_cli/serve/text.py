"""Token ids to text as they arrive, with stop strings.

Fast tokenizers decode incrementally through tokenizers' DecodeStream, which
holds back bytes of a character split across tokens. Text that could be the
start of a stop string is held back until it is known not to be one, so a
stream never shows a stop string and the streamed pieces always join into the
non-streamed text.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None):
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self._ids: list[int] = []
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self._emitted = 0

    def _decode_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        # slow tokenizers: decode everything and take what is new, unless it ends mid-character
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        return full[len(self.text):]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to send now, whether a stop string ended the text)."""
        piece = self._decode_step(token_id)
        if not piece:
            return "", False
        before = len(self.text)
        self.text += piece
        if self.stop:
            search_from = max(0, before - self._hold)
            hits = [at for s in self.stop if (at := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        ready = len(self.text) - self._hold
        if ready <= self._emitted:
            return "", False
        delta = self.text[self._emitted:ready]
        self._emitted = ready
        return delta, False

    def finish(self) -> str:
        """The rest of the text when generation ends without a stop string. A last token that ends inside a
        UTF-8 character leaves bytes the incremental decoder holds back; decoding every token, as
        transformers does, shows them as U+FFFD, and so does the finished text."""
        whole = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if len(whole) > len(self.text) and whole.startswith(self.text):
            self.text = whole
        return self.flush()

    def flush(self) -> str:
        """Whatever is still held back, at the end of the request."""
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta
