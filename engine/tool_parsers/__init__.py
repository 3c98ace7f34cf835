"""Tool-call parsers (`--tool-call-parser hermes|llama3_json|mistral|pythonic`): model output ->
OpenAI `tool_calls`, whole or as streamed `delta.tool_calls`."""
from engine.tool_parsers import formats  # noqa: F401  (registers the parsers)
from engine.tool_parsers.base import PARSERS, Parsed, ParsedCall, ToolParser, get_parser
from engine.tool_parsers.formats import NamedFunctionOutput, RequiredOutput
from engine.tool_parsers.stream import ToolCallStream, tool_calls_json

__all__ = ["PARSERS", "Parsed", "ParsedCall", "ToolParser", "get_parser", "NamedFunctionOutput",
           "RequiredOutput", "ToolCallStream", "tool_calls_json"]
