"""The tracking domain's error."""

from __future__ import annotations


class TrackingError(RuntimeError):
    """MLflow could not be reached, or refused what was logged; the message names the tracking URI."""

    fatal = True  # False: only this run's data was refused, the others can still be logged
