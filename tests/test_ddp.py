"""Data-parallel finetuning under torchrun: 2 CPU processes (gloo) equal one process on the same global batch,
and a killed 2-process run resumes from the step it saved."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pc_clip.core.config import get_config
from pc_clip.training.finetune import finetune
from pc_clip.models.clip import create_clip

SETTINGS = {"ft_batch_size": 16, "ft_lr": 1e-3, "ft_max_pairs": None}

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import pandas as pd
    from safetensors.torch import load_file
    from pc_clip.core.config import get_config
    from pc_clip.training.finetune import finetune
    from pc_clip.training.state import init_distributed
    from pc_clip.models.clip import create_clip

    rank, world = init_distributed()
    d, epochs, crash_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    emb = load_file(str(d / "emb.safetensors"))["emb"]
    triples = pd.read_csv(d / "triples.csv")
    model, _, tok = create_clip("pc-clip-tiny", seed=0)

    def stop(epoch, logs):
        if epoch == crash_after:
            raise SystemExit(3)  # a kill right after the checkpoint of this epoch

    cfg = get_config("tiny", **json.loads(sys.argv[4]))
    run = finetune(model, tok, triples, cfg, d / "out", image_embeddings=emb, epochs=epochs, progress=False,
                   on_epoch_end=stop)
    (d / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "start_epoch": run.start_epoch, "loss": run.steps.loss.tolist(),
         "weight": run.model.transformer.resblocks[1].mlp.c_fc.weight.flatten()[:50].tolist()}))
""")


def _data(n_images=10, n_rows=16):
    rng = np.random.default_rng(0)
    dim = create_clip("pc-clip-tiny", seed=0)[0].text_projection.shape[1]
    emb = F.normalize(torch.tensor(rng.normal(size=(n_images, dim)), dtype=torch.float32), dim=-1)
    words = ["larger", "smaller", "redder", "bluer", "brighter", "darker", "rounder", "taller"]
    rows = [dict(i=i, j=j, text=f"the first object is {words[(3 * i + j) % 8]} than the second")
            for i in range(n_images) for j in range(n_images) if i != j]
    return emb, pd.DataFrame(rows).sample(n_rows, random_state=0).reset_index(drop=True)


def _torchrun(d, epochs, crash_after):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PC_CLIP_RUNS": str(d / "runs")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(d / "worker.py"), str(d), str(epochs), str(crash_after), json.dumps(SETTINGS)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "A 2-process run killed after epoch 1 (one step: the global batch is the whole data), then resumed to 2 epochs."
    d = tmp_path_factory.mktemp("ddp")
    emb, triples = _data()
    save_file({"emb": emb}, str(d / "emb.safetensors"))
    triples.to_csv(d / "triples.csv", index=False)
    (d / "worker.py").write_text(WORKER)
    killed = _torchrun(d, epochs=2, crash_after=1)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    saved = d / "out" / "epochs" / "epoch-001"
    first_step = (load_file(str(saved / "open_clip_model.safetensors")),
                  json.loads((saved / "train_state.json").read_text()))
    resumed = _torchrun(d, epochs=2, crash_after=0)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
    return d, emb, triples, first_step, ranks


def _single(tmp_path, emb, triples, epochs, monkeypatch):
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    model, _, tok = create_clip("pc-clip-tiny", seed=0)
    return finetune(model, tok, triples, get_config("tiny", **SETTINGS), tmp_path / f"single{epochs}",
                    image_embeddings=emb, epochs=epochs, progress=False)


def test_two_processes_equal_one_process_step_on_the_global_batch(runs, tmp_path, monkeypatch):
    _, emb, triples, (weights, state), _ = runs
    one = _single(tmp_path, emb, triples, 1, monkeypatch)
    assert len(state["steps"]) == 1 and state["steps"][0]["epoch"] == 1  # one step on all 16 pairs
    assert abs(state["steps"][0]["loss"] - one.steps.loss.iloc[0]) < 1e-5
    ref, base, lr = one.model.state_dict(), create_clip("pc-clip-tiny", seed=0)[0].state_dict(), SETTINGS["ft_lr"]
    assert weights.keys() == ref.keys()
    n_full = n_moved = 0
    for k in ref:
        step, diff = (ref[k] - base[k]).abs(), (weights[k] - ref[k]).abs()
        if not step.any():  # frozen (or untouched): identical in both runs
            assert torch.equal(weights[k], ref[k]), k
            continue
        # Adam's first step is lr * g / (|g| + eps): a full step of lr wherever the gradient dominates eps.
        # There both runs must agree within 1e-5. Where |g| is below eps (e.g. the attention key bias, whose
        # gradient is zero in exact arithmetic), float rounding of a near-zero g decides the step; bound it by lr.
        full = step >= 0.9 * lr
        assert diff[full].max() <= 1e-5, (k, float(diff[full].max()))
        assert diff.max() <= lr, (k, float(diff.max()))
        n_full, n_moved = n_full + int(full.sum()), n_moved + step.numel()
    assert n_moved and n_full / n_moved > 0.99, n_full / n_moved  # almost every trained weight took a full step


def test_resumed_two_process_run_continues_from_the_saved_step(runs, tmp_path, monkeypatch):
    d, emb, triples, (_, state), ranks = runs
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["start_epoch"] for r in ranks] == [1, 1]  # both processes resumed after epoch 1
    assert ranks[0]["loss"] == ranks[1]["loss"] and ranks[0]["weight"] == ranks[1]["weight"]
    assert len(ranks[0]["loss"]) == 2 and ranks[0]["loss"][0] == state["steps"][0]["loss"]
    two = _single(tmp_path, emb, triples, 2, monkeypatch)
    assert np.allclose(ranks[0]["loss"], two.steps.loss.tolist(), atol=1e-5)  # epoch 2 continued the same run
    assert json.loads((d / "out" / "finetune.json").read_text())["n_epochs"] == 2  # rank 0 finished the run
