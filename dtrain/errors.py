"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class DtrainError(Exception):
    """A mistake in the user's input (config, data file, command line) that we can explain in one line."""


class ConfigError(DtrainError):
    """The job spec or an override is invalid."""


class DataError(DtrainError):
    """A data set or data file is missing, malformed or unsuitable."""


class TrainingError(DtrainError):
    """Training cannot continue (e.g. too many non-finite steps)."""
