"""The `pc-clip` command: order, overrides, and a failing experiment that is named in the error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

from conftest import REPO


def _notebook(path: Path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "tiny"\nseed = 0\noverrides = {}\nnote = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _pc_clip(*args, env=None):
    exe = Path(sys.executable).parent / "pc-clip"  # the console script a user runs
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_reproduce_runs_in_order_and_injects_overrides(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    marker = tmp_path / "order.txt"
    code = ("from pc_clip.core import get_config\n"
            "cfg = get_config(profile, seed=seed, **overrides)\n"
            f"open({str(marker)!r}, 'a').write(f'{{__NAME__}} {{cfg.ft_epochs}} {{note}}\\n')")
    _notebook(exp / "02_second.ipynb", code.replace("{__NAME__}", "second"))
    _notebook(exp / "01_first.ipynb", code.replace("{__NAME__}", "first"))
    nb = nbformat.read(exp / "01_first.ipynb", as_version=4)  # declares ft_epochs as its own parameter
    nb.cells[0].source += "\nft_epochs = None"
    nb.cells[1].source = nb.cells[1].source.replace("**overrides)", "ft_epochs=ft_epochs, **overrides)")
    nbformat.write(nb, exp / "01_first.ipynb")
    r = _pc_clip("reproduce", "--profile", "tiny", "--experiments", str(exp), "-p", "ft_epochs=7", "-p", "note='hi'")
    assert r.returncode == 0, r.stderr + r.stdout
    assert marker.read_text().split("\n")[:2] == ["first 7 hi", "second 7 hi"]
    assert "time per notebook" in r.stdout and "results table" in r.stdout
    executed = runs_dir / "runs" / "tiny" / "notebooks" / "01_first.ipynb"
    assert executed.exists()
    r = _pc_clip("reproduce", "--experiments", str(exp), "--only", "second", "-p", "note=1")
    assert r.returncode == 0 and "01_first" not in r.stdout and "02_second" in r.stdout


def test_failing_experiment_exits_nonzero_and_names_notebook(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    _notebook(exp / "01_ok.ipynb", "x = 1")
    _notebook(exp / "02_broken.ipynb", "raise RuntimeError('the world is flat')")
    _notebook(exp / "03_never.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    r = _pc_clip("reproduce", "--experiments", str(exp))
    assert r.returncode == 1
    assert "02_broken.ipynb" in r.stderr and "the world is flat" in r.stderr and "cell" in r.stderr
    assert not (tmp_path / "ran").exists(), "must stop at the first failing notebook"


def test_unknown_profile_or_key_is_a_clear_error(tmp_path):
    r = _pc_clip("reproduce", "--profile", "huge")
    assert r.returncode == 2 and "Unknown profile" in r.stderr
    r = _pc_clip("reproduce", "--experiments", str(tmp_path))
    assert r.returncode == 2 and "No experiment notebooks" in r.stderr
    _notebook(tmp_path / "01_a.ipynb", "x = 1")
    r = _pc_clip("reproduce", "-p", "no_such_field=1", "--experiments", str(tmp_path))
    assert r.returncode == 2 and "no_such_field" in r.stderr
