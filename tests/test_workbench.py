"""The workbench as a user meets it: progress on the terminal, the pc-clip kernel in JupyterLab, clean
executed notebooks, paths from any folder."""
import json
import os
import re
import subprocess
import sys
import pytest
import socket
import time
import urllib.request
from pathlib import Path

from conftest import REPO, SMALL_ENVIRONMENT, p_args, pc_clip, venv_script


# ---- The workbench as a user meets it: progress on the terminal, the project's own kernel in every
# notebook and in

sys.path.insert(0, str(REPO / "tools"))
import set_kernelspec  # noqa: E402  (a script of tools/, found through the line above)


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def _text(o: dict) -> str:
    if "text" in o:
        return "".join(o["text"])
    return "".join(o.get("data", {}).get("text/plain", ""))


# --- the kernel ---------------------------------------------------------------------------------------------
def test_every_notebook_names_the_pc_clip_kernel():
    lacking = [str(p.relative_to(REPO)) for p in set_kernelspec.notebooks()
               if set_kernelspec.set_kernelspec(p, write=False)]
    assert set_kernelspec.notebooks() and not lacking, \
        f"notebooks without the pc-clip kernel (run tools/set_kernelspec.py): {lacking}"
    for p in set_kernelspec.notebooks():
        assert json.loads(p.read_text())["metadata"]["kernelspec"]["name"] == "pc-clip"


def test_the_venvs_jupyter_lists_the_pc_clip_kernel():
    r = subprocess.run([str(venv_script("jupyter")), "kernelspec", "list", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    specs = json.loads(r.stdout)["kernelspecs"]
    assert "pc-clip" in specs, f"kernels known to this venv's Jupyter: {sorted(specs)}; run make install"
    argv = specs["pc-clip"]["spec"]["argv"]
    assert "ipykernel_launcher" in " ".join(argv) and Path(argv[0]).exists(), argv


def test_nbdev_clean_keeps_the_kernelspec(tmp_path):
    nb = REPO / "nbs" / "core/01_run.ipynb"
    copy = tmp_path / "nb.ipynb"
    copy.write_text(nb.read_text())
    set_kernelspec.set_kernelspec(copy)
    r = subprocess.run([str(venv_script("nbdev_clean")), "--fname", str(copy)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(copy.read_text())["metadata"]["kernelspec"] == set_kernelspec.KERNELSPEC


# --- a run as the terminal and the executed notebook show it ------------------------------------------------
@pytest.fixture(scope="module")
def run00(tmp_path_factory):
    "`pc-clip reproduce --only 00` at small settings, into a private PC_CLIP_RUNS."
    runs = tmp_path_factory.mktemp("runs")
    r = pc_clip("reproduce", "--only", "00", *p_args(SMALL_ENVIRONMENT), env={"PC_CLIP_RUNS": str(runs)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, runs


@pytest.mark.slow
def test_reproduce_prints_progress_by_default(run00):
    r, runs = run00
    out = r.stdout
    assert re.search(r"^\[pc-clip\] \[1/1\] running 00_environment\.ipynb -> .*\(\d+ code cells",
                     out, re.M), out
    cells = re.findall(r"^  00_environment\.ipynb cell (\d+)/(\d+) done, \d+ s in this notebook$", out, re.M)
    assert cells and cells[-1][0] == cells[-1][1], out  # every cell reported, the last one included
    assert "[pc-clip] 00_environment.ipynb done in" in out
    # the project's log lines come through
    assert re.search(r"^  \d\d:\d\d:\d\d INFO pc_clip\.", out, re.M), out
    assert "without encryption" not in r.stderr + out  # the kernel talks over IPC, not TCP
    timings = json.loads((runs / "runs" / "tiny" / "notebooks" / "timings.json").read_text())
    assert timings["00_environment.ipynb"] > 0


@pytest.mark.slow
def test_a_long_loop_shows_its_bar_with_count_and_eta(tmp_path):
    """A tqdm bar in a notebook (a widget, with ipywidgets installed) reaches the terminal as lines with
    n/total and ETA."""
    import nbformat
    exp = tmp_path / "exp"
    exp.mkdir()
    params = nbformat.v4.new_code_cell('profile = "tiny"\nseed = 0\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    loop = nbformat.v4.new_code_cell("import time\nfrom tqdm.auto import tqdm\n"
                                     "for i in tqdm(range(6), desc='a loop'):\n    time.sleep(0.2)")
    nb = nbformat.v4.new_notebook(cells=[params, loop], metadata={"kernelspec": set_kernelspec.KERNELSPEC})
    nbformat.write(nb, exp / "01_loop.ipynb")
    r = pc_clip("reproduce", "--experiments", str(exp), env={"PC_CLIP_RUNS": str(tmp_path / "runs")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^    a loop:\s+0% 0/6 \[00:00<", r.stdout, re.M), r.stdout
    assert re.search(r"^    a loop: 100% 6/6 \[\d\d:\d\d<00:00", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_quiet_prints_no_progress(tmp_path):
    r = pc_clip("reproduce", "--only", "00", *p_args(SMALL_ENVIRONMENT), "--quiet",
                env={"PC_CLIP_RUNS": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cell 1/" not in r.stdout and "running" not in r.stdout
    assert "time per notebook" in r.stdout  # the summary stays


@pytest.mark.slow
def test_executed_notebook_is_clean(run00):
    _, runs = run00
    nb = json.loads((runs / "runs" / "tiny" / "notebooks" / "00_environment.ipynb").read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "pc-clip"
    outs = _outputs(nb)
    assert outs, "the executed notebook has no outputs"
    warnings = [_text(o) for o in outs
                if re.search(r"warn", _text(o), re.I) or o.get("output_type") == "error"]
    assert not warnings, warnings
    lines = [l for o in outs if o.get("output_type") == "stream" for l in _text(o).splitlines() if l.strip()]
    logged = [l for l in lines if re.match(r"(\d\d:\d\d:\d\d )?(INFO|WARNING)[: ]", l)]
    # each log line once, not again from the root logger
    assert logged and len(logged) == len(set(logged)), lines
    config = next(_text(o) for o in outs if "Config(profile=" in _text(o))
    # folders named from $PC_CLIP_RUNS, not as this machine's absolute paths (outputs travel with it)
    assert len(config.splitlines()) <= 12 and "runs    $PC_CLIP_RUNS/runs/tiny" in config, config
    assert str(runs) not in json.dumps(outs), "an output carries the machine's absolute runs path"


@pytest.mark.slow
def test_experiment_00_checks_its_parameters(tmp_path):
    r = pc_clip("reproduce", "--only", "00", "-p", "n_images=-3", env={"PC_CLIP_RUNS": str(tmp_path)})
    assert r.returncode == 1 and "n_images must be a positive integer" in r.stderr, \
        r.stdout[-2000:] + r.stderr[-2000:]


# --- paths, help, list --------------------------------------------------------------------------------------
def test_folders_resolve_against_the_checkout_from_any_working_directory(tmp_path):
    code = ("from pc_clip.core.config import get_config\n"
            "from pc_clip.core.run import cache_dir, results_path\n"
            "cfg = get_config()\nprint(results_path(cfg)); print(cache_dir(cfg))")
    env = {k: v for k, v in os.environ.items() if k not in ("PC_CLIP_RUNS", "PC_CLIP_DATA")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    results, cache = map(Path, r.stdout.split())
    assert results == REPO / "results" / "tiny" / "results.csv" and cache == REPO / "cache" / "tiny"
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_help_version_and_list():
    h = pc_clip("--help")
    assert h.returncode == 0 and "PC_CLIP_RUNS" in h.stdout and "PC_CLIP_DATA" in h.stdout, h.stdout
    from pc_clip import __version__
    v = pc_clip("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"pc-clip {__version__}"
    listed = pc_clip("list").stdout
    experiments = (REPO / "nbs" / "experiments").rglob("*.ipynb")
    for nb in sorted(p for p in experiments if ".ipynb_checkpoints" not in p.parts):
        assert nb.name in listed, f"{nb} not listed:\n{listed}"
    assert "nbs/experiments/beyond/" in listed


def test_papermill_help_shows_typed_parameters():
    r = subprocess.run([str(venv_script("papermill")), "--help-notebook",
                        str(REPO / "nbs" / "experiments" / "03_finetune.ipynb")], capture_output=True,
                        text=True, timeout=120)
    assert "ft_epochs: Optional[int] (default None)" in r.stdout and "Unknown type" not in r.stdout, r.stdout


# --- the README's source ------------------------------------------------------------------------------------
def test_readme_is_the_text_of_index_notebook():
    """README.md is what nbs/index.ipynb says (nbdev_readme renders it; editing one without the other fails
    here)."""
    import index_from_readme
    nb = json.loads((REPO / "nbs" / "index.ipynb").read_text())
    assert index_from_readme.readme_from_index(nb) == (REPO / "README.md").read_text(), \
        "README.md and nbs/index.ipynb differ: edit nbs/index.ipynb and regenerate README.md (nbdev_readme)"
    from configparser import ConfigParser
    cfg = ConfigParser(delimiters=["="])
    cfg.read(REPO / "settings.ini")
    assert cfg["DEFAULT"]["readme_nb"] == "index.ipynb"


# ---- JupyterLab starts on 127.0.0.1, serves a notebook of the repository through its contents API and
# knows the

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jupyterlab_serves_repo_notebook(tmp_path):
    port, token = _free_port(), "pc-clip-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={REPO}", f"--IdentityProvider.token={token}",
         "--ServerApp.open_browser=False", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}/api/contents/nbs/core/01_run.ipynb?content=1"
    try:
        body, deadline = None, time.time() + 90
        while time.time() < deadline and body is None and proc.poll() is None:
            try:
                req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
            except OSError:
                time.sleep(0.5)
        if body is None:
            proc.terminate()
            err = proc.communicate(timeout=20)[1].decode(errors="replace")[-3000:]
            raise AssertionError(f"JupyterLab did not answer (exit code {proc.returncode}); "
                                 f"its log ends with:\n{err}")
        assert body["type"] == "notebook" and body["name"] == "01_run.ipynb"
        assert any("default_exp core.run" in "".join(c["source"]) for c in body["content"]["cells"])
        # the notebook asks for the project's kernel
        assert body["content"]["metadata"]["kernelspec"]["name"] == "pc-clip"
        specs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/kernelspecs", headers={"Authorization": f"token {token}"}),
            timeout=10).read())
        assert "pc-clip" in specs["kernelspecs"], \
            f"JupyterLab knows {sorted(specs['kernelspecs'])}; run make install"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/lab",
                                         headers={"Authorization": f"token {token}"})
        lab = urllib.request.urlopen(request, timeout=10)
        assert lab.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
