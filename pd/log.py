"""pd's loggers: one ``pd`` logger tree, formatted like vLLM's, level from PD_LOG_LEVEL."""

from __future__ import annotations

import logging

from pd import envs

_FORMAT = "%(levelname)s %(asctime)s [pd:%(name)s] %(message)s"


def setup_logging() -> None:
    """Give the ``pd`` logger a handler once per process (vLLM only configures its own)."""
    root = logging.getLogger("pd")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(envs.PD_LOG_LEVEL())
    root.propagate = False
