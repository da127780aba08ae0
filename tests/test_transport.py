"""Parameter chunking and the real gRPC service on loopback (port 0)."""
import threading

import numpy as np
import pytest

from flock.common.domain import ParamLayout, RankUpdate
from flock.common.errors import RefusedError
from protos import convert
from protos import scheduler_pb2 as pb
from reader.leaf import LeafRedditReader
from scheduler.client import SchedulerClient
from scheduler.optim import make_server_optimizer
from scheduler.server import create_server
from scheduler.state import Scheduler, SchedulerConfig
from tests.helpers import make_lm_data

TOKEN = "s3cret"
BIG = ParamLayout(names=("emb", "bias"), shapes=((3000, 1000), (7,)))   # 12 MB: three times gRPC's 4 MB default


def test_param_chunks_roundtrip_large_vector():
    flat = np.random.default_rng(0).normal(size=BIG.size).astype(np.float32)
    chunks = list(convert.param_chunks(4, BIG, flat, chunk_bytes=1 << 20))
    assert len(chunks) == 12 and all(len(c.data) <= 1 << 20 for c in chunks)
    version, layout, back = convert.params_from_chunks(chunks)
    assert version == 4 and layout == BIG
    np.testing.assert_array_equal(back, flat)


def test_hand_serialized_chunks_are_the_messages_protobuf_would_make():
    flat = np.random.default_rng(2).normal(size=BIG.size).astype(np.float32)
    raw = convert.serialized_param_chunks(3, BIG, flat, chunk_bytes=1 << 20)
    made = list(convert.param_chunks(3, BIG, flat, chunk_bytes=1 << 20))
    assert [pb.ParamChunk.FromString(r) for r in raw] == made
    for stream in (raw, made):     # as a rank receives it (bytes, read without copies), or as messages
        version, layout, back = convert.params_from_chunks(stream)
        assert version == 3 and layout == BIG
        np.testing.assert_array_equal(back, flat)
    with pytest.raises(RefusedError, match="out of order"):
        convert.params_from_chunks([raw[0], raw[2]])
    update = RankUpdate(step=2, rank=1, weight=3.0, delta_sum=np.arange(300, dtype=np.float64), sums={"loss": 1.5})
    chunks = [pb.UpdateChunk.FromString(c) for c in convert.update_chunks(update, chunk_bytes=1000)]
    assert chunks[0].header.total == 300 and [c.offset for c in chunks[1:]] == [0, 125, 250]
    np.testing.assert_array_equal(np.frombuffer(b"".join(c.data for c in chunks[1:]), "<f8"), update.delta_sum)
    for stream in (chunks, list(convert.update_chunks(update, chunk_bytes=1000))):   # messages, or raw bytes
        back = convert.update_from_chunks(stream, expected_size=300)
        assert (back.step, back.rank, back.weight, back.sums) == (2, 1, 3.0, {"loss": 1.5})
        np.testing.assert_array_equal(back.delta_sum, update.delta_sum)
    raw = list(convert.update_chunks(update, chunk_bytes=1000))
    with pytest.raises(RefusedError, match="past the end of the message"):
        convert.update_from_chunks([raw[0], raw[1][:-3]], expected_size=300)


def test_out_of_order_or_short_streams_are_refused():
    flat = np.zeros(BIG.size, dtype=np.float32)
    chunks = list(convert.param_chunks(0, BIG, flat, chunk_bytes=1 << 20))
    with pytest.raises(RefusedError, match="out of order"):
        convert.params_from_chunks([chunks[0], chunks[2]])
    with pytest.raises(RefusedError, match="ended early"):
        convert.params_from_chunks(chunks[:-1])
    update = RankUpdate(step=0, rank=1, weight=1.0, delta_sum=np.ones(100))
    with pytest.raises(RefusedError, match="has 100 values, the model has 50"):
        convert.update_from_chunks(convert.update_chunks(update), expected_size=50)
    back = convert.update_from_chunks(convert.update_chunks(update, chunk_bytes=64), expected_size=100)
    np.testing.assert_array_equal(back.delta_sum, update.delta_sum)


@pytest.fixture()
def served(tmp_path):
    reader = LeafRedditReader(make_lm_data(tmp_path / "data"))
    scheduler = Scheduler(SchedulerConfig(world_size=2, rounds=1, clients_per_round=3), reader=reader,
                          optimizer=make_server_optimizer("fedavg", server_lr=1.0),
                          train_ratios={}, eval_ratios={})
    server, port = create_server("127.0.0.1:0", scheduler, run_id="test", token=TOKEN)
    yield scheduler, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_grpc_round_trip_over_4mb(served):
    scheduler, address = served
    clients = [SchedulerClient(address, rank=r, world_size=2, run_id="test", token=TOKEN) for r in range(2)]
    assert clients[0].hello().world_size == 2
    flat = np.random.default_rng(1).normal(size=BIG.size).astype(np.float32)
    clients[0].init_params(BIG, flat)
    layout, got = clients[1].get_params(0)
    assert layout == BIG
    np.testing.assert_array_equal(got, flat)
    plans = [c.get_plan(0, wait_s=5) for c in clients]
    assert sum(len(p.users) for p in plans) == 3
    delta = np.full(BIG.size, 0.5)
    clients[0].push_update(RankUpdate(step=0, rank=0, weight=2.0, delta_sum=2.0 * delta))
    with pytest.raises(RefusedError, match="duplicate"):
        clients[0].push_update(RankUpdate(step=0, rank=0, weight=2.0, delta_sum=2.0 * delta))
    with pytest.raises(RefusedError, match="has 5 values"):
        clients[1].push_update(RankUpdate(step=0, rank=1, weight=1.0, delta_sum=np.zeros(5)))
    clients[1].push_update(RankUpdate(step=0, rank=1, weight=0.0, delta_sum=np.zeros(0)))
    _, new = clients[1].get_params(1)
    np.testing.assert_allclose(new, flat + 0.5, rtol=1e-6)
    with pytest.raises(RefusedError, match="version 0 requested, current is 1"):
        clients[0]._cached = None
        clients[0].get_params(0)


def test_get_plan_blocks_until_the_step_opens(served):
    scheduler, address = served
    client = SchedulerClient(address, rank=1, world_size=2, run_id="test", token=TOKEN)
    got = []
    waiter = threading.Thread(target=lambda: got.append(client.get_plan(0, wait_s=10)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()                       # no parameters yet: the step is not open
    scheduler.init_params(ParamLayout(names=("w",), shapes=((3,),)), np.zeros(3, dtype=np.float32))
    waiter.join(5)
    assert got and got[0].step == 0


def test_wrong_world_or_run_is_refused(served):
    _, address = served
    with pytest.raises(RefusedError, match="world of 3"):
        SchedulerClient(address, rank=0, world_size=3, run_id="test", token=TOKEN).hello()
    with pytest.raises(RefusedError, match="belongs to run 'other'"):
        SchedulerClient(address, rank=0, world_size=2, run_id="other", token=TOKEN).hello()


def test_calls_without_the_token_are_refused(served):
    _, address = served
    intruder = SchedulerClient(address, rank=0, world_size=2, run_id="test", token="guess")
    with pytest.raises(RefusedError, match="wrong scheduler token"):
        intruder.hello()
    with pytest.raises(RefusedError, match="wrong scheduler token"):
        intruder.get_params(0)
    with pytest.raises(RefusedError, match="wrong scheduler token"):
        intruder.push_update(RankUpdate(step=0, rank=0, weight=0.0, delta_sum=np.zeros(0)))


def test_unreachable_scheduler_is_retried_then_reported():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]            # nothing listens here once the socket is closed
    client = SchedulerClient(f"127.0.0.1:{port}", rank=0, world_size=1, token=TOKEN, retries=2, backoff_s=0.05)
    with pytest.raises(RuntimeError, match=r"GetPlan at 127\.0\.0\.1:\d+ failed after 3 tries: UNAVAILABLE"):
        client.get_plan(0, wait_s=1)


def test_tls_with_a_self_signed_certificate(tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=flock-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    reader = LeafRedditReader(make_lm_data(tmp_path / "data"))
    scheduler = Scheduler(SchedulerConfig(world_size=1, rounds=1, clients_per_round=2), reader=reader,
                          optimizer=make_server_optimizer("fedavg", server_lr=1.0), train_ratios={}, eval_ratios={})
    server, port = create_server("127.0.0.1:0", scheduler, run_id="tls", token=TOKEN, tls=(cert, key))
    try:
        secure = SchedulerClient(f"127.0.0.1:{port}", rank=0, world_size=1, run_id="tls", token=TOKEN, tls_ca=cert)
        assert secure.hello().run_id == "tls"
        plain = SchedulerClient(f"127.0.0.1:{port}", rank=0, world_size=1, token=TOKEN, retries=0)
        with pytest.raises(RuntimeError, match="UNAVAILABLE"):
            plain.get_plan(0, wait_s=1)
    finally:
        server.stop(grace=None)
