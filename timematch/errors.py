"""Errors a user can act on. Each message names what is wrong and how to fix it."""

from collections.abc import Iterator
from contextlib import contextmanager


class TimeMatchError(Exception):
    """Base class of every error the project raises on purpose."""


class DatasetError(TimeMatchError):
    """The dataset on disk is missing, malformed, or disagrees with itself."""


class ConfigError(TimeMatchError, ValueError):
    """A configuration value, name or file is invalid."""


class TrainingError(TimeMatchError):
    """Training cannot go on (for example a non-finite loss)."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite at ``epoch``, ``step``; ``saved`` says what was kept.

    Deterministic given the seed and the checkpoint, so a retry would diverge again: the
    runner ends the trial (tags ``diverged_epoch`` and ``diverged_step``) instead of retrying it.
    """

    def __init__(self, message: str, epoch: int, step: int, saved: str) -> None:
        super().__init__(message)
        self.epoch, self.step, self.saved = epoch, step, saved

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields
        return type(self), (str(self), self.epoch, self.step, self.saved)


class StorageError(TimeMatchError):
    """A cache or dataset cannot be written: the disk is full or not writable."""


@contextmanager
def named_option(option: str) -> Iterator[None]:
    """A :class:`ConfigError` raised inside names ``option`` (``--scenario: ...``), unless it
    names an option already."""
    try:
        yield
    except ConfigError as err:
        if str(err).startswith("--"):
            raise
        raise ConfigError(f"{option}: {err}") from None
