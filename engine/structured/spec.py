"""`StructuredSpec`: what a request's output must match (vLLM's structured outputs, OpenAI's
response_format), independent of any tokenizer.

    StructuredSpec("json_schema", '{"type": "object", ...}')
    StructuredSpec("json_object")            # any JSON object
    StructuredSpec("regex", "[0-9]{3}")
    StructuredSpec("choice", choices=("yes", "no"))
    StructuredSpec("grammar", 'root ::= "a" | "b"')   # EBNF (GBNF, xgrammar dialect)

`check()` parses it into a grammar (no tokenizer needed, sub-millisecond), so a bad schema,
regex or grammar is a ValueError where the request enters, never an error on a node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 256 * 1024  # schema / regex / grammar text
MAX_CHOICES = 1024
ANY_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class StructuredSpec:
    kind: str
    value: str = ""  # json_schema / regex / grammar text
    choices: tuple[str, ...] = ()  # choice only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.value, str) or len(self.value) > MAX_SPEC_CHARS:
            raise ValueError(f"structured {self.kind} must be a string of at most {MAX_SPEC_CHARS} characters")
        needs_value = self.kind in ("json_schema", "regex", "grammar")
        if needs_value and not self.value:
            raise ValueError(f"structured {self.kind} must not be empty")
        if self.kind == "choice":
            self._check_choices()

    def _check_choices(self) -> None:
        if not 1 <= len(self.choices) <= MAX_CHOICES:
            raise ValueError(f"structured choice must list 1 to {MAX_CHOICES} strings, got {len(self.choices)}")
        for c in self.choices:
            if not isinstance(c, str) or not c:
                raise ValueError("structured choice must hold non-empty strings")
        if sum(map(len, self.choices)) > MAX_SPEC_CHARS:
            raise ValueError(f"structured choice strings exceed {MAX_SPEC_CHARS} characters in all")

    @property
    def schema_text(self) -> str:
        """The JSON schema of a json_schema / json_object spec."""
        return ANY_OBJECT_SCHEMA if self.kind == "json_object" else self.value

    def ebnf(self) -> str:
        """choice as an EBNF alternation of JSON-escaped literals (EBNF strings escape like JSON)."""
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)

    def check_schema_json(self) -> None:
        """A json_schema / json_object spec's schema is a JSON object (cheap: no grammar is built);
        raises ValueError naming what is wrong."""
        try:
            schema = json.loads(self.schema_text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")

    def grammar(self):
        """The xgrammar `Grammar`; raises ValueError naming what is wrong."""
        import xgrammar as xgr

        try:
            if self.kind in ("json_schema", "json_object"):
                self.check_schema_json()
                # compact output: no free whitespace, so a complete value leaves only end-of-sequence
                return xgr.Grammar.from_json_schema(self.schema_text, any_whitespace=False, strict_mode=True)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.value)
            if self.kind == "choice":
                return xgr.Grammar.from_ebnf(self.ebnf())
            return xgr.Grammar.from_ebnf(self.value)
        except RuntimeError as exc:  # xgrammar's parse errors
            raise ValueError(f"invalid structured {self.kind}: {_xgr_message(exc)}") from None

    def check(self) -> None:
        self.grammar()


def spec_to_proto(spec: StructuredSpec):
    """-> pdserve.v1.StructuredOutput."""
    from protos.pdserve.v1 import generation_pb2 as pb

    if spec.kind == "choice":
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=spec.choices))
    if spec.kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    return pb.StructuredOutput(**{spec.kind: spec.value})


def spec_from_proto(msg) -> StructuredSpec | None:
    """pdserve.v1.StructuredOutput -> spec; None when no kind is set (or json_object is false).
    Raises ValueError on a bad spec shape (the grammar itself is parsed by `check()`)."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        return StructuredSpec("choice", choices=tuple(msg.choice.choices))
    if kind == "json_object":
        return StructuredSpec("json_object")
    return StructuredSpec(kind, getattr(msg, kind))


def _xgr_message(exc: Exception) -> str:
    """xgrammar prefixes its messages with '[time] /path/file.cc:line: '; keep the message."""
    text = str(exc).strip()
    head, sep, rest = text.partition(": ")
    return (rest if sep and ".cc:" in head else text)[:500]
