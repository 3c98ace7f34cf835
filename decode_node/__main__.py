"""python -m decode_node [flags]: a pdserve decode node (see --help)."""
from __future__ import annotations

import sys

from decode_node.servicer import DecodeServicer
from engine.node.main import main_for
from protos.pdserve.v1 import node_pb2_grpc

DEFAULT_PORT = 50071


def main(argv=None) -> int:
    return main_for("decode", DEFAULT_PORT, lambda ns: DecodeServicer(ns.kv_transport),
                    node_pb2_grpc.add_DecodeNodeServicer_to_server, argv)


if __name__ == "__main__":
    sys.exit(main())
