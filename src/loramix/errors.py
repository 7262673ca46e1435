"""Exception types. Every error loramix raises on bad input is one of these, and its message says what was
wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoramixError(Exception):
    """Base class for every error loramix raises on purpose."""


class ConfigError(LoramixError, ValueError):
    """A configuration field is missing, unknown or has a value outside what is allowed."""


class InjectionError(LoramixError, ValueError):
    """A target matched nothing, matched a module kind loramix cannot wrap, or the model is in the wrong state.
    `setting` names the adapter setting to change (`targets` unless the error is about another)."""

    def __init__(self, message: str, setting: str = "targets") -> None:
        super().__init__(message)
        self.setting = setting


class RoutingError(LoramixError, ValueError):
    """A side input a router needs (task ids, a gate) is missing or malformed."""


class DataError(LoramixError, ValueError):
    """A data file or task specification is malformed; the message names the file and line."""


class CheckpointError(LoramixError, ValueError):
    """An adapter file or checkpoint is missing, corrupted, truncated or does not fit the model."""


class TrainingError(LoramixError, RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the message names the step and the last good checkpoint."""


class DataWarning(UserWarning):
    """Data that loads but is probably not what was meant (a class with no train example); the message names the
    file and the labels. Turn it into an error with `warnings.simplefilter("error", DataWarning)`."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`. Did you mean 'x'?`, naming the known names closest to a mistyped one (at most two), or nothing: the end of
    an error message."""
    close = difflib.get_close_matches(name, [k for k in known if not k.startswith("_")], n=2, cutoff=0.7)
    return f". Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
