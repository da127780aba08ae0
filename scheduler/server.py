"""Hosting the scheduler's gRPC service."""
from __future__ import annotations

from concurrent import futures

import grpc

from protos import convert
from protos import scheduler_pb2_grpc as pb_grpc
from scheduler.servicer import SchedulerServicer
from scheduler.state import Scheduler


def create_server(address: str, scheduler: Scheduler, *, run_id: str) -> tuple[grpc.Server, int]:
    """A started gRPC server for `scheduler` on `address` ("127.0.0.1:0" picks a free port); returns it and
    the port. Every rank can block in GetPlan at once, so the pool has a thread per rank and some spare."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=scheduler.config.world_size + 8,
                                                    thread_name_prefix="scheduler"),
                         options=convert.CHANNEL_OPTIONS)
    pb_grpc.add_SchedulerServicer_to_server(SchedulerServicer(scheduler, run_id), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"scheduler: cannot listen on {address}")
    server.start()
    return server, port
