#!/usr/bin/env bash
# Installs flock's dependencies into the active Python environment (run it inside a venv).
#
#   ./install.sh               everything from pip, MPI included (the `mpich` wheel, whose mpirun lands in the venv)
#   ./install.sh --system-mpi  the same, but mpi4py built from source against the MPI on PATH (a cluster's own
#                              MPI, its module loaded first; MPICC names another compiler wrapper), and no
#                              `mpich` wheel: launch with that MPI's mpirun or with srun
set -euo pipefail
cd "$(dirname "$0")"
system_mpi=0
for arg in "$@"; do
    case "$arg" in
        --system-mpi) system_mpi=1 ;;
        -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
python -m pip install -q --upgrade pip
if [ "$system_mpi" = 1 ]; then
    mpicc=${MPICC:-mpicc}
    if ! command -v "$mpicc" > /dev/null; then
        echo "error: --system-mpi: no $mpicc on PATH (load the site's MPI module, or set MPICC)" >&2
        exit 2
    fi
    python -m pip install -q -r <(grep -v -E '^(mpi4py|mpich)==' requirements.txt)
    # from source, against $mpicc's MPI (never a cached wheel built against another); --ignore-installed
    # so that an mpi4py seen elsewhere on sys.path is neither taken for this one nor removed
    MPICC="$mpicc" python -m pip install -q --no-binary mpi4py --no-cache-dir --ignore-installed --no-deps \
        "$(grep -E '^mpi4py==' requirements.txt)"
    if python -m pip show -q mpich > /dev/null 2>&1; then
        echo "install.sh: note: the mpich wheel is installed here too; its mpirun (in the venv) does not" \
             "launch this mpi4py: 'python -m pip uninstall mpich', or launch with the system's mpirun or srun" >&2
    fi
else
    python -m pip install -q -r requirements.txt
fi
python -m pip install -q --no-deps -r requirements-data.txt
python -c "import torch, grpc, mpi4py.MPI, numpy, dp_accounting; print('flock: installed torch', torch.__version__, 'grpcio', grpc.__version__)"
python -c "import mpi4py.MPI as M; print('flock: mpi4py', M.Get_library_version().splitlines()[0].strip())"
