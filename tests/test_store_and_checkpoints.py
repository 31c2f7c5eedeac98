"""JSONL store resume semantics under a real kill, results-table idempotence, checkpoint round trip."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from pc_clip.store import JsonlStore
from pc_clip.core import get_config, read_results, result_row, write_results
from pc_clip.models import TINY_MODEL, create_clip, load_checkpoint, save_checkpoint

WRITER = textwrap.dedent("""
    import sys, time
    from pc_clip.store import JsonlStore
    store = JsonlStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        if i in store:
            continue
        store.append({"key": i, "payload": "x" * 1000})
        time.sleep(0.01)
""")


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
    assert s.n_torn == 1 and "c" not in s and len(s) == 2
    assert s.append({"key": "c"}) and [r["key"] for r in s.records()] == ["a", "b", "c"]


def test_results_table_is_idempotent_per_experiment(runs_dir):
    cfg = get_config("tiny")
    rows = [result_row("clip", "zero_shot", "world", "accuracy", 0.5, 0, 10)]
    write_results(rows, cfg, "e1"); write_results(rows, cfg, "e1")
    write_results([result_row("pc-clip", "zero_shot", "world", "accuracy", 0.6, 0, 10)], cfg, "e2")
    t = read_results(cfg)
    assert len(t) == 2 and set(t.experiment) == {"e1", "e2"}


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    model, _, tok = create_clip(TINY_MODEL, seed=3)
    with torch.no_grad():
        model.text_projection.add_(1.0)  # something a fresh model would not have
    save_checkpoint(model, tmp_path / "ck", TINY_MODEL, {"step": 5})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    m2, _, tok2 = load_checkpoint(tmp_path / "ck")
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_image(x), m2.encode_image(x))
    assert torch.equal(tok(["a glorp"]), tok2(["a glorp"]))
