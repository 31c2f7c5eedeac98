"""What one CPU hog beside a run costs, with and without the kernel environment `pc-clip` starts its kernels
with.

On a shared machine, torch's OpenMP threads used to spin-wait at the end of every parallel region: when
another job holds one of the cores, the thread that finished first burns the core its partner needs, and a
2-thread pretraining step ran many times slower than the load alone explains.
`pc_clip.kernels.KERNEL_ENV` (`OMP_WAIT_POLICY=PASSIVE`: a thread that waits sleeps instead of spinning) is
what the CLI sets for every notebook kernel it starts; it changes no number (the same threads split the
same work; the weights' hash is printed and compared).

Stage mode (the default) times `--steps` pretraining steps of the tiny model (the `tiny` profile's batch and
`PRETRAIN_THREADS`, on a small world cached in a private folder), each in a fresh process so the environment
is set before torch loads, four ways: {without, with} the kernel environment x {quiet, beside one busy-loop
process this script starts and stops itself}. Each case is run `--repeats` times, alternating, and the median
is kept:

    python bench/busy_machine.py                     # 60 steps, 3 repeats
    python bench/busy_machine.py --steps 30 --repeats 1

Whole-run mode runs `pc-clip reproduce` (default profile `tiny`, `--only` and `-p` passed through) from empty
private `PC_CLIP_RUNS` folders, quiet and beside one hog, and checks that the two runs' numbers agree (`python
-m pc_clip.compare`); it takes two full runs (about 2 x 6.5 minutes on a quiet 2-core machine):

    python bench/busy_machine.py --whole-run
    python bench/busy_machine.py --whole-run --only 00,01 -p pretrain_steps=40
    python bench/busy_machine.py --whole-run --keep /tmp/busy --cases quiet   # one case now, kept ...
    python bench/busy_machine.py --whole-run --keep /tmp/busy                 # ... the other later, compared

Prints one line per measurement and a closing table with the loaded / quiet ratios and the load average before
and after each case (other jobs on the machine count too: say so when you quote a number).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import hashlib, json, sys, time
import torch
from pc_clip.core.config import get_config
from pc_clip.training.pretrain import PRETRAIN_THREADS, PretrainSettings, pretrain_clip
from pc_clip.world.shapes import make_world
from pc_clip.core.registry import world_options
cfg = get_config("tiny", **json.loads(sys.argv[1]))
world = make_world(**world_options(cfg))
t0 = time.perf_counter()
model, _, history = pretrain_clip(world, PretrainSettings.from_config(cfg), device="cpu", progress=False)
seconds = time.perf_counter() - t0
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
print(json.dumps(dict(seconds=seconds, cpu_seconds=history["cpu_seconds"], threads=PRETRAIN_THREADS,
                      weights=h.hexdigest()[:16], final_loss=history["final_loss"])))
"""


def kernel_env() -> dict[str, str]:
    "The variables `pc-clip` adds to a notebook kernel's environment (read from the CLI, not restated here)."
    sys.path.insert(0, str(REPO))
    from pc_clip.kernels import KERNEL_ENV
    return dict(KERNEL_ENV)


def plain_env(runs: Path) -> dict[str, str]:
    """This process's environment without the kernel variables (so 'without' is really without), with private
    runs."""
    env = {k: v for k, v in os.environ.items() if k not in kernel_env()}
    return {**env, "PC_CLIP_RUNS": str(runs),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}


class Hog:
    "One busy-loop process (a CPU hog at the caller's niceness) for the duration of a `with` block."
    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it get going before the measured process starts
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def load() -> float:
    return os.getloadavg()[0]


def run_stage(env: dict, overrides: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(overrides)], env=env, capture_output=True,
                       text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"the worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def stage_mode(a) -> None:
    overrides = dict(world_n_train=a.world_n_train, world_n_test=50, world_n_val=50, pretrain_steps=a.steps)
    with tempfile.TemporaryDirectory(prefix="pc-clip-busy-") as d:
        base = plain_env(Path(d) / "runs")
        envs = {"without": base, "with": {**base, **kernel_env()}}
        for v in a.variant:  # NAME=VAR=VALUE[,VAR=VALUE]: another environment to compare (e.g. a spin count)
            name, _, assignments = v.partition("=")
            envs[name] = {**base, **dict(x.split("=", 1) for x in assignments.split(","))}
        run_stage(base, {**overrides, "pretrain_steps": 1})  # builds and caches the world (not timed)
        cases = [(fix, busy) for busy in (False, True) for fix in envs]
        seen: dict[tuple, list[dict]] = {c: [] for c in cases}
        for rep in range(a.repeats):
            for fix, busy in cases:
                before = load()
                if busy:
                    with Hog():
                        out = run_stage(envs[fix], overrides)
                else:
                    out = run_stage(envs[fix], overrides)
                out.update(load_before=before, load_after=load())
                seen[(fix, busy)].append(out)
                print(f"[{rep + 1}/{a.repeats}] {fix:>9s} env, {'one hog' if busy else 'quiet  '}: "
                      f"{a.steps} steps in {out['seconds']:6.1f} s ({out['seconds'] / a.steps:.3f} s/step, "
                      f"{out['cpu_seconds']:.1f} CPU s), load {before:.2f} -> {out['load_after']:.2f}, "
                      f"weights {out['weights']}", flush=True)
    med = {c: statistics.median(o["seconds"] for o in v) for c, v in seen.items()}
    hashes = {o["weights"] for v in seen.values() for o in v}
    print(f"\n{a.steps} pretraining steps of the tiny model (batch 64, {seen[cases[0]][0]['threads']} "
          f"threads), "
          f"median of {a.repeats}; kernel env = {kernel_env()}")
    print("| environment | quiet s/step | beside one hog s/step | hog / quiet |")
    print("|---|---:|---:|---:|")
    for fix in dict.fromkeys(f for f, _ in cases):
        q, b = med[(fix, False)] / a.steps, med[(fix, True)] / a.steps
        print(f"| {fix} | {q:.3f} | {b:.3f} | {b / q:.2f}x |")
    print(f"beside one hog, with vs without: {med[('without', True)] / med[('with', True)]:.2f}x faster; "
          f"quiet, with vs without: {med[('without', False)] / med[('with', False)]:.2f}x")
    print(f"weights identical in all {sum(len(v) for v in seen.values())} runs: {len(hashes) == 1} "
          f"({sorted(hashes)})")
    if len(hashes) != 1:
        raise SystemExit("the kernel environment changed the weights")


def reproduce(env: dict, a) -> float:
    cmd = [str(Path(sys.executable).parent / "pc-clip"), "reproduce", "--profile", a.profile, "--quiet"]
    cmd += (["--only", a.only] if a.only else []) + [x for p in a.param for x in ("-p", p)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"pc-clip reproduce failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def timed_case(name: str, root: Path, env: dict, a) -> float:
    "One whole run into `root/name` (its own PC_CLIP_RUNS), or its earlier seconds if `root/name` holds one."
    done = root / name / "seconds.json"
    if done.exists():
        seconds = json.loads(done.read_text())["seconds"]
        print(f"{name}: {seconds:.0f} s (kept from an earlier invocation, {done})", flush=True)
        return seconds
    before = load()
    if name == "busy":
        with Hog():
            seconds = reproduce({**env, "PC_CLIP_RUNS": str(root / name)}, a)
    else:
        seconds = reproduce({**env, "PC_CLIP_RUNS": str(root / name)}, a)
    done.write_text(json.dumps(dict(seconds=seconds, load_before=before, load_after=load())))
    print(f"{name}: {seconds:.0f} s (load {before:.2f} -> {load():.2f})", flush=True)
    return seconds


def whole_run_mode(a) -> None:
    with tempfile.TemporaryDirectory(prefix="pc-clip-busy-whole-") as d:
        # --keep: the runs stay, and a finished case is not run again
        root = Path(a.keep) if a.keep else Path(d)
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cases = a.cases.split(",")
        seconds = {name: timed_case(name, root, env, a) for name in cases}
        if len(seconds) < 2:
            return
        quiet, busy = seconds["quiet"], seconds["busy"]
        results = [next((root / name / "results").glob("*/results.csv")).parent
                   for name in ("quiet", "busy")]
        cmp = subprocess.run([sys.executable, "-m", "pc_clip.compare", *map(str, results)], env=env, cwd=REPO,
                             capture_output=True, text=True)
        print(cmp.stdout.strip() or cmp.stderr.strip())
        only = ", --only " + a.only if a.only else ""
        params = " " + " ".join(a.param) if a.param else ""
        print(f"whole run ({a.profile}{only}{params}): "
              f"quiet {quiet:.0f} s, beside one hog {busy:.0f} s, ratio {busy / quiet:.2f}x; "
              f"numbers identical: {cmp.returncode == 0}")
        if cmp.returncode:
            raise SystemExit("the loaded run's numbers differ from the quiet run's")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="pretraining steps per measurement (stage mode)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per case, alternating (stage mode)")
    p.add_argument("--world-n-train", type=int, default=640, help="train images of the stage's world")
    p.add_argument("--whole-run", action="store_true",
                   help="time `pc-clip reproduce` quiet and beside one hog")
    p.add_argument("--profile", default="tiny", help="whole-run mode: the profile")
    p.add_argument("--only", default=None, help="whole-run mode: passed to pc-clip reproduce")
    p.add_argument("-p", "--param", action="append", default=[],
                   help="whole-run mode: passed to pc-clip reproduce")
    p.add_argument("--variant", action="append", default=[],
                   help="stage mode: NAME=VAR=VALUE[,VAR=VALUE], another kernel environment (repeatable)")
    p.add_argument("--keep", default=None,
                   help="whole-run mode: keep the runs in this folder (a finished case is reused)")
    p.add_argument("--cases", default="quiet,busy", help="whole-run mode: which cases to run, of quiet,busy")
    a = p.parse_args(argv)
    whole_run_mode(a) if a.whole_run else stage_mode(a)


if __name__ == "__main__":
    main()
