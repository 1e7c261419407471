"""The runtime's error base: every error sdk raises for input or state a user can fix derives from SdkError.

The CLI prints these (and export's ExportError, training's TrainingError) as one line naming the fix,
the server answers them with a 4xx `detail`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class SdkError(ValueError):
    """A request the runtime cannot serve as asked (bad input, wrong state); the message says what to do."""


class SpaceMismatchError(SdkError):
    """Vectors, an index or a server from another embedding space than the one expected."""


class GalleryIndexError(SdkError):
    """A request to the index that cannot be served (bad input, wrong state); nothing was changed."""


class DimensionError(GalleryIndexError):
    """Vectors of the wrong dimension."""


class UnknownIdError(GalleryIndexError, KeyError):
    """An id that is not in the index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexCorruptError(GalleryIndexError):
    """The files of an index are damaged or not an index."""


class IndexLockedError(GalleryIndexError):
    """Another process has the index open for writing."""
