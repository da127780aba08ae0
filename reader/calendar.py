"""The data calendar: which day folder feeds which round, and which day tests."""
from __future__ import annotations

from dataclasses import dataclass

from flock.common.errors import DataError
from reader.base import Reader


@dataclass(frozen=True)
class Calendar:
    train_days: tuple[str, ...]
    test_day: str

    @classmethod
    def from_reader(cls, reader: Reader) -> "Calendar":
        """FL-mobile's convention: every day but the last trains, the last one tests. A single day folder
        must hold both a train and a test split."""
        days = reader.days()
        train_days = tuple(days[:-1]) if len(days) > 1 else tuple(days)
        test_day = days[-1]
        for day in train_days:
            if not reader.has_split(day, "train"):
                raise DataError(f"day {day}: training day without train_data.json")
        if not reader.has_split(test_day, "test"):
            raise DataError(f"day {test_day}: the last day folder is the test day but has no test_data.json")
        return cls(train_days=train_days, test_day=test_day)

    def train_day(self, round_index: int, rounds: int) -> str:
        """Rounds are spread evenly over the training days, in order."""
        i = round_index * len(self.train_days) // max(rounds, 1)
        return self.train_days[min(i, len(self.train_days) - 1)]
