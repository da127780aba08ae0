"""Regenerates the Python modules from `protos/scheduler.proto`: `python -m protos.codegen [OUT_DIR]`."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Runs protoc on scheduler.proto into `out_dir` (which gets a `protos/` folder); returns the files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", str(ROOT / "protos" / "scheduler.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/scheduler.proto")
    return sorted((out_dir / "protos").glob("scheduler_pb2*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
