"""Tests of the `pc-clip` command: running experiments, up-front checks of settings, weights and data
(preflight), clean stops."""
import os
import signal
import subprocess
import sys
import time
import nbformat
import pytest
from pathlib import Path

from conftest import REPO, make_notebook
from pc_clip.cli import experiment_notebooks, preflight
from pc_clip.core.config import get_config


# ---- The `pc-clip` command: order, overrides, a failing experiment named in the error, bad values and missing inputs



def _pc_clip(*args, env=None):
    exe = Path(sys.executable).parent / "pc-clip"  # the console script a user runs
    return subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_reproduce_runs_in_order_and_injects_overrides(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    marker = tmp_path / "order.txt"
    code = ("from pc_clip.core.config import get_config\n"
            "cfg = get_config(profile, seed=seed, **overrides)\n"
            f"open({str(marker)!r}, 'a').write(f'{{__NAME__}} {{cfg.ft_epochs}} {{note}}\\n')")
    make_notebook(exp / "02_second.ipynb", code.replace("{__NAME__}", "second"))
    make_notebook(exp / "01_first.ipynb", code.replace("{__NAME__}", "first"))
    nb = nbformat.read(exp / "01_first.ipynb", as_version=4)  # declares ft_epochs as its own parameter
    nb.cells[0].source += "\nft_epochs = None  # None: the profile's"
    nb.cells[1].source = ("from pc_clip.core.config import given\n" +
                          nb.cells[1].source.replace("**overrides)", "**given(ft_epochs=ft_epochs), **overrides)"))
    nbformat.write(nb, exp / "01_first.ipynb")
    r = _pc_clip("reproduce", "--profile", "tiny", "--experiments", str(exp), "-p", "ft_epochs=7", "-p", "note='hi'")
    assert r.returncode == 0, r.stderr + r.stdout
    assert marker.read_text().split("\n")[:2] == ["first 7 hi", "second 7 hi"]
    assert "time per notebook" in r.stdout and "results table" in r.stdout
    from pc_clip.core.runtime import notebooks_dir
    executed = notebooks_dir(get_config("tiny", ft_epochs=7)) / "01_first.ipynb"  # this run's settings: its own folder
    assert executed.exists() and executed.parent == runs_dir / "runs" / "tiny" / executed.parent.name
    assert not (runs_dir / "runs" / "tiny" / "notebooks").exists()  # the default run's folder is not touched
    r = _pc_clip("reproduce", "--experiments", str(exp), "--only", "second", "-p", "note=1")
    assert r.returncode == 0 and "01_first" not in r.stdout and "02_second" in r.stdout
    r = _pc_clip("reproduce", "--experiments", str(exp), "--only", "first", "-p", "note=2")  # ft_epochs left at None
    assert r.returncode == 0, r.stderr
    assert marker.read_text().splitlines()[-1] == f"first {get_config('tiny').ft_epochs} 2"  # the profile's ft_epochs


def test_failing_experiment_exits_nonzero_and_names_notebook(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "01_ok.ipynb", "x = 1")
    make_notebook(exp / "02_broken.ipynb", "raise RuntimeError('the world is flat')")
    make_notebook(exp / "03_never.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    r = _pc_clip("reproduce", "--experiments", str(exp))
    assert r.returncode == 1
    assert "02_broken.ipynb" in r.stderr and "the world is flat" in r.stderr and "cell" in r.stderr
    assert not (tmp_path / "ran").exists(), "must stop at the first failing notebook"


def test_unknown_profile_or_key_is_a_clear_error(tmp_path):
    r = _pc_clip("reproduce", "--profile", "huge")
    assert r.returncode == 2 and "Unknown profile" in r.stderr
    r = _pc_clip("reproduce", "--experiments", str(tmp_path))
    assert r.returncode == 2 and "No experiment notebooks" in r.stderr
    make_notebook(tmp_path / "01_a.ipynb", "x = 1")
    r = _pc_clip("reproduce", "-p", "no_such_field=1", "--experiments", str(tmp_path))
    assert r.returncode == 2 and "no_such_field" in r.stderr


@pytest.mark.parametrize("value, field, says", [
    ("ft_lr=abc", "ft_lr", "expected a float, got 'abc'"),
    ("n_pairs=-5", "n_pairs", "must be >= 1, got -5"),
    ("ft_batch_size=0", "ft_batch_size", "must be >= 2"),
    ("oracle_noise=2", "oracle_noise", "must be in [0, 1]"),
    ("ft_epochs=None", "ft_epochs", "None is not allowed"),
])
def test_bad_value_exits_2_before_any_notebook(tmp_path, runs_dir, value, field, says):
    make_notebook(tmp_path / "01_a.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    t0 = time.perf_counter()
    r = _pc_clip("reproduce", "-p", value, "--experiments", str(tmp_path))
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr + r.stdout
    problems = [l.strip() for l in r.stderr.splitlines() if l.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith(f"{field}:") and says in problems[0], r.stderr
    assert "nothing was run" in r.stderr and not (tmp_path / "ran").exists()
    assert seconds < 2.5, f"the config check took {seconds:.2f} s (it imports no torch and starts no kernel)"


def test_all_bad_values_reported_at_once(tmp_path):
    r = _pc_clip("reproduce", "-p", "ft_lr=abc", "-p", "n_pairs=-5", "-p", "ft_batch_size=0", "-p", "oracle_noise=2",
                 "--experiments", str(tmp_path))
    problems = sorted(l.strip().split(":")[0] for l in r.stderr.splitlines() if l.startswith("  "))
    assert r.returncode == 2 and problems == ["ft_batch_size", "ft_lr", "n_pairs", "oracle_noise"], r.stderr


def test_none_override_is_honoured(tmp_path, runs_dir):
    out = tmp_path / "judge.txt"
    make_notebook(tmp_path / "50_probe.ipynb", "from pc_clip.core.config import get_config\n"
              f"open({str(out)!r}, 'w').write(repr(get_config(profile, seed=seed, **overrides).judge))")
    r = _pc_clip("reproduce", "--profile", "paper", "-p", "judge=None", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr + r.stdout
    assert out.read_text() == "None"  # not silently the profile's LLM judge


def test_missing_weights_and_data_are_named_before_any_notebook(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "03_finetune.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    data = tmp_path / "data"; data.mkdir()
    r = _pc_clip("reproduce", "--profile", "paper", "--experiments", str(exp), env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2, r.stderr + r.stdout
    assert f"{data}/weights/ViT-L-14/datacomp_xl_s13b_b90k/" in r.stderr  # where the CLIP weights go
    assert "data set coco (train)" in r.stderr and "needed by experiment 03" in r.stderr
    assert "generator LLM" not in r.stderr  # experiment 03 does not generate
    assert not (tmp_path / "ran").exists()
    r = _pc_clip("reproduce", "--profile", "paper", "--experiments", str(exp), "--skip-preflight",
                 env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 0 and (tmp_path / "ran").exists(), r.stderr


def test_preflight_names_the_llms_of_experiment_02(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "02_differences.ipynb", "x = 1")
    data = tmp_path / "data"; data.mkdir()
    llms = ["-p", "generator='tiny-chat'", "-p", "judge='tiny-chat'"]  # paper-smoke would build them (below)
    r = _pc_clip("reproduce", "--profile", "paper", *llms, "--experiments", str(exp), env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2
    assert f"generator LLM 'tiny-chat': put the model folder (with config.json) at {data}/weights/tiny-chat/" in r.stderr
    assert "judge LLM 'tiny-chat'" in r.stderr and "CLIP weights" not in r.stderr
    (data / "weights" / "tiny-chat").mkdir(parents=True)
    (data / "weights" / "tiny-chat" / "config.json").write_text("{}")
    r = _pc_clip("reproduce", "--profile", "paper", *llms, "--experiments", str(exp), env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2 and "tiny-chat" not in r.stderr and "data set coco (train)" in r.stderr


def test_paper_smoke_builds_its_stand_ins_before_the_preflight(tmp_path, runs_dir):
    "From a fresh clone, `--profile paper-smoke` needs no step of its own: the stand-ins are built (or found) first."
    exp = tmp_path / "exp"; exp.mkdir()
    seen = tmp_path / "data_root.txt"
    make_notebook(exp / "02_differences.ipynb", "from pathlib import Path\nfrom pc_clip.core.config import get_config\nfrom pc_clip.core.runtime import data_root\n"
              f"Path({str(seen)!r}).write_text(str(data_root(get_config(profile, **overrides))))")
    env = {k: v for k, v in os.environ.items() if k != "PC_CLIP_DATA"}
    r = subprocess.run([str(Path(sys.executable).parent / "pc-clip"), "reproduce", "--profile", "paper-smoke",
                        "--experiments", str(exp)], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    smoke = REPO / "data" / "paper-smoke"
    assert f"paper-smoke stand-ins in {smoke}" in r.stdout and (smoke / "pc-clip-standins.json").exists()
    assert seen.read_text() == str(smoke)  # the notebooks read the stand-ins' data root


def _pid_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_pc_clip_stops_its_kernel(tmp_path, runs_dir, sig):
    out, pid_file = tmp_path / "ticks.txt", tmp_path / "kernel.pid"
    make_notebook(tmp_path / "01_loop.ipynb", "import os, time\n"
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "for i in range(100_000):\n"
              f"    with open({str(out)!r}, 'a') as f: f.write(f'{{i}}\\n')\n"
              "    time.sleep(0.02)")
    exe = Path(sys.executable).parent / "pc-clip"
    proc = subprocess.Popen([str(exe), "reproduce", "--experiments", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and len(out.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "the loop notebook never started writing"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err
    kernel = int(pid_file.read_text())
    size = out.stat().st_size
    time.sleep(2.0)  # the kernel used to go on writing for seconds
    assert out.stat().st_size == size, "the notebook kept writing after pc-clip was stopped"
    assert _pid_gone(kernel)


@pytest.mark.parametrize("args, field, says", [
    (["-p", "ft_lr_grid=(0,)"], "ft_lr_grid", "finite learning rates > 0"),
    (["-p", "wavg_alpha_grid=(2.0,)"], "wavg_alpha_grid", "mixes in [0, 1]"),
    (["-p", "ft_keep_epochs=(-3,)"], "ft_keep_epochs", "epoch numbers >= 1"),
    (["-p", "eval_seeds=[0, 'a']"], "eval_seeds", "tuple of ints"),
    (["-p", "ft_lr=1e-3", "-p", "ft_lr_grid=(1e-3, 2e-3)"], "ft_lr", "give one of them"),
])
def test_bad_tuples_and_grids_exit_2_before_any_notebook(tmp_path, runs_dir, args, field, says):
    make_notebook(tmp_path / "01_a.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    t0 = time.perf_counter()
    r = _pc_clip("reproduce", *args, "--experiments", str(tmp_path))
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr + r.stdout
    problems = [l.strip() for l in r.stderr.splitlines() if l.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith(f"{field}:") and says in problems[0], r.stderr
    assert not (tmp_path / "ran").exists() and seconds < 5, seconds


@pytest.mark.parametrize("given", ["eval_seeds=(0, 1)", "eval_seeds=[0, 1]"])
def test_tuples_and_lists_reach_the_notebook_as_values(tmp_path, runs_dir, given):
    out = tmp_path / "seen.txt"
    make_notebook(tmp_path / "01_a.ipynb", "from pc_clip.core.config import get_config\n"
              f"open({str(out)!r}, 'w').write(repr(get_config(profile, seed=seed, **overrides).eval_seeds))")
    r = _pc_clip("reproduce", "-p", given, "-p", "ft_lr_grid=()", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_text() == "(0, 1)"  # not the string "(0, 1)" papermill used to hand over


def test_ft_lr_alone_reaches_every_notebook_as_one_learning_rate(tmp_path, runs_dir):
    "The notebook that declares ft_lr and the one that gets it in `overrides` build the same config."
    seen = tmp_path / "seen.txt"
    code = ("from pc_clip.core.config import get_config, given\n"
            "cfg = get_config(profile, seed=seed, **given(ft_lr=globals().get('ft_lr')), **overrides)\n"
            f"open({str(seen)!r}, 'a').write(repr((cfg.ft_lr, cfg.ft_lr_grid, cfg.wavg_alpha_grid)) + '\\n')")
    make_notebook(tmp_path / "03_own.ipynb", code)
    nb = nbformat.read(tmp_path / "03_own.ipynb", as_version=4)
    nb.cells[0].source += "\nft_lr = None"
    nbformat.write(nb, tmp_path / "03_own.ipynb")
    make_notebook(tmp_path / "04_rest.ipynb", code)
    r = _pc_clip("reproduce", "-p", "ft_lr=1e-3", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert seen.read_text().splitlines() == ["(0.001, (), ())"] * 2


def test_an_unwritable_runs_folder_exits_2_naming_it(tmp_path):
    make_notebook(tmp_path / "01_a.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the runs folder should be")
    t0 = time.perf_counter()
    r = _pc_clip("reproduce", "--experiments", str(tmp_path), env={"PC_CLIP_RUNS": str(blocked)})
    assert r.returncode == 2 and f"cannot write to {blocked}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "ran").exists() and time.perf_counter() - t0 < 5


def test_a_second_run_of_the_same_notebook_and_settings_waits_its_turn(tmp_path, runs_dir):
    "Two runs of one identity never write the same executed notebook: the second stops, naming the first."
    go = tmp_path / "go"
    make_notebook(tmp_path / "01_slow.ipynb", "import time, pathlib\n"
              f"pathlib.Path({str(tmp_path / 'started')!r}).write_text('x')\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)")
    exe = Path(sys.executable).parent / "pc-clip"
    first = subprocess.Popen([str(exe), "reproduce", "--experiments", str(tmp_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = _pc_clip("reproduce", "--experiments", str(tmp_path))
        assert second.returncode == 2 and "is being written by pid" in second.stderr, second.stderr
    finally:
        go.write_text("x")
        first.communicate(timeout=120)
    assert first.returncode == 0


# ---- The up-front checks of `pc-clip reproduce`: what the chosen notebooks need is on disk before the first one starts.

def test_a_missing_t2i_base_exits_2_before_any_notebook(tmp_path):
    "On `paper`, experiment 11 finetunes its own PC-CLIP from ViT-L-14/openai: without it the run stops at once, naming it."
    data, runs = tmp_path / "data", tmp_path / "runs"
    cfg = get_config("paper")
    clip = data / "weights" / cfg.model_name / cfg.pretrained  # everything else experiment 11 reads is in place
    clip.mkdir(parents=True)
    (clip / "open_clip_model.safetensors").write_bytes(b"")
    (data / "weights" / cfg.t2i_model).mkdir(parents=True)
    (data / "weights" / cfg.t2i_model / "model_index.json").write_text("{}")
    env = {**os.environ, "PC_CLIP_DATA": str(data), "PC_CLIP_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "pc-clip"), "reproduce", "--profile", "paper", "--only", "11"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "T2I study's base" in out and "ViT-L-14 / openai" in out and str(data / "weights" / "ViT-L-14" / "openai") in out
    assert "SDXL pipeline (t2i_model)" not in out and "CLIP weights ViT-L-14 / datacomp" not in out  # those were found
    assert not list(runs.rglob("*.ipynb"))  # no notebook started (the writable-folder check may have made the folder)
    base = data / "weights" / "ViT-L-14" / "openai"
    base.mkdir(parents=True)
    (base / "open_clip_model.safetensors").write_bytes(b"")
    assert preflight(get_config("paper", data_root=str(data)), experiment_notebooks(only="11")) == []
