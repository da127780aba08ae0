"""The simulators' side of the scheduler service. Parameters are cached by version: a rank downloads each
version once. Every call has a deadline; calls that are safe to repeat are retried with backoff when the
scheduler is unreachable, then fail with a clear error."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from flock.common.domain import ParamLayout, Plan, RankMetrics, RankUpdate
from flock.common.errors import RefusedError, RunFailed
from protos import convert
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from scheduler.auth import TOKEN_KEY, channel_credentials

log = logging.getLogger(__name__)
RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class SchedulerClient:
    def __init__(self, address: str, *, rank: int, world_size: int, token: str, run_id: str = "",
                 tls_ca: Path | None = None, call_timeout: float = 120.0, retries: int = 5,
                 backoff_s: float = 0.5) -> None:
        self.address = address
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.call_timeout = call_timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._metadata = ((TOKEN_KEY, token),)
        if tls_ca is not None:
            self._channel = grpc.secure_channel(address, channel_credentials(tls_ca), options=convert.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=convert.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        # the parameter stream is read without copies (convert.params_from_chunks takes the raw chunks), and
        # PushUpdate's chunks come serialized already (convert.update_chunks): the same methods, raw (de)serializers
        self._get_params = self._channel.unary_stream("/flock.Scheduler/GetParams",
                                                      request_serializer=pb.ParamsRequest.SerializeToString,
                                                      response_deserializer=None)
        self._push_update = self._channel.stream_unary("/flock.Scheduler/PushUpdate",
                                                       request_serializer=convert.raw_or_serialize,
                                                       response_deserializer=pb.Ack.FromString)
        self._cached: tuple[int, ParamLayout, np.ndarray] | None = None

    def close(self) -> None:
        self._channel.close()

    def _call(self, what: str, fn, *args, timeout: float | None = None, retry: bool = False):
        """One call with a deadline; `retry` (only for calls safe to repeat) retries unreachable-scheduler
        errors with exponential backoff."""
        attempt = 0
        while True:
            try:
                return fn(*args, timeout=timeout or self.call_timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()
                if retry and code in RETRIABLE and attempt < self.retries:
                    delay = self.backoff_s * 2 ** attempt
                    attempt += 1
                    log.warning("scheduler %s: %s (%s); retry %d/%d in %.1f s", what, code.name, e.details(),
                                attempt, self.retries, delay)
                    time.sleep(delay)
                    continue
                if code == grpc.StatusCode.ABORTED:
                    raise RunFailed(e.details()) from None
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                    raise RefusedError(f"scheduler refused {what}: {e.details()}") from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(f"scheduler call {what} timed out: {e.details()}") from None
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise RuntimeError(f"scheduler call {what} at {self.address} failed{tries}: "
                                   f"{code.name}: {e.details()}") from None

    def hello(self) -> pb.HelloReply:
        """Checks that this rank belongs to the scheduler's run; waits up to 30 s for the server to come up."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            raise RuntimeError(f"rank {self.rank}: no scheduler answered at {self.address} within 30 s") from None
        return self._call("Hello", self._stub.Hello,
                          pb.HelloRequest(rank=self.rank, world_size=self.world_size, run_id=self.run_id), retry=True)

    def init_params(self, layout: ParamLayout, flat: np.ndarray) -> None:
        self._call("InitParams", self._stub.InitParams, convert.param_chunks(0, layout, flat))

    def get_plan(self, step: int, wait_s: float) -> Plan:
        request = pb.PlanRequest(rank=self.rank, step=step, timeout_s=wait_s)
        return convert.plan_from_proto(self._call("GetPlan", self._stub.GetPlan, request, timeout=wait_s + 30,
                                                  retry=True))

    def get_params(self, version: int) -> tuple[ParamLayout, np.ndarray]:
        """The shared parameters of `version` (read-only array; fetched once per version)."""
        if self._cached is None or self._cached[0] != version:
            self._cached = None
            got, layout, flat = self._call("GetParams", self._fetch, version, retry=True)
            if got != version:
                raise RefusedError(f"asked for parameters version {version}, got {got}")
            flat.flags.writeable = False
            self._cached = (version, layout, flat)
        return self._cached[1], self._cached[2]

    def _fetch(self, version: int, *, timeout: float, metadata) -> tuple[int, ParamLayout, np.ndarray]:
        stream = self._get_params(pb.ParamsRequest(version=version), timeout=timeout, metadata=metadata)
        return convert.params_from_chunks(stream)

    def push_update(self, update: RankUpdate) -> None:
        self._call("PushUpdate", self._push_update, convert.update_chunks(update))

    def push_metrics(self, metrics: RankMetrics) -> None:
        self._call("PushMetrics", self._stub.PushMetrics, convert.metrics_to_proto(metrics))


class LocalSchedulerClient:
    """The rank that hosts the scheduler calls it in-process: the same calls as SchedulerClient, on the
    `Scheduler` object itself. That rank then neither serializes its own parameters and update (75 MB a
    round for the LSTM) nor competes for its interpreter with the server threads that stream them to the
    other ranks, which always go through gRPC."""

    def __init__(self, scheduler, *, rank: int, run_id: str = "") -> None:
        self.scheduler = scheduler
        self.rank = rank
        self.run_id = run_id

    def close(self) -> None:
        pass

    def hello(self) -> pb.HelloReply:
        s = self.scheduler
        return pb.HelloReply(run_id=self.run_id, world_size=s.config.world_size, step=s.step)

    def init_params(self, layout: ParamLayout, flat: np.ndarray) -> None:
        self.scheduler.init_params(layout, flat)

    def get_plan(self, step: int, wait_s: float) -> Plan:
        return self.scheduler.plan(self.rank, step, wait_s)

    def get_params(self, version: int) -> tuple[ParamLayout, np.ndarray]:
        """The scheduler's own (read-only) array of `version`."""
        return self.scheduler.current_params(version)

    def on_version(self, publish: Callable[[int, np.ndarray], None], *, mirror: np.ndarray | None = None) -> None:
        """Has the scheduler call `publish(version, params)` with every new version as soon as it is made
        (in the thread that completed the step, under the scheduler's lock), after its server step wrote
        the parameters into `mirror` too (in the same pass). The current parameters go into `mirror` here,
        so that it holds them from now on (a step that changes nothing leaves them). `mirror=None` ends it."""
        with self.scheduler._cond:
            if mirror is not None and self.scheduler.params is not None:
                np.copyto(mirror, self.scheduler.params)
            self.scheduler.attach(on_version=publish, mirror=mirror)

    def on_plans(self, post: Callable[[int, list[Plan] | None, str | None], None] | None) -> None:
        """Has the scheduler call `post(step, plans, None)` with every rank's plans as each step opens, or
        `post(step, None, failure)` when the run fails (under its lock, in the thread that did it); the
        current step's plans (or failure) are posted here at once. `None` ends it."""
        s = self.scheduler
        with s._cond:
            s.attach(on_plans=post)
            if post is not None and s.failure is not None:
                post(s.step, None, s.failure)
            elif post is not None and s.params is not None:
                post(s.step, s._plans, None)

    def push_update(self, update: RankUpdate) -> None:
        self.scheduler.push_update(update)

    def push_metrics(self, metrics: RankMetrics) -> None:
        self.scheduler.push_metrics(metrics)
