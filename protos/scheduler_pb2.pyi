from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("rank", "world_size", "run_id")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    run_id: str
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("run_id", "world_size", "step")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    world_size: int
    step: int
    def __init__(self, run_id: _Optional[str] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ParamChunk(_message.Message):
    __slots__ = ("version", "offset", "total", "data", "layout")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    total: int
    data: bytes
    layout: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ..., layout: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("rank", "step", "timeout_s")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    timeout_s: float
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("step", "kind", "round", "day", "split", "users", "version", "total_users", "checkpoint", "train_day", "tasks", "clip", "keep")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_USERS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DAY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: str
    round: int
    day: str
    split: str
    users: _containers.RepeatedScalarFieldContainer[str]
    version: int
    total_users: int
    checkpoint: bool
    train_day: str
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    clip: float
    keep: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., day: _Optional[str] = ..., split: _Optional[str] = ..., users: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., total_users: _Optional[int] = ..., checkpoint: _Optional[bool] = ..., train_day: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., clip: _Optional[float] = ..., keep: _Optional[_Iterable[int]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "uid", "start_version", "target", "weight")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    START_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    uid: str
    start_version: int
    target: int
    weight: float
    def __init__(self, task_id: _Optional[int] = ..., uid: _Optional[str] = ..., start_version: _Optional[int] = ..., target: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class ParamsRequest(_message.Message):
    __slots__ = ("version", "chunk_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk_bytes: int
    def __init__(self, version: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("step", "rank", "weight", "total", "sums", "reduced", "clients")
    class SumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    REDUCED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    weight: float
    total: int
    sums: _containers.ScalarMap[str, float]
    reduced: bool
    clients: _containers.RepeatedCompositeFieldContainer[ClientReport]
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., weight: _Optional[float] = ..., total: _Optional[int] = ..., sums: _Optional[_Mapping[str, float]] = ..., reduced: _Optional[bool] = ..., clients: _Optional[_Iterable[_Union[ClientReport, _Mapping]]] = ...) -> None: ...

class ClientReport(_message.Message):
    __slots__ = ("uid", "samples", "loss", "loss_sq", "task_id")
    UID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_SQ_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    samples: float
    loss: float
    loss_sq: float
    task_id: int
    def __init__(self, uid: _Optional[str] = ..., samples: _Optional[float] = ..., loss: _Optional[float] = ..., loss_sq: _Optional[float] = ..., task_id: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MetricsPush(_message.Message):
    __slots__ = ("step", "rank", "sums", "users", "user_values")
    class SumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    USER_VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    sums: _containers.ScalarMap[str, float]
    users: _containers.RepeatedScalarFieldContainer[str]
    user_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., sums: _Optional[_Mapping[str, float]] = ..., users: _Optional[_Iterable[str]] = ..., user_values: _Optional[_Iterable[float]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
