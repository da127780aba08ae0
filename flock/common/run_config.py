"""A Flower app's run config (`context.run_config`) in Flower's own syntax: `--run-config "key=value ..."`
with TOML values (`num-server-rounds=5 lr=0.1 name="mnist" verbose=true`), as `flwr run --run-config`
reads it, or a table in a config file (`[run-config]` in TOML, as `[tool.flwr.app.config]` in a Flower
app's pyproject.toml). Nested tables become dotted keys, as in Flower. Values are bool, int, float or str."""
from __future__ import annotations

import math
import re
import tomllib
from typing import Any, Mapping

from flock.common.errors import ConfigError

# Flower's pattern (flwr.common.config.parse_config_args): key=value, the value quoted or up to a space
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def parse_run_config(text: str) -> dict[str, bool | int | float | str]:
    """'key=value ...' -> {key: value}; a ConfigError says what cannot be read."""
    leftover = _PAIR.sub(" ", text).strip()
    if leftover:
        raise ConfigError(f"--run-config: cannot read {leftover!r}: expected space-separated key=value pairs, "
                          f"e.g. 'num-server-rounds=5 lr=0.1 name=\"mnist\"'")
    pairs = _PAIR.findall(text)
    try:
        table = tomllib.loads("\n".join(f"{key} = {value}" for key, value in pairs))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--run-config {text!r}: values must be TOML: a number, true/false or a quoted "
                          f"string ({e})") from None
    return flatten_run_config(table)


def flatten_run_config(table: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A (nested) table -> {dotted key: value}, each value checked: bool, int, finite float or str."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if not _KEY.fullmatch(str(key)):
            raise ConfigError(f"--run-config: key {name!r}: use letters, digits, '-', '_' and '.'")
        if isinstance(value, Mapping):
            out.update(flatten_run_config(value, f"{name}."))
        elif not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"--run-config: {name!r} must be a number, true/false or a string, "
                              f"got {type(value).__name__}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--run-config: {name!r} must be finite, got {value!r}")
        else:
            out[name] = value
    return out


def format_run_config(table: Mapping[str, Any]) -> str:
    """A config file's table -> the 'key=value ...' text that `parse_run_config` reads back to the same values."""
    parts = []
    for key, value in flatten_run_config(table).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif '"' not in value and "\\" not in value:
            text = f'"{value}"'
        elif "'" not in value:
            text = f"'{value}'"        # TOML's literal string: no escapes
        else:
            raise ConfigError(f"--run-config: {key!r}: a string cannot hold both ' and \"")
        parts.append(f"{key}={text}")
    return " ".join(parts)
