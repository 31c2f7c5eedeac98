"""Finetuning throughput: our PC-CLIP loop vs a reference-style loop, same model and data, one run.

    python bench/bench_finetune.py                          # CPU, the tiny world model
    python bench/bench_finetune.py --model ViT-L-14 --pairs 16384 --batch-size 512   # on a GPU, random weights

Our loop is `pc_clip.finetune.finetune` itself (text blocks trained on cached image embeddings, autocast on a GPU,
padding after the last end-of-text token trimmed, one host sync per step). The reference-style loop is what a
straightforward port of the paper's training script does: fp32 without autocast, full-context text forward,
several `.item()` syncs per step and `torch.cuda.empty_cache()` after every step. Both train the same parameters
(text transformer blocks) with Adam on the same triples. Throughput is measured on the second epoch (the first
warms up kernels and caches). Prints a table; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pc_clip.core import get_config, pick_device
from pc_clip.finetune import difference_contrastive_loss, finetune, set_trainable
from pc_clip.models import create_clip

# Peak dense bf16 tensor throughput (FLOP/s) of GPUs we may run on; MFU is reported against it for both loops.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


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
    costs 2 FLOPs per weight, the backward 4 (2 for the activation gradient, 2 for the weight gradient), so 6 *
    12 w^2 = 72 w^2. Attention scores and their weighted sum cost 4 L w per token forward and twice that
    backward: 12 L w. Embedding lookups, layer norms and the final projection of one pooled token are
    negligible. FLOPs per pair = layers * L * (72 w^2 + 12 L w), with L the tokens a text actually needs (up to
    its end-of-text token): padding is not useful work, so a loop that computes on padding shows a lower MFU.
    """
    w, layers = model.transformer.width, model.transformer.layers
    return layers * tokens * (72 * w * w + 12 * tokens * w)


def reference_loop(model, tokenizer, triples, emb, batch_size, lr, epochs, seed, device) -> list[float]:
    "A straightforward loop: fp32, full-length text forward, per-step .item() syncs and empty_cache. Returns per-epoch pairs/s."
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
            acc_item = (F.normalize(text.float(), dim=-1) * F.normalize(a - b, dim=-1)).sum(-1).gt(0).float().mean().item()
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pc-clip-tiny", help="open_clip architecture (random weights)")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="throughput is read from the last epoch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two loops this many times, keep each one's best")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    model, _, tokenizer = create_clip(args.model, None, device=device, seed=args.seed)
    d = model.text_projection.shape[-1]
    emb = F.normalize(torch.randn(args.images, d, generator=torch.Generator().manual_seed(args.seed)), dim=-1)
    triples = synthetic_triples(args.pairs, args.images, args.seed)
    cfg = get_config("tiny", seed=args.seed, device=str(device), precision=args.precision, ft_lr=1e-5,
                     ft_batch_size=args.batch_size, ft_epochs=args.epochs, ft_grad_accum=1)
    ids = tokenizer(list(triples["text"]))
    full_len = ids.shape[1]
    eot = ids.argmax(dim=-1) + 1
    # our loop computes each batch up to its longest text; the mean of those maxima is the tokens per text it processes
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + args.epochs - 1)
    batch_max = [int(eot[b].max()) for b in torch.randperm(len(triples), generator=g).split(args.batch_size)]
    useful_tokens = float(eot.float().mean())

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), model {args.model}, "
          f"text width {model.transformer.width} x {model.transformer.layers} layers, {len(triples)} pairs, batch "
          f"{args.batch_size}, context {full_len} tokens, mean tokens per text {useful_tokens:.1f} "
          f"(mean batch max {np.mean(batch_max):.1f})")

    ours = ref = 0.0
    for _ in range(args.repeats):  # alternating evens out a machine whose load changes during the run
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run = finetune(model, tokenizer, triples, cfg, Path(tmp) / "ours", image_embeddings=emb, progress=False)
            ours_wall = time.perf_counter() - t0
        ours = max(ours, float(run.epochs["pairs_per_s"].iloc[-1]))
        t0 = time.perf_counter()
        ref = max(ref, reference_loop(model, tokenizer, triples, emb, args.batch_size, 1e-5, args.epochs, args.seed, device)[-1])
        ref_wall = time.perf_counter() - t0

    flops = text_flops_per_pair(model, useful_tokens)
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows = []
    for name, rate, wall in (("ours (pc_clip.finetune)", ours, ours_wall), ("reference-style", ref, ref_wall)):
        tflops = rate * flops / 1e12
        mfu = f"{rate * flops / peak:.1%}" if peak else "n/a"
        rows.append(dict(loop=name, pairs_per_s=round(rate, 1), useful_TFLOP_s=round(tflops, 3), MFU_bf16=mfu,
                         wall_s=round(wall, 1)))
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if device.type == "cpu":  # wall-clock rates on a shared CPU move with the load of other processes
        print(f"CPU threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} over {os.cpu_count()} cores")
    print(f"speed-up: {ours / ref:.2f}x  (useful FLOPs per pair {flops / 1e9:.2f} GFLOP at {useful_tokens:.1f} tokens; "
          f"MFU against {'%.0f TFLOP/s bf16 peak' % (peak / 1e12) if peak else 'no known peak (CPU)'})")
    return table


if __name__ == "__main__":
    main()
