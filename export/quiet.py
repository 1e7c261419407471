"""Silence the chatty converters (litert-torch's MLIR passes, ai-edge-quantizer, coremltools): progress
bars, logging and C++ messages written straight to the file descriptors. Exceptions still propagate."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def quiet_fds():
    """Silence C++ logging written straight to file descriptors 1 and 2 (MLIR converter, XNNPACK)."""
    try:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError):  # no real descriptors (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


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
