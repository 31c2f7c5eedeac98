"""The keyed JSONL store: resume after kill -9, one writer at a time, corruption and doubling cost only themselves."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pc_clip.core.runtime import ArtifactBusy
from pc_clip.core.store import JsonlStore, parse_line

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
    "A 512-byte fragment at record 200 of 400: 399 records stay, the file is rewritten clean, the loss is logged."
    path = tmp_path / "r.jsonl"
    write_records(path, 400)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[200] = lines[200][:512] + (b"\n" if not glued else b"")  # a torn write; the next append followed it
    path.write_bytes(b"".join(lines))
    s = JsonlStore(path)
    assert len(s) == 399 and 200 not in s and 199 in s and 201 in s and 399 in s
    assert s.n_corrupt == 1 and "dropped 1 unparsable line(s)" in caplog.text
    assert path.read_bytes().count(b"\n") == 399 and [r["key"] for r in s.records()] == [k for k in range(400) if k != 200]
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
    from pc_clip.core.runtime import artifact_lock
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


def test_parse_line_recovers_the_record_after_a_fragment():
    assert parse_line('{"key": 1, "a": "{"{"key": 2, "b": {"c": 3}}') == ({"key": 2, "b": {"c": 3}}, True)
    assert parse_line('{"key": 1}') == ({"key": 1}, False)
    assert parse_line('not json') == (None, True)
    assert parse_line('[1, 2]') == (None, True)
