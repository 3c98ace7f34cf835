"""Issue 14 item 1 on the torch.distributed KV path (CPU, gloo): a pair group's store is the decode
node's `DecodeNode.KVRendezvous` RPC on its node port (node key, TLS), not an open TCPStore. A real
in-process DecodeNode server: a gloo pair built over it sends a tensor; calls without the node key
are refused UNAUTHENTICATED; pairs without a well-formed secret, oversize keys and values and too
many keys are refused with their codes; a GET of a missing key ends in a clear DEADLINE_EXCEEDED
without blocking the node's event loop; a dropped pair frees its keys. A TP group's store (not on
the KV path) is a file in a fresh directory only the node's user can open, with no listening socket,
and the directory is gone once the store is closed."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
import torch.distributed as dist

from decode_node.servicer import DecodeServicer
from engine.kv_transfer import rendezvous as rdv
from engine.kv_transfer.grpc_transport import Channels
from engine.kv_transfer.rendezvous import GrpcPairStore, PairStores, rendezvous_call
from engine.kv_transfer.torch_dist import (PAIR_SECRET_BYTES, RECEIVER_RANK, SENDER_RANK, TorchDistHost,
                                           TorchDistKVSender, make_pair_group, new_pair_key, pair_instance)
from engine.parallel import group as tp_group
from engine.rpc.channel import sync_channel
from engine.rpc.errors import InvalidArgument
from engine.rpc.security import ClientSecurity, Security
from engine.rpc.server import build_server
from protos.pdserve.v1 import node_pb2, node_pb2_grpc
from tests.services.test_rel_tls import pki  # noqa: F401 - the module's certificates fixture

NODE_KEY = "rendezvous-node-key"
OP = node_pb2.KVStoreOp
CPU = torch.device("cpu")


@dataclass
class StoreServer:
    """A DecodeNode server in this process (its own event loop thread) whose servicer has only its
    torch.distributed host attached: what KVRendezvous needs."""

    address: str
    host: TorchDistHost
    loop: asyncio.AbstractEventLoop

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, request: node_pb2.KVStoreRequest, key: str | None = NODE_KEY, timeout: float = 10.0):
        with sync_channel(self.address) as channel:
            metadata = (("authorization", f"Bearer {key}"),) if key else ()
            return node_pb2_grpc.DecodeNodeStub(channel).KVRendezvous(request, metadata=metadata, timeout=timeout)


@contextlib.contextmanager
def store_server(node_key: str | None = NODE_KEY, pki_paths: dict | None = None):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    security = Security(node_key=node_key, tls_cert=pki_paths and pki_paths["server"],
                        tls_key=pki_paths and pki_paths["server_key"])

    async def start():
        servicer = DecodeServicer()
        servicer.dist = TorchDistHost("127.0.0.1")
        interceptor = security.node_key_interceptor()
        server = build_server([(node_pb2_grpc.add_DecodeNodeServicer_to_server, servicer)],
                              interceptors=[interceptor] if interceptor else [],
                              credentials=security.server_credentials())
        await server.start()
        return server, servicer
    server, servicer = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield StoreServer(server.address, servicer.dist, loop)
    finally:
        servicer.dist.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def server():
    with store_server() as s:
        yield s


def _request(op: int, pair: str, *keys: str, **fields) -> node_pb2.KVStoreRequest:
    return node_pb2.KVStoreRequest(op=op, pair=pair, keys=list(keys), **fields)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


# ---- pair keys -----------------------------------------------------------------------------------
def test_pair_keys_carry_an_unguessable_secret():
    a, b = new_pair_key("prefill-0-1a2b3c4d", 7), new_pair_key("prefill-0-1a2b3c4d", 7)
    assert a != b and a.startswith("prefill-0-1a2b3c4d/7/")
    assert len(a.rsplit("/", 1)[1]) == 2 * PAIR_SECRET_BYTES >= 32
    assert pair_instance(a) == "prefill-0-1a2b3c4d"
    assert pair_instance(new_pair_key("node/with/slashes", 1)) == "node/with/slashes"


BAD_PAIRS = ["prefill-0-1a2b3c4d/7", "prefill-0-1a2b3c4d/7/", "x/7/" + "g" * 32, "x/7/" + "a" * 31, "/7/" + "a" * 32,
             "x/seven/" + "a" * 32, "x" * 600 + "/1/" + "a" * 32, ""]


@pytest.mark.parametrize("key", BAD_PAIRS)
def test_pair_keys_without_a_well_formed_secret_are_refused(key, server):
    with pytest.raises(InvalidArgument) as err:
        pair_instance(key)
    assert "secret" in str(err.value)
    with pytest.raises(InvalidArgument):  # before any group or namespace exists
        server.run(server.host._group(key, 5.0))
    for op in (OP.KV_STORE_OP_SET, OP.KV_STORE_OP_GET, OP.KV_STORE_OP_CHECK):
        code, details = _code(lambda: server.call(_request(op, key, "0/0", value=b"x", timeout_ms=100)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "secret" in details, (op, details)
    assert server.host.stores.num_keys_total == 0


# ---- a gloo pair over the store ------------------------------------------------------------------
def _sender_store(address: str, key: str, security: ClientSecurity | None, timeout: float = 20.0) -> GrpcPairStore:
    channels = Channels(security)
    return GrpcPairStore(rendezvous_call(channels.sync_channel(address), channels.metadata()), key, timeout)


def _pair_over(server: StoreServer, key: str, security: ClientSecurity | None):
    """Rank 1 on the decode side (its own host), rank 0 over KVRendezvous from a worker thread."""
    built: dict = {}

    def sender():
        try:
            store = _sender_store(server.address, key, security)
            built["store"] = store
            built["group"] = make_pair_group(store, SENDER_RANK, 20, CPU, "127.0.0.1")
        except Exception as exc:  # reported below
            built["error"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    group = server.run(server.host._group(key, 20.0))
    thread.join(30)
    assert "error" not in built, built.get("error")
    return built["group"], group


def _exchange(sender_group, receiver_group, n: int = 4096) -> None:
    send = torch.randint(0, 255, (n,), dtype=torch.uint8)
    recv = torch.zeros(n, dtype=torch.uint8)
    work = sender_group.send([send], RECEIVER_RANK, 3)
    receiver_group.recv([recv], SENDER_RANK, 3).wait(datetime.timedelta(seconds=20))
    work.wait(datetime.timedelta(seconds=20))
    assert torch.equal(send, recv)


@pytest.mark.timeout(120)
def test_gloo_pair_over_the_node_port_store_with_node_key_and_tls(pki):  # noqa: F811
    security = ClientSecurity(node_key=NODE_KEY, tls_ca=pki["ca"])
    with store_server(pki_paths=pki) as server:
        key = new_pair_key("prefill-0-deadbeef", 1)
        sender_group, receiver_group = _pair_over(server, key, security)
        _exchange(sender_group, receiver_group)
        assert server.host.stores.num_keys(key) == 2  # gloo's two rank addresses, in the pair's namespace
        assert server.host.stores.pairs() == {key}
        server.host.drop(key)
        assert server.host.stores.num_keys_total == 0 and not server.host.stores.pairs()
        # without TLS the same server refuses the channel; without the key the call
        plain = _sender_store(server.address, key, ClientSecurity(node_key=NODE_KEY), timeout=1.0)
        with pytest.raises(dist.DistStoreError, match="UNAVAILABLE"):
            plain.set("0/0", b"x")
        keyless = _sender_store(server.address, key, ClientSecurity(tls_ca=pki["ca"]), timeout=1.0)
        with pytest.raises(dist.DistStoreError, match="UNAUTHENTICATED"):
            keyless.set("0/0", b"x")
        assert server.host.stores.num_keys_total == 0


@pytest.mark.timeout(120)
def test_gloo_pair_rebuilt_under_a_new_generation_frees_the_old_keys(server):
    security = ClientSecurity(node_key=NODE_KEY)
    for generation in (1, 2, 3):
        key = new_pair_key("prefill-1-cafef00d", generation)
        sender_group, receiver_group = _pair_over(server, key, security)
        _exchange(sender_group, receiver_group, 100)
        assert server.host.stores.pairs() == {key}  # the older generation's group and keys are gone
        assert server.host.stores.num_keys_total == 2
    server.host.drop(key)
    assert server.host.stores.num_keys_total == 0


# ---- refusals ------------------------------------------------------------------------------------
def test_store_calls_without_the_node_key_are_refused(server):
    key = new_pair_key("prefill-2-0badc0de", 1)
    for given in (None, "wrong-key"):
        for op in (OP.KV_STORE_OP_SET, OP.KV_STORE_OP_GET, OP.KV_STORE_OP_NUM_KEYS):
            code, details = _code(lambda: server.call(_request(op, key, "0/0", value=b"x", timeout_ms=100), key=given))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "node key" in details
    assert server.host.stores.num_keys_total == 0
    store = _sender_store(server.address, key, ClientSecurity(node_key="wrong-key"), timeout=1.0)
    with pytest.raises(dist.DistStoreError, match="UNAUTHENTICATED"):
        make_pair_group(store, SENDER_RANK, 1.0, CPU, "127.0.0.1")  # c10d surfaces the store's error


def test_oversize_keys_values_and_bad_calls_are_invalid_argument(server):
    key = new_pair_key("prefill-3-12345678", 1)
    cases = [
        _request(OP.KV_STORE_OP_SET, key, "k" * (rdv.MAX_KEY_BYTES + 1), value=b"x"),
        _request(OP.KV_STORE_OP_SET, key, "é" * (rdv.MAX_KEY_BYTES // 2 + 1), value=b"x"),  # bytes, not characters
        _request(OP.KV_STORE_OP_GET, key, "k" * (rdv.MAX_KEY_BYTES + 1), timeout_ms=10),
        _request(OP.KV_STORE_OP_CHECK, key, "k" * (rdv.MAX_KEY_BYTES + 1)),
        _request(OP.KV_STORE_OP_SET, key, "k", value=b"x" * (rdv.MAX_VALUE_BYTES + 1)),
        _request(OP.KV_STORE_OP_COMPARE_SET, key, "k", expected=b"", value=b"x" * (rdv.MAX_VALUE_BYTES + 1)),
        _request(OP.KV_STORE_OP_SET, key, "a", "b", value=b"x"),  # one key only
        _request(OP.KV_STORE_OP_WAIT, key),  # no key
        _request(OP.KV_STORE_OP_CHECK, key, *[str(i) for i in range(rdv.MAX_KEYS_PER_CALL + 1)]),
        _request(OP.KV_STORE_OP_UNSPECIFIED, key, "k"),
    ]
    for request in cases:
        code, details = _code(lambda: server.call(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Traceback" not in details, (request.op, details)
    server.call(_request(OP.KV_STORE_OP_SET, key, "n", value=b"not a number"))
    code, details = _code(lambda: server.call(_request(OP.KV_STORE_OP_ADD, key, "n", amount=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "number" in details
    at_the_limits = _request(OP.KV_STORE_OP_SET, key, "k" * rdv.MAX_KEY_BYTES, value=b"x" * rdv.MAX_VALUE_BYTES)
    server.call(at_the_limits)
    server.host.drop(key)
    assert server.host.stores.num_keys_total == 0


def test_too_many_keys_are_resource_exhausted(server):
    stores = server.host.stores
    key = new_pair_key("prefill-4-87654321", 1)
    for i in range(rdv.MAX_KEYS_PER_PAIR):
        server.call(_request(OP.KV_STORE_OP_SET, key, f"k{i}", value=b"x"))
    for request in (_request(OP.KV_STORE_OP_SET, key, "one-more", value=b"x"),
                    _request(OP.KV_STORE_OP_ADD, key, "one-more", amount=1),
                    _request(OP.KV_STORE_OP_COMPARE_SET, key, "one-more", expected=b"", value=b"x")):
        code, details = _code(lambda: server.call(request))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(rdv.MAX_KEYS_PER_PAIR) in details
    server.call(_request(OP.KV_STORE_OP_SET, key, "k0", value=b"overwritten"))  # an existing key may change
    assert server.call(_request(OP.KV_STORE_OP_NUM_KEYS, key)).number == rdv.MAX_KEYS_PER_PAIR
    others = [new_pair_key(f"prefill-5-{i:08x}", 1) for i in range(rdv.MAX_KEYS // rdv.MAX_KEYS_PER_PAIR - 1)]
    for other in others:  # the node's total, filled in process (the same code path as the handler)
        for i in range(rdv.MAX_KEYS_PER_PAIR):
            stores.set(other, f"k{i}", b"x")
    assert stores.num_keys_total == rdv.MAX_KEYS
    code, details = _code(lambda: server.call(_request(OP.KV_STORE_OP_SET, new_pair_key("late", 1), "0/0", value=b"x")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(rdv.MAX_KEYS) in details
    for pair in [key, *others]:
        server.host.drop(pair)
    assert stores.num_keys_total == 0
    server.call(_request(OP.KV_STORE_OP_SET, key, "0/0", value=b"x"))  # room again
    server.host.drop(key)


# ---- waiting -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_get_of_a_missing_key_times_out_clearly_without_blocking_the_node(server):
    key = new_pair_key("prefill-6-00c0ffee", 1)
    start = time.monotonic()
    code, details = _code(lambda: server.call(_request(OP.KV_STORE_OP_GET, key, "0/0", timeout_ms=300)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "'0/0'" in details and "300 ms" in details, details
    assert time.monotonic() - start < 3
    # the Store c10d uses raises (no hang) ...
    store = _sender_store(server.address, key, ClientSecurity(node_key=NODE_KEY), timeout=0.5)
    with pytest.raises(dist.DistStoreError, match="DEADLINE_EXCEEDED.*not set within"):
        store.get("0/0")
    with pytest.raises(dist.DistStoreError, match="DEADLINE_EXCEEDED"):
        store.wait(["0/0", "0/1"], datetime.timedelta(seconds=0.3))
    # ... and a waiting GET holds no thread of the node's loop: other calls answer meanwhile, and a
    # SET (from the decode rank in process, as gloo's does) wakes it
    got: list[bytes] = []
    waiting = threading.Thread(target=lambda: got.append(server.call(
        _request(OP.KV_STORE_OP_GET, key, "0/1", timeout_ms=20_000), timeout=30).value))
    waiting.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert not server.call(_request(OP.KV_STORE_OP_CHECK, key, "0/1")).found
    assert server.run(asyncio.sleep(0, result=True))
    assert time.monotonic() - t0 < 1.0
    server.host.stores.set(key, "0/1", b"rank 1 address")
    waiting.join(10)
    assert got == [b"rank 1 address"]
    assert store.get("0/1") == b"rank 1 address" and store.check(["0/1"]) and not store.check(["0/1", "0/0"])
    server.host.drop(key)


def test_store_operations_follow_c10d(server):
    key = new_pair_key("prefill-7-abcdef01", 1)
    store = _sender_store(server.address, key, ClientSecurity(node_key=NODE_KEY), timeout=2.0)
    prefixed = dist.PrefixStore("x", store)  # c10d's own wrapper calls the C++ names (getNumKeys, deleteKey)
    assert prefixed.add("n", 3) == 3 and prefixed.add("n", -1) == 2 and prefixed.get("n") == b"2"
    assert prefixed.compare_set("c", "", "v") == b"v"  # absent and nothing expected: set
    assert prefixed.compare_set("c", "w", "u") == b"v"  # not the expected value: unchanged
    assert prefixed.compare_set("c", "v", "u") == b"u"
    assert store.compare_set("absent", b"e", b"d") == b"e" and not store.check(["absent"])
    prefixed.set("s", "text")
    assert prefixed.num_keys() == 3 == store.num_keys()
    assert prefixed.delete_key("s") and not prefixed.delete_key("s") and prefixed.num_keys() == 2
    prefixed.append("a", b"x")  # c10d's fallbacks over compare_set / get / set
    prefixed.append("a", b"y")
    assert prefixed.get("a") == b"xy" and prefixed.multi_get(["a", "n"]) == [b"xy", b"2"]
    server.host.drop(key)
    assert store.num_keys() == 0


# ---- namespaces ----------------------------------------------------------------------------------
def test_dropped_and_stale_pairs_free_their_keys():
    now = [0.0]
    stores = PairStores(stale_s=10.0, clock=lambda: now[0])
    built = new_pair_key("prefill-8-11111111", 1)
    stores.hold(built)  # a group was built on it
    stores.set(built, "0/0", b"a")
    never = new_pair_key("prefill-9-22222222", 1)
    stores.set(never, "0/0", b"b")  # a sender whose PushKV was refused: no group ever holds it
    now[0] = 11.0
    third = new_pair_key("prefill-10-33333333", 1)
    stores.set(third, "0/0", b"c")  # a new namespace sweeps the stale ones no group holds
    assert stores.pairs() == {built, third} and stores.num_keys_total == 2
    newer = new_pair_key("prefill-8-11111111", 2)
    stores.set(newer, "0/0", b"d")
    stores.drop_others(newer)  # the sender's next generation: its older namespaces go
    assert built not in stores.pairs() and newer in stores.pairs()
    for pair in stores.pairs():
        stores.drop(pair)
    assert stores.num_keys_total == 0 and not stores.pairs()
    for cycle in range(200):  # build / drop cycles leave nothing behind
        pair = new_pair_key("prefill-11-44444444", cycle + 1)
        stores.drop_others(pair)
        stores.hold(pair)
        stores.set(pair, "0/0", b"x")
        stores.set(pair, "0/1", b"y")
        if cycle % 2:
            stores.drop(pair)
    assert stores.num_keys_total <= 2 and len(stores.pairs()) <= 1


def test_the_decode_host_opens_no_store_port():
    host = TorchDistHost("127.0.0.1")
    assert host.rendezvous == rdv.RENDEZVOUS_GRPC == "grpc"
    assert not hasattr(host, "_store") and not hasattr(host, "_port")
    host.close()


def test_a_sender_refuses_a_tcpstore_rendezvous_clearly():
    """An older decode node hands out "host:port" (its TCPStore): refused before any frame."""
    sender = TorchDistKVSender("prefill-0")
    k = v = torch.zeros(1, 1, 16, 1, 4)
    target = node_pb2.KVTarget(decode_address="127.0.0.1:1", reservation_id="r", rendezvous="127.0.0.1:29500",
                               layout=node_pb2.KVLayout(num_layers=1, block_size=16, num_kv_heads=1, head_dim=4,
                                                        dtype="float32"))
    with pytest.raises(ValueError, match="'127.0.0.1:29500', not 'grpc'.*same pdserve version"):
        asyncio.run(sender.send(target, k, v, 5.0))
    asyncio.run(sender.close())


def test_tp_group_store_is_a_private_file_and_opens_no_port():
    """host_store: a FileStore in a new mode-0700 directory of this user (no TCP listener of this
    process appears); a 2-rank gloo group over it all-reduces; close() removes the directory."""
    before = _own_listening_sockets()
    with socket.create_server(("127.0.0.1", 0)):  # the check does see a listener of ours
        assert len(_own_listening_sockets() - before) == 1
    hosted = tp_group.host_store(2)
    try:
        joined = tp_group.join_store(hosted.path)
        assert _own_listening_sockets() == before
        assert isinstance(hosted.store, dist.FileStore) and isinstance(joined, dist.FileStore)
        assert os.path.dirname(hosted.path) == hosted.dir
        assert os.path.basename(hosted.dir).startswith(tp_group.STORE_DIR_PREFIX)
        info = os.stat(hosted.dir)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()

        sums = {}

        def rank(r: int, store) -> None:
            group = tp_group.make_group(store, r, 2, CPU)
            sums[r] = group.all_reduce(torch.tensor([float(r + 1), 10.0 * r])).tolist()

        other = threading.Thread(target=rank, args=(1, joined))
        other.start()
        rank(0, hosted.store)
        other.join(30)
        assert sums == {0: [3.0, 10.0], 1: [3.0, 10.0]}
        assert os.path.isfile(hosted.path)
    finally:
        hosted.close()
    assert not os.path.exists(hosted.dir)
    hosted.close()  # idempotent
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):  # a late store call: no file is recreated, no long wait
        hosted.store.set("late", b"x")
    assert time.monotonic() - started < 10 and not os.path.exists(hosted.dir)


def _own_listening_sockets() -> set[int]:
    """Inodes of this process's TCP sockets in LISTEN (Linux: /proc/self/fd, /proc/net/tcp*)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(int(link[len("socket:["):-1]))
    listening = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    listening.add(int(fields[9]))
    return mine & listening


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_a_store_directory_whose_rank_0_died_is_removed_by_the_next_one(tmp_path):
    """A rank 0 killed with SIGKILL cannot remove its store directory; the next rank 0 does
    (its owner file names a process that is gone). A live owner's directory, one whose owner
    file is not written yet and a same-pid owner of another start time (a reused pid) are told apart."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def made(name: str, owner: str | None) -> str:
        d = tmp_path / (tp_group.STORE_DIR_PREFIX + name)
        d.mkdir(mode=0o700)
        (d / "store").write_bytes(b"x")
        if owner is not None:
            (d / tp_group.OWNER_FILE).write_text(owner)
        return str(d)
    me = f"{os.getpid()} {tp_group._process_start(os.getpid())}"
    gone = made("gone", f"{dead_pid} 12345")
    reused = made("reused", f"{os.getpid()} 1")  # our pid, another process's start time
    live = made("live", me)
    unborn = made("unborn", None)
    other = str(tmp_path / "unrelated")
    os.mkdir(other)
    removed = tp_group.sweep_stale_stores(str(tmp_path))
    assert sorted(removed) == sorted([gone, reused])
    assert not os.path.exists(gone) and not os.path.exists(reused)
    assert os.path.isdir(live) and os.path.isdir(unborn) and os.path.isdir(other)
    hosted = tp_group.host_store(2)  # a real one names its maker
    try:
        with open(os.path.join(hosted.dir, tp_group.OWNER_FILE)) as f:
            assert f.read() == me
    finally:
        hosted.close()
