"""The generated modules must be exactly what protoc makes of scheduler.proto today."""
from pathlib import Path

from protos.codegen import ROOT, generate


def test_generated_code_matches_proto(tmp_path: Path):
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == ["scheduler_pb2.py", "scheduler_pb2.pyi", "scheduler_pb2_grpc.py"]
    for path in fresh:
        committed = ROOT / "protos" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run python -m protos.codegen"
