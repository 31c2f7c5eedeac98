"""Finetuning throughput, two comparisons on one machine in one run.

Old step vs new step (the default, `--compare fast`): `pc_clip.training.finetune`'s own loop with its fast
paths off (today's step, the `tiny` profile's) and on (fused causal attention, length buckets and the compiled
text tower; `--compile off` leaves it out), same model, data and seed. The two trainers take turns step by
step (old, new, then new, old, ...), each step timed on its own, so a change in the load of a shared machine
hits both alike; the first epoch of each warms up (and compiles) and is not timed. Prints pairs/s of each
(wall clock, and per CPU second of this process, which the load of other jobs moves less), the mean padded
length of a batch and the ratio new / old, per epoch and overall:

    python bench/bench_finetune.py                                   # CPU, the tiny world model
    # a GPU, random weights:
    python bench/bench_finetune.py --model ViT-L-14 --pairs 32768 --batch-size 512 --epochs 3

Ours vs a reference-style loop (`--compare reference`):

    python bench/bench_finetune.py --compare reference              # CPU, the tiny world model
    python bench/bench_finetune.py --compare reference --model ViT-L-14 --pairs 32768 --ref-pairs 8192 \\
        --batch-size 512

Our loop is `pc_clip.training.finetune.finetune` itself (text blocks trained on cached image embeddings,
autocast on a GPU, padding after the last end-of-text token trimmed, one host sync per step). The
reference-style loop is what a straightforward port of the paper's training script does: fp32 without
autocast, full-context text forward, tokenising every batch in the loop, several `.item()` syncs per step and
`torch.cuda.empty_cache()` after every step. Both train the same parameters (text transformer blocks) with
Adam on the same kind of triples (the reference may see fewer of them, `--ref-pairs`: a rate is a rate).
Throughput is read from the last epoch (the first warms up kernels and caches). MFU counts the useful FLOPs of
a pair (its tokens up to end-of-text, forward and backward of the trained blocks) against the card's dense
bf16 peak; `counted_flops_per_pair` measures what one of our steps really executes (padding included) with
`torch.utils.flop_counter.FlopCounterMode` as a cross-check. Prints a table; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hardware import peak_bf16
from pc_clip.core.devices import autocast, pick_device, pick_dtype
from pc_clip.core.config import get_config
from pc_clip.training.finetune import _batches, _prepare, _train_step, _trainer, finetune
from pc_clip.models.text import encode_text_trimmed
from pc_clip.training.losses import difference_contrastive_loss, set_trainable
from pc_clip.models.clip import create_clip
from pc_clip.training.state import FinetuneSettings

# the new step: what the GPU profiles switch on (`--compile off`, `--buckets 0`, `--no-fused` take parts away)
FAST = dict(fused_attention=True, length_buckets=16, compile="default")


def synthetic_triples(n_pairs: int, n_images: int, seed: int) -> pd.DataFrame:
    "Comparative statements of the length of real ones (about 10-25 tokens) about random image pairs."
    rng = np.random.default_rng(seed)
    words = ["larger", "smaller", "brighter", "darker", "redder", "bluer", "more", "fewer", "further left"]
    nouns = ["object", "animal", "glorp", "vantile", "shape", "bird", "flower", "car"]
    rows = []
    for _ in range(n_pairs):
        i, j = rng.choice(n_images, 2, replace=False)
        w, v, n = rng.choice(words), rng.choice(words), rng.choice(nouns)
        text = f"The first image has a {w} {n}"
        if rng.random() < 0.3:
            text += f", while the second image shows a {v} {rng.choice(nouns)} in the background"
        rows.append(dict(i=int(i), j=int(j), text=text))
    return pd.DataFrame(rows)


def text_flops_per_pair(model, tokens: float) -> float:
    """Training FLOPs per difference text when only the text blocks are trained.

    Per layer and token the matmuls hold 12 w^2 weights (qkv 3w^2, attention output w^2, MLP 8w^2); a forward
    costs 2 FLOPs per weight, the backward 4 (2 for the activation gradient, 2 for the weight gradient), so 6
    * 12 w^2 = 72 w^2. Attention scores and their weighted sum cost 4 L w per token forward and twice that
    backward: 12 L w. Embedding lookups, layer norms and the final projection of one pooled token are
    negligible. FLOPs per pair = layers * L * (72 w^2 + 12 L w), with L the tokens a text actually needs (up
    to its end-of-text token): padding is not useful work, so a loop that computes on padding shows a lower
    MFU.
    """
    w, layers = model.transformer.width, model.transformer.layers
    return layers * tokens * (72 * w * w + 12 * tokens * w)


def counted_flops_per_pair(model, tokenizer, triples: pd.DataFrame, emb: torch.Tensor, batch_size: int,
                           device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs one training step of our loop executes per pair (forward + backward, padding to the batch's
    longest text)."""
    from torch.utils.flop_counter import FlopCounterMode
    m = copy.deepcopy(model)
    set_trainable(m, "text_blocks")
    m.train()
    part = triples.iloc[:batch_size]
    ids = tokenizer(list(part["text"])).to(device)
    a = emb[torch.tensor(part["i"].to_numpy())].to(device)
    b = emb[torch.tensor(part["j"].to_numpy())].to(device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, dtype):
            text = encode_text_trimmed(m, ids)
        difference_contrastive_loss(text, a, b, 1.0).backward()
    del m
    return counter.get_total_flops() / len(part)


def reference_loop(model, tokenizer, triples, emb, batch_size, lr, epochs, seed, device) -> list[float]:
    """A straightforward loop: fp32, full-length text forward, per-step .item() syncs and empty_cache.
    Returns per-epoch pairs/s."""
    model = copy.deepcopy(model)
    set_trainable(model, "text_blocks")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    emb = emb.to(device)
    rates = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(triples), generator=g)
        t0, n = time.perf_counter(), 0
        for batch in order.split(batch_size):
            if len(batch) < 2:
                continue
            part = triples.iloc[batch.numpy()]
            ids = tokenizer(list(part["text"])).to(device)
            text = model.encode_text(ids)
            a, b = emb[torch.tensor(part["i"].to_numpy())], emb[torch.tensor(part["j"].to_numpy())]
            loss = difference_contrastive_loss(text, a, b, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses_item = loss.item()  # logged every step
            acc_item = (F.normalize(text.float(),
                                    dim=-1) * F.normalize(a - b, dim=-1)).sum(-1).gt(0).float().mean().item()
            if not np.isfinite(losses_item + acc_item):
                raise FloatingPointError("non-finite loss")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            n += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
        sched.step()
    return rates


def _scratch_dir(need_gb: float = 16) -> str | None:
    """RAM-backed scratch for the per-epoch checkpoints when it has room (they are GBs for ViT-L), else the
    default."""
    try:
        if os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > need_gb * 2**30:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _timed_finetune(model, tokenizer, triples, cfg, emb, dev, **fast) -> tuple[float, float]:
    """`(pairs/s of the last epoch, wall seconds)` of one `finetune` run into a scratch folder (checkpoints
    included)."""
    with tempfile.TemporaryDirectory(dir=_scratch_dir() if dev.type == "cuda" else None) as tmp:
        t0 = time.perf_counter()
        run = finetune(model, tokenizer, triples, FinetuneSettings.from_config(cfg, **fast),
                       Path(tmp) / "run", image_embeddings=emb, progress=False)
        wall = time.perf_counter() - t0
    rate = float(run.epochs["pairs_per_s"].iloc[-1])
    del run
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rate, wall


def measure_finetune(model_name: str = "pc-clip-tiny", pairs: int = 4096, ref_pairs: int | None = None,
                     images: int = 1024, batch_size: int = 256, epochs: int = 2, device: str = "auto",
                     precision: str = "auto", seed: int = 0, repeats: int = 1, count_flops: bool = True,
                     fast: dict | None = None, log=print) -> dict:
    """Pairs/s of `pc_clip.training.finetune.finetune` and of the reference-style loop, FLOPs per pair and
    MFU, as one dict; with `fast` (FinetuneSettings fields), also of `finetune` with those fast paths on
    (before / after, one card)."""
    dev = pick_device(device)
    model, _, tokenizer = create_clip(model_name, None, device=dev, seed=seed)
    d = model.text_projection.shape[-1]
    emb = F.normalize(torch.randn(images, d, generator=torch.Generator().manual_seed(seed)), dim=-1)
    triples = synthetic_triples(pairs, images, seed)
    ref_triples = triples.iloc[:ref_pairs] if ref_pairs else triples
    cfg = get_config("tiny", seed=seed, device=str(dev), precision=precision, ft_lr=1e-5,
                     ft_batch_size=batch_size, ft_epochs=epochs, ft_grad_accum=1)
    ids = tokenizer(list(triples["text"]))
    eot = ids.argmax(dim=-1) + 1
    g = torch.Generator().manual_seed(seed * 1_000_003 + epochs - 1)
    batch_max = [int(eot[b].max()) for b in torch.randperm(len(triples), generator=g).split(batch_size)]
    useful_tokens = float(eot.float().mean())
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"device {dev} ({card}), model {model_name}, text width {model.transformer.width} x "
        f"{model.transformer.layers} layers, {len(triples)} pairs (reference {len(ref_triples)}), batch "
        f"{batch_size}, "
        f"context {ids.shape[1]} tokens, mean tokens per text {useful_tokens:.1f} (mean batch max "
        f"{np.mean(batch_max):.1f})")

    ours = ref = fast_rate = 0.0
    ours_wall = ref_wall = fast_wall = 0.0
    for _ in range(repeats):  # alternating evens out a machine whose load changes during the run
        rate, ours_wall = _timed_finetune(model, tokenizer, triples, cfg, emb, dev)
        ours = max(ours, rate)
        log(f"ours: {ours:.1f} pairs/s ({ours_wall:.1f} s wall, checkpoints included)")
        if fast:
            rate, fast_wall = _timed_finetune(model, tokenizer, triples, cfg, emb, dev, **fast)
            fast_rate = max(fast_rate, rate)
            log(f"ours with fast paths {fast}: {fast_rate:.1f} pairs/s ({fast_wall:.1f} s wall, compiling "
                f"and checkpoints included)")
        t0 = time.perf_counter()
        ref = max(ref,
                  reference_loop(model, tokenizer, ref_triples, emb, batch_size, 1e-5, epochs, seed, dev)[-1])
        ref_wall = time.perf_counter() - t0
        log(f"reference-style: {ref:.1f} pairs/s ({ref_wall:.1f} s wall)")

    flops = text_flops_per_pair(model, useful_tokens)
    counted = None
    if count_flops:  # a cross-check only: its failure must not lose the measured rates
        try:
            counted = counted_flops_per_pair(model, tokenizer, triples, emb, batch_size, dev,
                                             pick_dtype(precision, dev))
        except Exception as e:
            log(f"FlopCounterMode failed ({type(e).__name__}: {e}); reporting the analytic FLOPs only")
    peak, peak_key = peak_bf16(card) if dev.type == "cuda" else (None, "")
    return dict(card=card, model=model_name, batch_size=batch_size, pairs=len(triples),
                ref_pairs=len(ref_triples),
                epochs=epochs, text_width=model.transformer.width, text_layers=model.transformer.layers,
                trained_params=sum(p.numel() for n, p in model.named_parameters() if ".resblocks." in f".{n}"
                                   and not n.startswith("visual.")),
                useful_tokens=useful_tokens, mean_batch_max_tokens=float(np.mean(batch_max)),
                context=int(ids.shape[1]), ours_pairs_per_s=ours, ref_pairs_per_s=ref, speedup=ours / ref,
                ours_wall_s=ours_wall, ref_wall_s=ref_wall, useful_flops_per_pair=flops,
                counted_flops_per_pair=counted, peak_flops=peak, peak_key=peak_key,
                ours_mfu=ours * flops / peak if peak else None, ref_mfu=ref * flops / peak if peak else None,
                ours_counted_tflops=ours * counted / 1e12 if counted else None,
                **(dict(fast=fast, fast_pairs_per_s=fast_rate, fast_wall_s=fast_wall,
                        fast_speedup=fast_rate / ours, fast_mfu=fast_rate * flops / peak if peak else None,
                        fast_mean_batch_max_tokens=_mean_padded(ids, triples, batch_size, epochs, seed, fast))
                   if fast else {}))


def _mean_padded(ids: torch.Tensor, triples: pd.DataFrame, batch_size: int, epochs: int, seed: int,
                 fast: dict | None) -> float:
    "Mean padded length of a batch in the last epoch, with or without the fast paths' length buckets."
    s = FinetuneSettings(batch_size=batch_size, seed=seed,
                         length_buckets=(fast or {}).get("length_buckets", 0))
    eot = ids.argmax(dim=-1)
    return float(np.mean([int(eot[b].max()) + 1 for b in _batches(len(triples), s, epochs - 1, 1, eot)]))


def measure_fast_paths(model_name: str = "pc-clip-tiny", pairs: int = 4096, images: int = 1024,
                       batch_size: int = 256,
                       epochs: int = 3, device: str = "auto", precision: str = "auto", seed: int = 0,
                       fast: dict | None = None, log=print) -> dict:
    """Old step (fast paths off) vs new step (`fast`, default `FAST`) of `pc_clip.training.finetune`'s loop in
    one process: two trainers on the same model and data take turns step by step (`_train_step`, the loop's
    own optimizer step), each step timed on its own; the first epoch of each warms up (and compiles) and is
    not timed."""
    fast = dict(FAST if fast is None else fast)
    dev = pick_device(device)
    model, _, tokenizer = create_clip(model_name, None, device=dev, seed=seed)
    emb = F.normalize(torch.randn(images, model.text_projection.shape[-1],
                                  generator=torch.Generator().manual_seed(seed)), dim=-1)
    triples = synthetic_triples(pairs, images, seed)
    cfg = get_config("tiny", seed=seed, device=str(dev), precision=precision, ft_lr=1e-5,
                     ft_batch_size=batch_size, ft_epochs=epochs, ft_grad_accum=1, ft_max_pairs=None)
    runs = {}
    for name, s in (("old", FinetuneSettings.from_config(cfg)),
                    ("new", FinetuneSettings.from_config(cfg, **fast))):
        data = _prepare(model, tokenizer, triples, s, emb, None, False, 1)
        tr = _trainer(model, data, s, 0, 1)
        tr.model.train()
        runs[name] = (tr, data, s)
    log(f"device {dev}, model {model_name} (text {model.transformer.width} wide x {model.transformer.layers} "
        f"layers), {len(triples)} pairs, batch {batch_size}, {epochs} epochs each, steps interleaved; "
        f"new step: {fast}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    seconds = {k: [0.0] * epochs for k in runs}
    # CPU seconds of this process: what a step costs, whatever the load
    cpu = {k: [0.0] * epochs for k in runs}
    n_pairs = {k: [0] * epochs for k in runs}
    losses = {k: [] for k in runs}
    for epoch in range(epochs):
        order = {k: _batches(d.n, s, epoch, 1, d.pool_pos) for k, (_, d, s) in runs.items()}
        for step, pair in enumerate(zip(order["old"], order["new"])):
            turns = (("old", pair[0]), ("new", pair[1]))
            for name, batch in turns if step % 2 == 0 else turns[::-1]:  # who goes first alternates
                tr = runs[name][0]
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                loss, _ = _train_step(tr, [batch])
                sync()
                seconds[name][epoch] += time.perf_counter() - t0
                cpu[name][epoch] += time.process_time() - c0
                n_pairs[name][epoch] += len(batch)
                losses[name].append(loss)
        for tr, _, _ in runs.values():
            tr.sched.step()
        log(f"epoch {epoch + 1}: old {n_pairs['old'][epoch] / seconds['old'][epoch]:.1f} pairs/s "
            f"({seconds['old'][epoch]:.1f} s), new {n_pairs['new'][epoch] / seconds['new'][epoch]:.1f} "
            f"pairs/s "
            f"({seconds['new'][epoch]:.1f} s){' (warm-up, not timed)' if epoch == 0 and epochs > 1 else ''}")
    timed = slice(1, None) if epochs > 1 else slice(None)
    rate = {k: sum(n_pairs[k][timed]) / sum(seconds[k][timed]) for k in runs}
    cpu_rate = {k: sum(n_pairs[k][timed]) / sum(cpu[k][timed]) for k in runs}
    per_epoch = [(n_pairs["new"][e] / seconds["new"][e]) / (n_pairs["old"][e] / seconds["old"][e])
                 for e in range(epochs)][timed]
    ids = runs["old"][1].ids.cpu()
    return dict(card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", model=model_name,
                batch_size=batch_size, pairs=len(triples), epochs=epochs, timed_epochs=len(per_epoch),
                fast=fast,
                old_pairs_per_s=rate["old"], new_pairs_per_s=rate["new"], ratio=rate["new"] / rate["old"],
                ratio_per_epoch=per_epoch, useful_tokens=float(ids.argmax(-1).float().mean()) + 1,
                old_mean_batch_max_tokens=_mean_padded(ids, triples, batch_size, epochs, seed, None),
                new_mean_batch_max_tokens=_mean_padded(ids, triples, batch_size, epochs, seed, fast),
                old_pairs_per_cpu_s=cpu_rate["old"], new_pairs_per_cpu_s=cpu_rate["new"],
                cpu_ratio=cpu_rate["new"] / cpu_rate["old"],
                final_loss={k: float(np.mean(v[-len(order[k]):])) for k, v in losses.items()},
                first_epoch_s={k: seconds[k][0] for k in runs}, threads=torch.get_num_threads())


def finetune_table(r: dict) -> pd.DataFrame:
    "One row per loop: pairs/s, useful TFLOP/s, MFU and wall seconds."
    rows = []
    for name, key in (("ours (pc_clip.training.finetune)", "ours"), ("reference-style", "ref")):
        rate = r[f"{key}_pairs_per_s"]
        mfu = r[f"{key}_mfu"]
        rows.append(dict(loop=name, pairs_per_s=round(rate, 1),
                         useful_TFLOP_s=round(rate * r["useful_flops_per_pair"] / 1e12, 3),
                         MFU_bf16="n/a" if mfu is None else f"{mfu:.1%}",
                         wall_s=round(r[f"{key}_wall_s"], 1)))
    return pd.DataFrame(rows)


def fast_table(r: dict) -> pd.DataFrame:
    """One row per step: pairs/s over the timed epochs, mean padded batch length, and the ratio to the old
    step."""
    return pd.DataFrame([
        dict(step="old (fast paths off)", pairs_per_s=round(r["old_pairs_per_s"], 1),
             pairs_per_cpu_s=round(r["old_pairs_per_cpu_s"], 1),
             padded_tokens=round(r["old_mean_batch_max_tokens"], 1),
             ratio="1.00x", cpu_ratio="1.00x"),
        dict(step="new (" + ", ".join(f"{k}={v}" for k, v in r["fast"].items()) + ")",
             pairs_per_s=round(r["new_pairs_per_s"], 1), pairs_per_cpu_s=round(r["new_pairs_per_cpu_s"], 1),
             padded_tokens=round(r["new_mean_batch_max_tokens"], 1), ratio=f"{r['ratio']:.2f}x",
             cpu_ratio=f"{r['cpu_ratio']:.2f}x")])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=["fast", "reference"], default="fast",
                    help="fast: old vs new step of pc_clip.training.finetune (default); reference: ours vs a "
                         "reference-style loop")
    ap.add_argument("--model", default="pc-clip-tiny", help="open_clip architecture (random weights)")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--ref-pairs", type=int, default=None,
                    help="pairs for the reference loop (default: --pairs)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per loop (default 3 for --compare fast, 2 for reference); the first is not "
                         "timed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="reference: alternate the two loops this many times, keep each one's best")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-fused", action="store_true", help="new step without fused attention")
    ap.add_argument("--buckets", type=int, default=FAST["length_buckets"],
                    help="new step: length_buckets (0: off)")
    ap.add_argument("--compile", default=FAST["compile"],
                    help="new step: torch.compile mode of the text tower (off, default, ...)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fast = dict(fused_attention=not args.no_fused, length_buckets=args.buckets, compile=args.compile)
    load = (f"CPU threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
            f"over {os.cpu_count()} cores")
    if args.compare == "fast":
        r = measure_fast_paths(args.model, args.pairs, args.images, args.batch_size, args.epochs or 3,
                               args.device, args.precision, args.seed, fast)
        table = fast_table(r)
        print(table.to_string(index=False))
        if r["card"] == "cpu":
            print(f"{load} at the end (other jobs share this machine: the two steps took turns step by step)")
        print(f"new / old: {r['ratio']:.2f}x over {r['timed_epochs']} timed epochs each (per epoch: "
              + ", ".join(f"{x:.2f}x" for x in r["ratio_per_epoch"]) + f"); texts average "
                                                                       f"{r['useful_tokens']:.1f} tokens; "
              f"first (untimed) epoch {r['first_epoch_s']['old']:.1f} s old, {r['first_epoch_s']['new']:.1f} "
              f"s new (compiling included)")
        return table
    r = measure_finetune(args.model, args.pairs, args.ref_pairs, args.images, args.batch_size,
                         args.epochs or 2, args.device, args.precision, args.seed, args.repeats)
    table = finetune_table(r)
    print(table.to_string(index=False))
    if r["card"] == "cpu":  # wall-clock rates on a shared CPU move with the load of other processes
        print(load)
    peak = (f"{r['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 ({r['peak_key']})" if r["peak_flops"]
            else "no known peak (CPU)")
    print(f"speed-up: {r['speedup']:.2f}x  (useful FLOPs per pair {r['useful_flops_per_pair'] / 1e9:.2f} "
          f"GFLOP at "
          f"{r['useful_tokens']:.1f} tokens; counted per pair "
          f"{(r['counted_flops_per_pair'] or float('nan')) / 1e9:.2f} GFLOP; MFU against {peak})")
    return table


if __name__ == "__main__":
    main()
