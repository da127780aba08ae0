"""Each user's phone: training speed, downlink and uplink bandwidth, latency; the same in every round and at
any number of ranks.

Sources (`--device-profiles`; no option keeps today's behaviour, which has no clock at all):

- `builtin`: seeded lognormal distributions, drawn from (seed, uid) (`streams.device_rng`):

  | field | median | sigma of log | why |
  |---|---|---|---|
  | training time per sample | 13.6 ms (5 ms x e) | 0.6 | FedScale's lognormal compute model: 5 ms x LogNormal(1, 0.6) |
  | downlink | 20 Mbit/s | 0.8 | SelecEval's default bandwidth model has mean 20 Mbit/s (sd 10) |
  | uplink | 5 Mbit/s | 0.8 | public mobile speed tests put uplinks at a quarter to a fifth of downlinks |
  | latency (each way) | 50 ms | 0.5 | a typical 4G round trip |

  The four draws are independent; a sigma of 0.8 spans about 5x between the 5th and 95th percentile of a
  lognormal around its median.
- FedScale's device-capacity file (a pickle, read with `safe_pickle`, or the same mapping as JSON):
  `{client_id: {"computation": ms per sample, "communication": kbps}}`. As FedScale does, "computation" is
  the inference time per sample and training costs 3x that (backward ~ 2x forward); "communication" is
  both directions' bandwidth (a kbit taken as 1000 bits; FedScale divides kbits of 1024 bits by it, 2.4%
  apart); latency is 0. Users beyond the file reuse it (`files.UserEntries`).
- A per-user table, CSV (`user,ms_per_sample,downlink_kbps,uplink_kbps[,latency_ms]`) or JSON
  (`{uid: {"ms_per_sample": ..., "downlink_kbps": ..., "uplink_kbps": ..., "latency_ms": ...}}`):
  training ms per sample as is; a user the table does not list is an error.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flock.common import streams
from flock.common.errors import ConfigError, DataError
from scheduler.phones.files import UserEntries, check_keys, load_mapping, number, user_entries

FEDSCALE_TRAIN_FACTOR = 3.0     # FedScale: a training step costs forward + backward ~ 3 x inference
_FEDSCALE_KEYS = frozenset({"computation", "communication"})
_TABLE_REQUIRED = ("ms_per_sample", "downlink_kbps", "uplink_kbps")
_TABLE_KEYS = frozenset(_TABLE_REQUIRED)
_TABLE_OPTIONAL = frozenset({"latency_ms"})


@dataclass(frozen=True)
class DeviceProfile:
    """One phone. Seconds of training per sample, bandwidths in bit/s, latency in seconds per transfer."""

    seconds_per_sample: float
    downlink_bps: float
    uplink_bps: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        values = (self.seconds_per_sample, self.downlink_bps, self.uplink_bps, self.latency_s)
        if not all(math.isfinite(v) and v >= 0 for v in values) or min(self.downlink_bps, self.uplink_bps) <= 0:
            raise ValueError(f"DeviceProfile: values must be finite and >= 0, bandwidths > 0: {self}")


class ProfileSource(Protocol):
    """Where device profiles come from: a pure function of the user id."""

    def profile(self, uid: str) -> DeviceProfile:
        """`uid`'s phone; the same whenever it is asked."""
        ...


@dataclass(frozen=True, kw_only=True)
class BuiltinProfiles:
    """Seeded lognormal phones (the module's table gives the defaults and their sources)."""

    seed: int
    seconds_per_sample_median: float = 0.005 * math.e
    seconds_per_sample_sigma: float = 0.6
    downlink_median_bps: float = 20e6
    uplink_median_bps: float = 5e6
    bandwidth_sigma: float = 0.8
    latency_median_s: float = 0.05
    latency_sigma: float = 0.5

    def __post_init__(self) -> None:
        medians = (self.seconds_per_sample_median, self.downlink_median_bps, self.uplink_median_bps,
                   self.latency_median_s)
        sigmas = (self.seconds_per_sample_sigma, self.bandwidth_sigma, self.latency_sigma)
        if not all(math.isfinite(m) and m > 0 for m in medians) or not all(math.isfinite(s) and s >= 0
                                                                           for s in sigmas):
            raise ConfigError("built-in device profiles: medians must be finite and > 0, sigmas finite and >= 0")

    def profile(self, uid: str) -> DeviceProfile:
        z = streams.device_rng(self.seed, uid).standard_normal(4)
        return DeviceProfile(
            seconds_per_sample=self.seconds_per_sample_median * math.exp(self.seconds_per_sample_sigma * z[0]),
            downlink_bps=self.downlink_median_bps * math.exp(self.bandwidth_sigma * z[1]),
            uplink_bps=self.uplink_median_bps * math.exp(self.bandwidth_sigma * z[2]),
            latency_s=self.latency_median_s * math.exp(self.latency_sigma * z[3]))


@dataclass(frozen=True)
class FileProfiles:
    """Profiles read from a file (FedScale's form wraps around for unlisted users; a table does not)."""

    entries: UserEntries[DeviceProfile]

    def profile(self, uid: str) -> DeviceProfile:
        return self.entries.lookup(uid)


def _fedscale_profile(entry: Any, where: str) -> DeviceProfile:
    check_keys(entry, where=where, required=_FEDSCALE_KEYS)
    ms = number(entry["computation"], where=where, field="computation")
    kbps = number(entry["communication"], where=where, field="communication", positive=True)
    return DeviceProfile(seconds_per_sample=FEDSCALE_TRAIN_FACTOR * ms / 1000.0, downlink_bps=kbps * 1000.0,
                         uplink_bps=kbps * 1000.0)


def _table_profile(entry: Any, where: str) -> DeviceProfile:
    check_keys(entry, where=where, required=_TABLE_KEYS, optional=_TABLE_OPTIONAL)
    latency = entry.get("latency_ms", 0)
    return DeviceProfile(
        seconds_per_sample=number(entry["ms_per_sample"], where=where, field="ms_per_sample") / 1000.0,
        downlink_bps=number(entry["downlink_kbps"], where=where, field="downlink_kbps", positive=True) * 1000.0,
        uplink_bps=number(entry["uplink_kbps"], where=where, field="uplink_kbps", positive=True) * 1000.0,
        latency_s=number(latency, where=where, field="latency_ms") / 1000.0)


def _read_csv(path: Path) -> UserEntries[DeviceProfile]:
    """A per-user profile CSV; errors name the line and the user."""
    keys: dict[str, int] = {}
    profiles: list[DeviceProfile] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            known = {"user", *_TABLE_KEYS, *_TABLE_OPTIONAL}
            for name in header:
                if name not in known:
                    raise DataError(f"{path}, line 1: unknown column {name!r} (known: {sorted(known)})")
            for name in ("user", *_TABLE_REQUIRED):
                if name not in header:
                    raise DataError(f"{path}, line 1: missing column {name!r}")
            if len(set(header)) != len(header):
                raise DataError(f"{path}, line 1: a column appears twice")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}, line {reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} cells, the header has {len(header)}")
                cells = dict(zip(header, (cell.strip() for cell in row)))
                uid = cells.pop("user")
                if not uid:
                    raise DataError(f"{where}: empty user id")
                if uid in keys:
                    raise DataError(f"{where}: user {uid!r} appears twice")
                keys[uid] = len(profiles)
                # an empty optional cell takes the default, as an absent column does
                entry = {k: _as_number(v) for k, v in cells.items() if v or k not in _TABLE_OPTIONAL}
                profiles.append(_table_profile(entry, f"{where}, user {uid!r}"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as CSV ({e})") from None
    if not profiles:
        raise DataError(f"{path}: no users")
    return UserEntries(source=str(path), keys=keys, entries=tuple(profiles), wrap=False)


def _as_number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell


def load_profiles(path: Path | str) -> FileProfiles:
    """Device profiles from a file: `.csv` is a per-user table; anything else is JSON or a plain-data
    pickle, in FedScale's form (every entry has "computation" and "communication") or a per-user table.
    A malformed file is a DataError naming the file, the entry or line, and the field."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return FileProfiles(_read_csv(path))
    mapping = load_mapping(path)
    first = next(iter(mapping.values()))
    if isinstance(first, dict) and set(first) == _FEDSCALE_KEYS:
        return FileProfiles(user_entries(mapping, _fedscale_profile, source=str(path), wrap=True))
    return FileProfiles(user_entries(mapping, _table_profile, source=str(path), wrap=False))


def profiles_from_option(value: str, seed: int) -> ProfileSource | None:
    """The `--device-profiles` option: "" (no clock: today's behaviour), "builtin", or a file path."""
    if not value:
        return None
    if value == "builtin":
        return BuiltinProfiles(seed=seed)
    if not Path(value).is_file():
        raise ConfigError(f"--device-profiles {value}: neither 'builtin' nor an existing file")
    return load_profiles(value)
