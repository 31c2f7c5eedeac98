"""Shared fixtures: every test writes below its own temporary PC_CLIP_RUNS, never into the repository."""
import os
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    "A private PC_CLIP_RUNS for one test."
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def make_notebook(path: Path, code: str, params: str = 'profile = "tiny"\nseed = 0\noverrides = {}\nnote = None') -> None:
    "An experiment notebook as the CLI expects one: a tagged parameters cell, then `code`."
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
