"""Issue 28: a trainer's (or model's) defaults for the optimisation options, config.json's sources, a
model whose outputs disagree with the data refused, booleans that a config file set turned off on the
command line, plug-ins found in the current folder by the installed command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flock import simulate
from flock.common.config import Config, parse_options
from flock.common.errors import ConfigError, SharedError
from flock.common.task_defaults import with_task_defaults
from tests.helpers import ROOT, make_arrays_data

TINY = {"reader": "arrays", "model": "tests.tiny_models:Linear", "trainer": "classifier"}


def test_the_classifier_defaults_apply_where_the_user_set_nothing():
    config, sources = with_task_defaults(Config(data_dir="d", **TINY, lr=0.2))
    assert config.lr == 0.2 and sources["lr"] == "caller"              # a given value wins
    assert (config.server_lr, config.max_grad_norm, config.batch_size) == (1.0, 0.0, 20)
    assert sources["server_lr"] == sources["batch_size"] == "trainer classifier"
    assert sources["rounds"] == "flock default"


def test_the_language_model_keeps_fl_mobiles_defaults():
    config, sources = with_task_defaults(Config(data_dir="d"))
    assert (config.lr, config.server_lr, config.max_grad_norm, config.batch_size) == (1.0, 1.85, 5.0, 5)
    assert sources["lr"] == "trainer lm"


def test_the_trainers_defaults_win_over_the_models_and_a_given_value_over_both(tmp_path):
    config, sources = with_task_defaults(Config(data_dir="d", **{**TINY, "model": "tests.tiny_models:WithDefaults"}))
    assert config.lr == 0.05 and sources["lr"] == "trainer classifier"
    assert config.local_epochs == 2 and sources["local_epochs"] == "model tests.tiny_models:WithDefaults"
    # a value given on the command line wins even where it equals Config's default
    base = tmp_path / "base.toml"
    base.write_text('data-dir = "d"\nreader = "arrays"\ntrainer = "classifier"\nmodel = "tests.tiny_models:Linear"\n')
    config, given = parse_options(["--config", str(base), "--lr", "1.0"])
    config, sources = with_task_defaults(config, given)
    assert config.lr == 1.0 and sources["lr"] == "command line" and sources["reader"] == "config file"
    assert config.server_lr == 1.0 and sources["server_lr"] == "trainer classifier"


def test_config_json_records_where_each_value_came_from(tmp_path):
    data = make_arrays_data(tmp_path / "data")
    base = tmp_path / "base.toml"
    base.write_text(f'data-dir = "{data}"\nreader = "arrays"\ntrainer = "classifier"\n'
                    f'model = "tests.tiny_models:Linear"\nrounds = 1\n')
    config, given = parse_options(["--config", str(base), "--server-lr", "0.5", "--run-dir", str(tmp_path / "run")])
    simulate(config, given=given)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 0.05 and saved["server_lr"] == 0.5 and saved["batch_size"] == 20
    assert saved["sources"]["lr"] == "trainer classifier"
    assert saved["sources"]["server_lr"] == "command line"
    assert saved["sources"]["rounds"] == "config file"
    assert saved["sources"]["clients_per_round"] == "flock default"
    assert "token" not in saved["sources"]


def test_a_model_whose_outputs_disagree_with_the_classes_is_refused(tmp_path):
    data = make_arrays_data(tmp_path / "data", classes=3)
    config = Config(data_dir=str(data), **{**TINY, "model": "tests.tiny_models:OneClassTooMany"}, rounds=1,
                    run_dir=str(tmp_path / "run"))
    with pytest.raises(SharedError, match=r"last layer has 4 outputs, but the data has 3 classes"):
        simulate(config)


def test_a_plugin_default_outside_the_rules_is_refused_as_a_users_value_would_be(monkeypatch):
    from trainer.classifier import ClassifierTrainer

    monkeypatch.setattr(ClassifierTrainer, "defaults", {"lr": -1.0})
    with pytest.raises(ConfigError, match=r"--lr must be above 0.*trainer classifier"):
        with_task_defaults(Config(data_dir="d", **TINY))
    monkeypatch.setattr(ClassifierTrainer, "defaults", {"rounds": 3})
    with pytest.raises(ConfigError, match="defaults only for"):
        with_task_defaults(Config(data_dir="d", **TINY))


def test_no_quiet_overrides_quiet_from_a_config_file(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('data-dir = "d"\nquiet = true\nbuiltin-data = true\n')
    assert parse_options(["--config", str(base)])[0].quiet
    config, given = parse_options(["--config", str(base), "--no-quiet", "--no-builtin-data"])
    assert not config.quiet and not config.builtin_data and given["quiet"] == "command line"


def test_trackers_are_repeatable_or_comma_separated_and_checked(tmp_path):
    assert parse_options(["d", "--tracker", "csv,mlflow", "--tracker", "wandb"])[0].tracker == ("csv", "mlflow", "wandb")
    with pytest.raises(ConfigError, match="--tracker must be one of"):
        parse_options(["d", "--tracker", "tensorboard"])
    base = tmp_path / "base.toml"
    base.write_text('data-dir = "d"\ntracker = "csv"\n')
    assert parse_options(["--config", str(base)])[0].tracker == ("csv",)


def test_the_installed_command_finds_a_plugin_in_the_current_folder(tmp_path):
    """As the console script starts: its own folder first on sys.path, not the current one (`python -P`)."""
    data = make_arrays_data(tmp_path / "data")
    (tmp_path / "mymod.py").write_text((ROOT / "tests" / "tiny_models.py").read_text())
    script = "import sys; from application import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-P", "-c", script, str(data), "--reader", "arrays", "--trainer",
                           "classifier", "--model", "mymod:Linear", "--rounds", "1", "--run-dir", str(tmp_path / "run"),
                           "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert "mymod" not in sys.modules and str(Path.cwd()) != str(tmp_path)
