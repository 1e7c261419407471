"""Silence the chatty converters (litert-torch's MLIR passes, ai-edge-quantizer, coremltools): progress
bars, logging and C++ messages written straight to the file descriptors. Exceptions still propagate."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

from sdk.backends import quiet_fds


@contextlib.contextmanager
def quiet():
    """Python warnings, logging below ERROR, stdout/stderr and C++ output on fds 1/2, all muted."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), quiet_fds():
                yield
        finally:
            logging.getLogger().setLevel(previous)
