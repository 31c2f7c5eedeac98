"""The GPU check script (bench/gpu_check.py) runs end to end at CPU sizes and reports what it could not
measure."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(out: str, label: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(label)]
    assert lines, f"no table row starting with {label!r} in:\n{out}"
    return lines[-1]


@pytest.mark.slow
def test_gpu_check_smoke_prints_numeric_table(tmp_path):
    """Every stage at CPU sizes (tiny CLIP, batch 8; tiny NF4 Llama): JSON per stage, markdown, and the table
    last."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PC_CLIP_RUNS": str(tmp_path / "runs"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "all", "--smoke",
                           "--threads", "1", "--dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft, gen = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("finetune", "generate"))
    assert ft["ok"] and gen["ok"], (ft.get("error"), gen.get("error"), proc.stderr[-3000:])
    # no peak for a CPU
    assert ft["model"] == "pc-clip-tiny" and ft["batch_size"] == 8 and ft["ours_mfu"] is None
    # padding, projection and loss on top
    assert ft["counted_flops_per_pair"] > ft["useful_flops_per_pair"] > 0
    assert gen["batch_size"] == 8 and "NF4" in gen["model"]

    # the table is the last thing printed, and its figures are numbers
    table = out[out.rindex("GPU check on"):]
    assert out.rstrip().endswith(table.rstrip())
    num = r"\d+\.\d+"
    for label in ("finetune pc-clip-tiny pairs/s, ours (bs 8)", "finetune pairs/s, reference loop",
                  "generate tokens/s, batched (bs 8)", "generate tokens/s, one at a time"):
        assert re.search(rf"\s{num}\s*$", _row(table, label)), _row(table, label)
    for label, goal in (("finetune speed-up", ">= 5x"), ("generate speed-up", ">= 20x")):
        row = _row(table, label)
        assert re.search(rf"\s{num}x\s+{goal}\s+(yes|no)$", row), row
    assert re.search(r"\sn/a\s+>= 35%", _row(table, "finetune MFU"))
    # before and after: the same loop with the fast paths on (fused attention, length buckets), same
    # machine, same run
    assert ft["fast"] == dict(fused_attention=True, length_buckets=2,
                              compile="off") and ft["fast_pairs_per_s"] > 0
    assert abs(ft["fast_speedup"] - ft["fast_pairs_per_s"] / ft["ours_pairs_per_s"]) < 1e-9
    assert re.search(rf"\s{num}x\s*$", _row(table, "finetune with fast paths: / plain loop"))
    assert re.search(rf"\s{num}x\s+>= 20x\s+(yes|no)$", _row(table, "finetune with fast paths: speed-up"))
    assert re.search(r"\sn/a\s+>= 35%", _row(table, "finetune with fast paths: MFU"))
    speedup = float(re.search(num, _row(table, "generate speed-up")).group())
    assert abs(speedup - gen["speedup"]) < 0.01

    md = (tmp_path / "gpu_results.md").read_text()
    assert md.startswith("## GPU figures: cpu") and "| finetune speed-up |" in md and "not measured" not in md


def test_report_marks_failed_and_missing_stages(tmp_path):
    "A failed stage and a killed one read 'not measured' with their cause; the other figures stay."
    gc = _gpu_check()
    env = dict(card="NVIDIA H100 80GB HBM3", torch="2.11.0", python="3.12.3")
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "finetune.json").write_text(json.dumps(dict(ok=False,
                                                            error="OutOfMemoryError: CUDA out of memory")))
    text = gc.report(tmp_path)  # generate.json missing: the stage timed out
    assert text.startswith("## GPU figures: NVIDIA H100 80GB HBM3")
    assert "| finetune speed-up | not measured | >= 5x | not measured |" in text
    assert "Finetuning: not measured (OutOfMemoryError: CUDA out of memory)" in text
    assert "Generation: not measured (no result (generate.json missing" in text
    assert (tmp_path / "gpu_results.md").read_text() == text

    ok = dict(ok=True, card="NVIDIA H100 80GB HBM3", model="ViT-L-14", batch_size=512, pairs=32768,
              ref_pairs=8192,
              epochs=2, text_width=768, text_layers=12, trained_params=85e6, useful_tokens=20.0,
              mean_batch_max_tokens=30.0, context=77, ours_pairs_per_s=20000.0, ref_pairs_per_s=1000.0,
              speedup=20.0,
              useful_flops_per_pair=1.0e10, counted_flops_per_pair=1.6e10, peak_flops=989e12, peak_key="H100",
              ours_mfu=20000 * 1e10 / 989e12, ref_mfu=1000 * 1e10 / 989e12)
    (tmp_path / "finetune.json").write_text(json.dumps(ok))
    text = gc.report(tmp_path)
    assert "| finetune speed-up | 20.00x | >= 5x | yes |" in text
    assert "| finetune MFU, ours (989 TFLOP/s bf16 peak) | 20.2% | >= 35% | no |" in text


def test_peak_lookup_prefers_specific_names(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import hardware as bf
    assert bf.peak_bf16("NVIDIA H100 80GB HBM3") == (989e12, "H100")
    assert bf.peak_bf16("NVIDIA H100 PCIe")[0] == 756e12 and bf.peak_bf16("NVIDIA H200")[0] == 989e12
    assert bf.peak_bf16("NVIDIA H200 NVL")[0] == 835e12 and bf.peak_bf16("cpu") == (None, "")


def test_report_shows_mfu_before_and_after_the_fast_paths(tmp_path):
    """One card, one run: the plain loop's MFU, the fast paths' MFU, their ratio and the goals, as the GPU
    run reports them."""
    gc = _gpu_check()
    (tmp_path / "env.json").write_text(json.dumps(dict(card="NVIDIA H200", torch="2.11.0", python="3.12.3")))
    flops, peak = 6.89e9, 989e12
    ft = dict(ok=True, card="NVIDIA H200", model="ViT-L-14", batch_size=512, pairs=32768, ref_pairs=8192,
              epochs=2, text_width=768, text_layers=12, trained_params=85.1e6, useful_tokens=13.5,
              mean_batch_max_tokens=26.1,
              context=77, ours_pairs_per_s=11452.7, ref_pairs_per_s=924.3, speedup=11452.7 / 924.3,
              useful_flops_per_pair=flops, counted_flops_per_pair=13.34e9, peak_flops=peak, peak_key="H200",
              ours_mfu=11452.7 * flops / peak, ref_mfu=924.3 * flops / peak,
              fast=dict(fused_attention=True, length_buckets=16, compile="default"), fast_pairs_per_s=45811.0,
              fast_speedup=45811.0 / 11452.7, fast_mfu=45811.0 * flops / peak,
              fast_mean_batch_max_tokens=14.2)
    (tmp_path / "finetune.json").write_text(json.dumps(ft))
    text = gc.report(tmp_path)
    assert "| finetune MFU, ours (989 TFLOP/s bf16 peak) | 8.0% | >= 35% | no |" in text
    assert "| finetune with fast paths: MFU (989 TFLOP/s bf16 peak) | 31.9% | >= 35% | no |" in text
    assert "| finetune with fast paths: / plain loop (same card, same run) | 4.00x |  |  |" in text
    assert "| finetune with fast paths: speed-up | 49.56x | >= 20x | yes |" in text
    assert ("padded to 14.2 tokens on average; the MFU ratio after / before is the pairs/s ratio, 4.00x."
            in text)


def _attention_flops(batch: int, tokens: int, width: int, layers: int) -> int:
    """FLOPs of the attention products of `layers` blocks, forward (q k^T and p v) plus backward (5
    products), full square."""
    return layers * 7 * 2 * batch * tokens * tokens * width


def _split(by_op: dict) -> tuple[dict, int]:
    "`(FLOPs of the other ops, FLOPs of the attention kernels)` of a per-op count."
    return ({k: v for k, v in by_op.items() if "attention" not in k},
            sum(v for k, v in by_op.items() if "attention" in k))


@pytest.mark.slow
def test_bench_flops_reports_peak_and_stage_gflops(tmp_path):
    """bench_flops.py at its smallest settings: a positive peak and GFLOP/s per stage; FLOPs per step as
    FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import open_clip
    from pc_clip.models.clip import create_clip
    from pc_clip.models.text import encode_text_trimmed
    from pc_clip.training.losses import difference_contrastive_loss, set_trainable
    from pc_clip.training.pretrain import clip_step_loss

    out = tmp_path / "flops.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PC_CLIP_RUNS": str(tmp_path / "runs"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_flops.py"), "--threads", "1",
                           "--sizes", "64", "128",
                           "--repeats", "1", "--train-images", "64", "--pretrain-batch-size", "8",
                           "--pretrain-steps", "2",
                           "--warmup", "1", "--ft-batch-size", "8", "--ft-steps", "3", "--pairs", "24",
                           "--phase-reps", "1", "--embed-texts", "16", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["threads"] == 1 and r["peak"]["gflops"] > 0 and set(r["peak"]["by_size"]) == {"64", "128"}
    peak = r["peak"]
    assert peak["gflops"] == max(peak["by_size"].values()) == max(peak["start_gflops"], peak["end_gflops"])
    stages = r["stages"]
    assert set(stages) == {"pretrain", "finetune", "finetune_fast", "embed_images", "embed_texts"}
    for name, s in stages.items():
        assert s["gflops"] > 0, name
        assert abs(s["pct_of_peak"] - 100 * s["gflops"] / r["peak"]["gflops"]) < 1e-9, name
    # the markdown table names every stage against the same peak
    assert "| fp32 matmul peak (" in proc.stdout and proc.stdout.count("| finetuning step,") == 2

    # pretraining: each counted batch shape (images x longest caption) against the library's step on a
    # fresh model
    pre = stages["pretrain"]
    assert pre["batch"] == 8 and pre["steps"] == 2 and set(pre["flops_by_op"]) == set(pre["flops_by_shape"])
    assert min(pre["flops_by_shape"].values()) <= pre["flops_per_step"] <= max(pre["flops_by_shape"].values())
    model, _, tok = create_clip("pc-clip-tiny", None, device="cpu", seed=0)
    model.train()
    # 32 px, patch 4, class token
    w, layers, patches = model.transformer.width, model.transformer.layers, 8 * 8 + 1
    for key, by_op in pre["flops_by_op"].items():
        b, length = map(int, key.split("x"))
        ids = torch.zeros(b, model.context_length, dtype=torch.long)
        ids[:, :length] = torch.randint(1, 1000, (b, length))
        ids[:, length - 1] = 49407  # end of text: the highest id, where the text is pooled
        batch = dict(images=torch.randn(b, 3, 32, 32), tokens=ids)
        with FlopCounterMode(display=False) as fc:
            clip_step_loss(model, batch, open_clip.ClipLoss())["total"].backward()
        mine = {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}
        other, attention = _split(by_op)
        assert other == _split(mine)[0], key  # every matmul and convolution FlopCounterMode sees, the same
        assert pre["flops_by_shape"][key] == sum(by_op.values())
        # the attention products: image tower at its patches, text tower at the step's length (the
        # batch's longest
        # caption when the step trims the text tower, else the full context)
        image = _attention_flops(b, patches, w, layers)
        assert attention in (image + _attention_flops(b, length, w, layers),
                             image + _attention_flops(b, model.context_length, w, layers)), key

    # finetuning: each counted batch shape (texts x padded length) against a text-blocks step on the
    # same architecture
    for name in ("finetune", "finetune_fast"):
        s = stages[name]
        shapes = s["flops_by_shape"]
        assert shapes and min(shapes.values()) <= s["flops_per_step"] <= max(shapes.values())
        key = sorted(shapes)[0]
        b, length = map(int, key.split("x"))
        m = create_clip("pc-clip-tiny", None, device="cpu", seed=0)[0]
        set_trainable(m, "text_blocks")
        m.train()
        ids = torch.randint(1, 1000, (b, m.context_length))
        ids[:, length - 1] = 49407  # end of text: the highest id, where the text is pooled
        a, c = torch.randn(b, 96), torch.randn(b, 96)
        with FlopCounterMode(display=False) as fc:
            difference_contrastive_loss(encode_text_trimmed(m, ids, length), a, c, 1.0).backward()
        plain = {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}
        non_attention = sum(_split(plain)[0].values())
        assert shapes[key] == non_attention + _attention_flops(b, length, w, layers), (name, key)
    trained = stages["finetune"]["trained_params"]
    assert trained == stages["finetune_fast"]["trained_params"] < pre["trained_params"]


@pytest.mark.slow
def test_busy_machine_times_the_stage_with_and_without_the_kernel_env_and_checks_the_weights(tmp_path):
    """bench/busy_machine.py at its smallest: four cases (with / without KERNEL_ENV, quiet / one hog), one
    weights hash."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "busy_machine.py"), "--steps", "2",
                           "--repeats", "1",
                           "--world-n-train", "64"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("steps in") == 4 and "| with | " in out and "| without | " in out, out
    assert "weights identical in all 4 runs: True" in out and "OMP_WAIT_POLICY" in out, out
