"""Hosting the scheduler's gRPC service."""
from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc

from protos import convert
from scheduler.auth import TokenInterceptor, server_credentials
from scheduler.servicer import SchedulerServicer, add_to_server
from scheduler.state import Scheduler


def create_server(address: str, scheduler: Scheduler, *, run_id: str, token: str,
                  tls: tuple[Path, Path] | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server for `scheduler` on `address` ("127.0.0.1:0" picks a free port); returns it and
    the port. Every call must carry `token`; `tls` = (cert, key) serves TLS. Every rank can block in GetPlan
    at once, so the pool has a thread per rank and some spare."""
    if not token:
        raise ValueError("the scheduler needs a token")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=scheduler.config.world_size + 8,
                                                    thread_name_prefix="scheduler"),
                         interceptors=[TokenInterceptor(token)], options=convert.CHANNEL_OPTIONS)
    add_to_server(SchedulerServicer(scheduler, run_id), server)
    if tls is not None:
        port = server.add_secure_port(address, server_credentials(*tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"scheduler: cannot listen on {address}")
    server.start()
    return server, port
