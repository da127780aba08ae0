"""Metric sums: how per-user results add up over users and ranks, and how ratios come out of the sums."""
from __future__ import annotations

from typing import Mapping

Ratios = Mapping[str, tuple[str, str]]


def add_sums(total: dict[str, float], part: Mapping[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


def add_user_eval(total: dict[str, float], user_sums: Mapping[str, float], ratios: Ratios) -> None:
    """Adds one user's evaluation sums, plus each ratio's per-user value for the unweighted user mean."""
    total["users"] = total.get("users", 0.0) + 1
    add_sums(total, user_sums)
    for name, (num, den) in ratios.items():
        total.setdefault(f"{name}@user_sum", 0.0)
        total.setdefault(f"{name}@users", 0.0)
        if num in user_sums and user_sums.get(den, 0) > 0:
            total[f"{name}@user_sum"] += user_sums[num] / user_sums[den]
            total[f"{name}@users"] += 1


def reduce_ratios(sums: Mapping[str, float], ratios: Ratios) -> dict[str, float]:
    """Each ratio over everything, and its unweighted mean over users (from the per-user partial sums); a
    ratio whose numerator no user reported is left out (not reported as 0)."""
    out = {}
    for name, (num, den) in ratios.items():
        if num in sums and sums.get(den, 0.0) > 0:
            out[name] = sums.get(num, 0.0) / sums[den]
        if sums.get(f"{name}@users", 0.0) > 0:
            out[f"{name}_user_mean"] = sums[f"{name}@user_sum"] / sums[f"{name}@users"]
    return out


def eval_record(round_index: int, sums: Mapping[str, float], ratios: Ratios, seconds: float) -> dict:
    """The metrics.jsonl line of an evaluation."""
    return {"kind": "eval", "round": round_index, **reduce_ratios(sums, ratios), "users": int(sums.get("users", 0)),
            **{k: v for k, v in sums.items() if "@" not in k and k != "users"}, "seconds": round(seconds, 4)}


def train_record(round_index: int, sums: Mapping[str, float], ratios: Ratios, seconds: float) -> dict:
    """The metrics.jsonl line of a training round."""
    return {"kind": "train", "round": round_index, **reduce_ratios(sums, ratios),
            "clients": int(sums.get("clients", 0) - sums.get("diverged", 0)), "samples": int(sums.get("samples", 0)),
            **({"diverged": int(sums["diverged"])} if sums.get("diverged") else {}),
            **({"malicious": int(sums["malicious"])} if "malicious" in sums else {}),
            "seconds": round(seconds, 4), "clients_per_s": round(sums.get("clients", 0) / max(seconds, 1e-9), 3)}
