"""A trainer plug-in that fails on rank 1 (MPICH sets PMI_RANK), for the fault tests."""
import os

from trainer.lm import LanguageModelTrainer


class FailOnRank1(LanguageModelTrainer):
    def train(self, model, samples):
        if os.environ.get("PMI_RANK") == "1":
            raise RuntimeError("injected failure on rank 1")
        return super().train(model, samples)
