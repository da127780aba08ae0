"""Checkpoint and resume: a job killed with SIGKILL mid-run, resumed, ends with the uninterrupted metrics."""
import json

import numpy as np
import pytest

from flock.common.domain import ParamLayout, RankUpdate
from flock.common.errors import ConfigError
from reader.leaf import LeafRedditReader
from scheduler.optim import make_server_optimizer
from scheduler.state import Scheduler, SchedulerConfig
from tests.helpers import kill_after_train_rows, make_lm_data, read_metrics, run_app

ARGS = ("--rounds", "6", "--clients-per-round", "4", "--eval-every", "2", "--checkpoint-every", "2", "--seed", "5",
        "--trainer", "tests.faulty:SlowTrainer", "--private", "decoder.bias", "--data-server", "sqlite")


@pytest.mark.mpi
@pytest.mark.parametrize("server", [(), ("--server-opt", "fedadam", "--server-lr", "0.05")], ids=["fedavg", "fedadam"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, server):
    """With FedAdam the optimizer's moments must come back from the checkpoint too."""
    data = make_lm_data(tmp_path / "data")
    whole = tmp_path / "whole"
    proc = run_app(2, data, whole, *ARGS, *server)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    cut = tmp_path / "cut"
    done = kill_after_train_rows(2, data, cut, *ARGS, *server)
    assert 3 <= done < 6, "the kill came too late"
    assert (cut / "checkpoint.npz").exists()

    resumed = run_app(2, data, cut, "--resume", str(cut))   # run_app passes --run-dir; --resume wins
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = read_metrics(whole), read_metrics(cut)
    assert [(r["kind"], r["round"]) for r in a] == [(r["kind"], r["round"]) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "top1", "top1_user_mean", "samples", "tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6), (x["kind"], x["round"], key)


@pytest.mark.mpi
def test_a_finished_run_dir_is_not_overwritten(tmp_path):
    data = make_lm_data(tmp_path / "data")
    assert run_app(1, data, tmp_path / "run", "--rounds", "1", "--clients-per-round", "2").returncode == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = run_app(1, data, tmp_path / "run", "--rounds", "1", "--clients-per-round", "2")
    assert again.returncode == 2 and "already holds a run" in again.stdout + again.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.mpi
def test_resume_refuses_another_data_set(tmp_path):
    data = make_lm_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert run_app(1, data, run_dir, "--rounds", "2", "--clients-per-round", "2",
                   "--checkpoint-every", "1").returncode == 0
    other = make_lm_data(tmp_path / "other", seed=9)
    proc = run_app(1, other, run_dir, "--resume", str(run_dir))
    assert proc.returncode == 2 and "checkpoint was made on other data" in proc.stdout + proc.stderr
    vocab = json.loads((data / "vocab.json").read_text())           # same users, another vocabulary
    words = [w for w in vocab["vocab"] if not w.startswith("<")]
    vocab["vocab"][words[0]], vocab["vocab"][words[1]] = vocab["vocab"][words[1]], vocab["vocab"][words[0]]
    (data / "vocab.json").write_text(json.dumps(vocab))
    proc = run_app(1, data, run_dir, "--resume", str(run_dir))
    assert proc.returncode == 2 and "checkpoint was made on other data" in proc.stdout + proc.stderr


def test_restore_refuses_another_model(tmp_path):
    reader = LeafRedditReader(make_lm_data(tmp_path / "data"))

    def scheduler():
        return Scheduler(SchedulerConfig(world_size=1, rounds=2, clients_per_round=2, checkpoint_every=1),
                         reader=reader, optimizer=make_server_optimizer("fedavg", server_lr=1.0),
                         train_ratios={}, eval_ratios={}, checkpoint_path=tmp_path / "ck.npz")

    s = scheduler()
    layout = ParamLayout(names=("w",), shapes=((4,),))
    s.init_params(layout, np.zeros(4, dtype=np.float32))
    s.push_update(RankUpdate(step=0, rank=0, weight=1.0, delta_sum=np.ones(4)))
    assert scheduler().restore(tmp_path / "ck.npz", layout) == 1
    with pytest.raises(ConfigError, match="another model"):
        scheduler().restore(tmp_path / "ck.npz", ParamLayout(names=("w",), shapes=((5,),)))


def test_a_start_that_fails_leaves_no_empty_folder_it_made(tmp_path):
    """A model that does not fit the data: the run folder (and the parents made for it) go again; a folder that
    was there before stays, and so does one that something was written into."""
    from flock import Config, simulate
    from flock.common.errors import SharedError

    data = make_lm_data(tmp_path / "data")
    bad = dict(data_dir=str(data), rounds=1, model="tests.tiny_models:Linear")
    with pytest.raises(SharedError, match=r"^--model tests.tiny_models:Linear cannot be built for this data: "
                                          r"KeyError: 'input_0' \(the data's spec: \{'vocab_size'"):
        simulate(Config(run_dir=str(tmp_path / "new" / "deeper" / "run"), **bad))
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    with pytest.raises(SharedError):
        simulate(Config(run_dir=str(tmp_path / "there" / "run"), **bad))
    assert [p.name for p in tmp_path.iterdir() if p.name == "there"] == ["there"]
    assert not (tmp_path / "there" / "run").exists()
    with pytest.raises(Exception, match="non-finite or huge"):      # fails in round 1, after config.json
        simulate(Config(data_dir=str(data), rounds=1, lr=1e30, max_grad_norm=0.0, run_dir=str(tmp_path / "kept")))
    assert (tmp_path / "kept" / "config.json").is_file()


def test_a_plug_in_models_own_refusal_is_its_message(tmp_path):
    from flock import Config, simulate
    from flock.common.errors import SharedError

    data = make_lm_data(tmp_path / "data")
    with pytest.raises(SharedError, match=r"^--model tests.tiny_models:Picky cannot be built for this data: needs "
                                          r"feature vectors \(the spec's input_0\), not token sequences \(the data's"):
        simulate(Config(data_dir=str(data), rounds=1, model="tests.tiny_models:Picky", run_dir=str(tmp_path / "r")))
