"""The judge: verdict parsing, the oracle judge, and an OpenAI-compatible endpoint on 127.0.0.1 (key hygiene)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pc_clip.core.store import JsonlStore
from pc_clip.differences.records import difference_triples
from pc_clip.differences.judge import (OpenAIJudge, OracleJudge, judge_agreement, judge_prompt, judge_records,
    make_judge, parse_verdicts, verdict_counts)

KEY = "sk-secret-4f9a-never-log-me"


def records(n=4):
    return [{"key": f"g|{k}", "task": "differences",
             "item": {"key": str(k), "i": k, "j": k + 10, "caption_a": "A large red glorp.", "caption_b": "Two small mibs."},
             "statements": [{"text": "The first image has a larger object.", "true": True},
                            {"text": "The first image has more objects.", "true": False}],
             "rejected": []} for k in range(n)]


class Server:
    "A stand-in chat-completions server; `replies` is a list of (status, body) consumed in order (last repeats)."

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
    assert req["path"] == "/v1/chat/completions" and {k.lower(): v for k, v in req["headers"].items()}["authorization"] == f"Bearer {KEY}"  # names are case-free
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
