"""The one place where protobuf messages and domain objects meet (Flower's serde.py in spirit)."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from flock.common.domain import ClientReport, ParamLayout, Plan, RankMetrics, RankUpdate, TaskSpec
from flock.common.errors import RefusedError
from protos import scheduler_pb2 as pb

CHUNK_BYTES = (4 << 20) - 1024   # just under gRPC's 4 MiB default message limit (header included)
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def layout_to_proto(layout: ParamLayout) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=n, shape=list(s)) for n, s in zip(layout.names, layout.shapes)]


def layout_from_proto(specs: Iterable[pb.TensorSpec]) -> ParamLayout:
    specs = list(specs)
    return ParamLayout(names=tuple(s.name for s in specs), shapes=tuple(tuple(int(d) for d in s.shape) for s in specs))


def plan_to_proto(plan: Plan) -> pb.Plan:
    return pb.Plan(step=plan.step, kind=plan.kind, round=plan.round, day=plan.day, split=plan.split,
                   users=list(plan.users), version=plan.version, total_users=plan.total_users,
                   checkpoint=plan.checkpoint, train_day=plan.train_day, clip=plan.clip, keep=list(plan.keep),
                   tasks=[pb.Task(task_id=t.task_id, uid=t.uid, start_version=t.start_version, target=t.target,
                                  weight=t.weight) for t in plan.tasks])


def plan_from_proto(msg: pb.Plan) -> Plan:
    return Plan(step=msg.step, kind=msg.kind, round=msg.round, day=msg.day, split=msg.split,
                users=tuple(msg.users), version=msg.version, total_users=msg.total_users,
                checkpoint=msg.checkpoint, train_day=msg.train_day, clip=msg.clip, keep=tuple(msg.keep),
                tasks=tuple(TaskSpec(task_id=t.task_id, uid=t.uid, start_version=t.start_version, target=t.target,
                                     weight=t.weight) for t in msg.tasks))


def _byte_slices(values: np.ndarray, dtype: str, chunk_bytes: int, *,
                 at_least_one: bool = False) -> Iterator[tuple[int, memoryview]]:
    """(element offset, raw little-endian bytes) of `values` in slices of whole elements of at most
    `chunk_bytes`; `at_least_one` yields one empty slice for an empty array."""
    data = memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")
    size = np.dtype(dtype).itemsize
    step = max(size, chunk_bytes - chunk_bytes % size)
    for start in range(0, max(len(data), 1) if at_least_one else len(data), step):
        yield start // size, data[start:start + step]


def _param_heads(version: int, layout: ParamLayout, flat: np.ndarray,
                 chunk_bytes: int) -> Iterator[tuple[pb.ParamChunk, memoryview]]:
    """The ParamChunk messages of a parameter stream without their data, and the data of each."""
    for offset, payload in _byte_slices(flat, "<f4", chunk_bytes, at_least_one=True):
        yield pb.ParamChunk(version=version, offset=offset, total=flat.size,
                            layout=layout_to_proto(layout) if offset == 0 else []), payload


def param_chunks(version: int, layout: ParamLayout, flat: np.ndarray,
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.ParamChunk]:
    """float32 parameters as raw-byte chunks; the first carries the layout."""
    for head, payload in _param_heads(version, layout, flat, chunk_bytes):
        head.data = bytes(payload)
        yield head


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def with_bytes_field(head, field: int, payload: memoryview) -> bytes:
    """`head` serialized, plus bytes field number `field` = `payload` appended in protobuf's wire format
    (fields may come in any order): the message protobuf would serialize with that field set, for one copy
    of the payload instead of protobuf's three."""
    return b"".join((head.SerializeToString(), _varint(field << 3 | 2), _varint(len(payload)), payload))


def serialized_param_chunks(version: int, layout: ParamLayout, flat: np.ndarray,
                            chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """`param_chunks` as serialized ParamChunk messages: the scheduler builds them once per version and
    streams the same bytes to every rank (`raw_or_serialize` is the stream's serializer)."""
    return [with_bytes_field(head, 4, payload) for head, payload in _param_heads(version, layout, flat, chunk_bytes)]


def raw_or_serialize(message) -> bytes:
    """gRPC serializer for streams that carry pre-serialized messages (bytes) or messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def params_from_chunks(chunks: Iterable[pb.ParamChunk | bytes]) -> tuple[int, ParamLayout, np.ndarray]:
    """Reassembles `param_chunks`' stream (messages, or serialized chunks as the ranks receive them); checks
    offsets and the total against the layout."""
    version, layout, flat = None, None, None
    for chunk in chunks:
        if isinstance(chunk, bytes):
            c_version, offset, total, data, specs = _param_chunk_fields(chunk)
        else:
            c_version, offset, total, data, specs = chunk.version, chunk.offset, chunk.total, chunk.data, chunk.layout
        if flat is None:
            version, layout = c_version, layout_from_proto(specs)
            if total != layout.size:
                raise RefusedError(f"parameter stream: total {total} does not match the layout's {layout.size}")
            flat = np.empty(layout.size, dtype=np.float32)
            filled = 0
        if len(data) % 4:
            raise RefusedError(f"parameter stream: a chunk of {len(data)} bytes is not whole float32 values")
        values = np.frombuffer(data, dtype="<f4")
        if c_version != version or offset != filled or filled + values.size > flat.size:
            raise RefusedError("parameter stream: chunk out of order or past the end")
        flat[filled:filled + values.size] = values
        filled += values.size
    if flat is None or filled != flat.size:
        raise RefusedError("parameter stream ended early")
    return version, layout, flat


def update_chunks(update: RankUpdate, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A rank's update as serialized UpdateChunk messages: the header, then float64 chunks (none for an
    empty update). Sent with `raw_or_serialize`."""
    if update.more:
        raise ValueError(f"rank {update.rank}: an update with in-process parts (`more`) cannot be sent")
    header = pb.UpdateHeader(step=update.step, rank=update.rank, weight=update.weight,
                             total=update.delta_sum.size, sums=dict(update.sums), reduced=update.reduced,
                             clients=[pb.ClientReport(uid=c.uid, samples=c.samples, loss=c.loss, loss_sq=c.loss_sq,
                                                      task_id=c.task_id) for c in update.clients])
    yield pb.UpdateChunk(header=header).SerializeToString()
    for offset, payload in _byte_slices(update.delta_sum, "<f8", chunk_bytes):
        yield with_bytes_field(pb.UpdateChunk(offset=offset), 3, payload)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise RefusedError("update chunk: malformed varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _wire_fields(raw: bytes) -> dict[int, list]:
    """The fields of a serialized message, without copying: field number -> values (ints for varints,
    memoryviews for length-delimited fields; fixed-width fields are skipped, none of ours has one)."""
    buf = memoryview(raw)
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise RefusedError("stream chunk: field past the end of the message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        else:
            raise RefusedError(f"stream chunk: unsupported wire type {wire}")
        fields.setdefault(field, []).append(value)
    return fields


def _update_chunk_fields(raw: bytes) -> tuple[pb.UpdateHeader | None, int, memoryview]:
    """(header, offset, data) of a serialized UpdateChunk, its data not copied."""
    f = _wire_fields(raw)
    header = pb.UpdateHeader.FromString(bytes(f[1][-1])) if 1 in f else None
    return header, f.get(2, [0])[-1], f.get(3, [memoryview(b"")])[-1]


def _param_chunk_fields(raw: bytes) -> tuple[int, int, int, memoryview, list[pb.TensorSpec]]:
    """(version, offset, total, data, layout) of a serialized ParamChunk, its data not copied."""
    f = _wire_fields(raw)
    return (f.get(1, [0])[-1], f.get(2, [0])[-1], f.get(3, [0])[-1], f.get(4, [memoryview(b"")])[-1],
            [pb.TensorSpec.FromString(bytes(m)) for m in f.get(5, [])])


def update_from_chunks(chunks: Iterable[pb.UpdateChunk | bytes], expected_size: int) -> RankUpdate:
    """Reassembles `update_chunks`' stream (serialized chunks as the scheduler receives them, or messages);
    refuses a total other than 0 or `expected_size` before reading on."""
    it = (_update_chunk_fields(c) if isinstance(c, bytes) else
          (c.header if c.HasField("header") else None, c.offset, c.data) for c in chunks)
    h = next(it, (None, 0, b""))[0]
    if h is None:
        raise RefusedError("update stream without a header")
    if h.total not in (0, expected_size):
        raise RefusedError(f"rank {h.rank}: update has {h.total} values, the model has {expected_size}")
    delta = np.empty(h.total, dtype=np.float64)
    filled = 0
    for _, offset, data in it:
        if len(data) % 8:
            raise RefusedError(f"rank {h.rank}: update chunk of {len(data)} bytes is not whole float64 values")
        values = np.frombuffer(data, dtype="<f8")
        if offset != filled or filled + values.size > h.total:
            raise RefusedError(f"rank {h.rank}: update chunk out of order or past the end")
        if not np.isfinite(values).all():      # bytes off the wire are checked as they come, in cache
            raise RefusedError(f"rank {h.rank}: update for step {h.step} has non-finite values")
        delta[filled:filled + values.size] = values
        filled += values.size
    if filled != h.total:
        raise RefusedError(f"rank {h.rank}: update stream ended after {filled} of {h.total} values")
    return RankUpdate(step=h.step, rank=h.rank, weight=h.weight, delta_sum=delta, sums=dict(h.sums),
                      reduced=h.reduced, clients=reports_from_proto(h))


def reports_from_proto(h: pb.UpdateHeader) -> tuple[ClientReport, ...]:
    """An update header's client reports; a report with a non-finite or negative number is refused."""
    reports = tuple(ClientReport(uid=c.uid, samples=c.samples, loss=c.loss, loss_sq=c.loss_sq, task_id=c.task_id)
                    for c in h.clients)
    for c in reports:
        if not (np.isfinite([c.samples, c.loss, c.loss_sq]).all() and min(c.samples, c.loss_sq) >= 0):
            raise RefusedError(f"rank {h.rank}: the report of client {c.uid!r} for step {h.step} holds a "
                               f"non-finite or negative number")
    return reports


def metrics_to_proto(m: RankMetrics) -> pb.MetricsPush:
    return pb.MetricsPush(step=m.step, rank=m.rank, sums=dict(m.sums), users=list(m.per_user),
                          user_values=list(m.per_user.values()))


def metrics_from_proto(msg: pb.MetricsPush) -> RankMetrics:
    if len(msg.users) != len(msg.user_values):
        raise RefusedError(f"rank {msg.rank}: {len(msg.users)} users but {len(msg.user_values)} per-user values")
    return RankMetrics(step=msg.step, rank=msg.rank, sums=dict(msg.sums),
                       per_user=dict(zip(msg.users, msg.user_values)))
