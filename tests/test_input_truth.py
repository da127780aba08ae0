"""Inputs that used to give a run that succeeded with wrong numbers: FL-mobile's vocabularies, non-finite or
out-of-range options (command line and config files alike), diverged rounds, damaged checkpoints, a
mistyped data path, the run token in config.json, and errors every rank finds (exactly one message)."""
import json
import math
import zipfile

import numpy as np
import pytest

from application import main
from flock import Config, simulate
from flock.common.config import FIELDS, parse_config
from flock.common.errors import ConfigError, DataError, RunFailed
from reader.leaf_reddit import import_leaf_reddit
from reader.vocab import load_vocab
from tests.helpers import make_lm_data, run_app

SMALL = dict(rounds=3, clients_per_round=4, eval_every=3, seed=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def fl_mobile_variants(good: dict) -> dict[str, dict]:
    """The broken forms seen in the wild, from a correct vocab.json (PAD 0, UNK 1, words from 2)."""
    words = {w: i for w, i in good["vocab"].items() if w not in ("<PAD>", "<UNK>")}
    from_one = {w: i - 1 for w, i in words.items()}           # PaddleFL's builder: words numbered from 1
    return {
        "ids from 1, unk_symbol 1": {"vocab": from_one, "size": good["size"], "unk_symbol": 1, "pad_symbol": 0},
        "ids from 1 with a <UNK> entry": {"vocab": {**from_one, "<UNK>": 1}, "size": good["size"]},
        "no <PAD> entry": {"vocab": {**words, "<UNK>": 1}, "size": good["size"], "pad_symbol": 0},
        "no <PAD> at all": {"vocab": {**words, "<UNK>": 1}, "size": good["size"]},
    }


def metrics_of(data_dir, run_dir):
    history = simulate(Config(data_dir=str(data_dir), run_dir=str(run_dir), **SMALL))
    return [{k: v for k, v in r.items() if k not in ("seconds", "time", "clients_per_s", "rank_work_s")}
            for r in history.records]


def test_fl_mobile_vocabularies_give_the_metrics_of_a_correct_one(data, tmp_path):
    good = json.loads((data / "vocab.json").read_text())
    reference = metrics_of(data, tmp_path / "good")
    assert reference[-1]["top1"] > 0
    for name, broken in fl_mobile_variants(good).items():
        copy = tmp_path / name.replace(" ", "_").replace("<", "").replace(">", "")
        copy.mkdir()
        for day in ("20200101", "20200102"):
            (copy / day).symlink_to(data / day)
        (copy / "vocab.json").write_text(json.dumps(broken))
        vocab = load_vocab(copy / "vocab.json")
        assert vocab.ids == load_vocab(data / "vocab.json").ids, name
        assert metrics_of(copy, tmp_path / f"run-{copy.name}") == reference, name


def test_a_repair_says_what_it_changed_and_keys_the_cache(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"vocab": {"the": 1, "cat": 2}, "unk_symbol": 1, "pad_symbol": 0}))
    vocab = load_vocab(tmp_path / "v.json")
    assert vocab.ids == {"<PAD>": 0, "<UNK>": 1, "the": 2, "cat": 3} and vocab.size == 4
    assert "'the' shares id 1 with <UNK>" in vocab.repairs[0] and "size" not in vocab.repairs[-1]
    assert "2 ids changed" in vocab.repairs[-1]
    (tmp_path / "w.json").write_text(json.dumps({"vocab": {"<PAD>": 0, "<UNK>": 1, "the": 2, "cat": 3}, "size": 4}))
    correct = load_vocab(tmp_path / "w.json")
    assert correct.repairs == () and correct.digest == vocab.digest     # the same mapping, the same caches


@pytest.mark.parametrize("doc, message", [
    ({"vocab": {"the": 2, "cat": 2, "<PAD>": 0, "<UNK>": 1}}, "id 2 is shared by the words 'cat', 'the'"),
    ({"vocab": {"the": 2, "<UNK>": 1}, "unk_symbol": 3}, "unk_symbol is 3 but the entry '<UNK>' has id 1"),
    ({"vocab": {"the": 2, "<UNK>": 1, "<PAD>": 0}, "size": 2}, "size 2 is not above the largest id 2"),
    ({"vocab": {"the": 2.0}}, "integer ids"),
    ({"vocab": {"the": 2}, "pad_symbol": "0"}, "pad_symbol must be an integer"),
])
def test_vocabularies_that_cannot_be_repaired_are_refused(tmp_path, doc, message):
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_vocab(tmp_path / "v.json")


def test_the_importer_reports_a_vocabulary_it_will_repair(data, tmp_path):
    archive = tmp_path / "reddit_subsampled.zip"
    good = json.loads((data / "vocab.json").read_text())
    with zipfile.ZipFile(archive, "w") as z:
        z.write(data / "20200101" / "train_data.json", "new_small_data/train_data.json")
        z.write(data / "20200102" / "test_data.json", "new_small_data/test_data.json")
        z.writestr("vocab.json", json.dumps(fl_mobile_variants(good)["ids from 1, unk_symbol 1"]))
    summary = import_leaf_reddit(archive, tmp_path / "lm_data")
    assert "repair" in summary["vocab"] and "shares id 1 with <UNK>" in summary["vocab"]


# -- one rule set for every numeric option ------------------------------------------------------------------

def bad_values(name: str) -> list:
    """nan, inf and an out-of-range value for a numeric option (from its declared rule)."""
    f = FIELDS[name]
    rule, out = f.metadata, []
    if isinstance(f.default, float):
        out += [math.nan, math.inf, -math.inf]
    if rule["lo"] is not None:
        out.append(type(f.default)(rule["lo"]) - 1 if not rule["lo_open"] else type(f.default)(rule["lo"]))
    if rule["hi"] is not None:
        above = math.nextafter(float(rule["hi"]), math.inf) if isinstance(f.default, float) else rule["hi"] + 1
        out.append(rule["hi"] if rule["hi_open"] else above)
    return out


NUMERIC = [n for n, f in FIELDS.items() if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)]
CASES = [(n, v) for n in NUMERIC for v in bad_values(n)]


def test_every_numeric_option_has_a_rule():
    assert all(FIELDS[n].metadata["lo"] is not None for n in NUMERIC), "a numeric option without a range"
    assert len(CASES) > 2 * len(NUMERIC)


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_bad_numbers_from_the_command_line_and_a_config_file_exit_2_with_one_message(tmp_path, capsys, name, value):
    flag = "--" + name.replace("_", "-")
    assert main(["data", f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], err
    for suffix, text in ((".json", json.dumps({flag[2:]: value if math.isfinite(value) else str(value)})),
                         (".toml", f"{flag[2:]} = {value if math.isfinite(value) else ('nan' if value != value else ('inf' if value > 0 else '-inf'))}\n")):
        path = tmp_path / f"exp{suffix}"
        path.write_text(text)
        assert main(["data", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and str(path) in err[0] and flag[2:] in err[0], err


@pytest.mark.parametrize("key, value, message", [
    ("server-opt", "sgd", "--server-opt must be one of fedavg"),
    ("log-level", "verbose", "--log-level must be one of DEBUG"),
    ("device", "gpu", "--device must be one of auto, cpu, cuda"),
    ("data-server", "redis", "--data-server must be one of memory, sqlite"),
    ("rounds", True, "--rounds must be int"),
    ("lr", "fast", "--lr must be float"),
])
def test_config_file_choices_pass_the_command_lines_checks(tmp_path, key, value, message):
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps({key: value}))      # JSON is YAML
    with pytest.raises(ConfigError, match=message):
        parse_config(["data", "--config", str(path)])
    with pytest.raises(ConfigError, match=message.split(" must")[0]):
        parse_config(["data", f"--{key}", str(value)] if not isinstance(value, bool) else ["data", "--rounds", "x"])


def test_a_saved_config_with_bad_values_is_refused_on_resume(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data_dir": "x", "run_id": "r", "server_lr": "NaN", "lr": 1.0}))
    with pytest.raises(ConfigError, match="config.json"):
        from flock.common.config import resumed_config

        resumed_config(Config(resume=str(tmp_path)))


# -- results that are not finite stop the run -----------------------------------------------------------------

def test_a_round_where_every_client_diverges_stops_the_run(data, tmp_path):
    with pytest.raises(RunFailed, match="round 1: every client's local training gave non-finite"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path), lr=1e30, max_grad_norm=0, **SMALL))
    assert not (tmp_path / "checkpoint.npz").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_finite_server_parameters_stop_the_run_before_any_checkpoint(data, tmp_path):
    config = Config(data_dir=str(data), run_dir=str(tmp_path), server_lr=1e300, **{**SMALL, "checkpoint_every": 1})
    with pytest.raises(RunFailed, match="server step gave non-finite parameters"):
        simulate(config)
    if (tmp_path / "checkpoint.npz").exists():       # rounds before the failure may have checkpointed
        with np.load(tmp_path / "checkpoint.npz") as z:
            assert np.isfinite(z["params"]).all()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text


# -- files that promise a clear error --------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_checkpoint_is_a_data_error_and_is_left_alone(data, tmp_path, damage):
    run = tmp_path / "run"
    simulate(Config(data_dir=str(data), run_dir=str(run), **{**SMALL, "rounds": 2, "checkpoint_every": 1}))
    path = run / "checkpoint.npz"
    raw = path.read_bytes()
    damaged = {"truncate": raw[: len(raw) // 2], "garbage": raw[:100] + b"\x00" * 200 + raw[300:], "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(Exception) as info:
        simulate(Config(resume=str(run)))
    assert isinstance(info.value, (DataError,)) or "unreadable checkpoint" in str(info.value)
    assert "unreadable checkpoint" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == damaged


def test_a_mistyped_data_path_is_not_built_from_the_corpus(tmp_path, capsys):
    assert main([str(tmp_path / "reddti"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "error: DATA_DIR" in capsys.readouterr().err
    assert not (tmp_path / "reddti").exists()


def test_the_token_never_reaches_the_run_directory(data, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["application.py", str(data), "--token", "s3cret-value", "--token=other-s3cret"])
    simulate(Config(data_dir=str(data), run_dir=str(tmp_path), token="s3cret-value", **SMALL))
    saved = (tmp_path / "config.json").read_text()
    assert "s3cret" not in saved and json.loads(saved)["argv"][-2:] == ["***", "--token=***"]


# -- errors every rank finds: exactly one message --------------------------------------------------------------

@pytest.mark.mpi
def test_errors_every_rank_finds_print_exactly_one_message(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(("--resume", str(empty)), "no config.json there"), (("--model", "nosuch"), "--model 'nosuch'")]
    for attempt in range(20):
        args, expected = cases[attempt % 2]
        proc = run_app(2, data if attempt % 2 else "", tmp_path / f"run{attempt}", *args, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert out.count(expected) == 1 and out.count("error: ") == 1, f"try {attempt}: {out}"


@pytest.mark.mpi
def test_a_diverged_run_under_mpirun_stops_every_rank_with_one_message(data, tmp_path):
    proc = run_app(2, data, tmp_path, "--lr", "1e30", "--max-grad-norm", "0", "--rounds", "3", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("every client's local training gave non-finite or huge parameters") == 1, out
    assert out.count("error: round 1: every client") == 1 and "ERROR" not in out and "Traceback" not in out, out
    assert "diverged (a non-finite" not in out, out        # the users' own lines are DEBUG's


def test_diverged_clients_show_in_the_round_lines_and_one_warning(data, tmp_path, caplog):
    from flock import Config, simulate

    with caplog.at_level("INFO", logger="flock"):
        history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), rounds=3, clients_per_round=6,
                                  eval_every=0, trainer="tests.faulty:DivergeSome", shards=1), progress="lines")
    counts = [r.get("diverged", 0) for r in history.train]
    assert sum(counts) > 0 and all(r["clients"] + r.get("diverged", 0) == 6 for r in history.train), counts
    warnings = [m for m in caplog.messages if "diverged" in m and "dropped" in m]
    first = next(r for r in history.train if r.get("diverged"))
    assert warnings == [f"round {first['round']}: {first['diverged']} client(s) diverged (a non-finite or huge "
                        f"parameter after local training) and were dropped from the round; each round's line counts them "
                        f"(`diverged` in metrics.jsonl), --log-level DEBUG names the users"], caplog.messages
    lines = [m for m in caplog.messages if m.startswith("round ") and "/3  loss" in m]
    assert [f"({n} diverged)" in line for line, n in zip(lines, counts)] == [n > 0 for n in counts], lines
