"""A trainer plug-in that fails on rank 1 (as its launcher announced it: MPICH, Open MPI, srun), for the fault
tests."""
import os

from simulator.launch_env import launcher_rank
from trainer.lm import LanguageModelTrainer


class FailOnRank1(LanguageModelTrainer):
    def train(self, model, samples, rng=None):
        if launcher_rank(os.environ) == 1:
            raise RuntimeError("injected failure on rank 1")
        return super().train(model, samples, rng)


class SlowTrainer(LanguageModelTrainer):
    """Takes a fixed extra time per user, so a test can kill a job mid-run."""

    def train(self, model, samples, rng=None):
        import time

        time.sleep(0.25)
        return super().train(model, samples, rng)


class DieOnRank1(LanguageModelTrainer):
    """Rank 1's process is killed outright (as by the OOM killer) in its first round."""

    def train(self, model, samples, rng=None):
        if launcher_rank(os.environ) == 1:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return super().train(model, samples, rng)


class HangOnRank1(LanguageModelTrainer):
    """Rank 1 never finishes its first user (a stuck phone), so the round times out."""

    def train(self, model, samples, rng=None):
        if launcher_rank(os.environ) == 1:
            import time

            time.sleep(3600)
        return super().train(model, samples, rng)


class FailInRound2(LanguageModelTrainer):
    """Every user fails in the second round (for the in-process resource tests)."""

    def train(self, model, samples, rng=None):
        from trainer.base import current_call

        if current_call().round == 2:
            raise RuntimeError("injected failure in round 2")
        return super().train(model, samples, rng)


class FailFromRound3IfAsked(LanguageModelTrainer):
    """Fails from round 3 on while FLOCK_TEST_FAIL is set: a run that dies mid-way, then resumes cleanly."""

    def train(self, model, samples, rng=None):
        from trainer.base import current_call

        if os.environ.get("FLOCK_TEST_FAIL") and current_call().round >= 3:
            raise RuntimeError("injected failure from round 3")
        return super().train(model, samples, rng)


class DivergeSome(LanguageModelTrainer):
    """About a third of the users (by a hash of their id) train with an infinite learning rate: they diverge."""

    def train(self, model, samples, rng=None):
        import zlib
        from dataclasses import replace

        from trainer.base import current_call

        keep = self.config
        if zlib.crc32(current_call().user.encode()) % 3 == 0:
            self.config = replace(keep, lr=float("inf"))
        try:
            return super().train(model, samples, rng)
        finally:
            self.config = keep
