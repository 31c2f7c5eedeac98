"""The GPU check script (bench/gpu_check.py) runs end to end at CPU sizes and reports what it could not measure."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(out: str, label: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(label)]
    assert lines, f"no table row starting with {label!r} in:\n{out}"
    return lines[-1]


def test_gpu_check_smoke_prints_numeric_table(tmp_path):
    "Every stage at CPU sizes (tiny CLIP, batch 8; tiny NF4 Llama): JSON per stage, markdown, and the table last."
    env = {**os.environ, "PYTHONPATH": str(REPO), "PC_CLIP_RUNS": str(tmp_path / "runs"), "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "all", "--smoke", "--threads", "1",
                           "--dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft, gen = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("finetune", "generate"))
    assert ft["ok"] and gen["ok"], (ft.get("error"), gen.get("error"), proc.stderr[-3000:])
    assert ft["model"] == "pc-clip-tiny" and ft["batch_size"] == 8 and ft["ours_mfu"] is None  # no peak for a CPU
    assert ft["counted_flops_per_pair"] > ft["useful_flops_per_pair"] > 0  # padding, projection and loss on top
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
    # before and after: the same loop with the fast paths on (fused attention, length buckets), same machine, same run
    assert ft["fast"] == dict(fused_attention=True, length_buckets=2, compile="off") and ft["fast_pairs_per_s"] > 0
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
    (tmp_path / "env.json").write_text(json.dumps(dict(card="NVIDIA H100 80GB HBM3", torch="2.11.0", python="3.12.3")))
    (tmp_path / "finetune.json").write_text(json.dumps(dict(ok=False, error="OutOfMemoryError: CUDA out of memory")))
    text = gc.report(tmp_path)  # generate.json missing: the stage timed out
    assert text.startswith("## GPU figures: NVIDIA H100 80GB HBM3")
    assert "| finetune speed-up | not measured | >= 5x | not measured |" in text
    assert "Finetuning: not measured (OutOfMemoryError: CUDA out of memory)" in text
    assert "Generation: not measured (no result (generate.json missing" in text
    assert (tmp_path / "gpu_results.md").read_text() == text

    ok = dict(ok=True, card="NVIDIA H100 80GB HBM3", model="ViT-L-14", batch_size=512, pairs=32768, ref_pairs=8192,
              epochs=2, text_width=768, text_layers=12, trained_params=85e6, useful_tokens=20.0,
              mean_batch_max_tokens=30.0, context=77, ours_pairs_per_s=20000.0, ref_pairs_per_s=1000.0, speedup=20.0,
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
    "One card, one run: the plain loop's MFU, the fast paths' MFU, their ratio and the goals, as the GPU run reports them."
    gc = _gpu_check()
    (tmp_path / "env.json").write_text(json.dumps(dict(card="NVIDIA H200", torch="2.11.0", python="3.12.3")))
    flops, peak = 6.89e9, 989e12
    ft = dict(ok=True, card="NVIDIA H200", model="ViT-L-14", batch_size=512, pairs=32768, ref_pairs=8192, epochs=2,
              text_width=768, text_layers=12, trained_params=85.1e6, useful_tokens=13.5, mean_batch_max_tokens=26.1,
              context=77, ours_pairs_per_s=11452.7, ref_pairs_per_s=924.3, speedup=11452.7 / 924.3,
              useful_flops_per_pair=flops, counted_flops_per_pair=13.34e9, peak_flops=peak, peak_key="H200",
              ours_mfu=11452.7 * flops / peak, ref_mfu=924.3 * flops / peak,
              fast=dict(fused_attention=True, length_buckets=16, compile="default"), fast_pairs_per_s=45811.0,
              fast_speedup=45811.0 / 11452.7, fast_mfu=45811.0 * flops / peak, fast_mean_batch_max_tokens=14.2)
    (tmp_path / "finetune.json").write_text(json.dumps(ft))
    text = gc.report(tmp_path)
    assert "| finetune MFU, ours (989 TFLOP/s bf16 peak) | 8.0% | >= 35% | no |" in text
    assert "| finetune with fast paths: MFU (989 TFLOP/s bf16 peak) | 31.9% | >= 35% | no |" in text
    assert "| finetune with fast paths: / plain loop (same card, same run) | 4.00x |  |  |" in text
    assert "| finetune with fast paths: speed-up | 49.56x | >= 20x | yes |" in text
    assert "padded to 14.2 tokens on average; the MFU ratio after / before is the pairs/s ratio, 4.00x." in text
