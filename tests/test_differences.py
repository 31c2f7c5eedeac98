"""Tests of `pc_clip.differences`: pairs, backends, parsing, resumable stores of records, the judge, and
generation served by a real OpenAI-compatible server on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import numpy as np
import pandas as pd
import pytest
import torch
import threading
from collections import Counter
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

from conftest import REPO
from pc_clip.world.shapes import make_world
from pc_clip.core.config import get_config
from pc_clip.core.store import JsonlStore
from pc_clip.differences.llm import (HFBackend, build_prompt, generate_texts, load_causal_lm, render_chat,
    OpenAIBackend, serve_local)
from pc_clip.differences.records import (OracleBackend, difference_triples, differences_path,
    generate_differences, generator_key, judged_path, make_backend, read_records, rewrite_captions,
    rewrites_path, rewritten_captions, summary_rows, training_triples, write_category_differences)
from pc_clip.differences.pairs import corpus_from_world, pair_key, sample_pairs
from pc_clip.differences.record_stats import filter_counts, filter_summary
from pc_clip.differences.parse import parse_output, split_statements, statement_problem
from pc_clip.smoke.fixtures import make_tiny_llama
from pc_clip.differences.judge import (OpenAIJudge, OracleJudge, judge_agreement, judge_key, judge_prompt,
    judge_records, make_judge, parse_verdicts, verdict_counts)
from pc_clip.core.registry import (backend_options, corpus_options, judge_identity_options, store_options,
    world_options)
from pc_clip.core.run import results_path


# ---- Difference data: pair sampling, the real 4-bit HF path on a tiny Llama, parsing/filtering,
# kill-and-resume.

CORPUS = pd.DataFrame({
    "image_id": list(range(100, 140)),
    "caption": [f"A {s} {c} {k} on {b}." for s, c, k, b in zip(
        ["small", "large"] * 20, ["red", "blue", "green", "yellow"] * 10,
        ["glorp", "mib", "skiv", "yoot", "vantile"] * 8, ["grass", "sand", "snow", "water"] * 10)],
    "category": ["glorp", "mib", "skiv", "yoot", "vantile"] * 8,
})


ATTRS = pd.DataFrame({"category": CORPUS.category.to_numpy(), "size": np.arange(40) % 7},
                     index=CORPUS.image_id)


def fake_differences(a, b, rng, noise=0.0, max_statements=3):
    word = "larger" if a["size"] > b["size"] else "smaller"
    out = [{"text": f"The first image has a {word} {a['category']}.", "attribute": "size",
            "true": rng.random() >= noise},
           {"text": f"The first image shows a {a['category']}, while the second shows a {b['category']}.",
            "attribute": "category", "true": True}]
    return out[: int(rng.integers(1, max_statements + 1))]


def oracle(noise=0.0):
    return OracleBackend(ATTRS, noise=noise, seed=0, differences_fn=fake_differences,
                         rewrite_fn=lambda a, rng: f"The scene contains a {a['category']}.",
                         category_fn=lambda x, y, rng, n=3: [f"A {x} is larger than a {y}."][:n])


# ---------------------------------------------------------------- pairs
def test_pairs_are_seeded_distinct_and_respect_categories():
    p = sample_pairs(CORPUS, 200, seed=3)
    assert p.equals(sample_pairs(CORPUS, 200, seed=3))
    assert not p.equals(sample_pairs(CORPUS, 200, seed=4))
    assert p.key.is_unique and (p.i != p.j).all() and (p.category_a != p.category_b).all()
    assert list(p.key) == [pair_key(i, j) for i, j in zip(p.i, p.j)]
    assert sample_pairs(CORPUS, 300, seed=3).head(200).equals(p)  # growing n keeps the first pairs
    caps = dict(zip(CORPUS.image_id, CORPUS.caption))
    assert all(caps[i] == c for i, c in zip(p.i, p.caption_a))
    r = sample_pairs(CORPUS, 300, seed=0, mode="random")
    assert (r.category_a == r.category_b).any()  # random pairs may share a category


def test_held_out_category_pairs_never_appear_in_either_order():
    held = {("glorp", "mib"), frozenset(("skiv", "yoot"))}
    p = sample_pairs(CORPUS, 500, seed=0, held_out=held)
    got = {frozenset(x) for x in zip(p.category_a, p.category_b)}
    assert not got & {frozenset(h) for h in held}
    assert len(got) == 10 - 2  # every other unordered pair of the 5 categories does occur


def test_pair_sampling_errors_are_clear():
    with pytest.raises(ValueError, match="could draw only"):
        sample_pairs(CORPUS.head(2), 5, seed=0, mode="random")
    with pytest.raises(KeyError, match="category"):
        sample_pairs(CORPUS.drop(columns="category"), 5, seed=0)
    with pytest.raises(ValueError, match="pair sampling must be"):
        sample_pairs(CORPUS, 5, seed=0, mode="similar")


# ---------------------------------------------------------------- the real 4-bit path on CPU
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")


def test_tiny_llama_loads_in_4bit_nf4_and_generates_end_to_end(tiny_llama, tmp_path):
    import bitsandbytes as bnb
    model, tok = load_causal_lm(str(tiny_llama), load_in_4bit=True, device="cpu")
    lin = model.model.layers[0].mlp.down_proj
    assert isinstance(lin, bnb.nn.Linear4bit)
    assert lin.weight.quant_type == "nf4" and lin.weight.dtype == torch.uint8
    assert lin.compute_dtype == torch.bfloat16 and tok.padding_side == "left" and tok.pad_token is not None
    cfg = get_config("tiny", generator=str(tiny_llama), load_in_4bit=True, device="cpu", max_new_tokens=12,
                     gen_batch_size=2)
    # the config's path: same loader, 4-bit, generation settings from the config
    backend = make_backend(**backend_options(cfg))
    assert isinstance(backend, HFBackend) and backend.batch_size == 2 and backend.max_new_tokens == 12
    pairs = sample_pairs(CORPUS, 3, seed=0)
    recs = generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False)
    assert [r["item"]["key"] for r in recs] == list(pairs.key)
    for r, row in zip(recs, pairs.itertuples()):
        assert r["generator"] == str(tiny_llama) and r["gen_config"]["load_in_4bit"] is True
        assert r["prompt"] == build_prompt("differences",
                                           {"caption_a": row.caption_a, "caption_b": row.caption_b})
        assert isinstance(r["raw"], str) and 0 < r["n_tokens"] <= 12
        pieces = split_statements(r["raw"])  # every piece of the answer is accounted for
        assert len(r["statements"]) + len(r["rejected"]) == max(len(pieces), 1)
    assert len(JsonlStore(tmp_path / "d.jsonl")) == 3


def test_left_padded_batches_match_one_at_a_time_greedy(tiny_llama):
    model, tok = load_causal_lm(str(tiny_llama), load_in_4bit=False, device="cpu")
    prompts = ["short", "a much longer prompt about the first image and the second image and more"]
    batched, nb = generate_texts(model, tok, prompts, max_new_tokens=8, temperature=0, batch_size=2)
    single = [generate_texts(model, tok, [p], max_new_tokens=8, temperature=0,
                             batch_size=1)[0][0] for p in prompts]
    assert batched == single


def test_plain_prompt_without_chat_template_and_fast_failure(tmp_path):
    folder = make_tiny_llama(tmp_path / "base-lm", chat_template=None)
    model, tok = load_causal_lm(str(folder), load_in_4bit=False, device="cpu")
    assert render_chat(tok, "USER").endswith("USER\n\nAnswer:\n")
    assert HFBackend(model, tok, name="b").config["chat_template"] is False
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match=r"weights/meta-llama/Llama-2-13b-chat-hf"):
        load_causal_lm("meta-llama/Llama-2-13b-chat-hf", root=tmp_path)
    assert time.time() - t0 < 30


# ---------------------------------------------------------------- parsing and filtering
CAPS = ["A large red glorp on grass.", "Two small blue mibs on sand."]


GOOD = """Sure! Here are three differences:
1. The first image has a larger object than the second image.
2) The first image shows a red glorp, while the second shows blue mibs.
- The first image has fewer objects. The first image is on grass instead of sand."""


def test_parser_keeps_statements_and_counts_filler():
    acc, rej = parse_output(GOOD, CAPS,
                            build_prompt("differences", {"caption_a": CAPS[0], "caption_b": CAPS[1]}))
    assert acc == ["The first image has a larger object than the second image.",
                   "The first image shows a red glorp, while the second shows blue mibs.",
                   "The first image has fewer objects.", "The first image is on grass instead of sand."]
    assert Counter(r["reason"] for r in rej) == {"preamble": 2}


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("import torch", "code"), ("x = {'a': 1}", "code"), ("<div>first</div>", "code"),
    ("The first image is redddddd.", "repeated"), ("bigger bigger bigger bigger", "repeated"),
    ("ab\x07\x1b\x7f\x01 \x02\x03\x04\x05cd", "control_chars"), ("ab#$@~^ |#$@~^cd", "garbled"),
    ("The first image has a larger\x00 glorp.", "control_chars"),
    ("The first image is \ufffdlarger.", "control_chars"),
    ("The first\x0bimage is larger.", "control_chars"), ("I'm sorry, I cannot compare images.", "preamble"),
    ("Larger.", "too_short"), ("The first image " + "is much larger and " * 12 + "darker.", "too_long"),
    ("A large red glorp on grass.", "prompt_echo"),
    ("Second image: Two small blue mibs on sand.", "prompt_echo"),
    ("The stock market closed higher today", None),  # comparative word: kept (a judge may reject it)
    ("I like to eat pizza on Fridays.", "unrelated"),
    ("The first image has a larger glorp.", None), ("Image one shows a person.", None),
])
def test_statement_problems(text, reason):
    assert statement_problem(text, CAPS) == reason


def test_prompt_echo_and_whole_output_rejections():
    prompt = build_prompt("differences", {"caption_a": CAPS[0], "caption_b": CAPS[1]})
    echo = prompt.splitlines()[-1]  # the model repeats our instruction
    _, rej = parse_output(echo, CAPS, prompt)
    assert {r["reason"] for r in rej} == {"prompt_echo"}
    assert parse_output("\n \n", CAPS)[1] == [{"text": "\n \n", "reason": "empty_output"}]
    acc, rej = parse_output("The first image is darker.\n2. The first image is darker.", CAPS)
    assert acc == ["The first image is darker."] and rej[0]["reason"] == "duplicate"


def test_rewrite_filter_requires_overlap_with_the_caption():
    assert statement_problem("The scene contains a large red glorp.", CAPS[:1], task="rewrite") is None
    assert statement_problem("The first image is darker than the second.", CAPS[:1],
                             task="rewrite") == "unrelated"


# ---------------------------------------------------------------- records, counts, triples, other tasks
def test_oracle_records_counts_and_triples(tmp_path):
    pairs = sample_pairs(CORPUS, 50, seed=1)
    recs = generate_differences(pairs, oracle(noise=0.5), tmp_path / "o.jsonl", batch_size=7, progress=False)
    assert len(recs) == 50 and all(r["generator"] == "oracle-noise0.5" for r in recs)
    assert all(r["key"] == f"oracle-noise0.5|{k}" for r, k in zip(recs, pairs.key))
    c = filter_counts(recs)
    s = filter_summary(recs)
    assert c["accepted"] == s["n_statements"] == sum(len(r["statements"]) for r in recs) > 50
    assert s["accepted_rate"] == 1.0 and 0.2 < s["true_rate"] < 0.95
    t = difference_triples(recs)
    assert list(t.columns) == ["i", "j", "text"] and len(t) == c["accepted"]
    assert set(zip(t.i, t.j)) <= set(zip(pairs.i, pairs.j))
    with pytest.raises(ValueError, match="judge"):
        difference_triples(recs, consistent_only=True)


def test_rewrites_and_category_differences(tmp_path):
    rw = rewrite_captions(CORPUS.head(5), oracle(), tmp_path / "rw.jsonl", progress=False)
    assert [r["statements"][0]["text"] for r in rw][:2] == ["The scene contains a glorp.",
                                                            "The scene contains a mib."]
    assert all(r["task"] == "rewrite" for r in rw)
    assert rewritten_captions(rw).values.tolist()[:1] == [[100, "The scene contains a glorp."]]
    cd = write_category_differences([("glorp", "mib"), ("mib", "glorp")], oracle(), tmp_path / "cat.jsonl",
                                    progress=False)
    assert cd == {("glorp", "mib"): ["A glorp is larger than a mib."],
                  ("mib", "glorp"): ["A mib is larger than a glorp."]}


def test_make_backend_and_paths(runs_dir):
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="make_world"):
        make_backend(**backend_options(cfg))
    with pytest.raises(ValueError, match="the oracle needs corpus=world"):
        make_backend(**backend_options(get_config("tiny", corpus="coco")))
    path = differences_path(store_options(cfg), 0.3)
    assert path == (runs_dir / "runs" / "tiny" / "differences"
                    / f"{generator_key(store_options(cfg))}-noise0.3.jsonl")
    assert path.name.startswith("oracle-") and path.name.endswith("-noise0.3.jsonl")


# ---------------------------------------------------------------- kill mid-run, resume
WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import test_differences as T
    from pc_clip.differences.records import generate_differences
    from pc_clip.differences.pairs import sample_pairs

    def slow(a, b, rng, noise=0.0, max_statements=3):
        time.sleep(0.03)
        return T.fake_differences(a, b, rng, noise, max_statements)

    backend = T.oracle(noise=0.3); backend.differences_fn = slow
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    generate_differences(sample_pairs(T.CORPUS, 120, seed=5), backend, sys.argv[1], batch_size=3,
                         progress=False, lock_timeout=timeout)
""")


def test_killed_generation_resumes_with_every_pair_exactly_once(tmp_path):
    path = tmp_path / "diffs.jsonl"
    script = tmp_path / "worker.py"; script.write_text(WORKER)
    here = str(Path(__file__).parent)
    p = subprocess.Popen([sys.executable, str(script), str(path), here])
    deadline = time.time() + 90
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 15):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    n_before = len(JsonlStore(path))
    assert 15 <= n_before < 120, n_before
    subprocess.run([sys.executable, str(script), str(path), here], check=True, timeout=120)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    pairs = sample_pairs(CORPUS, 120, seed=5)
    assert sorted(keys) == sorted(f"oracle-noise0.3|{k}" for k in pairs.key), "every pair exactly once"
    # per-item seeding: the interrupted run wrote exactly what an uninterrupted run writes
    ref = generate_differences(pairs, oracle(noise=0.3), tmp_path / "ref.jsonl", batch_size=50,
                               progress=False)
    resumed = generate_differences(pairs, oracle(noise=0.3), path, progress=False)
    assert resumed == ref


# ---------------------------------------------------------------- the real world oracle
def test_world_oracle_statements_pass_the_filter(runs_dir):
    cfg = get_config("tiny", world_n_train=300, world_n_test=50)
    world = make_world(**world_options(cfg))
    corpus = corpus_from_world(world, "train")
    assert len(corpus) == 300 and corpus.caption.tolist() == [world.captions[i] for i in corpus.image_id]
    pairs = sample_pairs(corpus, 200, seed=0, held_out=world.heldout_pairs)
    clean = generate_differences(pairs, make_backend(world=world, **backend_options(cfg, noise=0.0)),
                                 runs_dir / "c.jsonl", progress=False)
    s = filter_summary(clean)
    assert s["accepted_rate"] > 0.97, s  # the filter does not throw away the world's true statements
    assert s["true_rate"] == 1.0
    noisy = generate_differences(pairs, make_backend(world=world, **backend_options(cfg, noise=0.3)),
                                 runs_dir / "n.jsonl", progress=False)
    assert 0.6 < filter_summary(noisy)["true_rate"] < 0.85
    rw = rewrite_captions(corpus.head(50), make_backend(world=world, **backend_options(cfg)),
                          runs_dir / "r.jsonl", progress=False)
    assert filter_summary(rw)["accepted_rate"] > 0.95


# ---------------------------------------------------------------- the experiment notebook
@pytest.mark.slow
def test_experiment_notebook_runs_and_resumes(runs_dir):
    import papermill as pm
    from pc_clip.core.results import read_results
    repo = Path(__file__).resolve().parents[1]
    params = dict(n_pairs=200, overrides={"judge": "oracle", "world_n_train": 400, "world_n_test": 50})
    for _ in range(2):  # the second run resumes: nothing is generated twice, the rows are replaced
        pm.execute_notebook(str(repo / "nbs/experiments/02_differences.ipynb"),
                            str(runs_dir.parent / "out.ipynb"), parameters=params, cwd=str(repo),
                            kernel_name="python3", progress_bar=False)
    # the run's own settings: its own results table
    cfg = get_config("tiny", n_pairs=200, **params["overrides"])
    for path in (differences_path(store_options(cfg), 0.0),
                 differences_path(store_options(cfg), 0.3),
                 judged_path(differences_path(store_options(cfg), 0.0), "oracle",
                             **judge_identity_options(cfg))):
        keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == 200, path.name
    t = read_results(results_path(cfg)).set_index(["model", "metric"])["value"]
    assert t[("oracle-noise0", "n_records")] == 200 and t[("oracle-noise0", "true_rate")] == 1.0
    assert 0.55 < t[("oracle-noise0.3", "consistent_rate")] < 0.85 and t[("oracle-noise0.3",
                                                                          "judge_agreement")] == 1.0
    assert t[("oracle-noise0/rewrites", "n_records")] == 400
    assert not t.index.duplicated().any()


@pytest.mark.slow
def test_runs_on_other_worlds_get_records_of_their_own_world(runs_dir):
    """Issue 30: after a run, `-p seed=1` and `-p world_n_train=...` runs of experiment 02 write and train on
    records of their own world."""
    import papermill as pm
    from pc_clip.differences.pairs import load_corpus
    from pc_clip.training.plan import _training_data
    small = {"world_n_train": 400, "world_n_test": 50}
    runs = [small, {**small, "seed": 1}, {**small, "world_n_train": 500}]
    data = []
    for overrides in runs:
        seed = overrides.get("seed", 0)  # -p seed=1 is the notebook's own parameter
        pm.execute_notebook(str(REPO / "nbs/experiments/02_differences.ipynb"),
                            str(runs_dir.parent / "out.ipynb"),
                            parameters=dict(n_pairs=100, seed=seed,
                                            overrides={k: v for k, v in overrides.items() if k != "seed"}),
                            cwd=str(REPO), kernel_name="python3", progress_bar=False)
        cfg = get_config("tiny", n_pairs=100, **overrides)
        corpus, held_out, world = load_corpus(**corpus_options(cfg), split="train")
        # every stored rewrite was written from this world's caption
        for r in read_records(rewrites_path(store_options(cfg))):
            assert r["item"]["caption"] == world.captions[r["item"]["i"]], r["key"]
        for r in read_records(differences_path(store_options(cfg))):
            it = r["item"]
            assert (it["caption_a"], it["caption_b"]) == (world.captions[it["i"]],
                                                          world.captions[it["j"]]), r["key"]
        d, _, files = _training_data(cfg, corpus, held_out)  # what experiment 03 trains on
        fresh = rewrite_captions(corpus, make_backend(world=world, **backend_options(cfg)),
                                 runs_dir / f"fresh-{len(data)}.jsonl", progress=False)
        assert d["rewritten"].equals(rewritten_captions(fresh))  # equal to a run on an empty folder
        data.append((files["differences"], d["rewritten"]))
    assert len({str(f) for f, _ in data}) == 3  # three worlds, three stores
    assert not data[0][1]["text"].equals(data[1][1]["text"])


def test_a_stored_record_for_another_item_is_made_again(tmp_path, caplog):
    """A record under the key asked for, but written for another image or caption (e.g. a store copied from
    another world), is regenerated."""
    pairs = sample_pairs(CORPUS, 12, seed=2)
    path = tmp_path / "d.jsonl"
    generate_differences(pairs, oracle(), path, progress=False)
    # the same keys
    moved = pairs.assign(caption_a=pairs.caption_b.to_numpy(), caption_b=pairs.caption_a.to_numpy())
    # 6 still match
    moved.loc[:5, ["caption_a", "caption_b"]] = pairs.loc[:5, ["caption_a", "caption_b"]].to_numpy()
    caplog.clear()
    recs = generate_differences(moved, oracle(), path, progress=False)
    assert "6 stored differences record(s) did not match the item asked for" in caplog.text
    assert ([(r["item"]["caption_a"], r["item"]["caption_b"]) for r in recs]
            == list(zip(moved.caption_a, moved.caption_b)))
    assert recs == generate_differences(moved, oracle(), tmp_path / "fresh.jsonl", progress=False)
    assert len(JsonlStore(path)) == 12
    rw = rewrite_captions(CORPUS.head(4), oracle(), tmp_path / "rw.jsonl", progress=False)
    other = CORPUS.head(4).assign(caption=CORPUS.caption[4:8].to_numpy())
    again = rewrite_captions(other, oracle(), tmp_path / "rw.jsonl", progress=False)
    assert [r["item"]["caption"] for r in again] == list(other.caption) != [r["item"]["caption"] for r in rw]


class CountingJudge:
    "A judge with a given identity that calls everything consistent and counts the records it is asked about."
    def __init__(self, name, identity):
        self.name, self.identity, self.asked = name, identity, 0

    def judge(self, records):
        self.asked += len(records)
        return [(["consistent"] * len(r["statements"]), "ok") for r in records]


def test_a_judge_of_another_identity_judges_again(tmp_path, monkeypatch):
    """Issue 30: another folder of the same last name, the model served, new weights or an edited prompt is
    another judge."""
    import pc_clip.differences.judge as J
    for d in ("a", "b"):
        (tmp_path / d / "llama").mkdir(parents=True)
        (tmp_path / d / "llama" / "model.safetensors").write_bytes(b"the same weights")
    a, b = str(tmp_path / "a" / "llama"), str(tmp_path / "b" / "llama")
    path = tmp_path / "oracle-x-noise0.jsonl"
    recs = generate_differences(sample_pairs(CORPUS, 10, seed=0), oracle(), path, progress=False)
    keys = {"folder a": judge_key(a), "folder b": judge_key(b), "served": judge_key("openai:" + a)}
    (tmp_path / "a" / "llama" / "model.safetensors").write_bytes(b"other weights")
    keys["new weights"] = judge_key(a)
    monkeypatch.setattr(J, "JUDGE_PROMPT", J.JUDGE_PROMPT.replace("consistent if", "consistent only if"))
    keys["edited prompt"] = judge_key(a)
    assert len(set(keys.values())) == 5, keys
    # each its own file of verdicts
    assert len({judged_path(path, spec) for spec in (a, b, "openai:" + a)}) == 3
    # each identity judges every record, into its own file; a judged file holding another judge's
    # verdicts is judged again
    store = tmp_path / "shared.judged.jsonl"
    first = CountingJudge("llama", J.judge_identity(a))
    judge_records(recs, first, store, progress=False)
    judge_records(recs, first, store, progress=False)
    assert first.asked == 10  # the same judge: reused
    for what in ("served", "folder b"):
        other = CountingJudge("llama", {"kind": what})
        out = judge_records(recs, other, store, progress=False)
        assert other.asked == 10 and {r["judge_key"] for r in out} == {judge_key(other)}


def test_two_concurrent_runs_leave_one_record_per_key(tmp_path):
    "Two generation processes started together on one store: one writes, the other waits, nothing is doubled."
    path = tmp_path / "diffs.jsonl"
    script = tmp_path / "worker.py"; script.write_text(WORKER)
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, str(script), str(path), here, "300"]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 120


def test_a_second_run_that_may_not_wait_names_the_holder(tmp_path):
    path = tmp_path / "diffs.jsonl"
    with JsonlStore(path).writing():
        with pytest.raises(RuntimeError, match=rf"{path.name} is being written by pid {os.getpid()}"):
            generate_differences(sample_pairs(CORPUS, 5, seed=0), oracle(), path, progress=False)


def test_regenerated_llm_record_equals_the_uninterrupted_one(tiny_llama, tmp_path):
    """Sampling is seeded per record key: a record made after an interruption, in another batch, is the same
    record."""
    model, tok = load_causal_lm(str(tiny_llama), load_in_4bit=True, device="cpu")
    backend = HFBackend(model, tok, name="tiny", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    pairs = sample_pairs(CORPUS, 6, seed=2)
    whole = generate_differences(pairs, backend, tmp_path / "whole.jsonl", batch_size=4, progress=False)
    # interrupted
    generate_differences(pairs.head(2), backend, tmp_path / "resumed.jsonl", batch_size=2, progress=False)
    resumed = generate_differences(pairs, backend, tmp_path / "resumed.jsonl", batch_size=3, progress=False)
    assert resumed == whole
    assert len({r["raw"] for r in whole}) > 1  # sampling, not one fixed text
    # the counts survive the resume
    assert summary_rows("tiny", resumed, "toy", 0) == summary_rows("tiny", whole, "toy", 0)
    other = HFBackend(model, tok, name="tiny", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=4)
    assert [o["raw"] for o in other.generate(pairs.to_dict("records"))] != [r["raw"] for r in whole]


class Soup:
    "A writer whose every answer is byte soup with a NUL and replacement characters."
    name, config, batch_size = "soup", {}, 8

    def generate(self, items, task="differences"):
        return [{"raw": "The first image\x00 is larger \ufffd\ufffd than the second.\n```",
                 "prompt": "p"} for _ in items]


def test_no_usable_differences_is_a_clear_error_with_counts(tmp_path, caplog):
    recs = generate_differences(sample_pairs(CORPUS, 10, seed=0), Soup(), tmp_path / "s.jsonl",
                                progress=False)
    assert "100% of 10 generations kept no statement" in caplog.text and "control_chars 10" in caplog.text
    assert filter_counts(recs) == {"accepted": 0, "control_chars": 10, "code": 10}
    with pytest.raises(ValueError, match=r"no usable differences: 10 records, 0 statements accepted; "
                                         r"rejected per reason: code 10, control_chars 10"):
        difference_triples(recs)


def test_training_triples_follow_the_judge(runs_dir):
    cfg = get_config("tiny", oracle_noise=0.5)
    pairs = sample_pairs(CORPUS, 40, seed=1)
    recs = generate_differences(pairs, oracle(noise=0.5), differences_path(store_options(cfg)),
                                progress=False)
    n_all = sum(len(r["statements"]) for r in recs)
    n_true = sum(s["true"] for r in recs for s in r["statements"])
    assert len(training_triples(store_options(cfg))) == n_all  # no judge configured
    jcfg = cfg.replace(judge="oracle")
    with pytest.raises(FileNotFoundError, match="run experiment 02 with this judge"):
        training_triples(store_options(jcfg))
    judge_records(recs[:30], OracleJudge(), judged_path(differences_path(store_options(cfg)), "oracle"),
                  progress=False)
    with pytest.raises(ValueError, match="judges 30 of 40 records"):
        training_triples(store_options(jcfg))
    judge_records(recs, OracleJudge(), judged_path(differences_path(store_options(cfg)), "oracle"),
                  progress=False)
    t = training_triples(store_options(jcfg))  # pc-clip: consistent statements only
    assert len(t) == n_true < n_all
    assert len(training_triples(store_options(jcfg), filtered=False)) == n_all  # pc-clip/unfiltered
    head = training_triples(store_options(jcfg), filtered=False, pairs=pairs.head(5))
    assert set(zip(head.i, head.j)) == set(zip(pairs.i[:5], pairs.j[:5]))


def test_a_generation_cut_at_max_new_tokens_loses_its_last_statement(tiny_llama, tmp_path):
    """A random tiny Llama never ends by itself: at max_new_tokens every answer is cut, and its last piece is
    rejected as such."""
    model, tok = load_causal_lm(str(tiny_llama), load_in_4bit=False, device="cpu")
    backend = HFBackend(model, tok, name="tiny", max_new_tokens=10, temperature=0.9, seed=0)
    pairs = sample_pairs(CORPUS, 4, seed=0)
    outs = backend.generate(pairs.to_dict("records"))
    cut = [o for o in outs if o["truncated"]]
    assert cut and all(o["n_tokens"] == 10 for o in cut)
    recs = generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False)
    for r, o in zip(recs, outs):
        pieces = split_statements(r["raw"])
        if o["truncated"] and pieces:
            assert r["rejected"][-1] == {"text": pieces[-1], "reason": "truncated"}
            assert pieces[-1] not in [s["text"] for s in r["statements"]]
    n_cut = sum(bool(split_statements(o["raw"])) for o in cut)
    rows = {x["metric"]: x["value"] for x in summary_rows("tiny", recs, "toy", 0)}
    assert rows["n_rejected_truncated"] == n_cut  # counted, like every other reason


class EndingWriter:
    "A stand-in LLM backend whose answer ends cleanly, and that counts what it is asked."
    name, config, batch_size, max_new_tokens = "my-lm", {}, 8, 64

    def __init__(self):
        self.asked = 0

    def generate(self, items, task="differences"):
        self.asked += len(items)
        return [{"raw": "The first image is brighter than the second image.", "prompt": "p",
                 "truncated": False}
                for _ in items]


def test_a_changed_generator_regenerates(runs_dir, tmp_path):
    """New weights at the same path, or new sampling settings, get a new store: the old generations are not
    reused."""
    lm = make_tiny_llama(tmp_path / "my-lm", seed=0)
    cfg = get_config("tiny", corpus="coco", generator=str(lm))
    pairs = sample_pairs(CORPUS, 5, seed=0)
    first = differences_path(store_options(cfg))
    w = EndingWriter()
    generate_differences(pairs, w, first, progress=False)
    assert w.asked == 5 and differences_path(store_options(cfg)) == first
    generate_differences(pairs, w, differences_path(store_options(cfg)), progress=False)
    assert w.asked == 5  # same generator: resumed from its store
    make_tiny_llama(lm, seed=1)  # other weights written over the same folder
    second = differences_path(store_options(cfg))
    assert second != first and second.parent == first.parent and not second.exists()
    generate_differences(pairs, w, second, progress=False)
    assert w.asked == 10  # regenerated
    assert differences_path(store_options(cfg.replace(temperature=0.2))) not in (first, second)


def test_4bit_cpu_shape_error_is_explained(tmp_path):
    """bitsandbytes' CPU 4-bit kernels fail on hidden sizes that are not multiples of 64; the error says so
    and what to do."""
    folder = make_tiny_llama(tmp_path / "odd-lm", hidden=96)
    model, tok = load_causal_lm(str(folder), load_in_4bit=True, device="cpu")
    backend = HFBackend(model, tok, name="odd-lm", max_new_tokens=4)
    try:
        backend.generate(sample_pairs(CORPUS, 1, seed=0).to_dict("records"))
    except RuntimeError as e:
        assert "shape" in str(e)
    else:
        pytest.skip("this bitsandbytes build runs 96-wide 4-bit layers on the CPU")
    with pytest.raises(RuntimeError, match="multiple of 64.*load_in_4bit=False"):
        generate_differences(sample_pairs(CORPUS, 2, seed=0), backend, tmp_path / "d.jsonl", progress=False)


# ---- The judge: verdict parsing, the oracle judge, and an OpenAI-compatible endpoint on 127.0.0.1 (key
# hygiene).

KEY = "sk-secret-4f9a-never-log-me"


def records(n=4):
    return [{"key": f"g|{k}", "task": "differences",
             "item": {"key": str(k), "i": k, "j": k + 10, "caption_a": "A large red glorp.",
                      "caption_b": "Two small mibs."},
             "statements": [{"text": "The first image has a larger object.", "true": True},
                            {"text": "The first image has more objects.", "true": False}],
             "rejected": []} for k in range(n)]


class Server:
    """A stand-in chat-completions server; `replies` is a list of (status, body) consumed in order (last
    repeats)."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, reply = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                self.send_response(status); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.srv = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *a):
        self.srv.shutdown(); self.srv.server_close()


def chat(text):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def openai_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return monkeypatch


def test_openai_judge_sends_key_only_in_the_header(openai_env, tmp_path, caplog):
    with Server([chat("1: consistent\n2: inconsistent")]) as srv:
        openai_env.setenv("OPENAI_BASE_URL", srv.url + "/")
        judge = make_judge("openai:gpt-4o-mini")
        out = judge_records(records(), judge, tmp_path / "judged.jsonl", batch_size=3, progress=False)
    assert len(srv.requests) == 4
    req = srv.requests[0]
    # names are case-free
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert req["path"] == "/v1/chat/completions" and headers["authorization"] == f"Bearer {KEY}"
    assert req["body"]["model"] == "gpt-4o-mini" and req["body"]["temperature"] == 0
    assert "A large red glorp." in req["body"]["messages"][-1]["content"]
    assert KEY not in json.dumps(req["body"])
    assert [s["verdict"] for s in out[0]["statements"]] == ["consistent", "inconsistent"]
    assert out[0]["judge"] == "openai:gpt-4o-mini" and out[0]["judge_raw"].startswith("1: consistent")
    assert KEY not in (tmp_path / "judged.jsonl").read_text() and KEY not in json.dumps(out)
    assert KEY not in repr(judge) and KEY not in caplog.text
    assert judge_agreement(out) == 1.0


def test_openai_judge_errors_never_show_the_key(openai_env):
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    with Server([(401, body)]) as srv:
        openai_env.setenv("OPENAI_BASE_URL", srv.url)
        with pytest.raises(RuntimeError) as e:
            OpenAIJudge(retries=0).chat("hi")
    assert "HTTP 401" in str(e.value) and srv.url in str(e.value)
    assert KEY not in str(e.value) and "***" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_openai_judge_retries_server_errors(openai_env):
    with Server([(503, "busy"), (429, "slow down"), chat("Inconsistent.")]) as srv:
        openai_env.setenv("OPENAI_BASE_URL", srv.url)
        rec = records(1)[0]
        one = dict(rec, statements=rec["statements"][:1])
        verdicts, raw = OpenAIJudge(retries=3, backoff=0.01).judge([one])[0]
    assert len(srv.requests) == 3 and verdicts == ["inconsistent"] and raw == "Inconsistent."


def test_openai_judge_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIJudge().chat("hi")


def test_unparseable_answers_are_counted_not_guessed(openai_env):
    with Server([chat("These statements look fine to me.")]) as srv:
        openai_env.setenv("OPENAI_BASE_URL", srv.url)
        out = judge_records(records(2), OpenAIJudge(), progress=False)
    assert verdict_counts(out) == {"unparsed": 4}
    assert judge_agreement(out) == 0.5  # unparsed counts as "not consistent"


@pytest.mark.parametrize("text,n,expected", [
    ("1: consistent\n2: inconsistent", 2, ["consistent", "inconsistent"]),
    ("2 - Inconsistent\n1 - CONSISTENT", 2, ["consistent", "inconsistent"]),
    ("1. **Not consistent**: the caption says red", 1, ["inconsistent"]),
    ("consistent", 1, ["consistent"]), ("consistent or inconsistent?", 1, [None]),
    ("1: consistent\n7: inconsistent", 2, ["consistent", None]),
])
def test_parse_verdicts(text, n, expected):
    assert parse_verdicts(text, n) == expected


def test_oracle_judge_resumes_and_filters_triples(tmp_path):
    recs = records(6) + [dict(records(1)[0], key="g|empty", statements=[])]
    first = judge_records(recs[:4], OracleJudge(), tmp_path / "j.jsonl", batch_size=3, progress=False)
    allj = judge_records(recs, OracleJudge(), tmp_path / "j.jsonl", batch_size=3, progress=False)
    assert allj[:4] == first and len(JsonlStore(tmp_path / "j.jsonl")) == 7
    assert verdict_counts(allj) == {"consistent": 6, "inconsistent": 6}
    t = difference_triples(allj, consistent_only=True)
    assert len(t) == 6 and set(t.text) == {"The first image has a larger object."}
    assert "The first image has more objects." in judge_prompt(recs[0])


# ---- Generation through a real OpenAI-compatible server on 127.0.0.1 (`transformers serve` with the tiny
# Llama):



SERVED_KEY = "sk-served-test-not-a-real-key"


CORPUS_CODE = """
import pandas as pd
SERVED_CORPUS = pd.DataFrame({"image_id": list(range(40)),
                       "caption": [f"A {s} {c} glorp number {k}." for k, (s, c)
                                   in enumerate(zip(["small", "large"] * 20,
                                                    ["red", "blue", "green", "teal"] * 10))],
                       "category": ["a", "b", "c", "d"] * 10})
"""


CLIENT = textwrap.dedent("""
    import sys
    from pc_clip.differences.records import generate_differences
    from pc_clip.differences.pairs import sample_pairs
    from pc_clip.differences.llm import OpenAIBackend
""") + CORPUS_CODE + textwrap.dedent("""
    backend = OpenAIBackend(sys.argv[2], max_new_tokens=16, batch_size=2, concurrency=2)
    generate_differences(sample_pairs(SERVED_CORPUS, int(sys.argv[3]), seed=1), backend, sys.argv[1],
                         progress=False)
""")


ns: dict = {}


exec(CORPUS_CODE, ns)


SERVED_CORPUS = ns["SERVED_CORPUS"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")
    with serve_local(folder, log=tmp_path_factory.mktemp("log") / "serve.log") as url:
        yield url, str(folder)


@pytest.fixture
def served_env(server, monkeypatch):
    url, model = server
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", SERVED_KEY)
    return model


def test_served_generator_uses_the_same_prompts_parser_and_store(served_env, tmp_path, caplog):
    pairs = sample_pairs(SERVED_CORPUS, 6, seed=0)
    backend = OpenAIBackend(served_env, max_new_tokens=16, batch_size=4)
    recs = generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False)
    assert [r["key"] for r in recs] == [f"openai:{served_env}|{k}" for k in pairs.key]
    for r, row in zip(recs, pairs.itertuples()):
        assert r["prompt"] == build_prompt("differences",
                                           {"caption_a": row.caption_a, "caption_b": row.caption_b})
        assert isinstance(r["raw"], str) and 0 < r["n_tokens"] <= 16
        assert len(r["statements"]) + len(r["rejected"]) >= 1  # every piece parsed and accounted for
    # resumes, no requests
    assert generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False) == recs
    assert SERVED_KEY not in (tmp_path / "d.jsonl").read_text() and SERVED_KEY not in json.dumps(recs)
    assert SERVED_KEY not in caplog.text
    assert SERVED_KEY not in repr(backend) and SERVED_KEY not in json.dumps(backend.config)


@pytest.mark.slow
def test_killed_client_resumes_without_loss_or_duplicates(served_env, tmp_path):
    path, n = tmp_path / "d.jsonl", 16
    script = tmp_path / "client.py"; script.write_text(CLIENT)
    env = {**os.environ}
    p = subprocess.Popen([sys.executable, str(script), str(path), served_env, str(n)], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 3):
        assert p.poll() is None, "the client ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    n_before = len(JsonlStore(path))
    assert 3 <= n_before < n, n_before
    subprocess.run([sys.executable, str(script), str(path), served_env, str(n)], env=env, check=True,
                   timeout=400)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    pairs = sample_pairs(SERVED_CORPUS, n, seed=1)
    assert sorted(keys) == sorted(f"openai:{served_env}|{k}" for k in pairs.key), "every pair exactly once"
    # the server decodes greedily here (the tiny model's generation config), so a resumed run equals a
    # fresh one
    fresh = generate_differences(pairs.head(6), OpenAIBackend(served_env, max_new_tokens=16, batch_size=3),
                                 tmp_path / "fresh.jsonl", progress=False)
    resumed = {r["key"]: r for r in JsonlStore(path).records()}
    assert [resumed[r["key"]]["raw"] for r in fresh] == [r["raw"] for r in fresh]
    assert SERVED_KEY not in path.read_text()


def test_a_refused_request_names_the_url_and_never_the_key(served_env, tmp_path):
    """The openai SDK's errors become ours: the URL and HTTP status named, no retry on a client error, the
    key never shown."""
    from pc_clip.differences.llm import OpenAIClient
    client = OpenAIClient(str(tmp_path / "no-such-model"), retries=2, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        client.chat("Describe a red circle.", max_tokens=4)
    msg = str(err.value)
    assert f"request to {os.environ['OPENAI_BASE_URL'].rstrip('/')}/chat/completions failed" in msg, msg
    assert "HTTP" in msg and SERVED_KEY not in msg and SERVED_KEY not in repr(client)
    assert time.monotonic() - t0 < 120
    ok = OpenAIClient(served_env).chat("Describe a red circle.", max_tokens=4, temperature=0)
    assert isinstance(ok["text"], str) and 0 < ok["n_tokens"] <= 4
