"""Who may call what on the router's port.

- pdserve.v1.Generation: a client API key (`--api-key`) or an admin key (`--admin-key`), when any
  is set; the key also scopes what a caller sees (`caller()`): Abort and GetLoads only reach the
  caller's own requests, an admin key reaches every request.
- pdserve.v1.RouterControl (node Register / Heartbeat): only the node key (`--node-key`); client
  keys never do. With API keys but no node key, RouterControl is switched off.
- Health and reflection stay open.
"""
from __future__ import annotations

import hashlib

from engine.rpc.security import KeyInterceptor, bearer_ok

GENERATION_PREFIX = "/pdserve.v1.Generation/"
CONTROL_PREFIX = "/pdserve.v1.RouterControl/"
ADMIN = "*admin*"  # the scope of an admin key: every request


def router_interceptor(api_keys: list[str], admin_keys: list[str], node_key: str | None) -> KeyInterceptor | None:
    rules = []
    client_keys = [*api_keys, *admin_keys]
    if client_keys:
        rules.append((GENERATION_PREFIX, client_keys, "API key"))
    if node_key or client_keys:
        rules.append((CONTROL_PREFIX, [node_key] if node_key else [], "node key"))
    return KeyInterceptor(rules) if rules else None


class Scopes:
    """The caller's scope from its key: a stable digest of an API key, ADMIN for an admin key, ""
    when the router runs without keys (then every caller shares one scope)."""

    def __init__(self, admin_keys: list[str]):
        self._admin = [k.encode() for k in admin_keys if k]

    def caller(self, context) -> str:
        metadata = context.invocation_metadata() or ()
        if self._admin and bearer_ok(metadata, self._admin):
            return ADMIN
        for key, value in metadata:
            if key == "authorization":
                return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()[:16]
        return ""
