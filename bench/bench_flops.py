"""How close do pretraining and finetuning come to the machine? Achieved GFLOP/s of each stage against a
matmul peak measured in the same run, so that a larger time budget is spent where it buys the most.

    python bench/bench_flops.py                          # CPU, --threads 2 (pretraining's), 1-2 minutes
    python bench/bench_flops.py --json /tmp/flops.json   # the figures as JSON too

In one process and at one thread count (default `PRETRAIN_THREADS`, what pretraining pins):

1. **matmul peak**: square fp32 `torch.mm` of a few sizes, best of `--repeats` timings each
   (`time.perf_counter`), GFLOP/s = 2 n^3 / t; the best size's figure is the peak. Measured at the start and
   again at the end of the run (the load of a shared machine drifts): the better pass is the peak, both are
   printed. Also the same matmuls at the **model's shapes** (tokens x width against the qkv, output and MLP
   weights of a 96-wide block), the ceiling the tiny model's matrices allow.
2. **pretraining**: `pc_clip.training.pretrain.pretrain_clip` itself (the library's loop, batch
   `pretrain_batch_size`) on a small world, its steps timed through its `on_step` hook (the first `--warmup`
   steps are not timed); the FLOPs of each step (`clip_step_loss` forward + backward) counted with
   `torch.utils.flop_counter.FlopCounterMode` per batch shape, on a batch of each shape the timed steps saw.
3. **finetuning**: `pc_clip.training.finetune`'s optimizer step (`_train_step`, text blocks trained,
   contrastive loss on cached image embeddings, batch `ft_batch_size`) on oracle difference statements of the
   small world, the step with its fast paths off and the fast-path step (`ft_fused_attention=True,
   ft_length_buckets=16`) taking turns step by step (the table marks which one the `tiny` profile runs); FLOPs
   counted per batch shape (a batch pads to its own longest text).
4. **evaluation**: image and text embedding throughput (`compute_image_embeddings`, `embed_texts`).

FlopCounterMode has no formula for the CPU flash-attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward), which both towers run on a CPU; they are
counted here with torch's own attention formulas (`sdpa_flop_count`, `sdpa_backward_flop_count`), so "FLOPs
per step" is every matmul, convolution and attention product the step executes. Optimizer updates, norms,
softmax and other elementwise work are not FLOPs in this count (they are time, though: see the phase
breakdown). Timing is the bench's alone: nothing in `pc_clip` reads the clock to decide anything. Prints
progress, then a markdown table; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pc_clip.core.config import embedding_options, get_config
from pc_clip.differences.pairs import corpus_from_world, sample_pairs
from pc_clip.differences.records import OracleBackend
from pc_clip.models.clip import create_clip
from pc_clip.models.embed import compute_image_embeddings, embed_texts
from pc_clip.models.text import pooled_positions
from pc_clip.training.finetune import _batches, _prepare, _train_step, _trainer
from pc_clip.training.pretrain import (PRETRAIN_THREADS, PretrainSettings, _param_groups, clip_step_loss,
                                       pretrain_clip)
from pc_clip.training.state import FinetuneSettings
from pc_clip.world.shapes import build_world

PLAIN = dict(ft_fused_attention=False, ft_length_buckets=0)  # the step with its fast paths off
# the fast-path step (compiling is off: it does not pay on a CPU)
FAST = dict(ft_fused_attention=True, ft_length_buckets=16)


# -----------------------------------------------------------------------------------------------------
# counting FLOPs
def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def count_flops(fn) -> tuple[int, dict[str, int]]:
    "`(total, per op)` FLOPs of `fn()`: FlopCounterMode with the CPU flash-attention kernels counted too."
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    by_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


# ------------------------------------------------------------------------------------------------------
# matmul peak
def _best_seconds(fn, repeats: int, min_sample_s: float = 0.05) -> float:
    "Best time of one call of `fn` over `repeats` samples; each sample loops `fn` long enough to time it."
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, math.ceil(min_sample_s / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_peak(sizes, repeats: int, log=print) -> dict:
    """fp32 GFLOP/s of square `torch.mm` per size (best of `repeats`); the peak is the best size's figure
    (`main` runs it twice)."""
    by_size = {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        t = _best_seconds(lambda: torch.mm(a, b, out=out), repeats)
        by_size[n] = 2 * n ** 3 / t / 1e9
        log(f"  matmul {n}x{n}: {by_size[n]:.1f} GFLOP/s")
    best = max(by_size, key=by_size.get)
    return dict(gflops=by_size[best], size=best, by_size=by_size)


def model_shape_matmuls(width: int, tokens: int, repeats: int) -> float:
    """fp32 GFLOP/s of one transformer block's four weight matmuls at `tokens` rows of `width` (the model's
    own shapes)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    xs = {k: torch.randn(tokens, k, generator=g) for k in {s[0] for s in shapes}}
    ws = [torch.randn(k, n, generator=g) for k, n in shapes]
    t = _best_seconds(lambda: [xs[w.shape[0]] @ w for w in ws], repeats)
    return sum(2 * tokens * k * n for k, n in shapes) / t / 1e9


# -------------------------------------------------------------------------------------------------------
# pretraining
def _phases(forward, opt, reps: int) -> dict:
    """Best seconds of the forward, the backward and the optimizer step of one training step (`forward()` ->
    loss)."""
    best = dict(forward=float("inf"), backward=float("inf"), optimizer=float("inf"))
    for _ in range(reps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for k, v in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
            best[k] = min(best[k], v)
    return best


def pretrain_stage(world, cfg, steps: int, warmup: int, threads: int, reps: int,
                   log=print) -> tuple[dict, torch.nn.Module, object]:
    """`warmup + steps` real steps of `pretrain_clip` timed through its `on_step` hook; FLOPs counted
    afterwards per batch shape (images, and the batch's longest caption: a step may trim the text tower to it)
    with the library's `clip_step_loss` on a batch of each shape that the timed steps saw."""
    bs, loss_fn = cfg.pretrain_batch_size, open_clip.ClipLoss()
    shapes, examples = [], {}

    def step_loss(model, batch):  # the default step, and a note of its batch's shape (no clock, no change)
        key = (len(batch["tokens"]), int(pooled_positions(model, batch["tokens"]).max()) + 1)
        shapes.append(key)
        if key not in examples:
            examples[key] = dict(images=batch["images"].clone(), tokens=batch["tokens"].clone())
        return clip_step_loss(model, batch, loss_fn)

    stamps = []
    on_step = lambda step, loss: stamps.append((time.perf_counter(), time.process_time()))
    total = warmup + steps
    t0 = time.perf_counter()
    trained, tok, hist = pretrain_clip(world, PretrainSettings.from_config(cfg, steps=total), device="cpu",
                                       progress=False, threads=threads, on_step=on_step, step_loss=step_loss)
    log(f"  {total} steps of pretrain_clip in {time.perf_counter() - t0:.1f} s (model built, world "
        f"tokenised, "
        f"{warmup} warm-up steps included)")
    (w0, c0), (w1, c1) = stamps[warmup - 1], stamps[-1]
    seconds = w1 - w0
    durations = np.diff([w for w, _ in stamps[warmup - 1:]])

    model = create_clip(cfg.model_name, None, device="cpu", seed=cfg.seed)[0]
    model.train()
    counted = {k: count_flops(lambda: clip_step_loss(model, b, loss_fn)["total"].backward())
               for k, b in examples.items()}
    model.zero_grad(set_to_none=True)
    flops = np.array([counted[k][0] for k in shapes[warmup:]], dtype=float)
    log(f"  one step (batch {bs}): {flops.mean() / 1e9:.2f} GFLOP counted on average ({len(counted)} batch "
        f"shapes)")

    # where a step's time goes (same step code: forward, backward, AdamW over the same parameter
    # groups), median batch
    probe = examples[sorted(shapes[warmup:], key=lambda k: k[1])[len(shapes[warmup:]) // 2]]
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=cfg.pretrain_lr, betas=(0.9, 0.98), eps=1e-6)
    phases = _phases(lambda: clip_step_loss(model, probe, loss_fn)["total"], opt, reps)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_shape = {f"{b}x{l}": c[0] for (b, l), c in sorted(counted.items())}
    return dict(batch=bs, flops_per_step=float(flops.mean()), flops_by_shape=by_shape,
                flops_by_op={f"{b}x{l}": c[1] for (b, l), c in sorted(counted.items())},
                steps=steps, seconds=seconds, cpu_seconds=c1 - c0, steps_per_s=steps / seconds,
                gflops=float(flops.sum()) / seconds / 1e9, median_step_s=float(np.median(durations)),
                gflops_median_step=float(np.median(flops / durations)) / 1e9,
                gflops_per_cpu_s=float(flops.sum()) / (c1 - c0) / 1e9,
                phases_s=phases, trained_params=n_params, threads=hist["threads"]), trained, tok


# --------------------------------------------------------------------------------------------------------
# finetuning
def oracle_triples(world, cfg, n_pairs: int) -> pd.DataFrame:
    """Training triples (i, j, text) from the oracle's statements about `n_pairs` sampled pairs of the
    world's train images."""
    pairs = sample_pairs(corpus_from_world(world, "train"), n_pairs, cfg.seed, cfg.pair_sampling,
                         world.heldout_pairs)
    out = OracleBackend(world.attrs, seed=cfg.seed).generate(pairs.to_dict("records"))
    rows = [(p["i"], p["j"], s["text"]) for p, o in zip(pairs.to_dict("records"), out) for s in o["oracle"]]
    return pd.DataFrame(rows, columns=["i", "j", "text"])


def finetune_stages(model, tokenizer, triples, emb, cfg, steps: int, warmup: int, reps: int,
                    log=print) -> dict:
    """Plain and fast-path steps of `pc_clip.training.finetune` taking turns (who goes first alternates), each
    step timed; FLOPs counted once per batch shape (batch size, padded length) on the same trainer."""
    runs = {}
    for name, c in (("finetune", cfg.replace(**PLAIN)), ("finetune_fast", cfg.replace(**FAST))):
        s = FinetuneSettings.from_config(c)
        data = _prepare(model, tokenizer, triples, s, emb, None, False, 1)
        tr = _trainer(model, data, s, 0, 1)
        tr.model.train()
        order, epoch = [], 0
        while len(order) < warmup + steps:
            order += _batches(data.n, s, epoch, 1, data.pool_pos)
            epoch += 1
        order = order[:warmup + steps]
        # a step trims to its longest text
        shape = lambda b, pos=data.pool_pos: (len(b), int(pos[b].max()) + 1)
        counted = {}
        for b in order:
            if shape(b) not in counted:
                counted[shape(b)] = count_flops(lambda: tr.objective(b).backward())
        tr.opt.zero_grad(set_to_none=True)
        runs[name] = dict(tr=tr, data=data, s=s, order=order, shape=shape, counted=counted)
        log(f"  {name}: {data.n} texts, batch {s.batch_size}, fused attention {s.fused_attention}, length "
            f"buckets "
            f"{s.length_buckets}; {len(counted)} batch shapes counted")
    seconds = {k: 0.0 for k in runs}
    cpu = {k: 0.0 for k in runs}
    per_step = {k: [] for k in runs}  # seconds of each timed step
    for step in range(warmup + steps):
        names = list(runs) if step % 2 == 0 else list(runs)[::-1]
        for name in names:
            r = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            _train_step(r["tr"], [r["order"][step]])
            if step >= warmup:
                per_step[name].append(time.perf_counter() - t0)
                seconds[name] += per_step[name][-1]
                cpu[name] += time.process_time() - c0
    out = {}
    for name, r in runs.items():
        timed = r["order"][warmup:]
        flops = [r["counted"][r["shape"](b)][0] for b in timed]
        lengths = [r["shape"](b)[1] for b in timed]
        tr = r["tr"]
        probe = timed[int(np.argsort(lengths)[len(lengths) // 2])]  # a batch of median padded length
        phases = _phases(lambda: tr.objective(probe), tr.opt, reps)
        out[name] = dict(batch=r["s"].batch_size, fused_attention=r["s"].fused_attention,
                         tiny_profile_step=all(getattr(cfg, k) == v
                                               for k, v in (PLAIN if name == "finetune" else FAST).items()),
                         length_buckets=r["s"].length_buckets, flops_per_step=float(np.mean(flops)),
                         flops_by_shape={f"{b}x{l}": c[0] for (b, l), c in sorted(r["counted"].items())},
                         mean_padded_tokens=float(np.mean(lengths)), steps=steps, seconds=seconds[name],
                         cpu_seconds=cpu[name], steps_per_s=steps / seconds[name],
                         gflops=float(np.sum(flops)) / seconds[name] / 1e9, phases_s=phases,
                         gflops_per_cpu_s=float(np.sum(flops)) / cpu[name] / 1e9,
                         median_step_s=float(np.median(per_step[name])),
                         gflops_median_step=float(np.median(np.array(flops) / np.array(per_step[name])))
                         / 1e9,
                         phase_padded_tokens=r["shape"](probe)[1],
                         trained_params=sum(p.numel() for p in tr.params))
        log(f"  {name}: {out[name]['steps_per_s']:.2f} steps/s, {out[name]['gflops']:.1f} GFLOP/s "
            f"(mean padded length {out[name]['mean_padded_tokens']:.1f} tokens)")
    return out


# --------------------------------------------------------------------------------------------------------
# evaluation
def embedding_stages(model, tokenizer, world, cfg, n_images: int, n_texts: int,
                     log=print) -> tuple[dict, torch.Tensor]:
    """Image and text embedding throughput (items/s, GFLOP/s); returns the image embeddings of the whole
    world too."""
    out = {}
    t0, c0 = time.perf_counter(), time.process_time()
    emb = compute_image_embeddings(model, world.images, cfg.eval_batch_size, "cpu", progress=False)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = min(n_images, len(world.images))
    flops, _ = count_flops(lambda: compute_image_embeddings(model, world.images[:n], cfg.eval_batch_size,
                                                            "cpu", progress=False))
    per_item = flops / n
    out["embed_images"] = dict(batch=cfg.eval_batch_size, items=len(world.images), seconds=sec,
                               cpu_seconds=cpu, items_per_s=len(world.images) / sec, flops_per_item=per_item,
                               gflops=per_item * len(world.images) / sec / 1e9,
                               gflops_per_cpu_s=per_item * len(world.images) / cpu / 1e9)
    texts = world.captions[:n_texts]
    t0, c0 = time.perf_counter(), time.process_time()
    embed_texts(model, tokenizer, texts, **embedding_options(cfg))
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    flops, _ = count_flops(lambda: embed_texts(model, tokenizer, texts, **embedding_options(cfg)))
    out["embed_texts"] = dict(batch=cfg.eval_batch_size, items=len(texts), seconds=sec, cpu_seconds=cpu,
                              items_per_s=len(texts) / sec, flops_per_item=flops / len(texts),
                              gflops=flops / sec / 1e9, gflops_per_cpu_s=flops / cpu / 1e9)
    for k, v in out.items():
        log(f"  {k}: {v['items_per_s']:.0f} items/s, {v['gflops']:.1f} GFLOP/s")
    return out, emb


# ----------------------------------------------------------------------------------------------------------
# report
LABELS = dict(pretrain="pretraining step (CLIP loss, both towers, AdamW)",
              finetune="finetuning step, fast paths off (text blocks, contrastive)",
              finetune_fast="finetuning step, fast paths (fused attention, buckets 16)",
              embed_images="image embedding (evaluation, per image)",
              embed_texts="text embedding (evaluation, per text)")


def table(r: dict) -> str:
    "The figures as a markdown table: one row per stage against the matmul peak of the same run."
    peak = r["peak"]["gflops"]
    pct = lambda x: f"{x / peak:.0%}".replace("%", " %")
    lines = ["| stage | batch | GFLOP per step | steps/s | achieved GFLOP/s | % of matmul peak | GFLOP/s of "
             "the median step "
             "| GFLOP per CPU second |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 matmul peak ({r['peak']['size']}x{r['peak']['size']}, {r['threads']} threads) | | | | "
             f"{peak:.1f} | 100 % | | |",
             f"| (matmul peak at the start / at the end of the run) | | | | {r['peak']['start_gflops']:.1f} "
             f"/ "
             f"{r['peak']['end_gflops']:.1f} | | | |"]
    for name, shape in r["model_shape_gflops"].items():
        lines.append(f"| matmul at the model's shapes ({name}) | | | | {shape:.1f} | {pct(shape)} | | |")
    for k, v in r["stages"].items():
        if "flops_per_step" in v:
            label = LABELS[k] + (", the `tiny` profile's" if v.get("tiny_profile_step") else "")
            lines.append(f"| {label} | {v['batch']} | {v['flops_per_step'] / 1e9:.2f} | "
                         f"{v['steps_per_s']:.2f} | "
                         f"{v['gflops']:.1f} | {pct(v['gflops'])} | {v['gflops_median_step']:.1f} | "
                         f"{v['gflops_per_cpu_s']:.1f} |")
        else:
            lines.append(f"| {LABELS[k]} | {v['batch']} | {v['flops_per_item'] / 1e6:.1f} MFLOP per item | "
                         f"{v['items_per_s']:.0f} items/s | {v['gflops']:.1f} | {pct(v['gflops'])} | | "
                         f"{v['gflops_per_cpu_s']:.1f} |")
    return "\n".join(lines)


def phase_table(r: dict) -> str:
    "Where a step's time goes: best forward, backward and optimizer seconds of each training stage."
    lines = ["| stage | forward ms | backward ms | optimizer ms | optimizer share | trained parameters |",
             "|---|---:|---:|---:|---:|---:|"]
    for k in ("pretrain", "finetune", "finetune_fast"):
        v = r["stages"].get(k)
        if v is None:
            continue
        p = v["phases_s"]
        tot = sum(p.values())
        lines.append(f"| {k} | {p['forward'] * 1e3:.1f} | {p['backward'] * 1e3:.1f} | "
                     f"{p['optimizer'] * 1e3:.1f} | "
                     f"{p['optimizer'] / tot:.0%} | {v['trained_params'] / 1e6:.2f} M |".replace("%", " %"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=PRETRAIN_THREADS,
                    help=f"torch CPU threads for every stage and the peak (default {PRETRAIN_THREADS}: "
                         f"pretraining's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048],
                    help="square matmul sizes for the peak")
    ap.add_argument("--repeats", type=int, default=5, help="timings per matmul size (the best one counts)")
    ap.add_argument("--train-images", type=int, default=1024,
                    help="train images of the small world (>= the pretraining batch)")
    ap.add_argument("--pretrain-steps", type=int, default=20, help="timed pretraining steps")
    ap.add_argument("--ft-steps", type=int, default=40, help="timed finetuning steps of each step kind")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones, per stage")
    ap.add_argument("--pairs", type=int, default=2048,
                    help="image pairs whose oracle statements the finetuning steps train on")
    ap.add_argument("--phase-reps", type=int, default=5,
                    help="repeats of the forward/backward/optimizer breakdown")
    ap.add_argument("--embed-texts", type=int, default=1024,
                    help="captions embedded for the text embedding figure")
    ap.add_argument("--pretrain-batch-size", type=int, default=None,
                    help="override cfg.pretrain_batch_size (tests)")
    ap.add_argument("--ft-batch-size", type=int, default=None, help="override cfg.ft_batch_size (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    over = {k: v for k, v in dict(pretrain_batch_size=args.pretrain_batch_size,
                                  ft_batch_size=args.ft_batch_size).items() if v}
    cfg = get_config("tiny", seed=args.seed, device="cpu", **over)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first timed step is measured from the end of the last "
                 "warm-up step)")
    if args.train_images < cfg.pretrain_batch_size:
        ap.error(f"--train-images {args.train_images} is below the pretraining batch "
                 f"({cfg.pretrain_batch_size}): raise it")
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    print(f"bench_flops: torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load "
          f"average "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)

    print("1/4 matmul peak", flush=True)
    peak = matmul_peak(args.sizes, args.repeats)
    print("2/4 pretraining", flush=True)
    world = build_world(args.seed, args.train_images, 0, cfg.world_image_size)
    pre, model, tokenizer = pretrain_stage(world, cfg, args.pretrain_steps, args.warmup, args.threads,
                                           args.phase_reps)
    # pretrain_clip restores the caller's; kept explicit for the stages below
    torch.set_num_threads(args.threads)
    print("3/4 evaluation embeddings", flush=True)
    emb_stages, emb = embedding_stages(model, tokenizer, world, cfg, min(512, len(world.images)),
                                       args.embed_texts)
    print("4/4 finetuning (plain and fast-path steps taking turns)", flush=True)
    triples = oracle_triples(world, cfg, args.pairs)
    ft = finetune_stages(model, tokenizer, triples, emb, cfg, args.ft_steps, args.warmup, args.phase_reps)

    width = model.transformer.width
    patches = int(np.prod(model.visual.grid_size)) + 1  # patch tokens and the class token
    shapes = {f"{cfg.pretrain_batch_size} images x {patches} tokens": cfg.pretrain_batch_size * patches,
              f"{cfg.ft_batch_size} texts x {ft['finetune']['mean_padded_tokens']:.0f} tokens":
                  int(cfg.ft_batch_size * round(ft["finetune"]["mean_padded_tokens"]))}
    model_shape = {f"width {width}, {k}": model_shape_matmuls(width, rows, args.repeats)
                   for k, rows in shapes.items()}
    print("matmul peak again (the load of a shared machine drifts; the better of the two passes is the peak)",
          flush=True)
    again = matmul_peak(args.sizes, args.repeats)
    peak = dict(gflops=max(peak["gflops"], again["gflops"]),
                size=peak["size"] if peak["gflops"] >= again["gflops"] else again["size"],
                by_size={n: max(peak["by_size"][n], again["by_size"][n]) for n in args.sizes},
                start_gflops=peak["gflops"], end_gflops=again["gflops"])
    load1 = os.getloadavg()
    r = dict(threads=args.threads, cores=os.cpu_count(), cpu=platform.processor() or platform.machine(),
             torch=torch.__version__, load_average_start=load0, load_average_end=load1,
             seconds=time.perf_counter() - t_all, peak=peak, model_shape_gflops=model_shape,
             stages=dict(pretrain=pre, **ft, **emb_stages),
             settings=dict(vars(args), json=str(args.json) if args.json else None, model=cfg.model_name,
                           pretrain_batch_size=cfg.pretrain_batch_size, ft_batch_size=cfg.ft_batch_size))
    for v in r["stages"].values():
        v["pct_of_peak"] = 100 * v["gflops"] / peak["gflops"]
    print()
    print(table(r))
    print()
    print(phase_table(r))
    print(f"\n{r['seconds']:.0f} s in all; load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the "
          f"end "
          f"(1 min; {os.cpu_count()} cores, other jobs share them when it is above about {args.threads})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1, default=str))
        print(f"wrote {args.json}")
    return r


if __name__ == "__main__":
    main()
