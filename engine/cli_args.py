"""Command-line flags shared by every process that runs an engine (names as in `vllm serve`).

Every flag has an environment-variable twin `PDSERVE_<FLAG_NAME>` (e.g. `--max-model-len` ->
`PDSERVE_MAX_MODEL_LEN`), read once, when the flags are added to the parser; a flag given on the
command line wins over its variable.

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(argv)
    engine_args = engine_args_from(args, role="decode")

The engine flags are not listed here: each is declared once, on its `EngineArgs` (or `NodeArgs`)
field (engine/config.py); `ENGINE_FLAGS` is that table, and `add_engine_args`, `engine_args_from`
and `engine_argv` (what `pdserve serve` forwards to its nodes) are loops over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Mapping

from engine.args import EngineArgs, Flag, NodeArgs  # torch-free: the router and gateway use these flags

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def env_name(flag: str) -> str:
    return "PDSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def _env_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SystemExit(f"{name}={value!r}: expected one of {', '.join(_TRUE + _FALSE[:-1])}")


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *,
             env: Mapping[str, str] | None = None, **kwargs) -> argparse.Action:
    """`parser.add_argument(flag, ...)` whose default comes from `PDSERVE_<FLAG>` when that is set."""
    env = os.environ if env is None else env
    name = env_name(flag)
    kwargs["help"] = f"{kwargs.get('help', '')} [env: {name}]".strip()
    if name in env:
        raw = env[name]
        if kwargs.get("action") in (argparse.BooleanOptionalAction, "store_true"):
            kwargs["default"] = _env_bool(name, raw)
        else:
            convert = kwargs.get("type", str)
            try:
                kwargs["default"] = convert(raw)
            except (TypeError, ValueError) as exc:
                raise SystemExit(f"{name}={raw!r}: {exc}") from None
            if "choices" in kwargs and kwargs["default"] not in kwargs["choices"]:
                raise SystemExit(f"{name}={raw!r}: choose from {', '.join(map(str, kwargs['choices']))}")
    if "default" in kwargs and kwargs.get("default") is not None and "%(default)" not in kwargs["help"]:
        kwargs["help"] += " (default: %(default)s)"
    return parser.add_argument(flag, **kwargs)


@dataclasses.dataclass(frozen=True)
class FlagField:
    """One row of the flag table: a config dataclass field and its `Flag`."""

    owner: type  # EngineArgs or NodeArgs
    name: str  # the field's name, also the argparse dest
    default: object
    flag: Flag

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool) or self.flag.negatable

    def add_to(self, parser, env: Mapping[str, str] | None) -> argparse.Action:
        kwargs: dict = {"default": self.default, "help": self.flag.help}
        if self.is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction if self.flag.negatable else "store_true"
        else:
            if self.flag.type is not None:
                kwargs["type"] = self.flag.type
            if self.flag.choices is not None:
                kwargs["choices"] = list(self.flag.choices)
        return add_flag(parser, self.option, env=env, **kwargs)

    def argv(self, value) -> list[str]:
        """The flags that reproduce `value` on a command line."""
        if self.is_bool:
            if value is None:
                return []
            if self.flag.negatable:
                return [self.option if value else "--no-" + self.option[2:]]
            return [self.option] if value else []
        return [] if value is None else [self.option, str(value)]


def flag_table(*owners: type) -> tuple[FlagField, ...]:
    """The fields of config dataclasses that are command-line flags, in declaration order."""
    rows = []
    for owner in owners:
        for f in dataclasses.fields(owner):
            if "flag" not in f.metadata:
                raise TypeError(f"{owner.__name__}.{f.name} declares neither flag(...) nor not_a_flag(...)")
            if f.metadata["flag"] is not None:
                rows.append(FlagField(owner, f.name, f.default, f.metadata["flag"]))
    return tuple(rows)


ENGINE_FLAGS = flag_table(EngineArgs, NodeArgs)


def add_server_args(parser: argparse.ArgumentParser, *, default_port: int, default_host: str = "127.0.0.1",
                    env: Mapping[str, str] | None = None) -> None:
    add_flag(parser, "--host", env=env, default=default_host,
             help="address to listen on; internal services bind loopback unless told otherwise")
    add_flag(parser, "--port", env=env, type=int, default=default_port, help="port to listen on (0 = any free port)")


def add_engine_args(parser: argparse.ArgumentParser, *, env: Mapping[str, str] | None = None,
                    default_port: int = 0, default_host: str = "127.0.0.1") -> argparse.ArgumentParser:
    """Adds the engine flags plus --host/--port/--kv-transport; returns the parser."""
    g = parser.add_argument_group("engine")
    for row in ENGINE_FLAGS:
        row.add_to(g, env)
    add_server_args(parser, default_port=default_port, default_host=default_host, env=env)
    return parser


def engine_args_from(ns: argparse.Namespace, role: str) -> EngineArgs:
    """EngineArgs for `role` ('both' | 'prefill' | 'decode') from parsed flags."""
    return EngineArgs(role=role, **{row.name: getattr(ns, row.name) for row in ENGINE_FLAGS if row.owner is EngineArgs})


def engine_argv(ns: argparse.Namespace) -> list[str]:
    """Every engine and node flag with a value, as a command line (`pdserve serve` -> its nodes):
    parsing it gives `ns`'s values back. Booleans: --x / --no-x (--x alone for store_true flags)."""
    return [arg for row in ENGINE_FLAGS for arg in row.argv(getattr(ns, row.name))]
