"""Generation through a real OpenAI-compatible server on 127.0.0.1 (`transformers serve` with the tiny Llama):
same prompts and parser, the key never written, and a client killed with SIGKILL resumes without loss or doubling."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pc_clip.differences.llm import build_prompt
from pc_clip.differences.records import generate_differences
from pc_clip.differences.pairs import sample_pairs
from pc_clip.differences.llm import OpenAIBackend, serve_local
from pc_clip.core.store import JsonlStore
from pc_clip.smoke.fixtures import make_tiny_llama

pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (fastapi, uvicorn, openai)")

KEY = "sk-served-test-not-a-real-key"
CORPUS_CODE = """
import pandas as pd
CORPUS = pd.DataFrame({"image_id": list(range(40)),
                       "caption": [f"A {s} {c} glorp number {k}." for k, (s, c) in enumerate(zip(["small", "large"] * 20, ["red", "blue", "green", "teal"] * 10))],
                       "category": ["a", "b", "c", "d"] * 10})
"""
CLIENT = textwrap.dedent("""
    import sys
    from pc_clip.differences.records import generate_differences
    from pc_clip.differences.pairs import sample_pairs
    from pc_clip.differences.llm import OpenAIBackend
""") + CORPUS_CODE + textwrap.dedent("""
    backend = OpenAIBackend(sys.argv[2], max_new_tokens=16, batch_size=2, concurrency=2)
    generate_differences(sample_pairs(CORPUS, int(sys.argv[3]), seed=1), backend, sys.argv[1], progress=False)
""")
ns: dict = {}
exec(CORPUS_CODE, ns)
CORPUS = ns["CORPUS"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")
    with serve_local(folder, log=tmp_path_factory.mktemp("log") / "serve.log") as url:
        yield url, str(folder)


@pytest.fixture
def served_env(server, monkeypatch):
    url, model = server
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return model


def test_served_generator_uses_the_same_prompts_parser_and_store(served_env, tmp_path, caplog):
    pairs = sample_pairs(CORPUS, 6, seed=0)
    backend = OpenAIBackend(served_env, max_new_tokens=16, batch_size=4)
    recs = generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False)
    assert [r["key"] for r in recs] == [f"openai:{served_env}|{k}" for k in pairs.key]
    for r, row in zip(recs, pairs.itertuples()):
        assert r["prompt"] == build_prompt("differences", {"caption_a": row.caption_a, "caption_b": row.caption_b})
        assert isinstance(r["raw"], str) and 0 < r["n_tokens"] <= 16
        assert len(r["statements"]) + len(r["rejected"]) >= 1  # every piece parsed and accounted for
    assert generate_differences(pairs, backend, tmp_path / "d.jsonl", progress=False) == recs  # resumes, no requests
    assert KEY not in (tmp_path / "d.jsonl").read_text() and KEY not in json.dumps(recs) and KEY not in caplog.text
    assert KEY not in repr(backend) and KEY not in json.dumps(backend.config)


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
    subprocess.run([sys.executable, str(script), str(path), served_env, str(n)], env=env, check=True, timeout=400)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    pairs = sample_pairs(CORPUS, n, seed=1)
    assert sorted(keys) == sorted(f"openai:{served_env}|{k}" for k in pairs.key), "every pair exactly once"
    # the server decodes greedily here (the tiny model's generation config), so a resumed run equals a fresh one
    fresh = generate_differences(pairs.head(6), OpenAIBackend(served_env, max_new_tokens=16, batch_size=3),
                                 tmp_path / "fresh.jsonl", progress=False)
    resumed = {r["key"]: r for r in JsonlStore(path).records()}
    assert [resumed[r["key"]]["raw"] for r in fresh] == [r["raw"] for r in fresh]
    assert KEY not in path.read_text()


def test_a_refused_request_names_the_url_and_never_the_key(served_env, tmp_path):
    "The openai SDK's errors become ours: the URL and HTTP status named, no retry on a client error, the key never shown."
    from pc_clip.differences.llm import OpenAIClient
    client = OpenAIClient(str(tmp_path / "no-such-model"), retries=2, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        client.chat("Describe a red circle.", max_tokens=4)
    msg = str(err.value)
    assert f"request to {os.environ['OPENAI_BASE_URL'].rstrip('/')}/chat/completions failed" in msg, msg
    assert "HTTP" in msg and KEY not in msg and KEY not in repr(client)
    assert time.monotonic() - t0 < 120
    ok = OpenAIClient(served_env).chat("Describe a red circle.", max_tokens=4, temperature=0)
    assert isinstance(ok["text"], str) and 0 < ok["n_tokens"] <= 4
