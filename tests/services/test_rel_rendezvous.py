"""Issue 14 item 1 on the torch.distributed KV path (CPU, gloo): the decode node's TCPStore is open
by nature, so a pair group's keys live under a per-pair 128-bit secret that travels only in the
node-key-authenticated PushKV call. A store client without the secret finds none of the pair's
keys (cannot read the ranks' addresses, plant its own or join); the decode side refuses pair keys
without a well-formed secret; TP groups' stores bind loopback only."""
from __future__ import annotations

import asyncio
import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from engine.kv_transfer.torch_dist import (PAIR_SECRET_BYTES, SENDER_RANK, TorchDistHost, make_pair_group,
                                           new_pair_key, pair_instance)
from engine.parallel import group as tp_group
from engine.rpc.errors import InvalidArgument

GLOO_KEYS = ("0/0", "0/1")  # what ProcessGroupGloo writes under its prefix: one address per rank


def test_pair_keys_carry_an_unguessable_secret():
    a, b = new_pair_key("prefill-0-1a2b3c4d", 7), new_pair_key("prefill-0-1a2b3c4d", 7)
    assert a != b and a.startswith("prefill-0-1a2b3c4d/7/")
    assert len(a.rsplit("/", 1)[1]) == 2 * PAIR_SECRET_BYTES >= 32
    assert pair_instance(a) == "prefill-0-1a2b3c4d"
    assert pair_instance(new_pair_key("node/with/slashes", 1)) == "node/with/slashes"


@pytest.mark.parametrize("key", ["prefill-0-1a2b3c4d/7", "prefill-0-1a2b3c4d/7/", "x/7/" + "g" * 32,
                                 "x/7/" + "a" * 31, "/7/" + "a" * 32, "x/seven/" + "a" * 32, "x" * 600 + "/1/" + "a" * 32])
def test_pair_keys_without_a_well_formed_secret_are_refused(key):
    with pytest.raises(InvalidArgument) as err:
        pair_instance(key)
    assert "secret" in str(err.value)
    host = TorchDistHost("127.0.0.1")
    try:
        host.rendezvous  # noqa: B018 - starts the store
        with pytest.raises(InvalidArgument):  # before any group is built on the open store
            asyncio.run(host._group(key, 5.0))
    finally:
        host.close()


@pytest.mark.timeout(120)
def test_store_client_without_the_secret_cannot_see_or_join_the_pair():
    host = TorchDistHost("127.0.0.1", store_timeout=20.0)
    try:
        address, port = host.rendezvous.rsplit(":", 1)
        assert address == "127.0.0.1"
        key = new_pair_key("prefill-0-deadbeef", 1)
        built: dict = {}

        def sender():
            store = dist.TCPStore(address, int(port), None, False, datetime.timedelta(seconds=20))
            built["store"] = store
            built["group"] = make_pair_group(dist.PrefixStore(f"pdserve/kv/{key}", store), SENDER_RANK, 20,
                                             torch.device("cpu"), "127.0.0.1")

        thread = threading.Thread(target=sender)
        thread.start()

        async def receive_side():
            return await host._group(key, 20.0)
        group = asyncio.run(receive_side())
        thread.join(30)
        assert "group" in built and group is not None
        send = torch.arange(16, dtype=torch.uint8)
        recv = torch.zeros(16, dtype=torch.uint8)
        work = built["group"].send([send], 1, 3)
        group.recv([recv], 0, 3).wait()
        work.wait()
        assert torch.equal(send, recv)  # the pair works for those who hold the key

        attacker = dist.TCPStore(address, int(port), None, False, datetime.timedelta(seconds=5))
        instance, generation, _secret = key.rsplit("/", 2)
        full = [f"pdserve/kv/{key}/{k}" for k in GLOO_KEYS]
        assert attacker.check(full)  # the ranks' addresses are there, under the secret ...
        for guess in (f"pdserve/kv/{instance}/{generation}", f"pdserve/kv/{instance}", "pdserve/kv", ""):
            assert not any(attacker.check([f"{guess}/{k}"]) for k in GLOO_KEYS), guess  # ... and nowhere else
    finally:
        host.close()


def test_tp_group_store_binds_loopback_only():
    store = tp_group.host_store(2)
    try:
        assert tp_group.LOOPBACK == "127.0.0.1"
        listening = _listening_addresses(store.port)
        assert listening == {"127.0.0.1"}, listening
    finally:
        del store


def _listening_addresses(port: int) -> set[str]:
    """IPv4 / IPv6 addresses listening on `port` (Linux /proc/net/tcp*: state 0A = LISTEN)."""
    out = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(path).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                out.add("::" if v6 and set(address) == {"0"} else
                        ".".join(str(b) for b in reversed(bytes.fromhex(address))) if not v6 else address)
    return out
