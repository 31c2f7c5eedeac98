"""Shared fixtures: every test writes below its own temporary PC_CLIP_RUNS, never into the repository."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    "A private PC_CLIP_RUNS for one test."
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"
