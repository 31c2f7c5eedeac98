"""The tiny world text-to-image generator: pixel measurement, arithmetic conditioning, training, caching."""
import numpy as np
import pandas as pd
import pytest
import torch

from pc_clip.core.config import get_config
from pc_clip.models.clip import create_clip
from pc_clip.smoke.fixtures import temp_workdir
from pc_clip.world.species import CATEGORIES, CATEGORY_NAMES, typical_attrs
from pc_clip.world.render import COLOURS, render_images
from pc_clip.world.shapes import World
from pc_clip.world.edits import WORLD_EDITS, edit_success, measure_generated
from pc_clip.t2i.world_diffusion import (GeneratorSettings, _schedulers, arithmetic_conditioning, denoising_loss,
    text_conditioning, to_patches, train_generator, train_or_load_generator)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip():
    model, _, tokenizer = create_clip(seed=0)
    return model, tokenizer


def _rows(n, seed=0):
    "Single-object images of every shape with random size, brightness, hue and position."
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = CATEGORY_NAMES[i % len(CATEGORY_NAMES)]
        r = float(rng.uniform(4, 10))
        cx = float(rng.uniform(r + 1, 31 - r))
        rows.append(dict(typical_attrs(c), shape=CATEGORIES["shape"][c], radius=r, brightness=float(rng.uniform(0.45, 1.0)),
                         hue=float(rng.uniform(0, 360)), saturation=0.85, background="stone", x=cx / 32, cx0=cx,
                         cy0=16.0, cx1=np.nan, cy1=np.nan, cx2=np.nan, cy2=np.nan, count=1, n_distractors=0,
                         split="train"))
    return pd.DataFrame(rows)


def test_measurer_recovers_rendered_attributes():
    attrs = _rows(64)
    m = measure_generated(render_images(attrs, 32, seed=0))
    assert m["area"].min() > 0
    by_shape = attrs.assign(area=m["area"]).groupby("shape")
    assert all(np.corrcoef(g["radius"], g["area"])[0, 1] > 0.9 for _, g in by_shape)  # larger radius -> larger area
    assert np.corrcoef(attrs["brightness"], m["value"])[0, 1] > 0.95  # brighter -> higher HSV value
    assert np.abs(m["x"] - attrs["x"]).max() < 0.08  # centroid -> position
    hue_err = np.abs((m["hue"] - attrs["hue"] + 180) % 360 - 180)
    assert np.median(hue_err) < 8


def test_edit_success_needs_the_stated_direction():
    ref = measure_generated(render_images(_rows(1).assign(radius=5.0), 32))
    big = measure_generated(render_images(_rows(1).assign(radius=8.0), 32))
    larger, smaller = WORLD_EDITS[0], WORLD_EDITS[1]
    assert edit_success(ref, big, larger).tolist() == [True]
    assert edit_success(ref, big, smaller).tolist() == [False]
    assert edit_success(ref, ref, larger).tolist() == [False]  # no change is no success


def test_arithmetic_conditioning_is_class_plus_weighted_difference(clip):
    model, tok = clip
    c, d, e = (text_conditioning(model, tok, [t]) for t in ("a photo of a mib", "The first mib is brighter.", ""))
    for w in (0.0, 1.0, 3.0):
        s, p = arithmetic_conditioning(c, d, e, w)
        torch.testing.assert_close(s, c[0] + w * (d[0] - e[0]))
        torch.testing.assert_close(p, c[1] + w * (d[1] - e[1]))
    assert not torch.allclose(arithmetic_conditioning(c, d, e, 1.0)[0], c[0])


def test_training_reduces_the_denoising_loss(clip):
    model, tok = clip
    attrs = _rows(4)
    images = render_images(attrs, 32, seed=0)
    cond = text_conditioning(model, tok, [f"a photo of a {c}" for c in attrs["category"]])
    settings = GeneratorSettings(steps=40, batch_size=4, lr=3e-3, warmup=5, ema_decay=0.9)
    ddpm, _ = _schedulers(settings)

    def loss(unet):
        with torch.no_grad():
            return np.mean([denoising_loss(unet, ddpm, to_patches(images, 4), *cond,
                                           torch.Generator().manual_seed(k)).item() for k in range(8)])

    from pc_clip.t2i.world_diffusion import make_unet
    before = loss(make_unet(settings, 32, 96, 96))
    unet, losses = train_generator(images, lambda idx, rng: tuple(t[idx] for t in cond), settings,
                                   text_conditioning(model, tok, [""]), progress=False)
    assert len(losses) == 40
    assert loss(unet) < 0.9 * before


def test_generator_cache_is_reused(clip):
    model, tok = clip
    attrs = _rows(8)
    world = World(render_images(attrs, 32, seed=0), attrs, [""] * len(attrs), 0, "test-world")
    settings = GeneratorSettings(steps=2, batch_size=2)
    with temp_workdir():
        cfg = get_config("tiny")
        first, info1 = train_or_load_generator(cfg, world, model, tok, settings, progress=False)
        second, info2 = train_or_load_generator(cfg, world, model, tok, settings, progress=False)
        assert (info1["reused"], info2["reused"]) == (False, True)
        assert info1["key"] == info2["key"]
        for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
        _, info3 = train_or_load_generator(cfg, world, model, tok, GeneratorSettings(steps=3, batch_size=2),
                                           progress=False)
        assert info3["reused"] is False and info3["key"] != info1["key"]
