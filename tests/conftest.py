"""Shared fixtures. Engines are expensive on CPU: start each once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd.models import make_model


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_model("tiny")
