"""The project's own error types. A `FlockError` is the user's to fix (bad data, options, plug-in path):
the application prints its message without a traceback and exits with status 2."""


class FlockError(Exception):
    """Bad input or options; the message names the file, user or option at fault."""


class DataError(FlockError):
    """A data file is missing, malformed or inconsistent with the vocabulary."""


class ConfigError(FlockError):
    """Options that are invalid or contradict each other or the data."""


class RefusedError(FlockError):
    """The scheduler refused a call: a stale, duplicate or mis-shaped push, or an unknown rank."""
