"""A trainer plug-in that fails on rank 1 (MPICH sets PMI_RANK), for the fault tests."""
import os

from trainer.lm import LanguageModelTrainer


class FailOnRank1(LanguageModelTrainer):
    def train(self, model, samples):
        if os.environ.get("PMI_RANK") == "1":
            raise RuntimeError("injected failure on rank 1")
        return super().train(model, samples)


class SlowTrainer(LanguageModelTrainer):
    """Takes a fixed extra time per user, so a test can kill a job mid-run."""

    def train(self, model, samples):
        import time

        time.sleep(0.25)
        return super().train(model, samples)
