"""gRPC adapter over `Scheduler`: decodes messages, calls the plain object, maps its errors to statuses."""
from __future__ import annotations

import functools
import logging
import threading

import grpc

from flock.common.errors import RefusedError, RunFailed
from protos import convert
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from scheduler.state import Scheduler

log = logging.getLogger(__name__)


def _abort_with_status(context, method_name: str, e: Exception) -> None:
    """RunFailed -> ABORTED (the run is over), RefusedError -> FAILED_PRECONDITION, TimeoutError ->
    DEADLINE_EXCEEDED, anything else -> INTERNAL (a bug on the scheduler side: logged where it runs)."""
    if isinstance(e, RunFailed):
        context.abort(grpc.StatusCode.ABORTED, str(e))
    if isinstance(e, RefusedError):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, TimeoutError):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
    log.exception("scheduler call %s failed", method_name)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


def _statuses(method):
    """Unary methods: errors mapped to statuses by _abort_with_status."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort_with_status(context, method.__name__, e)
    return wrapper


def _streaming(method):
    """Server-streaming methods (generators): the same mapping."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as e:
            _abort_with_status(context, method.__name__, e)
    return wrapper


def add_to_server(servicer: "SchedulerServicer", server: grpc.Server) -> None:
    """The generated registration, except that GetParams streams pre-serialized chunks (bytes) as they are,
    and PushUpdate hands its chunks' bytes to convert.update_from_chunks (which reads them without copies)."""
    captured: dict = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            captured.update(service=service, handlers=dict(handlers))

    pb_grpc.add_SchedulerServicer_to_server(servicer, Capture())
    service, handlers = captured["service"], captured["handlers"]
    get, push = handlers["GetParams"], handlers["PushUpdate"]
    handlers["GetParams"] = grpc.unary_stream_rpc_method_handler(
        get.unary_stream, request_deserializer=get.request_deserializer, response_serializer=convert.raw_or_serialize)
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(   # convert.update_from_chunks reads the bytes
        push.stream_unary, request_deserializer=None, response_serializer=push.response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class SchedulerServicer(pb_grpc.SchedulerServicer):
    def __init__(self, scheduler: Scheduler, run_id: str) -> None:
        self.scheduler = scheduler
        self.run_id = run_id
        self._chunks_lock = threading.Lock()
        self._chunks: tuple[tuple[int, int, int], list[bytes]] | None = None

    @_statuses
    def Hello(self, request, context):
        s = self.scheduler
        if request.world_size != s.config.world_size:
            raise RefusedError(f"rank {request.rank} runs in a world of {request.world_size}, "
                               f"the scheduler expects {s.config.world_size}")
        if request.run_id and request.run_id != self.run_id:
            raise RefusedError(f"rank {request.rank} belongs to run {request.run_id!r}, this is {self.run_id!r}")
        return pb.HelloReply(run_id=self.run_id, world_size=s.config.world_size, step=s.step)

    @_statuses
    def InitParams(self, request_iterator, context):
        _, layout, flat = convert.params_from_chunks(request_iterator)
        self.scheduler.init_params(layout, flat)
        return pb.Ack()

    @_statuses
    def GetPlan(self, request, context):
        plan = self.scheduler.plan(request.rank, request.step, request.timeout_s or 60.0)
        return convert.plan_to_proto(plan)

    @_streaming
    def GetParams(self, request, context):
        layout, flat = self.scheduler.current_params(request.version)
        wanted = request.chunk_bytes or convert.CHUNK_BYTES       # kept between 64 KiB and the message limit
        chunk_bytes = min(max(wanted, 1 << 16), convert.MAX_MESSAGE_BYTES - (1 << 20))
        yield from self._serialized(request.version, layout, flat, chunk_bytes)

    def _serialized(self, version: int, layout, flat, chunk_bytes: int) -> list[bytes]:
        """The version's chunks, serialized once for all ranks (the latest version's only)."""
        key = (version, id(flat), chunk_bytes)
        with self._chunks_lock:
            if self._chunks is None or self._chunks[0] != key:
                self._chunks = (key, convert.serialized_param_chunks(version, layout, flat, chunk_bytes))
            return self._chunks[1]

    @_statuses
    def PushUpdate(self, request_iterator, context):
        layout = self.scheduler.layout
        update = convert.update_from_chunks(request_iterator, layout.size if layout is not None else 0)
        self.scheduler.push_update(update)
        return pb.Ack()

    @_statuses
    def PushMetrics(self, request, context):
        self.scheduler.push_metrics(convert.metrics_from_proto(request))
        return pb.Ack()
