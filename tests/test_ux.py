"""Config files, the quiet mode, per-user evaluation output and the plot tool."""
import json
import subprocess
import sys

import pytest

from flock.common.config import parse_config
from flock.common.errors import ConfigError
from flock.plot import plot
from tests.helpers import ROOT, make_lm_data, read_metrics


def test_config_file_then_command_line(tmp_path):
    toml = tmp_path / "exp.toml"
    toml.write_text('rounds = 3\nclients-per-round = 4\nserver_lr = 1\nprivate = "decoder.bias"\n')
    c = parse_config(["lm_data", "--config", str(toml), "--rounds", "7"])
    assert (c.rounds, c.clients_per_round, c.server_lr, c.private) == (7, 4, 1.0, ("decoder.bias",))
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("data_dir: somewhere\nseed: 5\nprivate: [a, b]\n")
    c = parse_config(["--config", str(yaml_file)])
    assert (c.data_dir, c.seed, c.private) == ("somewhere", 5, ("a", "b"))


@pytest.mark.parametrize("content, message", [
    ("roundz = 3\n", "unknown option 'roundz'"),
    ('rounds = "many"\n', "'rounds': --rounds must be int"),
    ("rounds = [\n", "not valid TOML"),
])
def test_config_file_errors_name_the_key(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse_config(["lm_data", "--config", str(path)])


def test_saved_config_reruns_the_experiment_and_plots(tmp_path):
    data = make_lm_data(tmp_path / "data")
    app = [sys.executable, str(ROOT / "application.py")]
    first = subprocess.run([*app, str(data), "--rounds", "2", "--clients-per-round", "3", "--eval-every", "1",
                            "--seed", "4", "--quiet", "--run-dir", str(tmp_path / "a")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("eval @ round 2") and "round 1/2" not in first.stdout + first.stderr   # quiet
    again = subprocess.run([*app, "--config", str(tmp_path / "a" / "config.json"), "--run-dir", str(tmp_path / "b"),
                            "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r.get("top1") for r in a] == [r.get("top1") for r in b]
    users = json.loads((tmp_path / "a" / "eval_users.json").read_text())
    assert users["round"] == 2 and users["metric"] == "top1" and len(users["users"]) == 12
    out = plot([tmp_path / "a", tmp_path / "b"], tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="optional extra: pip install -r requirements-extras.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_lm_data(tmp_path / "data")
    proc = subprocess.run([sys.executable, str(ROOT / "application.py"), str(data), "--rounds", "2",
                           "--clients-per-round", "3", "--eval-every", "1", "--quiet", "--run-dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/top1", "eval/top1_user_mean"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/top1")] == [1, 2]


@pytest.mark.parametrize("target, ok", [("top1=10", False), ("top1=-0.1", False), ("top1=0.1", True)])
def test_a_target_for_a_fraction_must_be_a_fraction(tmp_path, capsys, target, ok):
    from application import main

    data = make_lm_data(tmp_path / "data")
    code = main([str(data), "--rounds", "1", "--eval-every", "1", "--target", target, "--run-dir", str(tmp_path / "run"),
                 "--quiet"])
    if ok:
        assert code == 0
    else:
        assert code == 2 and not any((tmp_path / "run").rglob("*.json*"))     # nothing of a run written
        assert "is a fraction of correct predictions, in [0, 1]" in capsys.readouterr().err
