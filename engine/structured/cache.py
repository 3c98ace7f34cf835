"""Compiled grammars for one tokenizer (LRU) and the per-request matcher.

Compiling a grammar against the vocabulary costs milliseconds to seconds (large schemas), so
compiled grammars are kept by spec; a matcher (the per-request state) is cheap to make from one.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.structured.spec import StructuredSpec

if TYPE_CHECKING:
    import torch

DEFAULT_CACHE_ENTRIES = 256


class GrammarState:
    """One request's position in its grammar: the mask of allowed next tokens, advanced by each
    sampled token. End-of-sequence is allowed only where the grammar is complete."""

    def __init__(self, matcher):
        self.matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advances by one token; False if the grammar does not allow it (the state is unchanged)."""
        if self.matcher.is_terminated():
            return False
        return self.matcher.accept_token(token_id)

    @property
    def is_completed(self) -> bool:
        return self.matcher.is_completed()

    @property
    def is_terminated(self) -> bool:
        """It accepted an end-of-sequence token: nothing may follow."""
        return self.matcher.is_terminated()


class GrammarCache:
    """`state(spec)` -> a fresh GrammarState; compiled grammars kept in an LRU of `max_entries`."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 max_entries: int = DEFAULT_CACHE_ENTRIES, max_threads: int = 2):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._compiled: collections.OrderedDict = collections.OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, spec: StructuredSpec):
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                self.hits += 1
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self.misses += 1
            self._compiled[spec] = compiled
            while len(self._compiled) > self._max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredSpec):
        grammar = spec.grammar()  # ValueError for a bad spec
        try:
            return self._compiler.compile_grammar(grammar)
        except RuntimeError as exc:
            raise ValueError(f"structured {spec.kind} could not be compiled: {str(exc)[:300]}") from None

    def state(self, spec: StructuredSpec) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(spec)))

    def __len__(self) -> int:
        return len(self._compiled)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every token allowed."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Sets to -inf, in place, the logits of `rows` whose token the bitmask forbids."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[1], indices=rows)
