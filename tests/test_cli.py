"""Tests of the `pc-clip` command: running experiments, up-front checks of settings, weights and data
(preflight), clean stops."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import nbformat
import pytest
from pathlib import Path

from conftest import REPO, SMALL_BASES, make_notebook, p_args, pc_clip, start_pc_clip
from pc_clip.reproduce import experiment_notebooks
from pc_clip.preflight import preflight
from pc_clip.core.config import get_config


# ---- The `pc-clip` command: order, overrides, a failing experiment named in the error, bad values and
# missing inputs


@pytest.mark.slow
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
                          nb.cells[1].source.replace("**overrides)",
                                                     "**given(ft_epochs=ft_epochs), **overrides)"))
    nbformat.write(nb, exp / "01_first.ipynb")
    r = pc_clip("reproduce", "--profile", "tiny", "--experiments", str(exp), "-p", "ft_epochs=7", "-p",
                "note='hi'")
    assert r.returncode == 0, r.stderr + r.stdout
    assert marker.read_text().split("\n")[:2] == ["first 7 hi", "second 7 hi"]
    assert "time per notebook" in r.stdout and "results table" in r.stdout
    from pc_clip.core.run import notebooks_dir
    # this run's settings: its own folder
    executed = notebooks_dir(get_config("tiny", ft_epochs=7)) / "01_first.ipynb"
    assert executed.exists() and executed.parent == runs_dir / "runs" / "tiny" / executed.parent.name
    assert not (runs_dir / "runs" / "tiny" / "notebooks").exists()  # the default run's folder is not touched
    r = pc_clip("reproduce", "--experiments", str(exp), "--only", "second", "-p", "note=1")
    assert r.returncode == 0 and "01_first" not in r.stdout and "02_second" in r.stdout
    # ft_epochs left at None
    r = pc_clip("reproduce", "--experiments", str(exp), "--only", "first", "-p", "note=2")
    assert r.returncode == 0, r.stderr
    # the profile's ft_epochs
    assert marker.read_text().splitlines()[-1] == f"first {get_config('tiny').ft_epochs} 2"


@pytest.mark.slow
def test_failing_experiment_exits_nonzero_and_names_notebook(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "01_ok.ipynb", "x = 1")
    make_notebook(exp / "02_broken.ipynb", "raise RuntimeError('the world is flat')")
    make_notebook(exp / "03_never.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    r = pc_clip("reproduce", "--experiments", str(exp))
    assert r.returncode == 1
    assert "02_broken.ipynb" in r.stderr and "the world is flat" in r.stderr and "cell" in r.stderr
    assert not (tmp_path / "ran").exists(), "must stop at the first failing notebook"


def test_unknown_profile_or_key_is_a_clear_error(tmp_path):
    r = pc_clip("reproduce", "--profile", "huge")
    assert r.returncode == 2 and "Unknown profile" in r.stderr
    r = pc_clip("reproduce", "--experiments", str(tmp_path))
    assert r.returncode == 2 and "No experiment notebooks" in r.stderr
    make_notebook(tmp_path / "01_a.ipynb", "x = 1")
    r = pc_clip("reproduce", "-p", "no_such_field=1", "--experiments", str(tmp_path))
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
    r = pc_clip("reproduce", "-p", value, "--experiments", str(tmp_path))
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr + r.stdout
    problems = [l.strip() for l in r.stderr.splitlines() if l.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith(f"{field}:") and says in problems[0], r.stderr
    assert "nothing was run" in r.stderr and not (tmp_path / "ran").exists()
    assert seconds < 2.5, f"the config check took {seconds:.2f} s (it imports no torch and starts no kernel)"


def test_all_bad_values_reported_at_once(tmp_path):
    r = pc_clip("reproduce", "-p", "ft_lr=abc", "-p", "n_pairs=-5", "-p", "ft_batch_size=0", "-p",
                "oracle_noise=2",
                 "--experiments", str(tmp_path))
    problems = sorted(l.strip().split(":")[0] for l in r.stderr.splitlines() if l.startswith("  "))
    assert r.returncode == 2 and problems == ["ft_batch_size", "ft_lr", "n_pairs", "oracle_noise"], r.stderr


@pytest.mark.slow
def test_none_override_is_honoured(tmp_path, runs_dir):
    out = tmp_path / "judge.txt"
    make_notebook(tmp_path / "50_probe.ipynb", "from pc_clip.core.config import get_config\n"
              f"open({str(out)!r}, 'w').write(repr(get_config(profile, seed=seed, **overrides).judge))")
    r = pc_clip("reproduce", "--profile", "paper", "-p", "judge=None", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr + r.stdout
    assert out.read_text() == "None"  # not silently the profile's LLM judge


@pytest.mark.slow
def test_missing_weights_and_data_are_named_before_any_notebook(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "03_finetune.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    data = tmp_path / "data"; data.mkdir()
    r = pc_clip("reproduce", "--profile", "paper", "--experiments", str(exp), env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2, r.stderr + r.stdout
    assert f"{data}/weights/ViT-L-14/datacomp_xl_s13b_b90k/" in r.stderr  # where the CLIP weights go
    assert "data set coco (train)" in r.stderr and "needed by experiment 03" in r.stderr
    assert "generator LLM" not in r.stderr  # experiment 03 does not generate
    assert not (tmp_path / "ran").exists()
    r = pc_clip("reproduce", "--profile", "paper", "--experiments", str(exp), "--skip-preflight",
                 env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 0 and (tmp_path / "ran").exists(), r.stderr


def test_preflight_names_the_llms_of_experiment_02(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "02_differences.ipynb", "x = 1")
    data = tmp_path / "data"; data.mkdir()
    llms = ["-p", "generator='tiny-chat'", "-p", "judge='tiny-chat'"]  # paper-smoke would build them (below)
    r = pc_clip("reproduce", "--profile", "paper", *llms, "--experiments", str(exp),
                env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2
    assert (f"generator LLM 'tiny-chat': put the model folder (with config.json) at {data}/weights/tiny-chat/"
            in r.stderr)
    assert "judge LLM 'tiny-chat'" in r.stderr and "CLIP weights" not in r.stderr
    llm = data / "weights" / "tiny-chat"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text("{}")  # a download cut short: the config, not the weights
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (llm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (llm / "model-00001-of-00002.safetensors").write_bytes(b"")
    r = pc_clip("reproduce", "--profile", "paper", *llms, "--experiments", str(exp),
                env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2 and f"generator LLM 'tiny-chat': {llm} is incomplete" in r.stderr, r.stderr
    assert ("1 of the 2 weight shards model.safetensors.index.json lists (model-00002-of-00002.safetensors)"
            in r.stderr)
    (llm / "model-00002-of-00002.safetensors").write_bytes(b"")
    r = pc_clip("reproduce", "--profile", "paper", *llms, "--experiments", str(exp),
                env={"PC_CLIP_DATA": str(data)})
    assert r.returncode == 2 and "tiny-chat" not in r.stderr and "data set coco (train)" in r.stderr


@pytest.mark.slow
def test_paper_smoke_builds_its_stand_ins_before_the_preflight(tmp_path, runs_dir):
    """From a fresh clone, `--profile paper-smoke` needs no step of its own: the stand-ins are built (or
    found) first."""
    exp = tmp_path / "exp"; exp.mkdir()
    seen = tmp_path / "data_root.txt"
    make_notebook(exp / "02_differences.ipynb",
                  "from pathlib import Path\nfrom pc_clip.core.config import get_config\n"
                  "from pc_clip.core.run import data_root\n"
                  f"Path({str(seen)!r}).write_text(str(data_root(get_config(profile, **overrides))))")
    r = pc_clip("reproduce", "--profile", "paper-smoke", "--experiments", exp, unset=("PC_CLIP_DATA",),
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
@pytest.mark.slow
def test_stopping_pc_clip_stops_its_kernel(tmp_path, runs_dir, sig):
    out, pid_file = tmp_path / "ticks.txt", tmp_path / "kernel.pid"
    make_notebook(tmp_path / "01_loop.ipynb", "import os, time\n"
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "for i in range(100_000):\n"
              f"    with open({str(out)!r}, 'a') as f: f.write(f'{{i}}\\n')\n"
              "    time.sleep(0.02)")
    proc = start_pc_clip("reproduce", "--experiments", tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and len(out.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, \
                "the loop notebook never started writing"
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
    r = pc_clip("reproduce", *args, "--experiments", str(tmp_path))
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr + r.stdout
    problems = [l.strip() for l in r.stderr.splitlines() if l.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith(f"{field}:") and says in problems[0], r.stderr
    assert not (tmp_path / "ran").exists() and seconds < 5, seconds


@pytest.mark.parametrize("given", ["eval_seeds=(0, 1)", "eval_seeds=[0, 1]"])
@pytest.mark.slow
def test_tuples_and_lists_reach_the_notebook_as_values(tmp_path, runs_dir, given):
    out = tmp_path / "seen.txt"
    make_notebook(tmp_path / "01_a.ipynb", "from pc_clip.core.config import get_config\n"
              f"open({str(out)!r}, 'w').write(repr(get_config(profile, seed=seed, **overrides).eval_seeds))")
    r = pc_clip("reproduce", "-p", given, "-p", "ft_lr_grid=()", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_text() == "(0, 1)"  # not the string "(0, 1)" papermill used to hand over


@pytest.mark.slow
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
    r = pc_clip("reproduce", "-p", "ft_lr=1e-3", "--experiments", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert seen.read_text().splitlines() == ["(0.001, (), ())"] * 2


def test_an_unwritable_runs_folder_exits_2_naming_it(tmp_path):
    make_notebook(tmp_path / "01_a.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the runs folder should be")
    t0 = time.perf_counter()
    r = pc_clip("reproduce", "--experiments", str(tmp_path), env={"PC_CLIP_RUNS": str(blocked)})
    assert r.returncode == 2, r.stderr
    assert f"cannot write to {blocked}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "ran").exists() and time.perf_counter() - t0 < 5


@pytest.mark.slow
def test_a_second_run_of_the_same_notebook_and_settings_waits_its_turn(tmp_path, runs_dir):
    "Two runs of one identity never write the same executed notebook: the second stops, naming the first."
    go = tmp_path / "go"
    make_notebook(tmp_path / "01_slow.ipynb", "import time, pathlib\n"
              f"pathlib.Path({str(tmp_path / 'started')!r}).write_text('x')\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)")
    first = start_pc_clip("reproduce", "--experiments", tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, \
                "the first run's notebook never started"
            time.sleep(0.1)
        t0 = time.perf_counter()
        second = pc_clip("reproduce", "--experiments", str(tmp_path))
        seconds = time.perf_counter() - t0
        assert second.returncode == 2 and "is being written by pid" in second.stderr, second.stderr
        # stopped before anything ran
        assert "running" not in second.stdout and seconds < 3, (seconds, second.stdout)
    finally:
        go.write_text("x")
        first.communicate(timeout=120)
    assert first.returncode == 0


# ---- The up-front checks of `pc-clip reproduce`: what the chosen notebooks need is on disk before the
# first one starts.

def test_a_missing_t2i_base_exits_2_before_any_notebook(tmp_path):
    """On `paper`, experiment 11 finetunes its own PC-CLIP from ViT-L-14/openai: without it the run stops at
    once, naming it."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    cfg = get_config("paper")
    # everything else experiment 11 reads is in place
    clip = data / "weights" / cfg.model_name / cfg.pretrained
    clip.mkdir(parents=True)
    (clip / "open_clip_model.safetensors").write_bytes(b"")
    (data / "weights" / cfg.t2i_model).mkdir(parents=True)
    (data / "weights" / cfg.t2i_model / "model_index.json").write_text("{}")
    env = {"PC_CLIP_DATA": str(data), "PC_CLIP_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    r = pc_clip("reproduce", "--profile", "paper", "--only", "11", env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "T2I study's base" in out and "ViT-L-14 / openai" in out
    assert str(data / "weights" / "ViT-L-14" / "openai") in out
    # those were found
    assert "SDXL pipeline (t2i_model)" not in out and "CLIP weights ViT-L-14 / datacomp" not in out
    # no notebook started (the writable-folder check may have made the folder)
    assert not list(runs.rglob("*.ipynb"))
    base = data / "weights" / "ViT-L-14" / "openai"
    base.mkdir(parents=True)
    (base / "open_clip_model.safetensors").write_bytes(b"")
    assert preflight(get_config("paper", data_root=str(data)), experiment_notebooks(only="11")) == []



# ---- Runs that share a machine: kernels of their own, a lock taken first, a slow kernel start, one-line
# errors

def _kernel_probe(out: Path) -> str:
    "Notebook code that writes the kernel's connection file and its OpenMP wait policy to `out`."
    return ("import os, time\nfrom ipykernel import get_connection_file\n"
            f"open({str(out)!r}, 'w').write(get_connection_file() + '\\n' + "
            f"os.environ.get('OMP_WAIT_POLICY', ''))\n"
            "time.sleep(1)")


@pytest.fixture
def runtime():
    "A Jupyter runtime folder of the test's own, on a short path (a socket's path holds at most 107 bytes)."
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_three_runs_started_together_keep_their_kernels_apart(tmp_path, runtime):
    """Three runs started in the same second (each with its own PC_CLIP_RUNS): each kernel has sockets of its
    own, none in the checkout."""
    before = sorted(REPO.glob("kernel-ipc*"))
    procs = []
    try:
        for k in range(3):
            exp = tmp_path / f"exp{k}"; exp.mkdir()
            make_notebook(exp / "01_probe.ipynb", _kernel_probe(tmp_path / f"probe{k}.txt"))
            env = {"PC_CLIP_RUNS": str(tmp_path / f"runs{k}"), "JUPYTER_RUNTIME_DIR": str(runtime)}
            procs.append(start_pc_clip("reproduce", "--experiments", exp, env=env,
                                       unset=("OMP_WAIT_POLICY",)))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Invalid Signature" not in out + err, err[-3000:]
    probes = [(tmp_path / f"probe{k}.txt").read_text().splitlines() for k in range(3)]
    folders = [Path(connection).parent for connection, _ in probes]
    # one private folder per kernel
    assert len(set(folders)) == 3 and all(f.parent == runtime for f in folders)
    assert [policy for _, policy in probes] == ["PASSIVE"] * 3  # KERNEL_ENV reached each kernel
    assert list(runtime.iterdir()) == [], list(runtime.iterdir())  # each went with its kernel
    assert sorted(REPO.glob("kernel-ipc*")) == before  # nothing in the checkout


@pytest.mark.slow
def test_a_run_killed_with_9_leaves_its_kernel_folder_to_the_next_start(tmp_path, runs_dir, runtime):
    started = tmp_path / "started"
    make_notebook(tmp_path / "01_wait.ipynb", "import time, pathlib\n"
                  f"pathlib.Path({str(started)!r}).write_text('x')\ntime.sleep(120)")
    env = {"JUPYTER_RUNTIME_DIR": str(runtime)}
    proc = start_pc_clip("reproduce", "--experiments", tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the notebook never started"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its kernel, with no chance to clean up
        proc.wait(timeout=30)
    left = list(runtime.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f"pc-clip-kernel-{proc.pid}-"), left
    (tmp_path / "01_wait.ipynb").unlink()
    make_notebook(tmp_path / "01_quick.ipynb", "x = 1")
    r = pc_clip("reproduce", "--experiments", tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the dead run's folder went at this start, this run's with its kernel
    assert list(runtime.iterdir()) == []


SLOW_KERNEL = ("import sys, time\ntime.sleep({delay})\nfrom ipykernel import kernelapp\n"
               "sys.argv = ['ipykernel_launcher', '-f', sys.argv[1]]\nkernelapp.launch_new_instance()")


@pytest.mark.slow
def test_a_slow_kernel_start_is_waited_for_or_named_in_one_line(tmp_path, runs_dir):
    """A kernel that takes 8 s to start: with 3 s allowed the run stops in one line naming the option; with
    60 s it runs."""
    spec = tmp_path / "jupyter" / "kernels" / "pc-clip"  # found before any other `pc-clip` kernelspec
    spec.mkdir(parents=True)
    argv = [sys.executable, "-c", SLOW_KERNEL.format(delay=8), "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "slow", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    make_notebook(tmp_path / "01_a.ipynb", f"open({str(tmp_path / 'ran')!r}, 'w').write('x')")
    env = {"JUPYTER_PATH": str(tmp_path / "jupyter")}
    r = pc_clip("reproduce", "--experiments", str(tmp_path), "--kernel-timeout", "3", env=env)
    assert r.returncode == 2 and not (tmp_path / "ran").exists(), r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("[pc-clip]")]
    assert len(errors) == 1 and "did not start" in errors[0] and "--kernel-timeout" in errors[0], \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    r = pc_clip("reproduce", "--experiments", str(tmp_path), env={**env, "PC_CLIP_KERNEL_TIMEOUT": "60"})
    assert r.returncode == 0 and (tmp_path / "ran").exists(), r.stderr[-3000:]


@pytest.mark.slow
def test_no_lock_file_is_left_after_a_clean_run(tmp_path):
    """The world, two pretrained base models, the results table and the executed notebooks, each written
    under a lock: none stays."""
    env = {"PC_CLIP_RUNS": str(tmp_path)}
    r = pc_clip("reproduce", "--only", "00,01", "--quiet", *p_args(SMALL_BASES), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.rglob("*.ipynb")) and list(tmp_path.rglob("open_clip_model.safetensors"))
    assert sorted(tmp_path.rglob("*.lock*")) == []


def test_a_partial_sdxl_snapshot_is_named_by_the_preflight(tmp_path):
    """An SDXL folder with model_index.json but without unet/ (and a vae/ without weights) stops the run
    before notebook 11."""
    data = tmp_path / "data"
    cfg = get_config("paper")
    for arch, tag in ((cfg.model_name, cfg.pretrained), (cfg.t2i_clip_model, cfg.t2i_clip_pretrained)):
        (data / "weights" / arch / tag).mkdir(parents=True)
        (data / "weights" / arch / tag / "open_clip_model.safetensors").write_bytes(b"")
    sdxl = data / "weights" / cfg.t2i_model
    sdxl.mkdir(parents=True)
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "tokenizer": ["transformers", "CLIPTokenizer"],
                                                       "feature_extractor": [None, None]}))
    (sdxl / "vae").mkdir(); (sdxl / "vae" / "config.json").write_text("{}")
    (sdxl / "tokenizer").mkdir(); (sdxl / "tokenizer" / "vocab.json").write_text("{}")
    env = {"PC_CLIP_DATA": str(data), "PC_CLIP_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    r = pc_clip("reproduce", "--profile", "paper", "--only", "11", env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"SDXL pipeline (t2i_model) {cfg.t2i_model!r}: {sdxl} is incomplete" in r.stderr, r.stderr
    assert "missing unet/; vae/: the weights" in r.stderr and "tokenizer" not in r.stderr
    (sdxl / "unet").mkdir(); (sdxl / "unet" / "config.json").write_text("{}")
    (sdxl / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (sdxl / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert preflight(get_config("paper", data_root=str(data)), experiment_notebooks(only="11")) == []


@pytest.mark.parametrize("args, says", [
    (["reproduce", "-p", "profile=paper"], "choose it with --profile paper"),
    (["models", "--profile", "bogus"], "Unknown profile 'bogus'"),
    (["reproduce", "--profile", "papr"], "Unknown profile 'papr' (did you mean 'paper'?)"),
    (["config", "--profile", "bogus"], "Unknown profile 'bogus'"),
    (["reproduce", "-p", "pretrain_step=5"], "'pretrain_step' (did you mean 'pretrain_steps'?)"),
    (["reproduce", "-p", "ft_lrr=1e-3"], "'ft_lrr' (did you mean 'ft_lr'?)"),
])
def test_a_mistake_is_one_line_and_exit_2(tmp_path, runs_dir, args, says):
    t0 = time.perf_counter()
    r = pc_clip(*args)
    seconds = time.perf_counter() - t0
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("[pc-clip] error: ") and says in r.stderr, r.stderr
    # no quotes around the message
    assert not r.stderr.startswith(("[pc-clip] error: \"", "[pc-clip] error: '\"")), r.stderr
    assert seconds < 3, seconds  # nothing heavy is imported, no notebook is run


def test_config_lists_every_key_with_type_value_and_help():
    from pc_clip.core.config import Config
    import dataclasses
    r = pc_clip("config", "--profile", "paper")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for f in dataclasses.fields(Config):
        row = next(i for i, l in enumerate(lines) if l.startswith(f"{f.name}: "))
        assert f" = {getattr(get_config('paper'), f.name)!r}" in lines[row] and lines[row + 1].strip(), \
            lines[row:row + 2]
    assert "pretrain_steps: int = 420" in r.stdout and "n_pairs: int = 200000  (default 12000)" in r.stdout


def test_models_without_models_imports_no_torch(tmp_path, runs_dir):
    code = ("import sys\nfrom pc_clip.cli import main\nrc = main(['models'])\n"
            "assert rc == 0 and 'torch' not in sys.modules, "
            "sorted(m for m in sys.modules if 'torch' in m)[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no model folders" in r.stdout, r.stderr


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, runs_dir):
    """A notebook whose write fails with errno 28 (as a full disk fails it): exit 2, one line naming the
    folder and the fix."""
    folder = runs_dir / "runs" / "tiny" / "models" / "clip"
    make_notebook(tmp_path / "01_write.ipynb", "import errno, os\n"
                  f"raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "
                  f"{str(folder / 'open_clip_model.safetensors')!r})")
    r = pc_clip("reproduce", "--experiments", str(tmp_path))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"[pc-clip] error: no space left on the disk of "
                                                             f"{folder} "), r.stderr
    assert "01_write.ipynb" in r.stderr and "free space there" in r.stderr
