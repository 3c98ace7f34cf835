"""Moving a request's KV blocks from a prefill node to a decode node.

One interface per side, one implementation per transport (`--kv-transport auto|ipc|nccl|grpc`):
- `KVSender.send(target, k, v, timeout) -> bytes_sent` on the prefill side: `GrpcKVSender`
  (PushKV frames, serialized off the loop), `TorchDistKVSender` (header-only PushKV frames announcing
  raw tensors sent over a torch.distributed pair group: NCCL on CUDA, gloo on CPU), `IpcKVSender`
  (CUDA IPC: straight into the decode node's reserved blocks on the GPU);
- `KVReceiver.receive(landing, request, context)` on the decode side: `GrpcKVReceiver`,
  `TorchDistKVReceiver`, `IpcKVReceiver`. `KVStaging` validates every header BEFORE anything is
  allocated or copied, and never reports complete KV unless every block of every layer arrived
  exactly once with a matching CRC32.
"""
from engine.kv_transfer.base import (TRANSPORTS, KVLanding, KVReceiver, KVSender, KVSpec, Received, plan_frames,
                                     tensor_bytes, transport_name)
from engine.kv_transfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from engine.kv_transfer.ipc import IpcKVReceiver, IpcKVSender
from engine.kv_transfer.staging import KVStaging, TransferError
from engine.kv_transfer.torch_dist import TorchDistHost, TorchDistKVReceiver, TorchDistKVSender

__all__ = ["TRANSPORTS", "KVLanding", "KVReceiver", "KVSender", "KVSpec", "Received", "plan_frames", "tensor_bytes",
           "transport_name", "GrpcKVReceiver", "GrpcKVSender", "IpcKVReceiver", "IpcKVSender", "KVStaging",
           "TransferError", "TorchDistHost", "TorchDistKVReceiver", "TorchDistKVSender"]
