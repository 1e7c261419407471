"""The training side's error base: input or state a user can fix (a bad config, dataset, checkpoint or
weights source). The CLI prints a TrainingError as one line; any other exception keeps its traceback."""

from __future__ import annotations


class TrainingError(ValueError):
    """A training, data or checkpoint step cannot run as asked; the message says what to do."""
