"""python -m prefill_node [flags]: a pdserve prefill node (see --help)."""
from __future__ import annotations

import sys

from engine.node.main import main_for
from prefill_node.servicer import PrefillServicer
from protos.pdserve.v1 import node_pb2_grpc

DEFAULT_PORT = 50061


def main(argv=None) -> int:
    return main_for("prefill", DEFAULT_PORT, lambda ns: PrefillServicer(ns.kv_transport),
                    node_pb2_grpc.add_PrefillNodeServicer_to_server, argv)


if __name__ == "__main__":
    sys.exit(main())
