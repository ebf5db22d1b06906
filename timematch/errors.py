"""Errors a user can act on. Each message names what is wrong and how to fix it."""


class TimeMatchError(Exception):
    """Base class of every error the project raises on purpose."""


class DatasetError(TimeMatchError):
    """The dataset on disk is missing, malformed, or disagrees with itself."""


class ConfigError(TimeMatchError, ValueError):
    """A configuration value, name or file is invalid."""


class TrainingError(TimeMatchError):
    """Training cannot go on (for example a non-finite loss)."""


class StorageError(TimeMatchError):
    """A cache or dataset cannot be written: the disk is full or not writable."""
