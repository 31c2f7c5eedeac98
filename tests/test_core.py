"""Tests of `pc_clip.core`: the config and its checks, the results table, stores and locks, the model registry
and run identity (folders keyed by their settings, manifests, rows per run)."""
import subprocess
import sys
import pytest
import json
import os
import signal
import textwrap
import time
import torch
import hashlib
import pandas as pd
from pathlib import Path

from pc_clip.core.config import (PROFILES, Config, ConfigError, get_config, given, validate_config,
    parse_overrides)
from pc_clip.core.artifacts import ArtifactBusy
from pc_clip.core.results import read_results, result_row, write_results
from pc_clip.core.run import notebooks_dir, results_options, results_path
from pc_clip.core.store import JsonlStore, parse_line
from pc_clip.models.clip import (TINY_MODEL, create_clip, load_checkpoint, save_checkpoint, WEIGHTS_FILE,
    find_models, is_checkpoint, load_clip)
from conftest import SMALL_TINY, make_notebook, p_args, pc_clip
from pc_clip.core import registry
from pc_clip.evaluation.runner import (evaluated_models, items_path, run_zero_shot, eval_datasets,
    write_evaluation)
from pc_clip.core.registry import (ModelSpec, backend_options, corpus_options, model_names, store_options,
    world_options)
from pc_clip.core.registry import clip_source, model_dir, models_dir


# ---- The config is checked as a whole before anything runs: types, ranges, known forms, and None as a value.

@pytest.mark.parametrize("override, field, says", [
    ({"ft_lr": "abc"}, "ft_lr", "expected a float"),
    ({"n_pairs": -5}, "n_pairs", ">= 1"),
    ({"ft_batch_size": 0}, "ft_batch_size", ">= 2"),
    ({"ft_batch_size": 1}, "ft_batch_size", "contrastive"),
    ({"oracle_noise": 2}, "oracle_noise", "[0, 1]"),
    ({"ft_epochs": None}, "ft_epochs", "None is not allowed"),
    ({"load_in_4bit": "yes"}, "load_in_4bit", "True or False"),
    ({"eval_seeds": (0, "a")}, "eval_seeds", "tuple of ints"),
    ({"ft_trainable": "everything"}, "ft_trainable", "text_blocks"),
    ({"ft_loss": "hinge"}, "ft_loss", "contrastive"),
    ({"generator": "openai:"}, "generator", "name the served model"),
    ({"judge": ""}, "judge", "None (no judge)"),
    ({"ft_lr": 0.0}, "ft_lr", "> 0"),
    ({"ft_lr": float("nan")}, "ft_lr", "> 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"t2i_image_size": 100}, "t2i_image_size", "multiple of 8"),
    ({"device": "gpu"}, "device", "cuda"),
    ({"ft_lr_grid": (0,)}, "ft_lr_grid", "> 0"),
    ({"ft_lr_grid": (1e-3, float("inf"))}, "ft_lr_grid", "finite"),
    ({"wavg_alpha_grid": (2.0,)}, "wavg_alpha_grid", "[0, 1]"),
    ({"ft_keep_epochs": (-3,)}, "ft_keep_epochs", ">= 1"),
    ({"ft_lr": 1e-3, "ft_lr_grid": (1e-3, 2e-3)}, "ft_lr", "give one of them"),
])
def test_each_bad_value_is_one_message_naming_its_field(override, field, says):
    with pytest.raises(ConfigError) as e:
        get_config("tiny", **override)
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(f"{field}:") and says in e.value.problems[0], e.value.problems


def test_all_bad_fields_are_reported_together():
    with pytest.raises(ConfigError) as e:
        get_config("tiny", ft_lr="abc", n_pairs=-5, ft_batch_size=0, oracle_noise=2)
    fields = sorted(p.split(":")[0] for p in e.value.problems)
    assert fields == ["ft_batch_size", "ft_lr", "n_pairs", "oracle_noise"]


def test_none_is_a_value_where_the_field_allows_it():
    assert get_config("paper").judge is not None
    assert get_config("paper", judge=None).judge is None  # no longer dropped
    assert get_config("tiny", ft_max_pairs=None).ft_max_pairs is None
    assert get_config("tiny", pretrained=None).pretrained is None
    # a notebook parameter left at None means "the profile's value": `given` leaves it out
    assert get_config("paper", **given(ft_epochs=None, ft_lr=None)).ft_epochs == 20
    assert get_config("paper", **given(ft_epochs=3)).ft_epochs == 3


def test_values_are_coerced_only_where_nothing_is_lost():
    cfg = get_config("tiny", ft_lr=1, eval_seeds=[3, 4], comparative_alphas=[1, 0.5])
    assert cfg.ft_lr == 1.0 and isinstance(cfg.ft_lr, float)
    assert cfg.eval_seeds == (3, 4) and cfg.comparative_alphas == (1.0, 0.5)
    with pytest.raises(ConfigError):
        get_config("tiny", n_pairs=12.5)  # a float is not a count
    with pytest.raises(ConfigError):
        get_config("tiny", n_pairs=True)  # nor is a bool


def test_replace_validates_too():
    with pytest.raises(ConfigError, match="ft_batch_size"):
        get_config("tiny").replace(ft_batch_size=1)
    assert get_config("tiny").replace(ft_loss="mse", ft_batch_size=1).ft_batch_size == 1


def test_every_profile_is_valid_and_paper_runs_offline():
    for name in PROFILES:
        assert validate_config(get_config(name)) == [], name
    paper = get_config("paper")
    assert paper.judge == paper.generator and not paper.judge.startswith("openai:")
    assert get_config("paper", judge="openai:gpt-4o-mini").judge == "openai:gpt-4o-mini"  # still an option
    assert get_config("paper", judge="openai:").judge == "openai:"  # the judge module's default model
    # a served LLM
    assert get_config("paper",
                      generator="openai:meta-llama/Llama-2-13b-chat-hf").generator.startswith("openai:")


def test_paper_smoke_is_paper_at_toy_scale():
    smoke, paper = get_config("paper-smoke"), get_config("paper")
    assert (smoke.model_name, smoke.pretrained, smoke.generator, smoke.judge) == ("pc-clip-smoke", "smoke",
                                                                                  "tiny-chat", "tiny-chat")
    assert (smoke.ft_epochs, smoke.ft_batch_size, smoke.t2i_steps, smoke.t2i_image_size) == (2, 16, 2, 64)
    assert smoke.n_pairs < 1000 and smoke.eval_n_images < paper.eval_n_images
    same = ("corpus", "pair_sampling", "load_in_4bit", "ft_trainable", "ft_loss", "ft_lr_decay",
            "ft_temperature", "ft_max_pairs")
    assert [getattr(smoke, k) for k in same] == [getattr(paper, k) for k in same]
    assert smoke.ft_lr >= 1e3 * paper.ft_lr  # a learning rate that moves the stand-in's weights (issue 21)


def test_checking_a_config_imports_neither_torch_nor_pandas():
    code = ("import sys; from pc_clip.core.config import get_config; get_config('paper', ft_lr=1e-3); "
            "print('torch' in sys.modules, 'pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_a_config_built_by_hand_is_checked_by_validate_config():
    assert validate_config(Config()) == []
    problems = validate_config(Config(n_pairs=0, corpus="imagenet"))
    assert [p.split(":")[0] for p in problems] == ["n_pairs", "corpus"]


def test_ft_lr_alone_is_one_learning_rate_for_every_caller():
    """The CLI and every notebook build their config with get_config: ft_lr alone collapses both grids, in
    all of them."""
    one = get_config("tiny", ft_lr=1e-3)
    assert (one.ft_lr_grid, one.wavg_alpha_grid) == ((), ())
    assert get_config("tiny", ft_lr=1e-3, ft_lr_grid=[]) == one  # the grid given empty too: the same config
    # an alpha sweep at that lr
    assert get_config("tiny", ft_lr=1e-3, wavg_alpha_grid=(0.5, 1.0)).wavg_alpha_grid == (0.5, 1.0)
    assert get_config("tiny").ft_lr_grid == (1e-3, 2e-3)  # nothing given: the profile's sweep
    assert get_config("paper", ft_lr=1e-7).ft_lr_grid == ()


# ---- The keyed JSONL store: resume after kill -9, one writer at a time, corruption and doubling cost only
# themselves.

WRITER = textwrap.dedent("""
    import sys, time
    from pc_clip.core.store import JsonlStore
    store = JsonlStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        if i in store:
            continue
        store.append({"key": i, "payload": "x" * 1000})
        time.sleep(0.01)
""")


RUN = textwrap.dedent("""
    import sys, time
    from pc_clip.core.store import JsonlStore
    store = JsonlStore(sys.argv[1])
    with store.writing(timeout=float(sys.argv[3])):
        for i in range(int(sys.argv[2])):
            if i not in store:
                store.extend([{"key": i, "payload": "x" * 500}])
                time.sleep(0.002)
""")


def write_records(path, n, size=1000):
    path.write_text("".join(json.dumps({"key": i, "payload": "x" * size}) + "\n" for i in range(n)))


def test_killed_writer_resumes_without_loss_or_duplicates(tmp_path):
    path = tmp_path / "recs.jsonl"
    script = tmp_path / "writer.py"; script.write_text(WRITER)
    p = subprocess.Popen([sys.executable, str(script), str(path), "400"])
    deadline = time.time() + 60
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 30):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    n_before = len(JsonlStore(path))
    assert 30 <= n_before < 400
    subprocess.run([sys.executable, str(script), str(path), "400"], check=True, timeout=120)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == list(range(400)), "every record exactly once"


def test_torn_last_line_is_dropped_and_redone(tmp_path):
    path = tmp_path / "r.jsonl"
    s = JsonlStore(path); s.append({"key": "a"}); s.append({"key": "b"})
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "tr')
    s = JsonlStore(path)
    assert s.n_corrupt == 1 and "c" not in s and len(s) == 2
    assert s.append({"key": "c"}) and [r["key"] for r in s.records()] == ["a", "b", "c"]


@pytest.mark.parametrize("glued", [False, True], ids=["own-line", "glued-to-next-record"])
def test_a_torn_line_mid_file_costs_one_record(tmp_path, caplog, glued):
    """A 512-byte fragment at record 200 of 400: 399 records stay, the file is rewritten clean, the loss is
    logged."""
    path = tmp_path / "r.jsonl"
    write_records(path, 400)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[200] = lines[200][:512] + (b"\n" if not glued else b"")  # a torn write; the next append followed it
    path.write_bytes(b"".join(lines))
    s = JsonlStore(path)
    assert len(s) == 399 and 200 not in s and 199 in s and 201 in s and 399 in s
    assert s.n_corrupt == 1 and "dropped 1 unparsable line(s)" in caplog.text
    assert path.read_bytes().count(b"\n") == 399
    assert [r["key"] for r in s.records()] == [k for k in range(400) if k != 200]
    assert JsonlStore(path).n_corrupt == 0  # healed on disk
    assert s.append({"key": 200, "payload": "again"}) and len(JsonlStore(path)) == 400


def test_a_doubled_file_heals_on_the_next_open(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, 50, size=10)
    path.write_bytes(path.read_bytes() * 2)  # what two unlocked runs used to leave
    s = JsonlStore(path)
    assert (len(s), s.n_duplicate, len(s.records())) == (50, 50, 50)
    assert path.read_bytes().count(b"\n") == 50


def test_a_locked_store_is_not_rewritten_by_a_reader(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, 5, size=10)
    path.write_bytes(path.read_bytes() + b'{"key": 9, "x\n')
    with JsonlStore(tmp_path / "other.jsonl").writing():  # unrelated lock: no effect
        pass
    from pc_clip.core.artifacts import artifact_lock
    with artifact_lock(path):  # a writer holds it: readers see a clean view, the file is left to the writer
        s = JsonlStore(path)
        assert (len(s), s.n_corrupt) == (5, 1) and path.read_bytes().count(b"\n") == 6
    assert path.read_bytes().count(b"\n") == 6 and JsonlStore(path).n_corrupt == 1
    assert path.read_bytes().count(b"\n") == 5  # healed once the lock was free


def test_two_concurrent_writers_leave_one_record_per_key(tmp_path):
    path = tmp_path / "r.jsonl"
    script = tmp_path / "run.py"; script.write_text(RUN)
    procs = [subprocess.Popen([sys.executable, str(script), str(path), "300", "120"]) for _ in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == list(range(300))


def test_unlocked_appends_from_two_processes_never_double(tmp_path):
    path = tmp_path / "r.jsonl"
    script = tmp_path / "writer.py"; script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(path), "150"]) for _ in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == list(range(150))


def test_a_second_writer_stops_naming_the_holder(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlStore(path).writing():
        with pytest.raises(ArtifactBusy, match=rf"is being written by pid {os.getpid()}"):
            with JsonlStore(path).writing(timeout=0.2):
                pass


COUNTER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pc_clip.core.artifacts import artifact_lock
    target, n = Path(sys.argv[1]), int(sys.argv[2])
    for _ in range(n):
        with artifact_lock(target, timeout=60):  # read, add one, write: lost updates if two held it at once
            count = int(target.read_text()) if target.exists() else 0
            target.write_text(str(count + 1))
""")


def test_lock_files_removed_on_release_still_exclude(tmp_path):
    """Each holder removes its lock file on release; four processes taking turns 100 times each still never
    overlap."""
    target, script = tmp_path / "counter.txt", tmp_path / "count.py"
    script.write_text(COUNTER)
    procs = [subprocess.Popen([sys.executable, str(script), str(target), "100"]) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    assert target.read_text() == "400"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count.py", "counter.txt"]  # no lock file left


def test_a_lock_file_removed_while_being_taken_is_not_held(tmp_path, monkeypatch):
    """A taker opened the lock file, then its holder removed it and let go, then the taker locked it: the
    taker must not count that as holding the lock (a third process would lock a new file of the same name),
    and takes the file at the path instead."""
    import fcntl
    from pc_clip.core import artifacts
    lock = tmp_path / "model.lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    real, locked = fcntl.flock, []
    def flock(fd, op):
        if not locked:  # the holder finishes between the taker's open and its lock
            os.unlink(lock)
            os.close(holder)
        locked.append(fd)
        return real(fd, op)
    monkeypatch.setattr(fcntl, "flock", flock)
    with artifacts.artifact_lock(tmp_path / "model"):
        assert len(locked) == 2 and lock.exists()  # it went on to lock the file now at the path
        other = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # which excludes a third process
            real(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    assert not lock.exists()


def test_parse_line_recovers_the_record_after_a_fragment():
    assert parse_line('{"key": 1, "a": "{"{"key": 2, "b": {"c": 3}}') == ({"key": 2, "b": {"c": 3}}, True)
    assert parse_line('{"key": 1}') == ({"key": 1}, False)
    assert parse_line('not json') == (None, True)
    assert parse_line('[1, 2]') == (None, True)


# ---- Results-table idempotence, checkpoint round trip (the store's tests are in test_store.py).

def test_results_table_is_idempotent_per_experiment(runs_dir):
    cfg = get_config("tiny")
    rows = [result_row("clip", "zero_shot", "world", "accuracy", 0.5, 0, 10)]
    write_results(rows, "e1", **results_options(cfg)); write_results(rows, "e1", **results_options(cfg))
    write_results([result_row("pc-clip", "zero_shot", "world", "accuracy", 0.6, 0, 10)], "e2",
                  **results_options(cfg))
    t = read_results(results_path(cfg))
    assert len(t) == 2 and set(t.experiment) == {"e1", "e2"}


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    model, _, tok = create_clip(TINY_MODEL, seed=3)
    with torch.no_grad():
        model.text_projection.add_(1.0)  # something a fresh model would not have
    save_checkpoint(model, tmp_path / "ck", TINY_MODEL, {"step": 5})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["open_clip_config.json",
                                                                   "open_clip_model.safetensors"]
    m2, _, tok2 = load_checkpoint(tmp_path / "ck")
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_image(x), m2.encode_image(x))
    assert torch.equal(tok(["a glorp"]), tok2(["a glorp"]))


# ---- Change a setting and rerun: every model and every row knows the settings that made it.

@pytest.mark.slow
def test_one_learning_rate_trains_and_evaluates_the_same_folders(tmp_path, monkeypatch):
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path)}
    r = pc_clip("reproduce", "--only", "01,02", *p_args(SMALL_TINY), env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = pc_clip("reproduce", "--only", "03,04", *p_args(SMALL_TINY, "-p", "ft_lr=1e-3"), env=env,
                timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path))
    cfg = get_config("tiny", ft_lr=1e-3, **parse_overrides(SMALL_TINY)[0])
    rows = read_results(results_path(cfg))
    evaluated = set(rows[rows.experiment == "04_difference_classification"].model)
    # every finetuned model
    assert evaluated == set(model_names(cfg)), sorted(set(model_names(cfg)) - evaluated)
    assert len(evaluated) == 10  # with the vocabulary ablation (clip/plain-captions, pc-clip/plain-captions)
    default_table = tmp_path / "results" / "tiny" / "results.csv"  # not the default run's table
    assert not default_table.exists() or "04_difference_classification" not in set(
        read_results(default_table).experiment)

    # which folder is pc-clip, at which lr, trained on which file: the manifests alone say
    manifests = [json.loads(p.read_text()) | {"path": p.parent}
                 for p in (tmp_path / "runs" / "tiny" / "models").glob("*/manifest.json")]
    (chosen,) = [m for m in manifests if m["name"] == "pc-clip" and m["role"] == "pc-clip"]
    assert chosen["path"] == model_dir(cfg, "pc-clip") and chosen["selection"]["lr"] == 1e-3
    weights = (chosen["path"] / WEIGHTS_FILE).read_bytes()
    assert chosen["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert chosen["data_sha256"] == hashlib.sha256(Path(chosen["data_file"]).read_bytes()).hexdigest()
    assert chosen["settings"]["ft_lr"] == 1e-3 and chosen["parent"] == model_dir(cfg, "clip").name
    r = pc_clip("models", "--name", "pc-clip", env=env, timeout=300)
    assert r.returncode == 0 and str(model_dir(cfg, "pc-clip")) in r.stdout and "lr=0.001" in r.stdout, \
        r.stdout + r.stderr

    # issue 30: every model is listed, bases too, with the run that wrote it and its data file;
    # -p names the folders
    from pc_clip.core.run import run_name
    from pc_clip.report.build import run_warnings
    small = get_config("tiny", **parse_overrides(SMALL_TINY)[0])
    r = pc_clip("models", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {tuple(l.split()[:2]): l for l in r.stdout.splitlines() if l and not l.startswith(" ")}
    for base in ("clip", "clip/plain-captions"):
        line = lines[(base, "base")]
        assert f"run {run_name(small)}" in line and ".attrs.csv" in line, r.stdout
    wavg = lines[("pc-clip/wavg-0.5", "weight-average")]
    assert "lr=0.001" in wavg and "alpha=0.5" in wavg
    r = pc_clip("models", *p_args(SMALL_TINY, "-p", "ft_lr=1e-3"), env=env, timeout=300)
    assert r.returncode == 0 and f"run {run_name(cfg)}" in r.stdout, r.stdout + r.stderr
    for name in ("pc-clip", "clip-ft-captions", "clip"):
        (line,) = [l for l in r.stdout.splitlines() if l.split()[0] == name]
        assert str(model_dir(cfg, name)) in line and "written by run" in line, line

    # issue 30: the override switched the search off: the run's output and its own REPORT say so, with
    # each rate
    out03 = (notebooks_dir(cfg) / "03_finetune.ipynb").read_text()
    assert "No model was searched on validation" in out03 and "caption_ft_lr=0.002" in out03
    r = pc_clip("reproduce", "--only", "12", *p_args(SMALL_TINY, "-p", "ft_lr=1e-3"), env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = (results_path(cfg).parent / "REPORT.md").read_text()
    assert "**How the compared models were tuned:** No model was searched on validation." in report
    assert "`clip-ft-captions`, `clip-ft-rewritten` at caption_ft_lr=0.002" in report
    warned = report.split("## Warnings of this run\n")[1].split("\n## ")[0]
    # its own notebooks'
    assert warned.strip() == ("".join(f"- {w}\n" for w in run_warnings(cfg)) or "none").strip()
    assert "ft_lr=0.001" in report.split("## Departures from the paper")[1].split("## Warnings")[0]




NOTEBOOK_WRITER = ("from pc_clip.core.config import get_config\n"
                   "from pc_clip.core.results import result_row, write_results\n"
                   "from pc_clip.core.run import results_options\n"
          "cfg = get_config(profile, seed=seed, **overrides)\n"
          "rows = [result_row('pc-clip', 'zero_shot', 'world', 'accuracy', 0.5 + 0.1 * len(cfg.eval_seeds), "
          "s, 10)\n"
          "        for s in cfg.eval_seeds]\n"
          "{fail}write_results(rows, '05_zero_shot', **results_options(cfg))\n"
          "print(cfg.eval_seeds)")


@pytest.mark.slow
def test_other_settings_leave_the_default_rows_and_notebooks_byte_identical(tmp_path):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "05_zero_shot.ipynb", NOTEBOOK_WRITER.format(fail=""))
    env = {**os.environ, "PC_CLIP_RUNS": str(tmp_path / "out")}
    r = pc_clip("reproduce", "--experiments", str(exp), env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    default_csv = tmp_path / "out" / "results" / "tiny" / "results.csv"
    default_nb = tmp_path / "out" / "runs" / "tiny" / "notebooks" / "05_zero_shot.ipynb"
    before = default_csv.read_bytes(), default_nb.read_bytes()

    # a tuple, as a user types it
    r = pc_clip("reproduce", "--experiments", str(exp), "-p", "eval_seeds=(0, 1)", env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (default_csv.read_bytes(), default_nb.read_bytes()) == before
    other = get_config("tiny", eval_seeds=(0, 1))
    mine = read_results(tmp_path / "out" / "results" / f"tiny-{other_id(other)}" / "results.csv")
    assert sorted(mine.seed) == [0, 1] and (mine.value == 0.7).all()  # the tuple arrived as a tuple
    assert (tmp_path / "out" / "runs" / "tiny" / f"notebooks-{other_id(other)}" / "05_zero_shot.ipynb"
            ).exists()
    run_json = tmp_path / "out" / "results" / f"tiny-{other_id(other)}" / "run.json"
    assert json.loads(run_json.read_text())["changed"] == {"eval_seeds": [0, 1]}

    # the default again: the same rows
    r = pc_clip("reproduce", "--experiments", str(exp), env=env, timeout=1200)
    assert r.returncode == 0 and default_csv.read_bytes() == before[0]


def other_id(cfg):
    from pc_clip.core.run import run_id
    return run_id(cfg)


@pytest.mark.slow
def test_a_failed_experiment_keeps_the_earlier_rows(tmp_path, runs_dir):
    exp = tmp_path / "exp"; exp.mkdir()
    make_notebook(exp / "05_zero_shot.ipynb", NOTEBOOK_WRITER.format(fail=""))
    env = {**os.environ, "PC_CLIP_RUNS": str(runs_dir)}
    assert pc_clip("reproduce", "--experiments", str(exp), env=env, timeout=1200).returncode == 0
    table = results_path(get_config("tiny"))
    before = table.read_bytes()
    make_notebook(exp / "05_zero_shot.ipynb",
                  NOTEBOOK_WRITER.format(fail="raise RuntimeError('the models were not found')\n"))
    r = pc_clip("reproduce", "--experiments", str(exp), env=env, timeout=1200)
    assert r.returncode == 1 and "the models were not found" in r.stderr
    assert table.read_bytes() == before
    # in the library too: a row the table refuses stops write_evaluation before either file changes
    cfg = get_config("tiny")
    good = [dict(result_row("clip", "zero_shot", "world", "accuracy", 0.5, 0, 2),
                 items=pd.DataFrame({"item": ["a", "b"], "value": [1.0, 0.0], "weight": 1.0, "group": "x"}))]
    write_evaluation(good, cfg, "toy")
    files = table.read_bytes(), items_path(cfg, "toy").read_bytes()
    bad = [dict(good[0], value=55.0)]  # a percentage
    with pytest.raises(ValueError, match="fractions|fraction metrics"):
        write_evaluation(bad, cfg, "toy")
    assert (table.read_bytes(), items_path(cfg, "toy").read_bytes()) == files


def _toy_world_run(cfg):
    """A random base model as `clip` and oracle differences and rewrites for `cfg`'s small world (experiments
    01-02)."""
    from pc_clip.differences.records import (differences_path, generate_differences, make_backend,
        rewrite_captions, rewrites_path)
    from pc_clip.differences.pairs import load_corpus, sample_pairs
    save_checkpoint(create_clip("pc-clip-tiny", seed=0)[0], model_dir(cfg, "clip"), "pc-clip-tiny")
    save_checkpoint(create_clip("pc-clip-tiny", seed=1)[0], model_dir(cfg, "clip/plain-captions"),
                    "pc-clip-tiny")
    corpus, held_out, world = load_corpus(**corpus_options(cfg), split="train")
    pairs = sample_pairs(corpus, cfg.n_pairs, cfg.seed, cfg.pair_sampling, held_out)
    for noise in (0.0, registry.NOISE_LEVEL):
        generate_differences(pairs, make_backend(world=world, **backend_options(cfg, noise=noise)),
                             differences_path(store_options(cfg), noise), progress=False)
    rewrite_captions(corpus, make_backend(world=world, **backend_options(cfg)),
                     rewrites_path(store_options(cfg)), progress=False)


@pytest.fixture
def one_more_entry():
    "The registry with one extra entry for the duration of a test (the list every module reads)."
    extra = ModelSpec("pc-clip/tau-0.5", "ablation", "differences",
                      registry._without(registry._DIFFERENCES, "ft_temperature") + ("judge",),
                      finetune={"temperature": 0.5}, chosen=True, note="a sharper difference loss")
    registry.REGISTRY.append(extra)
    try:
        yield extra
    finally:
        registry.REGISTRY.remove(extra)


def test_one_registry_entry_is_trained_evaluated_and_reported(runs_dir, one_more_entry):
    from pc_clip.training.plan import finetuning_inputs
    from pc_clip.core.registry import ablation_models
    from pc_clip.report.tables import ablation_table
    from pc_clip.training.sweep import finetune_chosen
    cfg = get_config("tiny", world_n_train=60, world_n_test=40, world_n_val=20, n_pairs=40, ft_batch_size=16,
                     caption_ft_batch_size=16, ft_lr=1e-3, eval_n_images=20, eval_seeds=(0,))
    _toy_world_run(cfg)
    inputs = finetuning_inputs(cfg, progress=False)
    # one lr (ft_lr=1e-3): each model at its own rate
    models, runs = finetune_chosen(inputs, cfg, progress=False)
    assert "pc-clip/tau-0.5" in runs and runs["pc-clip/tau-0.5"].settings.temperature == 0.5  # trained ...
    assert is_checkpoint(model_dir(cfg, "pc-clip/tau-0.5"))
    assert model_dir(cfg, "pc-clip/tau-0.5") != model_dir(cfg, "pc-clip")
    assert find_models(models_dir(cfg), "pc-clip/tau-0.5")[0]["role"] == "ablation"
    assert "pc-clip/tau-0.5" in evaluated_models(cfg)  # ... evaluated ...
    rows, _ = run_zero_shot(cfg, evaluated_models(cfg), eval_datasets(cfg, "zero_shot"))
    results = write_evaluation(rows, cfg, "05_zero_shot")
    assert "pc-clip/tau-0.5" in set(results.model)
    assert "pc-clip/tau-0.5" in ablation_table(results, ablation_models(cfg)).index  # ... and reported


def test_a_damaged_base_checkpoint_is_rebuilt(runs_dir):
    from pc_clip.training.plan import pretrain_or_load
    from pc_clip.world.shapes import make_world
    cfg = get_config("tiny", world_n_train=64, world_n_test=16, world_n_val=16, pretrain_steps=2,
                     pretrain_batch_size=16)
    world = make_world(**world_options(cfg))
    model, _, _, reused = pretrain_or_load(world, cfg, "cpu", progress=False)
    weights = model_dir(cfg, "clip") / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    again, _, _, reused = pretrain_or_load(world, cfg, "cpu", progress=False)
    assert not reused
    # intact again, and the same weights (pretraining is seeded)
    loaded = load_clip(**clip_source(cfg, "clip", "cpu"))[0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
