"""The GPU figures of the issues in one run: finetuning throughput and MFU, batched 4-bit generation.

`bench/gpu_check.sh` runs each stage in its own process (a crash or a hang in one loses no other figure), then
`report`, which prints the table and writes `gpu_results.md`, ready to paste into `bench/RESULTS.md`:

    python bench/gpu_check.py finetune --json OUT/finetune.json     # ViT-L-14, batch 512 (random weights)
    python bench/gpu_check.py generate --json OUT/generate.json     # Llama-2-13B-shaped NF4, batch 32
    python bench/gpu_check.py report --dir OUT --md OUT/gpu_results.md
    python bench/gpu_check.py all --smoke --dir OUT                 # CPU-sized, every stage in this process

Every stage writes `{"ok": false, "error": ...}` instead of figures when it fails, and the report marks that
figure as not measured. Nothing is downloaded: all weights are random.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_finetune, bench_generation

GOALS = dict(finetune_speedup=5.0, finetune_mfu=0.35, finetune_fast_speedup=20.0, generation_speedup=20.0)
# GPU sizes (the issue's) and CPU sizes (seconds on two cores, same code paths)
SIZES = {
    "gpu": dict(ft_model="ViT-L-14", ft_pairs=32768, ft_ref_pairs=8192, ft_images=4096, ft_batch=512,
                ft_epochs=2,
                # the fast paths of the paper profile: MFU after
                ft_fused=1, ft_buckets=16, ft_compile="default",
                gen_shape="llama2-13b", gen_layers=None, gen_prompts=64, gen_single=4, gen_batch=0,
                gen_tokens=128),
    # gen_batch 0: the paper profile's batch on this card (fitted to free memory; --gen-batch 32 for the
    # fixed one)
    "smoke": dict(ft_model="pc-clip-tiny", ft_pairs=48, ft_ref_pairs=24, ft_images=32, ft_batch=8,
                  ft_epochs=2,
                  # compiling on a CPU takes longer than the smoke run
                  ft_fused=1, ft_buckets=2, ft_compile="off",
                  gen_shape="llama-tiny", gen_layers=None, gen_prompts=8, gen_single=2, gen_batch=8,
                  gen_tokens=4),
}


def environment() -> dict:
    "Card, driver and library versions of this machine."
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               card=torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else f"cpu ({platform.processor() or platform.machine()})")
    for mod in ("transformers", "bitsandbytes", "open_clip"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # a missing library is reported, not fatal
            env[mod] = f"missing ({type(e).__name__})"
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = ""
    return env


def fast_paths(s: dict) -> dict | None:
    "The FinetuneSettings fast paths of the sizes `s` (None: measure the plain loop only)."
    fast = dict(fused_attention=bool(s["ft_fused"]), length_buckets=s["ft_buckets"], compile=s["ft_compile"])
    return fast if fast["fused_attention"] or fast["length_buckets"] or fast["compile"] != "off" else None


def stage_finetune(s: dict) -> dict:
    from bench_finetune import measure_finetune
    return measure_finetune(s["ft_model"], s["ft_pairs"], s["ft_ref_pairs"], s["ft_images"], s["ft_batch"],
                            s["ft_epochs"], fast=fast_paths(s), log=lambda m: print(m, flush=True))


def stage_generate(s: dict) -> dict:
    import torch
    if not torch.cuda.is_available():
        try:  # bitsandbytes' NF4 on a CPU is a fallback that some builds lack
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise RuntimeError(f"skipped on this CPU: bitsandbytes does not import ({e}); NF4 needs it") \
                from e
    from bench_generation import measure_generation
    return measure_generation(None, s["gen_shape"], s["gen_layers"], True, "auto", s["gen_prompts"],
                              s["gen_single"],
                              s["gen_batch"], s["gen_tokens"], log=lambda m: print(m, flush=True))


STAGES = {"finetune": stage_finetune, "generate": stage_generate}


def run_stage(name: str, sizes: dict, out: Path) -> dict:
    "Run one stage; its figures (or its error) go to `out` as JSON either way."
    print(f"== {name} ==", flush=True)
    try:
        result = dict(ok=True, **STAGES[name](sizes))
    except Exception as e:  # one failed stage must not lose the others' figures
        traceback.print_exc()
        result = dict(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        print(f"stage {name} FAILED: {result['error']}", flush=True)
    result["sizes"] = sizes
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _load(path: Path) -> dict:
    if not path.exists():
        return dict(ok=False,
                    error=f"no result ({path.name} missing: the stage was killed, timed out or not run)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return dict(ok=False, error=f"unreadable {path.name}: {e}")


def _fmt(x, spec: str) -> str:
    return "not measured" if x is None else format(x, spec)


def _met(x, goal) -> str:
    return "" if goal is None else ("not measured" if x is None else ("yes" if x >= goal else "no"))


def summary_rows(ft: dict, gen: dict) -> list[tuple[str, str, str, str]]:
    "`(figure, measured, goal, met)` rows; a failed stage's figures read 'not measured'."
    f = ft if ft.get("ok") else {}
    g = gen if gen.get("ok") else {}
    peak = f"{f['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak" if f.get("peak_flops") else "no peak: CPU"
    no_peak = bool(f) and f.get("ours_mfu") is None
    return [
        (f"finetune {f.get('model', '')} pairs/s, ours (bs {f.get('batch_size', '?')})",
         _fmt(f.get("ours_pairs_per_s"), ".1f"), "", ""),
        ("finetune pairs/s, reference loop", _fmt(f.get("ref_pairs_per_s"), ".1f"), "", ""),
        ("finetune speed-up", _fmt(f.get("speedup"), ".2f") + ("x" if f else ""),
         f">= {GOALS['finetune_speedup']:g}x", _met(f.get("speedup"), GOALS["finetune_speedup"])),
        (f"finetune MFU, ours ({peak})",
         "n/a" if no_peak else _fmt(f.get("ours_mfu") and 100 * f["ours_mfu"], ".1f") + ("%" if f else ""),
         f">= {GOALS['finetune_mfu']:.0%}",
         "" if no_peak else _met(f.get("ours_mfu"), GOALS["finetune_mfu"])),
        *(_fast_rows(f, peak, no_peak) if f.get("fast") else []),
        (f"generate tokens/s, batched (bs "
         f"{g.get('batch_size', '?')}{', fitted to memory' if g.get('batch_fitted') else ''})",
         _fmt(g.get("batched_tokens_per_s"), ".1f"), "", ""),
        ("generate tokens/s, one at a time", _fmt(g.get("single_tokens_per_s"), ".1f"), "", ""),
        ("generate speed-up", _fmt(g.get("speedup"), ".2f") + ("x" if g else ""),
         f">= {GOALS['generation_speedup']:g}x", _met(g.get("speedup"), GOALS["generation_speedup"])),
    ]


def _fast_rows(f: dict, peak: str, no_peak: bool) -> list[tuple[str, str, str, str]]:
    """Rows of the same loop with the fast paths on, measured on the same card in the same run (before ->
    after)."""
    ref = f["ref_pairs_per_s"]
    return [
        ("finetune with fast paths: pairs/s", _fmt(f.get("fast_pairs_per_s"), ".1f"), "", ""),
        ("finetune with fast paths: / plain loop (same card, same run)",
         _fmt(f.get("fast_speedup"), ".2f") + "x", "", ""),
        ("finetune with fast paths: speed-up",
         _fmt(f["fast_pairs_per_s"] / ref if ref else None, ".2f") + "x",
         f">= {GOALS['finetune_fast_speedup']:g}x",
         _met(f["fast_pairs_per_s"] / ref if ref else None, GOALS["finetune_fast_speedup"])),
        (f"finetune with fast paths: MFU ({peak})",
         "n/a" if no_peak else _fmt(f.get("fast_mfu") and 100 * f["fast_mfu"], ".1f") + "%",
         f">= {GOALS['finetune_mfu']:.0%}",
         "" if no_peak else _met(f.get("fast_mfu"), GOALS["finetune_mfu"])),
    ]


def _details(ft: dict, gen: dict) -> list[str]:
    lines = []
    if ft.get("ok"):
        counted = ft.get("counted_flops_per_pair")
        lines.append(
            f"- Finetuning: {ft['model']} with random weights, text transformer trained ({ft['text_layers']} "
            f"blocks of "
            f"width {ft['text_width']}, {ft['trained_params'] / 1e6:.1f} M parameters) on cached random "
            f"image "
            f"embeddings with the PC-CLIP difference loss; ours {ft['pairs']} pairs x {ft['epochs']} epochs, "
            f"reference "
            f"{ft['ref_pairs']} pairs x {ft['epochs']} epochs, rate of the last epoch. Texts average "
            f"{ft['useful_tokens']:.1f} tokens to end-of-text (batch maxima "
            f"{ft['mean_batch_max_tokens']:.1f}, context "
            f"{ft['context']}). Useful FLOPs per pair {ft['useful_flops_per_pair'] / 1e9:.2f} GFLOP (forward "
            f"+ backward "
            f"of the trained blocks on the useful tokens, attention included)"
            + (f"; FlopCounterMode counts {counted / 1e9:.2f} GFLOP per pair in one of our steps (padding to "
               f"the "
               f"batch's longest text, projection and loss included)" if counted else "")
            + (f". MFU = pairs/s x useful FLOPs per pair / {ft['peak_flops'] / 1e12:.0f} TFLOP/s (the "
               f"datasheet dense "
               f"bf16 peak of '{ft['peak_key']}', read from the device name '{ft['card']}'); reference MFU "
               f"{100 * ft['ref_mfu']:.1f}%." if ft.get("ref_mfu") is not None else ".")
            + (f" Fast paths {ft['fast']} (the paper profile's): the same loop on the same card in the same "
               f"run, its "
               f"batches padded to {ft['fast_mean_batch_max_tokens']:.1f} tokens on average; the MFU ratio "
               f"after / before "
               f"is the pairs/s ratio, {ft['fast_speedup']:.2f}x." if ft.get("fast") else ""))
    else:
        lines.append(f"- Finetuning: not measured ({ft.get('error', 'no result')}).")
    if gen.get("ok"):
        mem = (f", peak GPU memory while generating {gen['peak_gpu_mem_gib']:.1f} GiB"
               if gen.get("peak_gpu_mem_gib") else "")
        lines.append(
            f"- Generation: {gen['model']}, {gen['stored_params'] / 1e9:.2f} G stored parameters (4-bit "
            f"weights count "
            f"half a byte each), built in {gen['build_s']:.0f} s; `pc_clip.differences.llm.generate_texts` "
            f"with the Llama-2 chat "
            f"template, left padding, sampling (temperature 0.7, top-p 0.9), every completion forced to "
            f"{gen['max_new_tokens']} new tokens; prompts ~{gen['prompt_tokens']} tokens (tiny stand-in "
            f"tokenizer) before "
            f"the template. Batched: {gen['prompts']} prompts in batches of {gen['batch_size']} "
            f"({gen['batched_s']:.1f} s); "
            f"one at a time: {gen['single_prompts']} prompts ({gen['single_s']:.1f} s){mem}.")
    else:
        lines.append(f"- Generation: not measured ({gen.get('error', 'no result')}).")
    return lines


def report(out_dir: Path, md_path: Path | None = None) -> str:
    """Print the summary table of the stage results in `out_dir` and write it as markdown (default
    `gpu_results.md`)."""
    ft, gen = _load(out_dir / "finetune.json"), _load(out_dir / "generate.json")
    env = _load(out_dir / "env.json")
    card = env.get("card", ft.get("card", "unknown card"))
    rows = summary_rows(ft, gen)
    md = [f"## GPU figures: {card}", "",
          f"Measured by `bash bench/gpu_check.sh` (random weights, nothing downloaded) on {card}"
          + (f" (nvidia-smi: {env['nvidia_smi']})" if env.get("nvidia_smi") else "")
          + f"; python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA "
            f"{env.get('cuda', '?')}), "
          f"transformers {env.get('transformers', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}, "
          f"open_clip {env.get('open_clip', '?')}.", "",
          "| figure | measured | goal | met |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    md += ["", *_details(ft, gen), ""]
    text = "\n".join(md)
    md_path = md_path or out_dir / "gpu_results.md"
    md_path.write_text(text)
    width = max(len(r[0]) for r in rows)
    print(f"\nGPU check on {card} (torch {env.get('torch', '?')}); markdown in {md_path}")
    print(f"{'figure':<{width}}  {'measured':>14}  {'goal':>8}  met")
    for a, b, c, d in rows:
        print(f"{a:<{width}}  {b:>14}  {c:>8}  {d}")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["env", "finetune", "generate", "report", "all"])
    ap.add_argument("--dir", default="/tmp/gpu_check_out",
                    help="folder of the stage JSON files (report, all, env)")
    ap.add_argument("--json", help="where a single stage writes its result (default: DIR/<stage>.json)")
    ap.add_argument("--md", help="markdown output of report (default: DIR/gpu_results.md)")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized models and counts (same code paths)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for key, value in SIZES["gpu"].items():  # every size can be overridden, e.g. --ft-batch 256
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int,
                        default=None)
    a = ap.parse_args(argv)
    sizes = dict(SIZES["smoke" if a.smoke else "gpu"])
    sizes.update({k: getattr(a, k) for k in sizes if getattr(a, k) is not None})
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    out_dir = Path(a.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.what in ("env", "all"):
        env = environment()
        (out_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env), flush=True)
    for name in STAGES:
        if a.what in (name, "all"):
            run_stage(name, sizes, Path(a.json) if a.json and a.what == name else out_dir / f"{name}.json")
    if a.what in ("report", "all"):
        report(out_dir, Path(a.md) if a.md else None)


if __name__ == "__main__":
    main()
