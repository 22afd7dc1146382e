"""The scripts users are told to run, in their smoke modes: a renamed method breaks CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.engines
def test_reliability_smoke(tmp_path):
    report = tmp_path / "reliability.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reliability.py"), "--smoke", "--output",
         str(report)],
        capture_output=True, text=True, timeout=800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    text = report.read_text()
    assert "| request_deadline |" in text and "| load_4_clients_5s |" in text, text
    assert "FAILED" not in text, text
