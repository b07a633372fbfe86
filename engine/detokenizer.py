"""Incremental detokenization and stop strings for one completion.

Tokens arrive one at a time; text must stream without ever emitting half a
UTF-8 character, and the streamed pieces must add up to decoding the whole
sequence at once. Each new token decodes a short window of ids: the text of
``ids[prefix_offset:]`` minus the text of ``ids[prefix_offset:read_offset]``
is the new part; while it ends in U+FFFD (an incomplete byte sequence) we
wait for more tokens.

Stop strings are searched only in the newly decoded tail (plus the longest
stop string's length of earlier text), and text that could still turn into a
stop string is held back from the stream until it cannot.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        hf_tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._tok = hf_tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self._hold_back = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._num_emitted_chars = 0
        self._stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string it completed, if any."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return None
        search_from = max(0, len(self.text) - self._hold_back)
        self.text += new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return self._find_stop(search_from) if check_stop and self.stop else None

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[:idx + len(s)] if self.include_stop_str_in_output else self.text[:idx]
        self._stopped = True
        return s

    def finish(self) -> None:
        """Flush: the text becomes exactly the decode of every token.

        Only a trailing incomplete character (or a model-produced U+FFFD) can
        still be pending here; a stop string already fixed the text.
        """
        if self._stopped:
            return
        full = self._decode(self.token_ids)
        if full.startswith(self.text):
            self.text = full

    def take_delta(self, finished: bool) -> str:
        """The text not yet streamed, holding back a possible stop-string start."""
        end = len(self.text) if finished else max(self._num_emitted_chars, len(self.text) - self._hold_back)
        delta = self.text[self._num_emitted_chars:end]
        self._num_emitted_chars = end
        return delta
