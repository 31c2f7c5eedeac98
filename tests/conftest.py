"""Shared fixtures and helpers: every test writes below its own temporary PC_CLIP_RUNS, never into the
repository.

Two layers: tests marked `slow` (the marker is declared in pyproject.toml) run a reproduction, a whole
notebook or a pipeline of processes; `pytest -m "not slow"` is the quick unit layer, `pytest tests`
(`make test`) runs both.
"""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


# ---- the venv's console scripts, and `pc-clip` run as a user runs it

def venv_script(name: str) -> Path:
    "A console script of this venv (`pc-clip`, `jupyter`, `papermill`, `nbdev_clean`, ...)."
    return Path(sys.executable).parent / name


PC_CLIP = venv_script("pc-clip")  # the console script a user runs


def pc_clip_env(env: dict | None = None, unset: tuple = ()) -> dict:
    "This process's environment with `env` on top and the names in `unset` removed."
    merged = {**os.environ, **(env or {})}
    return {k: v for k, v in merged.items() if k not in unset}


def pc_clip(*args, env: dict | None = None, unset: tuple = (), cwd=REPO, timeout: float = 600):
    "Run `pc-clip *args` from the checkout and wait; the finished process, its output captured as text."
    return subprocess.run([str(PC_CLIP), *map(str, args)], cwd=cwd, env=pc_clip_env(env, unset),
                          capture_output=True, text=True, timeout=timeout)


def start_pc_clip(*args, env: dict | None = None, unset: tuple = (), cwd=REPO, **popen) -> subprocess.Popen:
    "Start `pc-clip *args` from the checkout, not waiting; output piped as text unless `popen` says."
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([str(PC_CLIP), *map(str, args)], cwd=cwd, env=pc_clip_env(env, unset), **popen)


# ---- small settings for whole runs on a CPU (the tiny profile otherwise), one list per kind of run

# experiments 01-04 and 12: a world and budgets small enough for a CPU test
SMALL_TINY = ["world_n_train=300", "world_n_test=150", "world_n_val=150", "pretrain_steps=20",
              "n_pairs=200", "ft_batch_size=32", "caption_ft_batch_size=32", "eval_seeds=[0]",
              "eval_n_images=20", "comparative_topk=4"]
# every experiment, at a reduced size
SMALL_REPRODUCTION = ["world_n_train=1200", "world_n_test=400", "world_n_val=400", "pretrain_steps=60",
                      "n_pairs=1500", "ft_epochs=1", "caption_ft_epochs=1", "eval_seeds=[0]",
                      "eval_n_images=40", "comparative_topk=4"]
# experiments 00 and 01 only: a world and two base models, each written under a lock
SMALL_BASES = ["world_n_train=256", "world_n_test=64", "world_n_val=64", "pretrain_steps=3"]
# experiment 00 times 8 images instead of 512
SMALL_ENVIRONMENT = ["n_images=8"]
# the paper-smoke run: fewer generated pairs keep the 4-bit chat LM's share of the run short
SMALL_PAPER_SMOKE = ["n_pairs=64"]
# experiment 15c, the base-capacity study, on two small bases
SMALL_CAPACITY = ["world_n_train=256", "world_n_test=32", "world_n_val=96", "n_pairs=200",
                  "reference_steps=4", "more_seeds={}", "ft_batch_size=32", "ft_epochs=1",
                  "eval_n_images=24", "eval_seeds=[0]", "ft_lr_grid=[0.001]",
                  "wavg_alpha_grid=[0.5,1.0]", 'bases=["tiny","48px"]']


def p_args(settings: list[str], *extra: str) -> list[str]:
    "The command-line form of `settings` (`-p key=value` each), then `extra`."
    return [a for s in settings for a in ("-p", s)] + list(extra)


# ---- temporary folders and notebooks

@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    "A private PC_CLIP_RUNS for one test."
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def make_notebook(path: Path, code: str,
                  params: str = 'profile = "tiny"\nseed = 0\noverrides = {}\nnote = None') -> None:
    "An experiment notebook as the CLI expects one: a tagged parameters cell, then `code`."
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
