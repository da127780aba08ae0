"""The virtual clock's arithmetic, synchronous round resolution and the clock's records."""
import math

import pytest

from flock.common.domain import over_selected
from scheduler.phones.clock import ClientTiming, client_timing, model_bytes
from scheduler.phones.devices import DeviceProfile
from scheduler.phones.report import sync_round_record
from scheduler.phones.sync_round import RoundOutcome, resolve_sync_round


def test_client_timing_on_a_hand_computed_example():
    # 250,000 float32 parameters = 1,000,000 bytes each way; 1 MB/s down, 0.25 MB/s up, 100 ms latency,
    # 20 ms per sample, 3 local epochs over 50 samples:
    #   download 0.1 + 8e6 / 8e6 = 1.1 s;  compute 150 x 0.02 = 3.0 s;  upload 0.1 + 8e6 / 2e6 = 4.1 s
    phone = DeviceProfile(seconds_per_sample=0.02, downlink_bps=8e6, uplink_bps=2e6, latency_s=0.1)
    nbytes = model_bytes(250_000)
    assert nbytes == 1_000_000
    t = client_timing(phone, samples=3 * 50, bytes_down=nbytes, bytes_up=nbytes)
    assert t == ClientTiming(download_s=pytest.approx(1.1), compute_s=pytest.approx(3.0), upload_s=pytest.approx(4.1))
    assert t.total_s == pytest.approx(8.2)
    # a compressed upload (say 8 bits per parameter) only changes the upload
    small = client_timing(phone, samples=150, bytes_down=nbytes, bytes_up=model_bytes(250_000, 1))
    assert small.upload_s == pytest.approx(0.1 + 2e6 / 2e6) and small.download_s == t.download_s
    with pytest.raises(ValueError):
        client_timing(phone, samples=-1, bytes_down=0, bytes_up=0)
    with pytest.raises(ValueError):
        client_timing(phone, samples=math.nan, bytes_down=0, bytes_up=0)


def test_over_selection():
    assert over_selected(10, 1.0) == 10
    assert over_selected(10, 1.3) == 13          # not 14: 10 x 1.3 is 13.000000000000002 in binary
    assert over_selected(7, 1.5) == 11
    with pytest.raises(ValueError):
        over_selected(10, 0.9)


CANDS = ("a", "b", "c", "d", "e")
DUR = (5.0, 1.0, 3.0, 2.0, 4.0)
ON = (math.inf,) * 5


def test_round_ends_at_the_kth_finisher_and_late_results_are_not_trained():
    out = resolve_sync_round(CANDS, DUR, ON, start_time=100.0, k=3)
    # finishers: b at 101, d at 102, c at 103 (the 3rd), e at 104, a at 105
    assert out == RoundOutcome(trained=("b", "c", "d"), discarded=("a", "e"), dropped=(), start_time=100.0,
                               end_time=103.0, failed=False)
    assert out.duration_s == 3.0
    # K = all candidates and no deadline: everyone trains, in the candidates' order
    full = resolve_sync_round(CANDS, DUR, ON, start_time=0.0, k=5)
    assert full.trained == CANDS and full.end_time == 5.0


def test_ties_at_the_kth_finisher_go_by_user_id():
    out = resolve_sync_round(("z", "y", "x"), (2.0, 2.0, 2.0), (math.inf,) * 3, start_time=0.0, k=2)
    assert out.trained == ("y", "x") and out.discarded == ("z",)


def test_deadline_cuts_the_round_and_quorum_decides_failure():
    out = resolve_sync_round(CANDS, DUR, ON, start_time=0.0, k=4, deadline_s=2.5, min_clients=2)
    assert out.trained == ("b", "d") and out.discarded == ("a", "c", "e")
    assert out.end_time == 2.5 and not out.failed
    failed = resolve_sync_round(CANDS, DUR, ON, start_time=0.0, k=4, deadline_s=2.5, min_clients=3)
    # a failed round trains nobody: its results would be thrown away
    assert failed.failed and failed.trained == () and failed.end_time == 2.5
    assert set(failed.discarded) == {"a", "c", "e"} and failed.voided == ("b", "d")     # late apart from in time


def test_a_deadline_no_phone_can_meet_fails_the_round_without_waiting():
    out = resolve_sync_round(CANDS, DUR, ON, start_time=10.0, k=2, deadline_s=0.5)
    assert out.failed and out.trained == () and out.end_time == 10.5


def test_clients_going_off_line_before_their_task_ends_drop_out():
    off = (math.inf, 0.5, math.inf, 2.0, math.inf)      # b leaves before it finishes; d just as it finishes
    out = resolve_sync_round(CANDS, DUR, off, start_time=0.0, k=3)
    assert out.dropped == ("b",)
    assert out.trained == ("c", "d", "e") and out.discarded == ("a",) and out.end_time == 4.0
    # with fewer finishers than K and no deadline, the round ends once everyone finished or left
    gone = resolve_sync_round(CANDS, DUR, (1.0, 0.5, 1.5, 1.0, math.inf), start_time=0.0, k=3)
    assert gone.dropped == ("a", "b", "c", "d") and gone.trained == ("e",)
    assert gone.end_time == 4.0 and not gone.failed
    all_gone = resolve_sync_round(CANDS, DUR, (0.1,) * 5, start_time=0.0, k=3, deadline_s=60.0)
    assert all_gone.failed and all_gone.end_time == 0.1      # nobody left to wait for


def test_a_round_with_no_candidate_fails_at_its_deadline():
    out = resolve_sync_round((), (), (), start_time=7.0, k=3, deadline_s=60.0)
    assert out.failed and out.end_time == 67.0
    assert resolve_sync_round((), (), (), start_time=7.0, k=3).end_time == 7.0


def test_bad_round_arguments():
    with pytest.raises(ValueError, match="durations"):
        resolve_sync_round(CANDS, DUR[:4], ON, start_time=0.0, k=3)
    with pytest.raises(ValueError, match="min_clients"):
        resolve_sync_round(CANDS, DUR, ON, start_time=0.0, k=3, min_clients=4)
    with pytest.raises(ValueError, match="twice"):
        resolve_sync_round(("a", "a"), (1.0, 1.0), (math.inf,) * 2, start_time=0.0, k=1)
    with pytest.raises(ValueError, match="deadline"):
        resolve_sync_round(CANDS, DUR, ON, start_time=0.0, k=3, deadline_s=0)


def test_sync_round_record():
    off = (math.inf, 10.5, math.inf, 12.0, math.inf)     # off-line times are virtual times, not offsets
    out = resolve_sync_round(CANDS, DUR, off, start_time=10.0, k=3)
    record = sync_round_record(out, bytes_down=1000, bytes_up=400)
    assert record == {"sim_time": 14.0, "round_s": 4.0, "selected": 5, "completed": 3, "dropped": 1, "stale": 1,
                      "voided": 0, "staleness_mean": 0.0, "staleness_max": 0, "bytes_down": 5000, "bytes_up": 1200,
                      "failed": 0}
