"""Screenshot of JupyterLab with one library and one experiment notebook open on the `pc-clip` kernel.

    python tools/lab_screenshot.py [--out figures/jupyterlab_pc_clip_kernel.png]
    python tools/lab_screenshot.py --executed runs/tiny/notebooks/05_zero_shot.ipynb \\
        [--out figures/jupyterlab_experiment_figure.png]

With `--executed`, JupyterLab opens one executed experiment notebook (papermill's copy under `runs/`), scrolls
to its first figure (`--figure N`: another) and takes the screenshot with the figure in view; it also says
whether the notebook's tab was marked modified on opening (it should not be).

Starts JupyterLab on 127.0.0.1 (a free port, a fresh token, its own runtime and workspace folders), lays out a
workspace with `nbs/core/01_run.ipynb` beside `nbs/experiments/00_environment.ipynb`, opens it in headless
Chromium driven through chromedriver's W3C HTTP interface (Debian's `chromium` and `chromium-driver`:
`apt-get install -y chromium chromium-driver`), waits until both notebooks show the `pc-clip` kernel as idle,
and saves a PNG. It exits non-zero, saying why, if a notebook opens on another kernel. Not part of
`make test`: it needs a browser and a minute.
"""
import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("nbs/core/01_run.ipynb", "nbs/experiments/00_environment.ipynb")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1800,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 60):
    "JSON in, JSON out (None for an empty answer)."
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"token {token}"} if token else {})
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def workspace(name: str, notebooks=NOTEBOOKS) -> dict:
    "A JupyterLab workspace: the notebooks side by side, the file browser folded away."
    ids = [f"notebook:{p}" for p in notebooks]
    dock = {"type": "split-area", "orientation": "horizontal", "sizes": [1 / len(ids)] * len(ids),
            "children": [{"type": "tab-area", "currentIndex": 0, "widgets": [i]} for i in ids]}
    data = {"layout-restorer:data": {"main": {"dock": dock, "current": ids[-1]},
                                     "left": {"collapsed": True, "widgets": ["filebrowser"]},
                                     "right": {"collapsed": True, "widgets": []}}}
    data |= {i: {"data": {"path": p, "factory": "Notebook"}} for i, p in zip(ids, notebooks)}
    return {"data": data, "metadata": {"id": name}}


KERNEL_NAMES_JS = """return Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-Toolbar-kernelName'))
  .map(k => k.innerText.trim());"""
FIGURE_JS = """const all = document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output img');
const img = all[arguments[0] < 0 ? all.length + arguments[0] : arguments[0]];
if (!img || !img.complete || img.naturalWidth === 0) return false;
img.scrollIntoView({block: 'start'}); window.scrollBy(0, -60);
return [img.naturalWidth, img.naturalHeight];"""
DIRTY_JS = ("return document.querySelectorAll('.lm-TabBar-tab.jp-mod-dirty, .p-TabBar-tab.jp-mod-dirty')"
            ".length;")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "figures" / "jupyterlab_pc_clip_kernel.png"))
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--executed", default=None, help="an executed notebook to show with a figure in view")
    ap.add_argument("--figure", type=int, default=0,
                    help="which figure of --executed to scroll to (0: the first, -1: the last)")
    args = ap.parse_args(argv)
    root, notebooks = REPO, NOTEBOOKS
    if args.executed:
        executed = Path(args.executed).resolve()
        root, notebooks = executed.parent, (executed.name,)
        if args.out == ap.get_default("out"):
            args.out = str(REPO / "figures" / "jupyterlab_experiment_figure.png")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        print("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="pc-clip-lab-"))
    checkpoints = [root / Path(p).parent / ".ipynb_checkpoints" for p in notebooks]
    # JupyterLab writes these on opening; removed again below
    made = [c for c in checkpoints if not c.exists()]
    lab_port, drv_port, token = free_port(), free_port(), base64.b32encode(os.urandom(10)).decode().lower()
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no news pop-up
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings")}
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1",
                            f"--port={lab_port}",
                            f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
                            f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--allow-root"],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "lab.log", "w"))
    drv = subprocess.Popen([driver, f"--port={drv_port}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    base, wd, session = f"http://127.0.0.1:{lab_port}", f"http://127.0.0.1:{drv_port}", None
    try:
        wait_for("JupyterLab answering", lambda: http("GET", f"{base}/api/status", token=token), args.timeout)
        specs = http("GET", f"{base}/api/kernelspecs", token=token)["kernelspecs"]
        if "pc-clip" not in specs:
            print(f"JupyterLab knows no pc-clip kernel (it knows {sorted(specs)}); run make install",
                  file=sys.stderr)
            return 1
        http("PUT", f"{base}/lab/api/workspaces/pc-clip-shot", workspace("pc-clip-shot", notebooks),
             token=token)
        wait_for("chromedriver answering", lambda: http("GET", f"{wd}/status")["value"]["ready"], 30)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": CHROME_FLAGS + [f"--user-data-dir={tmp / 'chrome'}"]}}}}
        session = http("POST", f"{wd}/session", caps)["value"]["sessionId"]
        s = f"{wd}/session/{session}"
        http("POST", f"{s}/url", {"url": f"{base}/lab/workspaces/pc-clip-shot?reset&token={token}"})
        http("POST", f"{s}/url", {"url": f"{base}/lab/workspaces/pc-clip-shot?token={token}"})

        def both_idle():  # the toolbars name the pc-clip kernel, and the server's sessions run it, idle
            shown = http("POST", f"{s}/execute/sync", {"script": KERNEL_NAMES_JS, "args": []})["value"]
            sessions = {x["path"]: x["kernel"] for x in http("GET", f"{base}/api/sessions", token=token)}
            idle = lambda p: (sessions.get(p, {}).get("name") == "pc-clip"
                              and sessions[p].get("execution_state") == "idle")
            ok = (len(shown) == len(notebooks) and all("pc-clip" in k for k in shown)
                  and all(idle(p) for p in notebooks))
            return {p: sessions[p]["name"] for p in notebooks} if ok else None
        try:
            kernels = wait_for("both notebooks idle on the pc-clip kernel", both_idle, args.timeout,
                               every=1.0)
        except TimeoutError as e:
            got = http("POST", f"{s}/execute/sync", {"script": KERNEL_NAMES_JS, "args": []})["value"]
            sessions = {x["path"]: x["kernel"]["name"]
                        for x in http("GET", f"{base}/api/sessions", token=token)}
            print(f"{e}; the toolbars show {got}, the server's sessions {sessions}", file=sys.stderr)
            return 1
        figure = None
        if args.executed:  # the figure in view: the first image output, scrolled to the middle of the window
            try:
                figure = wait_for("a figure in the notebook", lambda: http(
                    "POST", f"{s}/execute/sync", {"script": FIGURE_JS, "args": [args.figure]})["value"], 30,
                    every=1.0)
            except TimeoutError:
                print(f"{args.executed} shows no figure (not executed, or it draws none)", file=sys.stderr)
        time.sleep(2)  # let the last repaint settle
        if figure:  # cells above may have grown while they rendered: scroll to the figure again
            http("POST", f"{s}/execute/sync", {"script": FIGURE_JS, "args": [args.figure]})
            time.sleep(1)
        dirty = http("POST", f"{s}/execute/sync", {"script": DIRTY_JS, "args": []})["value"]
        png = base64.b64decode(http("GET", f"{s}/screenshot")["value"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(png)
        print(f"{args.out}: {len(png)} bytes; kernels {kernels}" + (f"; figure {figure[0]} x {figure[1]} px "
                                                                    f"in view" if figure else "")
              + f"; {dirty} tab(s) marked modified after opening")
        return 0
    finally:
        if session:
            try:
                http("DELETE", f"{wd}/session/{session}", timeout=20)
            except OSError:
                pass
        for p in (drv, lab):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        for c in made:
            shutil.rmtree(c, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
