"""Incremental detokenization with stop strings, for streaming.

Each new token is decoded inside a short window of the latest token ids, so the cost per token
does not grow with the output, and tokenizers that drop a word's leading space at the start of a
decode still see some context (the window starts with a few earlier tokens: vLLM's prefix
offset). Of the window's text, the first `read_offset` characters are already taken; what
follows is new, except a trailing run of U+FFFD: the first bytes of a character whose other
bytes are still to come.

    window ids:   [context ..., new ...]
    window text:  taken[:read_offset] | new text | U+FFFD... (pending)

Streaming holds back the last `max_stop_len - 1` characters, which could be the start of a stop
string, until the request finishes; a stop string is never streamed unless
`include_stop_str_in_output`.
"""
from __future__ import annotations

from engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 4  # tokens kept before the new ones when the window slides
MAX_PENDING_TOKENS = 16  # a U+FFFD still unresolved after this many tokens is real output


def _trailing_replacements(text: str) -> int:
    return len(text) - len(text.rstrip(REPLACEMENT_CHAR))


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes the same text without transformers' per-call
        # Python wrapping (about 4x less host time per token at batch 256).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if hasattr(backend, "decode") else None
        self._skip_special = params.skip_special_tokens
        self._spaces_between_special = params.spaces_between_special_tokens
        self._stops = list(params.stop or ())
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens

        self._window = list(prompt_token_ids[-CONTEXT_TOKENS:])
        context = self._decode(self._window)
        self._read_offset = len(context)
        if context.endswith(REPLACEMENT_CHAR):
            self._window, self._read_offset = [], 0  # the prompt ends inside a character
        self._text = ""  # settled output text, stop-truncated
        self._pending = ""  # trailing U+FFFD run not settled yet
        self._num_tokens = 0
        self._streamed = 0  # characters of output_text returned by get_delta
        self.stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        return self._text + self._pending

    def _output_from(self, start: int, end: int | None = None) -> str:
        """output_text[start:end] without building the whole text (this runs for every token)."""
        settled = len(self._text)
        end = settled + len(self._pending) if end is None else end
        if start >= settled:
            return self._pending[start - settled:end - settled]
        return self._text[start:end] + (self._pending[:end - settled] if end > settled else "")

    @property
    def held_back(self) -> str:
        """Output text not yet returned by get_delta (a possible start of a stop string, bytes of
        an unfinished character): what get_delta(finished=True) would release now."""
        return self._output_from(self._streamed)

    @property
    def finished_by_stop(self) -> bool:
        return self.stop_reason is not None

    def append(self, token_id: int) -> str | None:
        """Adds one generated token; returns the stop string it completed, if any."""
        if self.stop_reason is not None:
            raise RuntimeError("append() after a stop string ended the output")
        self._num_tokens += 1
        self._window.append(token_id)
        settled_before = len(self._text)
        self._text += self._decode_new()
        if self._stops and self._num_tokens >= self._min_tokens:
            return self._find_stop(max(0, settled_before - self._holdback))
        return None

    def get_delta(self, finished: bool = False) -> str:
        """Text safe to stream since the last call; finished=True releases everything."""
        if finished or self.stop_reason is not None:
            end = len(self._text) + len(self._pending)
        else:
            end = len(self._text) - self._holdback
        if end <= self._streamed:
            return ""
        delta = self._output_from(self._streamed, end)
        self._streamed = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self._spaces_between_special)

    def _decode_new(self) -> str:
        """Settled text added by the last token; keeps the window short."""
        window = self._decode(self._window)
        unsettled = _trailing_replacements(window)
        settled_end = len(window) - unsettled
        new = window[self._read_offset:settled_end]
        self._read_offset = max(self._read_offset, settled_end)
        self._pending = window[self._read_offset:]
        if unsettled == 0 and len(self._window) > 2 * CONTEXT_TOKENS:
            self._window = self._window[-CONTEXT_TOKENS:]
            self._read_offset = len(self._decode(self._window))
        elif unsettled and len(self._window) > CONTEXT_TOKENS + MAX_PENDING_TOKENS:
            new += self._settle_invalid_bytes(window)
        return new

    def _settle_invalid_bytes(self, window: str) -> str:
        """The window has ended in U+FFFD for many tokens: bytes that will never form a character.

        They are text (decode() shows them as U+FFFD too). Only a character still being
        completed stays pending: at most 3 bytes, so within the last 3 tokens. Splits the window
        at the latest token boundary that decodes the same in two parts; returns the text before
        it not yet taken."""
        n = len(self._window)
        for cut in range(n - 1, max(n - 4, 0), -1):
            left, right = self._decode(self._window[:cut]), self._decode(self._window[cut:])
            if left + right == window:
                break
        else:
            cut, left, right = n, window, ""
        new = window[self._read_offset:len(left)]
        self._read_offset = max(self._read_offset - len(left), 0)
        self._window = self._window[cut:]
        self._pending = right[self._read_offset:]
        return new

    def _find_stop(self, start: int) -> str | None:
        """Earliest stop string in self._text[start:]; truncates the text at it."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            i = self._text.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        self._text = self._text[:i + len(stop) if self._include_stop else i]
        self._pending = ""
        self.stop_reason = stop
        return stop
