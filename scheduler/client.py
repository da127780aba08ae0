"""The simulators' side of the scheduler service. Parameters are cached by version: a rank downloads each
version once."""
from __future__ import annotations

import grpc
import numpy as np

from common.domain import ParamLayout, Plan, RankMetrics, RankUpdate
from common.errors import RefusedError
from protos import convert
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc


class SchedulerClient:
    def __init__(self, address: str, *, rank: int, world_size: int, run_id: str = "",
                 call_timeout: float = 120.0) -> None:
        self.address = address
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.call_timeout = call_timeout
        self._channel = grpc.insecure_channel(address, options=convert.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._cached: tuple[int, ParamLayout, np.ndarray] | None = None

    def close(self) -> None:
        self._channel.close()

    def _call(self, what: str, fn, *args, timeout: float | None = None):
        try:
            return fn(*args, timeout=timeout or self.call_timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RefusedError(f"scheduler refused {what}: {e.details()}") from None
            raise RuntimeError(f"scheduler call {what} at {self.address} failed: {e.code().name}: {e.details()}") from None

    def hello(self) -> pb.HelloReply:
        """Checks that this rank belongs to the scheduler's run; waits up to 30 s for the server to come up."""
        grpc.channel_ready_future(self._channel).result(timeout=30)
        return self._call("Hello", self._stub.Hello,
                          pb.HelloRequest(rank=self.rank, world_size=self.world_size, run_id=self.run_id))

    def init_params(self, layout: ParamLayout, flat: np.ndarray) -> None:
        self._call("InitParams", self._stub.InitParams, convert.param_chunks(0, layout, flat))

    def get_plan(self, step: int, wait_s: float) -> Plan:
        request = pb.PlanRequest(rank=self.rank, step=step, timeout_s=wait_s)
        return convert.plan_from_proto(self._call("GetPlan", self._stub.GetPlan, request, timeout=wait_s + 30))

    def get_params(self, version: int) -> tuple[ParamLayout, np.ndarray]:
        """The shared parameters of `version` (read-only array; fetched once per version)."""
        if self._cached is None or self._cached[0] != version:
            self._cached = None
            stream = self._call("GetParams", self._stub.GetParams, pb.ParamsRequest(version=version))
            try:
                got, layout, flat = convert.params_from_chunks(stream)
            except grpc.RpcError as e:
                raise RefusedError(f"scheduler refused GetParams: {e.details()}") from None
            if got != version:
                raise RefusedError(f"asked for parameters version {version}, got {got}")
            flat.flags.writeable = False
            self._cached = (version, layout, flat)
        return self._cached[1], self._cached[2]

    def push_update(self, update: RankUpdate) -> None:
        self._call("PushUpdate", self._stub.PushUpdate, convert.update_chunks(update))

    def push_metrics(self, metrics: RankMetrics) -> None:
        self._call("PushMetrics", self._stub.PushMetrics, convert.metrics_to_proto(metrics))
