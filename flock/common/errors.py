"""The project's own error types. A `FlockError` is the user's to fix (bad data, options, plug-in path):
the application prints its message without a traceback and exits with status 2."""


class FlockError(Exception):
    """Bad input or options; the message names the file, user or option at fault."""


class DataError(FlockError):
    """A data file is missing, malformed or inconsistent with the vocabulary."""


class ConfigError(FlockError):
    """Options that are invalid or contradict each other or the data. `options`: the options at fault, by
    name, where the message also names others (so that a config file can be named beside the ones it set)."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.options = options


class RefusedError(FlockError):
    """The scheduler refused a call: a stale, duplicate or mis-shaped push, or an unknown rank."""


class SharedError(FlockError):
    """An error every rank of the job raised alike (a set-up error that the ranks agreed on, or the
    scheduler's verdict): rank 0 reports it once and no rank aborts the others."""


class RunFailed(SharedError):
    """The scheduler stopped the run (a diverged round, non-finite parameters): every rank learns it from
    its next plan, so all of them stop alike and rank 0 prints the one message."""
