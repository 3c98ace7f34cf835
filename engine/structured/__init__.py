"""Structured outputs (JSON schema, regex, choice, grammar) with xgrammar.

`StructuredSpec` says what the output must match (no tokenizer); `GrammarCache` compiles specs
for one tokenizer (LRU) and makes the per-request `GrammarState`, whose token bitmask the batched
sampler applies before sampling.
"""
from engine.structured.cache import GrammarCache, GrammarState, allocate_bitmask, apply_bitmask
from engine.structured.spec import KINDS, StructuredSpec

__all__ = ["StructuredSpec", "KINDS", "GrammarCache", "GrammarState", "allocate_bitmask", "apply_bitmask"]
