"""The up-front checks of `pc-clip reproduce`: what the chosen notebooks need is on disk before the first one starts."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from pc_clip.cli import experiment_notebooks, preflight
from pc_clip.core.config import get_config


def test_a_missing_t2i_base_exits_2_before_any_notebook(tmp_path):
    "On `paper`, experiment 11 finetunes its own PC-CLIP from ViT-L-14/openai: without it the run stops at once, naming it."
    data, runs = tmp_path / "data", tmp_path / "runs"
    cfg = get_config("paper")
    clip = data / "weights" / cfg.model_name / cfg.pretrained  # everything else experiment 11 reads is in place
    clip.mkdir(parents=True)
    (clip / "open_clip_model.safetensors").write_bytes(b"")
    (data / "weights" / cfg.t2i_model).mkdir(parents=True)
    (data / "weights" / cfg.t2i_model / "model_index.json").write_text("{}")
    env = {**os.environ, "PC_CLIP_DATA": str(data), "PC_CLIP_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "pc-clip"), "reproduce", "--profile", "paper", "--only", "11"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "T2I study's base" in out and "ViT-L-14 / openai" in out and str(data / "weights" / "ViT-L-14" / "openai") in out
    assert "SDXL pipeline (t2i_model)" not in out and "CLIP weights ViT-L-14 / datacomp" not in out  # those were found
    assert not (runs / "runs" / "paper" / "notebooks").exists()  # no notebook started
    base = data / "weights" / "ViT-L-14" / "openai"
    base.mkdir(parents=True)
    (base / "open_clip_model.safetensors").write_bytes(b"")
    assert preflight(get_config("paper", data_root=str(data)), experiment_notebooks(only="11")) == []
