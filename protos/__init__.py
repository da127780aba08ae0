"""The wire contract. `scheduler.proto` is the source; `scheduler_pb2*.py` are generated from it by
`python -m protos.codegen` (a test fails if they drift). Only `protos/convert.py`, the servicer and the
scheduler client touch the generated classes."""
