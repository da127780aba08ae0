"""A task's own defaults for the optimisation options: a trainer (or model) class may say, in a class
attribute `defaults`, what suits its task (the language model FL-mobile's lr 1.0 and server lr 1.85, a
classifier plain FedAvg's). An option the user did not set takes the trainer's default, else the model's,
else Config's; the result is built as any Config, so a plug-in's default passes the same checks as a
user's value. Which source each option's value came from is recorded in config.json (`sources`)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from flock.common.config import CALLER, FIELDS, Config
from flock.common.errors import ConfigError

# the options a plug-in may give a default for: how its task is optimised, nothing about where or how it runs
TASK_OPTIONS = ("lr", "server_lr", "server_opt", "max_grad_norm", "batch_size", "local_epochs", "momentum",
                "prox_mu")
FLOCK_DEFAULT = "flock default"


def plugin_defaults(config: Config) -> tuple[dict[str, Any], dict[str, str]]:
    """The defaults the run's model and trainer declare (the trainer's win over the model's), and for each
    the source's name ("trainer classifier"). A Flower app brings its own settings: none."""
    if config.flower_client or config.flower_app:
        return {}, {}
    from flock.common.plugins import resolve

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for kind, name in (("model", config.model), ("trainer", config.trainer)):
        declared = getattr(resolve(kind, name), "defaults", None) or {}
        if not isinstance(declared, Mapping):
            raise ConfigError(f"--{kind} {name}: `defaults` must be a mapping of option name to value")
        for key, value in declared.items():
            option = str(key).replace("-", "_")
            if option not in TASK_OPTIONS:
                raise ConfigError(f"--{kind} {name}: defaults[{key!r}]: a plug-in may give defaults only for "
                                  f"{', '.join(TASK_OPTIONS)}")
            values[option] = float(value) if isinstance(FIELDS[option].default, float) and isinstance(value, int) \
                and not isinstance(value, bool) else value
            sources[option] = f"{kind} {name}"
    return values, sources


def with_task_defaults(config: Config, given: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """`config` with the plug-ins' defaults for the options the user did not set, and where every option's
    value came from. `given`: the options the user set and where ("command line", "config file"); None
    (a Config built in Python): those that differ from Config's defaults, labelled "caller"."""
    if given is None:
        given = {n: CALLER for n in FIELDS if getattr(config, n) != FIELDS[n].default}
    values, labels = plugin_defaults(config)
    applied = {n: v for n, v in values.items() if n not in given}
    try:
        resolved = replace(config, **applied)       # Config's own checks, as for any value
    except ConfigError as e:
        shown = ", ".join(f"{n}={v!r} ({labels[n]})" for n, v in applied.items())
        raise ConfigError(f"{e} (from the plug-ins' defaults: {shown})") from None
    sources = {n: given[n] if n in given else labels[n] if n in applied else FLOCK_DEFAULT
               for n in FIELDS if n != "token"}
    return resolved, sources


def saved_sources(run_dir: str | Path) -> dict[str, str]:
    """The `sources` a run's config.json recorded (a resumed run keeps them); empty when it has none."""
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved.get("sources", {}) if isinstance(saved, dict) else {}
