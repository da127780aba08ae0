"""The README's plug-in guide: a reader, model and trainer from the user's own module, run under mpirun."""
import json

import numpy as np
import pytest

from tests.helpers import read_metrics, run_app

pytestmark = pytest.mark.mpi   # every test here starts mpirun


def write_csv_data(root):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4))
    for day, split in (("20200101", "train"), ("20200102", "test")):
        (root / day).mkdir(parents=True)
        with open(root / day / f"{split}.csv", "w") as f:
            for u in range(8):
                for _ in range(20):
                    x = rng.normal(size=4)
                    f.write(",".join([f"user{u}", str(int(np.argmax(w @ x)))] + [f"{v:.5f}" for v in x]) + "\n")
    (root / "classes.txt").write_text("3")
    return root


def test_user_plugins_run_under_mpirun(tmp_path):
    data = write_csv_data(tmp_path / "csv")
    proc = run_app(2, data, tmp_path / "run", "--reader", "examples.plugins:CsvReader",
                   "--model", "examples.plugins:LogisticModel", "--trainer", "examples.plugins:LogisticTrainer",
                   "--rounds", "8", "--clients-per-round", "4", "--local-epochs", "5", "--lr", "0.5",
                   "--server-lr", "1", "--eval-every", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["private_params"] == ["user_bias"]
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert evals[-1]["users"] == 8 and evals[-1]["accuracy"] > 0.6 and "accuracy_user_mean" in evals[-1]
