from protos.pdserve.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KVTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KVTransport]
    KV_TRANSPORT_NCCL: _ClassVar[KVTransport]
    KV_TRANSPORT_IPC: _ClassVar[KVTransport]
    KV_TRANSPORT_AUTO: _ClassVar[KVTransport]

class KVStoreOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STORE_OP_UNSPECIFIED: _ClassVar[KVStoreOp]
    KV_STORE_OP_SET: _ClassVar[KVStoreOp]
    KV_STORE_OP_GET: _ClassVar[KVStoreOp]
    KV_STORE_OP_ADD: _ClassVar[KVStoreOp]
    KV_STORE_OP_CHECK: _ClassVar[KVStoreOp]
    KV_STORE_OP_WAIT: _ClassVar[KVStoreOp]
    KV_STORE_OP_DELETE: _ClassVar[KVStoreOp]
    KV_STORE_OP_COMPARE_SET: _ClassVar[KVStoreOp]
    KV_STORE_OP_NUM_KEYS: _ClassVar[KVStoreOp]
KV_TRANSPORT_UNSPECIFIED: KVTransport
KV_TRANSPORT_GRPC: KVTransport
KV_TRANSPORT_NCCL: KVTransport
KV_TRANSPORT_IPC: KVTransport
KV_TRANSPORT_AUTO: KVTransport
KV_STORE_OP_UNSPECIFIED: KVStoreOp
KV_STORE_OP_SET: KVStoreOp
KV_STORE_OP_GET: KVStoreOp
KV_STORE_OP_ADD: KVStoreOp
KV_STORE_OP_CHECK: KVStoreOp
KV_STORE_OP_WAIT: KVStoreOp
KV_STORE_OP_DELETE: KVStoreOp
KV_STORE_OP_COMPARE_SET: KVStoreOp
KV_STORE_OP_NUM_KEYS: KVStoreOp

class ResolvedParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "max_tokens", "min_tokens", "stop", "stop_token_ids", "include_stop_str", "ignore_eos", "logprobs", "skip_special_tokens", "sample_index", "structured", "prompt_logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    include_stop_str: bool
    ignore_eos: bool
    logprobs: int
    skip_special_tokens: bool
    sample_index: int
    structured: _generation_pb2.StructuredOutput
    prompt_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., include_stop_str: _Optional[bool] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., skip_special_tokens: _Optional[bool] = ..., sample_index: _Optional[int] = ..., structured: _Optional[_Union[_generation_pb2.StructuredOutput, _Mapping]] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVTarget(_message.Message):
    __slots__ = ("decode_address", "reservation_id", "transport", "rendezvous", "decode_node_id", "layout", "kv_lanes")
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_LANES_FIELD_NUMBER: _ClassVar[int]
    decode_address: str
    reservation_id: str
    transport: KVTransport
    rendezvous: str
    decode_node_id: str
    layout: KVLayout
    kv_lanes: int
    def __init__(self, decode_address: _Optional[str] = ..., reservation_id: _Optional[str] = ..., transport: _Optional[_Union[KVTransport, str]] = ..., rendezvous: _Optional[str] = ..., decode_node_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., kv_lanes: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "target")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: ResolvedParams
    priority: int
    target: KVTarget
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[ResolvedParams, _Mapping]] = ..., priority: _Optional[int] = ..., target: _Optional[_Union[KVTarget, _Mapping]] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "finish_reason", "cached_tokens", "prefill_ms", "stop_sequence", "prompt_logprobs", "text", "stop_token_id", "held_text")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_TEXT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: _generation_pb2.TokenLogprob
    finish_reason: _generation_pb2.FinishReason
    cached_tokens: int
    prefill_ms: float
    stop_sequence: str
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    text: str
    stop_token_id: int
    held_text: str
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[_Union[_generation_pb2.TokenLogprob, _Mapping]] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., cached_tokens: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., stop_sequence: _Optional[str] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ..., text: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., held_text: _Optional[str] = ...) -> None: ...

class TransferDone(_message.Message):
    __slots__ = ("bytes", "ms", "transport")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    ms: float
    transport: KVTransport
    def __init__(self, bytes: _Optional[int] = ..., ms: _Optional[float] = ..., transport: _Optional[_Union[KVTransport, str]] = ...) -> None: ...

class KVCommit(_message.Message):
    __slots__ = ("reservation_id", "instance", "num_blocks", "bytes")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    instance: str
    num_blocks: int
    bytes: int
    def __init__(self, reservation_id: _Optional[str] = ..., instance: _Optional[str] = ..., num_blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ShareKVRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("device", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class KVShare(_message.Message):
    __slots__ = ("host_id", "device_uuid", "instance", "layout", "num_blocks", "k", "v")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    device_uuid: str
    instance: str
    layout: KVLayout
    num_blocks: int
    k: _containers.RepeatedCompositeFieldContainer[CudaIpcHandle]
    v: _containers.RepeatedCompositeFieldContainer[CudaIpcHandle]
    def __init__(self, host_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., instance: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., num_blocks: _Optional[int] = ..., k: _Optional[_Iterable[_Union[CudaIpcHandle, _Mapping]]] = ..., v: _Optional[_Iterable[_Union[CudaIpcHandle, _Mapping]]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("reservation_id", "ipc_write")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_WRITE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    ipc_write: bool
    def __init__(self, reservation_id: _Optional[str] = ..., ipc_write: _Optional[bool] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease_ms", "block_ids")
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_ms: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first_token", "transfer_done")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DONE_FIELD_NUMBER: _ClassVar[int]
    first_token: FirstToken
    transfer_done: TransferDone
    def __init__(self, first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., transfer_done: _Optional[_Union[TransferDone, _Mapping]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "lease_ms", "transport", "num_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    lease_ms: int
    transport: KVTransport
    num_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., transport: _Optional[_Union[KVTransport, str]] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "num_blocks", "layout", "rendezvous", "node_id", "lease_ms", "kv_lanes")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_LANES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    num_blocks: int
    layout: KVLayout
    rendezvous: str
    node_id: str
    lease_ms: int
    kv_lanes: int
    def __init__(self, reservation_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., rendezvous: _Optional[str] = ..., node_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., kv_lanes: _Optional[int] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("kind", "layer", "block_start", "dtype", "shape", "crc32", "num_layers", "sum64")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SUM64_FIELD_NUMBER: _ClassVar[int]
    kind: int
    layer: int
    block_start: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    crc32: int
    num_layers: int
    sum64: int
    def __init__(self, kind: _Optional[int] = ..., layer: _Optional[int] = ..., block_start: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., crc32: _Optional[int] = ..., num_layers: _Optional[int] = ..., sum64: _Optional[int] = ...) -> None: ...

class KVFrame(_message.Message):
    __slots__ = ("reservation_id", "seq", "total_frames", "header", "data", "lane", "lanes")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    seq: int
    total_frames: int
    header: TensorHeader
    data: bytes
    lane: int
    lanes: int
    def __init__(self, reservation_id: _Optional[str] = ..., seq: _Optional[int] = ..., total_frames: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., lane: _Optional[int] = ..., lanes: _Optional[int] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("bytes_received", "frames")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    frames: int
    def __init__(self, bytes_received: _Optional[int] = ..., frames: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "prompt_token_ids", "first_token_id", "params", "priority", "kv_wait_ms", "local_prefill", "output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    KV_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    params: ResolvedParams
    priority: int
    kv_wait_ms: int
    local_prefill: bool
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., params: _Optional[_Union[ResolvedParams, _Mapping]] = ..., priority: _Optional[int] = ..., kv_wait_ms: _Optional[int] = ..., local_prefill: _Optional[bool] = ..., output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "stop_sequence", "stop_token_id", "cached_tokens", "prompt_logprobs", "text", "held_text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HELD_TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    finish_reason: _generation_pb2.FinishReason
    stop_sequence: str
    stop_token_id: int
    cached_tokens: int
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    text: str
    held_text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., stop_sequence: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ..., text: _Optional[str] = ..., held_text: _Optional[str] = ...) -> None: ...

class NodeAbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class NodeAbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class KVStoreRequest(_message.Message):
    __slots__ = ("op", "pair", "keys", "value", "expected", "amount", "timeout_ms")
    OP_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    op: KVStoreOp
    pair: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    value: bytes
    expected: bytes
    amount: int
    timeout_ms: int
    def __init__(self, op: _Optional[_Union[KVStoreOp, str]] = ..., pair: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., value: _Optional[bytes] = ..., expected: _Optional[bytes] = ..., amount: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class KVStoreResponse(_message.Message):
    __slots__ = ("value", "number", "found")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    number: int
    found: bool
    def __init__(self, value: _Optional[bytes] = ..., number: _Optional[int] = ..., found: _Optional[bool] = ...) -> None: ...

class NodeLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeDrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeDrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...
