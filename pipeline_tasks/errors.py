"""Domain errors. The CLI maps them to a one-line message and an exit code (no traceback)."""


class PipelineError(Exception):
    """Base class: a failure the user can act on (bad input, failed check), not a bug."""

    exit_code = 1


class SourceError(PipelineError):
    """A data source cannot be found, downloaded or verified."""


class DataError(PipelineError):
    """Input data is malformed (names the file and record)."""


class ValidationFailedError(PipelineError):
    """A data-quality suite failed; downstream must not run."""

    exit_code = 3


class GateFailedError(PipelineError):
    """A model did not pass its evaluation gates."""

    exit_code = 4
