"""JupyterLab starts on 127.0.0.1, serves a notebook of the repository through its contents API and knows the
notebook's kernel, `pc-clip`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_serves_repo_notebook(tmp_path):
    port, token = _free_port(), "pc-clip-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={REPO}", f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}/api/contents/nbs/core/01_runtime.ipynb?content=1"
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
            raise AssertionError(f"JupyterLab did not answer (exit code {proc.returncode}); its log ends with:\n{err}")
        assert body["type"] == "notebook" and body["name"] == "01_runtime.ipynb"
        assert any("default_exp core.runtime" in "".join(c["source"]) for c in body["content"]["cells"])
        assert body["content"]["metadata"]["kernelspec"]["name"] == "pc-clip"  # the notebook asks for the project's kernel
        specs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/kernelspecs", headers={"Authorization": f"token {token}"}), timeout=10).read())
        assert "pc-clip" in specs["kernelspecs"], f"JupyterLab knows {sorted(specs['kernelspecs'])}; run make install"
        lab = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/lab",
                                                            headers={"Authorization": f"token {token}"}), timeout=10)
        assert lab.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
