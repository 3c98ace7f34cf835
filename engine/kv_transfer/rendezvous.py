"""The key-value store a prefill/decode pair builds its torch.distributed group on, served by the
decode node's own gRPC server (`DecodeNode.KVRendezvous` on the node port: node key, TLS when
configured), so the KV path opens no store port of its own:

    prefill rank 0: GrpcPairStore ── KVRendezvous (blocking gRPC) ──►  PairStores on the decode node:
                                                                        pair key -> {key: value},
    decode rank 1:  LocalPairStore ─────────── in process ──────────►  in memory, thread-safe

Each pair key (`<instance>/<generation>/<secret>`, drawn by the prefill node for every pair group
and sent in the PushKV metadata) names one namespace; a store of either side sees only its pair's
namespace, so every key c10d writes (gloo's rank addresses, NCCL's unique id and its dump-signal
keys) lands there and is freed with the pair. (No PrefixStore in between: ProcessGroupNCCL also
writes to the store beneath one, outside the prefix.) Sizes are bounded (keys, values, keys per namespace
and per node); namespaces no group holds are swept after `stale_s` without a write.
"""
from __future__ import annotations

import asyncio
import datetime
import functools
import re
import secrets
import threading
import time

import grpc
import torch.distributed as dist

from engine.rpc.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, RpcError
from protos.pdserve.v1 import node_pb2, node_pb2_grpc

PAIR_METADATA_KEY = "x-pdserve-kv-pair"  # "<prefill instance>/<generation>/<secret>"
PAIR_SECRET_BYTES = 16
_PAIR_TAIL = re.compile(r"[0-9]{1,12}/[0-9a-f]{%d}" % (2 * PAIR_SECRET_BYTES))
RENDEZVOUS_GRPC = "grpc"  # ReserveResponse.rendezvous: the pair's store is this node's KVRendezvous RPC

MAX_PAIR_KEY_CHARS = 512
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS_PER_PAIR = 64  # gloo writes 2 for a pair, NCCL a few
MAX_KEYS = 4096
MAX_KEYS_PER_CALL = 64
MAX_WAIT_S = 600.0
STALE_S = 300.0  # a namespace no group holds (a sender that never got a group) lives this long after its last write
RPC_TIMEOUT_S = 10.0  # a store call that does not wait
RPC_SLACK_S = 5.0  # a waiting call's deadline beyond its wait, so the server's own timeout answer arrives

OP = node_pb2.KVStoreOp


def new_pair_key(instance: str, generation: int) -> str:
    """A pair group's namespace: unguessable, so it also binds the store keys to the PushKV call."""
    return f"{instance}/{generation}/{secrets.token_hex(PAIR_SECRET_BYTES)}"


def pair_instance(key: str, what: str = f"the {PAIR_METADATA_KEY} metadata") -> str:
    """The sender instance of a well-formed pair key; InvalidArgument otherwise."""
    parts = key.rsplit("/", 2)
    if (len(parts) != 3 or not parts[0] or len(key) > MAX_PAIR_KEY_CHARS
            or not _PAIR_TAIL.fullmatch(f"{parts[1]}/{parts[2]}")):
        raise InvalidArgument(f"{what} must be <instance>/<generation>/<secret of {2 * PAIR_SECRET_BYTES} hex "
                              f"digits>")
    return parts[0]


def _check_key(key: str) -> None:
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"a store key has at most {MAX_KEY_BYTES} bytes, got {len(key.encode())}")


def _check_value(value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"a store value has at most {MAX_VALUE_BYTES} bytes, got {len(value)}")


class PairStores:
    """The decode node's pair namespaces. One lock guards them; threads (the decode rank building or
    using its group) wait on its Condition, coroutines (KVRendezvous calls) on an asyncio.Event that
    every write sets from whichever thread wrote, so the event loop never waits on the lock."""

    def __init__(self, stale_s: float = STALE_S, clock=time.monotonic):
        self.stale_s = stale_s
        self._clock = clock
        self._cond = threading.Condition()
        self._spaces: dict[str, dict[str, bytes]] = {}  # pair key -> its keys
        self._written: dict[str, float] = {}  # pair key -> clock of its last write
        self._held: set[str] = set()  # pair keys whose group is built or building: never swept
        self._count = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # ---- namespaces ----------------------------------------------------------------------------
    def hold(self, pair: str) -> None:
        """A group is being built on `pair`: its namespace stays until `drop`."""
        with self._cond:
            self._held.add(pair)

    def drop(self, pair: str) -> None:
        """Frees a pair's keys (its group was dropped, or it was never built)."""
        with self._cond:
            self._held.discard(pair)
            self._count -= len(self._spaces.pop(pair, {}))
            self._written.pop(pair, None)

    def drop_others(self, pair: str) -> None:
        """Frees every other namespace of the pair's sender instance (its older generations)."""
        instance = pair_instance(pair)
        with self._cond:
            for old in [p for p in {*self._spaces, *self._held} if p != pair and pair_instance(p) == instance]:
                self.drop(old)

    @property
    def num_keys_total(self) -> int:
        return self._count

    def pairs(self) -> set[str]:
        with self._cond:
            return set(self._spaces)

    def _sweep(self) -> None:
        now = self._clock()
        for pair in [p for p, t in self._written.items() if p not in self._held and now - t > self.stale_s]:
            self.drop(pair)

    def _space_for_write(self, pair: str, key: str) -> dict[str, bytes]:
        """The namespace `key` is written into, after the size checks (lock held)."""
        _check_key(key)
        space = self._spaces.get(pair)
        if space is None or key not in space:
            if space is None:
                self._sweep()
            if space is not None and len(space) >= MAX_KEYS_PER_PAIR:
                raise ResourceExhausted(f"a KV pair's store holds at most {MAX_KEYS_PER_PAIR} keys")
            if self._count >= MAX_KEYS:
                raise ResourceExhausted(f"this node's KV rendezvous store holds at most {MAX_KEYS} keys")
            if space is None:
                space = self._spaces[pair] = {}
        return space

    def _changed(self, pair: str) -> None:
        """After a write (lock held): wakes every waiter."""
        self._written[pair] = self._clock()
        self._cond.notify_all()
        for loop, event in list(self._waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                self._waiters.discard((loop, event))

    # ---- operations (never wait) ------------------------------------------------------------
    def set(self, pair: str, key: str, value: bytes) -> None:
        _check_value(value)
        with self._cond:
            space = self._space_for_write(pair, key)
            self._count += key not in space
            space[key] = bytes(value)
            self._changed(pair)

    def get(self, pair: str, key: str) -> bytes | None:
        with self._cond:
            return self._spaces.get(pair, {}).get(key)

    def add(self, pair: str, key: str, amount: int) -> int:
        with self._cond:
            space = self._space_for_write(pair, key)
            try:
                number = int(space.get(key, b"0")) + amount
            except ValueError:
                raise InvalidArgument("ADD on a store key whose value is not a number") from None
            self._count += key not in space
            space[key] = str(number).encode()
            self._changed(pair)
            return number

    def compare_set(self, pair: str, key: str, expected: bytes, desired: bytes) -> bytes:
        """As c10d's stores: sets `desired` if the key holds `expected` (or is absent and `expected`
        is empty); returns what the key holds afterwards (`expected` if absent and not empty)."""
        _check_value(desired)
        with self._cond:
            current = self._spaces.get(pair, {}).get(key)
            if current is None and expected:
                return bytes(expected)
            if current is not None and current != expected:
                return current
            space = self._space_for_write(pair, key)
            self._count += key not in space
            space[key] = bytes(desired)
            self._changed(pair)
            return space[key]

    def check(self, pair: str, keys) -> bool:
        with self._cond:
            space = self._spaces.get(pair, {})
            return all(k in space for k in keys)

    def delete(self, pair: str, key: str) -> bool:
        with self._cond:
            space = self._spaces.get(pair)
            if space is None or key not in space:
                return False
            del space[key]
            self._count -= 1
            if not space and pair not in self._held:
                self.drop(pair)
            return True

    def num_keys(self, pair: str) -> int:
        with self._cond:
            return len(self._spaces.get(pair, {}))

    # ---- waiting --------------------------------------------------------------------------------
    def wait(self, pair: str, keys, timeout: float) -> bool:
        """Blocks the calling thread until every key exists (True) or `timeout` seconds passed."""
        with self._cond:
            return self._cond.wait_for(lambda: all(k in self._spaces.get(pair, {}) for k in keys), timeout)

    async def wait_async(self, pair: str, keys, timeout: float) -> bool:
        """As `wait`, for a coroutine: the event loop goes on meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = (loop, asyncio.Event())
        with self._cond:
            self._waiters.add(waiter)
        try:
            while True:
                waiter[1].clear()  # before the check: a write after it sets the event again
                if self.check(pair, keys):
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(waiter[1].wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            with self._cond:
                self._waiters.discard(waiter)


# ---- the KVRendezvous handler (decode node) -------------------------------------------------------
def _one_key(request) -> str:
    if len(request.keys) != 1:
        raise InvalidArgument(f"{OP.Name(request.op)} takes exactly one key, got {len(request.keys)}")
    return request.keys[0]


def _some_keys(request) -> list[str]:
    if not 1 <= len(request.keys) <= MAX_KEYS_PER_CALL:
        raise InvalidArgument(f"{OP.Name(request.op)} takes 1 to {MAX_KEYS_PER_CALL} keys, got {len(request.keys)}")
    keys = list(request.keys)
    for key in keys:
        _check_key(key)
    return keys


def _wait_budget(request, context) -> float:
    """Seconds a GET or WAIT may wait: its timeout_ms, within the call's deadline."""
    budget = min(request.timeout_ms / 1000.0, MAX_WAIT_S)
    remaining = context.time_remaining() if context is not None else None
    return budget if remaining is None else max(min(budget, remaining - 0.05), 0.0)


async def _waited(stores: PairStores, request, context, keys: list[str]) -> None:
    budget = _wait_budget(request, context)
    if not await stores.wait_async(request.pair, keys, budget):
        missing = [k for k in keys if stores.get(request.pair, k) is None]
        raise DeadlineExceeded(f"store key {missing[0][:80]!r} of the KV pair was not set within "
                               f"{budget * 1000:.0f} ms" if missing else "the store keys went away while waiting")


async def _get(stores, request, context):
    key = _one_key(request)
    _check_key(key)
    await _waited(stores, request, context, [key])
    value = stores.get(request.pair, key)
    if value is None:  # deleted in between
        raise DeadlineExceeded("the store key was deleted while waiting for it")
    return node_pb2.KVStoreResponse(value=value)


async def _wait(stores, request, context):
    await _waited(stores, request, context, _some_keys(request))
    return node_pb2.KVStoreResponse()


def _set(stores, request):
    stores.set(request.pair, _one_key(request), request.value)
    return node_pb2.KVStoreResponse()


def _add(stores, request):
    return node_pb2.KVStoreResponse(number=stores.add(request.pair, _one_key(request), request.amount))


def _check(stores, request):
    return node_pb2.KVStoreResponse(found=stores.check(request.pair, _some_keys(request)))


def _delete(stores, request):
    return node_pb2.KVStoreResponse(found=stores.delete(request.pair, _one_key(request)))


def _compare_set(stores, request):
    _check_value(request.expected)
    return node_pb2.KVStoreResponse(
        value=stores.compare_set(request.pair, _one_key(request), request.expected, request.value))


def _num_keys(stores, request):
    return node_pb2.KVStoreResponse(number=stores.num_keys(request.pair))


_IMMEDIATE = {OP.KV_STORE_OP_SET: _set, OP.KV_STORE_OP_ADD: _add, OP.KV_STORE_OP_CHECK: _check,
              OP.KV_STORE_OP_DELETE: _delete, OP.KV_STORE_OP_COMPARE_SET: _compare_set,
              OP.KV_STORE_OP_NUM_KEYS: _num_keys}
_WAITING = {OP.KV_STORE_OP_GET: _get, OP.KV_STORE_OP_WAIT: _wait}


async def serve(stores: PairStores, request: node_pb2.KVStoreRequest, context) -> node_pb2.KVStoreResponse:
    """One KVRendezvous call: a store operation in the namespace of a well-formed pair key."""
    pair_instance(request.pair, "a KV rendezvous pair")
    if request.op in _WAITING:
        return await _WAITING[request.op](stores, request, context)
    if request.op in _IMMEDIATE:
        return _IMMEDIATE[request.op](stores, request)
    raise InvalidArgument(f"unknown KV store operation {request.op}")


# ---- torch.distributed Stores of the two ranks -----------------------------------------------------
def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _seconds(timeout: datetime.timedelta | None, default: float) -> float:
    return default if timeout is None else timeout.total_seconds()


class _PairStore(dist.Store):
    """A torch.distributed Store over one pair's namespace (c10d calls it from its own threads).
    `getNumKeys` / `deleteKey` are the names c10d's C++ side looks up; `num_keys` / `delete_key`
    the Python ones."""

    def __init__(self, pair: str, timeout: float):
        super().__init__()
        self.pair = pair
        self.wait_s = timeout  # how long get / wait wait for a key

    def num_keys(self) -> int:
        return self.getNumKeys()

    def delete_key(self, key: str) -> bool:
        return self.deleteKey(key)


class LocalPairStore(_PairStore):
    """Decode side (rank 1): the pair's namespace in this process's PairStores."""

    def __init__(self, stores: PairStores, pair: str, timeout: float):
        super().__init__(pair, timeout)
        self.stores = stores

    def _do(self, fn, *args):
        try:
            return fn(self.pair, *args)
        except RpcError as exc:
            raise dist.DistStoreError(f"KV rendezvous store: {exc.message}") from None

    def set(self, key, value) -> None:
        self._do(self.stores.set, key, _bytes(value))

    def get(self, key) -> bytes:
        self.wait([key])
        value = self.stores.get(self.pair, key)
        if value is None:
            raise dist.DistStoreError("KV rendezvous store: the key was deleted while waiting for it")
        return value

    def add(self, key, amount) -> int:
        return self._do(self.stores.add, key, int(amount))

    def compare_set(self, key, expected, desired) -> bytes:
        return self._do(self.stores.compare_set, key, _bytes(expected), _bytes(desired))

    def check(self, keys) -> bool:
        return self.stores.check(self.pair, list(keys))

    def wait(self, keys, timeout: datetime.timedelta | None = None) -> None:
        wait_s = _seconds(timeout, self.wait_s)
        if not self.stores.wait(self.pair, list(keys), wait_s):
            raise dist.DistStoreError(f"KV rendezvous store: the peer did not set {list(keys)} within "
                                      f"{wait_s * 1000:.0f} ms")

    def deleteKey(self, key) -> bool:  # noqa: N802 - the name c10d calls
        return self.stores.delete(self.pair, key)

    def getNumKeys(self) -> int:  # noqa: N802 - the name c10d calls
        return self.stores.num_keys(self.pair)

    def clone(self) -> "LocalPairStore":
        return LocalPairStore(self.stores, self.pair, self.wait_s)


class GrpcPairStore(_PairStore):
    """Prefill side (rank 0): the pair's namespace on the decode node, one blocking KVRendezvous call
    per operation (`call`: the stub method with this node's key and TLS). Only c10d's threads and
    worker threads use it, never an event loop. Errors become DistStoreError (a RuntimeError)."""

    def __init__(self, call, pair: str, timeout: float):
        super().__init__(pair, timeout)
        self._call = call

    def _rpc(self, op: int, keys: list[str], wait_s: float = 0.0, **fields) -> node_pb2.KVStoreResponse:
        request = node_pb2.KVStoreRequest(op=op, pair=self.pair, keys=keys, timeout_ms=int(wait_s * 1000), **fields)
        try:
            return self._call(request, timeout=(wait_s + RPC_SLACK_S) if wait_s else RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise dist.DistStoreError(f"KV rendezvous {OP.Name(op)[12:]} on the decode node failed: "
                                      f"{exc.code().name}: {exc.details()}") from None

    def set(self, key, value) -> None:
        self._rpc(OP.KV_STORE_OP_SET, [key], value=_bytes(value))

    def get(self, key) -> bytes:
        return self._rpc(OP.KV_STORE_OP_GET, [key], self.wait_s).value

    def add(self, key, amount) -> int:
        return self._rpc(OP.KV_STORE_OP_ADD, [key], amount=int(amount)).number

    def compare_set(self, key, expected, desired) -> bytes:
        return self._rpc(OP.KV_STORE_OP_COMPARE_SET, [key], expected=_bytes(expected), value=_bytes(desired)).value

    def check(self, keys) -> bool:
        return self._rpc(OP.KV_STORE_OP_CHECK, list(keys)).found

    def wait(self, keys, timeout: datetime.timedelta | None = None) -> None:
        self._rpc(OP.KV_STORE_OP_WAIT, list(keys), _seconds(timeout, self.wait_s))

    def deleteKey(self, key) -> bool:  # noqa: N802 - the name c10d calls
        return self._rpc(OP.KV_STORE_OP_DELETE, [key]).found

    def getNumKeys(self) -> int:  # noqa: N802 - the name c10d calls
        return self._rpc(OP.KV_STORE_OP_NUM_KEYS, []).number

    def clone(self) -> "GrpcPairStore":
        return GrpcPairStore(self._call, self.pair, self.wait_s)


def rendezvous_call(channel: grpc.Channel, metadata) -> functools.partial:
    """The blocking KVRendezvous method of `channel`, with `metadata` (the node key) on every call."""
    return functools.partial(node_pb2_grpc.DecodeNodeStub(channel).KVRendezvous, metadata=tuple(metadata))
