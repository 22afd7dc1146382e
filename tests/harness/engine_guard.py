"""Only tests marked ``engines`` start engines, so ``pytest -m "not engines"`` starts none.

A pytest plugin (tests/conftest.py loads it). In every run, a test without the mark
cannot start a vLLM server or a local Ray cluster from the test process, itself or
through a fixture: the ``subprocess.Popen`` that would start one (``vllm serve``,
Ray's ``raylet`` or ``gcs_server``) raises ``EngineWithoutMark`` instead. A test
without the mark that asks for a fixture which started engines for an earlier test
fails too. Engines that a child process starts (pd-serve run as a command, a script)
are out of its sight: mark those tests by hand.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

MARK = "engines"
# Programs whose start means a local Ray cluster is starting.
_RAY_PROGRAMS = frozenset({"raylet", "gcs_server"})


class EngineWithoutMark(RuntimeError):
    """A test not marked ``engines`` tried to start one."""


def engine_started_by(args: Any) -> str | None:
    """What engine the command ``args`` (as ``Popen`` takes it) starts, or None."""
    if isinstance(args, (str, bytes, os.PathLike)):
        argv = shlex.split(os.fsdecode(args))
    elif isinstance(args, Sequence):
        argv = [os.fsdecode(a) for a in args]
    else:
        return None
    names = [os.path.basename(a) for a in argv]
    if names and names[0] in _RAY_PROGRAMS:
        return f"a Ray cluster ({names[0]})"
    if "vllm" in names and "serve" in argv[names.index("vllm") + 1 :]:
        return "a vLLM server (vllm serve)"
    return None


@dataclass
class _Guard:
    test: pytest.Item | None = None  # the test running now (None between tests)
    allowed: bool = True
    fixtures: list[str] = field(default_factory=list)  # the fixtures being set up
    engine_fixtures: set[str] = field(default_factory=set)  # fixtures that started engines

    def check(self, args: Any) -> None:
        engine = engine_started_by(args)
        if engine is None or self.test is None:
            return
        if self.allowed:
            self.engine_fixtures.update(self.fixtures)
            return
        raise EngineWithoutMark(
            f"{self.test.nodeid} starts {engine} but is not marked `{MARK}`: add "
            f"`pytestmark = pytest.mark.{MARK}` to its module (or mark the test)"
        )


_guard = _Guard()
_original_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
    _guard.check(args)
    _original_popen_init(self, args, *rest, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _guarded_popen_init  # type: ignore[method-assign]


def pytest_unconfigure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _original_popen_init  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[Any]:
    _guard.test = item
    _guard.allowed = item.get_closest_marker(MARK) is not None
    try:
        return (yield)
    finally:
        _guard.test = None
        _guard.allowed = True


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: Any) -> Iterator[Any]:
    _guard.fixtures.append(fixturedef.argname)
    try:
        return (yield)
    finally:
        _guard.fixtures.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker(MARK) is not None:
        return
    used = sorted(_guard.engine_fixtures.intersection(getattr(item, "fixturenames", ())))
    if used:
        pytest.fail(
            f"{item.nodeid} uses {', '.join(used)}, which started engines, but is not "
            f"marked `{MARK}`",
            pytrace=False,
        )
