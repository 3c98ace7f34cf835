"""Moving a request's KV blocks from a prefill node to a decode node.

One interface, two transports:
- `KVSender.send(target, k, v, timeout) -> bytes_sent` on the prefill side
  (`GrpcKVSender`: PushKV frames of at most 1 MiB; `TorchDistKVSender`: header-only PushKV frames
  announcing raw tensors sent over a torch.distributed pair group);
- `KVStaging` on the decode side: assembles one reservation's frames into a staging buffer,
  validating every header BEFORE anything is allocated or copied, and never reports complete KV
  unless every block of every layer arrived exactly once with a matching CRC32.
"""
from engine.kv_transfer.base import KVSender, KVSpec, plan_frames, tensor_bytes
from engine.kv_transfer.grpc_transport import GrpcKVSender
from engine.kv_transfer.staging import KVStaging, TransferError
from engine.kv_transfer.torch_dist import TorchDistHost, TorchDistKVSender

__all__ = ["KVSender", "KVSpec", "plan_frames", "tensor_bytes", "GrpcKVSender", "KVStaging", "TransferError",
           "TorchDistHost", "TorchDistKVSender"]
