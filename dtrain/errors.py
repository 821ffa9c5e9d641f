"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

from __future__ import annotations

from collections.abc import Callable


class DtrainError(Exception):
    """A mistake in the user's input (config, data file, command line) that we can explain in one line."""


class ConfigError(DtrainError):
    """The job spec or an override is invalid."""


class DataError(DtrainError):
    """A data set or data file is missing, malformed or unsuitable."""


class TrainingError(DtrainError):
    """Training cannot continue (e.g. too many non-finite steps)."""


class Preempted(TrainingError):
    """A worker was asked to stop (SIGTERM, or its node is being preempted): the run checkpointed at a step boundary
    and hands over."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors built around it."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check(ok: bool, key: str, expected: str, got: object) -> None:
    """Raise ConfigError "<key>: expected <expected>, got <got>" unless ok: the one shape of a bad-value error."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def find_in_chain(err: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in err's chain that match accepts: causes, contexts, and the failures Ray's errors wrap
    (a task's cause, a Train run's worker and controller failures)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None
