from protos.pdserve.v1 import generation_pb2 as _generation_pb2
from protos.pdserve.v1 import node_pb2 as _node_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("acknowledged",)
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    acknowledged: bool
    def __init__(self, acknowledged: _Optional[bool] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "address", "role", "layout", "load", "model", "max_model_len", "dtype")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    role: str
    layout: _node_pb2.KVLayout
    load: _generation_pb2.NodeLoad
    model: str
    max_model_len: int
    dtype: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., layout: _Optional[_Union[_node_pb2.KVLayout, _Mapping]] = ..., load: _Optional[_Union[_generation_pb2.NodeLoad, _Mapping]] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("accepted", "heartbeat_interval_ms", "node_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    heartbeat_interval_ms: int
    node_id: str
    def __init__(self, accepted: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "load", "serving")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    load: _generation_pb2.NodeLoad
    serving: bool
    def __init__(self, node_id: _Optional[str] = ..., load: _Optional[_Union[_generation_pb2.NodeLoad, _Mapping]] = ..., serving: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "heartbeat_interval_ms")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    heartbeat_interval_ms: int
    def __init__(self, known: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...
