"""A client's virtual duration, known before it trains:

    duration = latency + 8 * bytes_down / downlink_bps      (download the shared parameters)
             + samples * seconds_per_sample                 (local training: epochs x the user's samples)
             + latency + 8 * bytes_up / uplink_bps          (upload the update)

Bytes default to 4 per shared parameter each way (float32, as flock's wire format sends them); callers pass
other counts where an update is compressed. FedScale's completion time has the same shape (compute from a
per-sample speed, communication from update size over bandwidth); latency is per transfer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.phones.devices import DeviceProfile

BYTES_PER_PARAM = 4
BITS_PER_BYTE = 8


def model_bytes(shared_params: int, bytes_per_param: int = BYTES_PER_PARAM) -> int:
    """Bytes of one transfer of `shared_params` parameters."""
    if shared_params < 0 or bytes_per_param < 0:
        raise ValueError("parameter and byte counts must not be negative")
    return shared_params * bytes_per_param


@dataclass(frozen=True)
class ClientTiming:
    """One client's virtual seconds: download (with its latency), compute, upload (with its latency)."""

    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


def client_timing(profile: DeviceProfile, *, samples: float, bytes_down: int, bytes_up: int) -> ClientTiming:
    """The virtual time `profile`'s phone takes to fetch `bytes_down`, train on `samples` samples (local
    epochs x the user's samples, or local steps x batch size) and send `bytes_up`."""
    if not (math.isfinite(samples) and samples >= 0) or bytes_down < 0 or bytes_up < 0:
        raise ValueError(f"samples and bytes must be finite and >= 0 (samples {samples}, bytes {bytes_down}, "
                         f"{bytes_up})")
    return ClientTiming(
        download_s=profile.latency_s + BITS_PER_BYTE * bytes_down / profile.downlink_bps,
        compute_s=samples * profile.seconds_per_sample,
        upload_s=profile.latency_s + BITS_PER_BYTE * bytes_up / profile.uplink_bps)
