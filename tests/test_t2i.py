"""Tests of `pc_clip.t2i`: the SDXL text-encoder swap, embedding arithmetic, the T2I study and the world's
tiny diffusion model."""
import numpy as np
import pandas as pd
import pytest
import torch

from pc_clip.t2i import sdxl as T, study as S
from pc_clip.core.config import get_config
from pc_clip.models.clip import create_clip, save_checkpoint
from pc_clip.smoke.fixtures import temp_workdir, tiny_sdxl_pipeline
from pc_clip.world.species import CATEGORIES, CATEGORY_NAMES, typical_attrs
from pc_clip.world.render import render_images
from pc_clip.world.shapes import World
from pc_clip.world.edits import WORLD_EDITS, edit_success, measure_generated
from pc_clip.t2i.world_diffusion import (GeneratorSettings, _schedulers, arithmetic_conditioning,
    denoising_loss, text_conditioning, to_patches, train_generator, train_or_load_generator)
from pc_clip.core.registry import model_dir
from pc_clip.core.run import cache_dir, data_root


# ---- Text-to-image with embedding arithmetic: the open_clip -> Hugging Face text-tower conversion, a tiny

@pytest.fixture(scope="module")
def tiny_clip():
    return create_clip("pc-clip-tiny", seed=0)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


def test_clip_tokenizer_matches_open_clip(tiny_clip):
    _, _, oc_tok = tiny_clip
    tok = T.clip_tokenizer(32)
    for text in ["a photo of a glorp", "The second photo has a brighter glorp than the first photo.",
                 "two mibs, in water!"]:
        ids = tok(text).input_ids
        assert ids == oc_tok([text])[0, :len(ids)].tolist()


def test_text_tower_conversion_is_exact(tiny_clip):
    model, _, oc_tok = tiny_clip
    hf = T.open_clip_text_to_hf(model)
    ids = oc_tok(["a small red glorp on grass", "Relative to image two, image one shows a larger thing."])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).text_embeds, model.encode_text(ids), atol=1e-4, rtol=1e-4)
    assert T.hf_text_config(model).max_position_embeddings == 32


def test_quick_gelu_towers_convert_with_their_activation():
    import open_clip
    model = open_clip.create_model("pc-clip-tiny", force_quick_gelu=True)
    assert T.hf_text_config(model).hidden_act == "quick_gelu"
    ids = open_clip.get_tokenizer("pc-clip-tiny")(["a dark vantile"])
    with torch.no_grad():
        torch.testing.assert_close(T.open_clip_text_to_hf(model)(ids).text_embeds, model.encode_text(ids),
                                   atol=1e-4, rtol=1e-4)


def test_arithmetic_conditioning_reaches_the_unet(pipe, tiny_clip):
    T.swap_text_encoder(pipe, tiny_clip[0])
    classes = ["a photo of a glorp", "a photo of a mib"]
    diffs = ["The first one is larger.", "The first image is snowier."]
    e, p = T.arithmetic_conditioning(pipe, classes, diffs, weight=0.7)
    e_c, p_c = T.encode_sdxl_prompts(pipe, classes)
    e_d, p_d = T.encode_sdxl_prompts(pipe, diffs)
    e_0, p_0 = T.encode_sdxl_prompts(pipe, [""])
    torch.testing.assert_close(e, e_c + 0.7 * (e_d - e_0))
    torch.testing.assert_close(p, p_c + 0.7 * (p_d - p_0))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"].clone(),
                                      kw["added_cond_kwargs"]["text_embeds"].clone())) and None,
        with_kwargs=True)
    try:
        images = T.generate_images(pipe, e, p, steps=2, size=64, guidance_scale=1.0, batch_size=2,
                                   progress=False)
        assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
        assert len(seen) == 2  # one UNet call per step
        assert all(torch.equal(h, e) and torch.equal(t, p) for h, t in seen)
        seen.clear()
        T.generate_images(pipe, e, p, steps=2, size=64, guidance_scale=5.0, batch_size=2, progress=False)
        # [unconditional, conditional]
        assert torch.equal(seen[0][0][2:], e) and torch.equal(seen[0][1][2:], p)
    finally:
        hook.remove()
    one = T.generate_images(pipe, e[1:], p[1:], steps=2, size=64, seed=1, progress=False)
    both = T.generate_images(pipe, e, p, steps=2, size=64, seed=0, batch_size=2, progress=False)
    # image i is seeded seed + i whatever the batching (up to float rounding of a batched forward pass)
    assert np.abs(one[0].astype(int) - both[1].astype(int)).max() <= 2


def test_swapped_tower_is_the_finetuned_one(tiny_clip):
    pipe = tiny_sdxl_pipeline(seed=1)
    before, _ = T.encode_sdxl_prompts(pipe, ["a photo of a glorp"])
    T.swap_text_encoder(pipe, tiny_clip[0], "auto")
    after, _ = T.encode_sdxl_prompts(pipe, ["a photo of a glorp"])
    w = pipe.text_encoder.config.hidden_size
    assert w == T.hf_text_config(tiny_clip[0]).hidden_size
    assert not torch.allclose(before[..., :w], after[..., :w])  # text_encoder part changed
    torch.testing.assert_close(before[..., w:], after[..., w:])  # text_encoder_2 part did not
    with pytest.raises(ValueError, match="refusing to put this text tower into SDXL's text_encoder_2"):
        T.swap_text_encoder(pipe, tiny_clip[0], "text_encoder_2")


def test_a_tower_of_another_origin_is_refused(tiny_clip):
    """SDXL's first encoder is OpenAI's (QuickGELU); a same-width GELU tower (e.g. datacomp_xl) is refused,
    not warned about."""
    import open_clip
    openai_like = tiny_sdxl_pipeline(quick_gelu=True, seed=0)
    before = openai_like.text_encoder
    with pytest.raises(ValueError, match="hidden_act: tower 'gelu' vs encoder 'quick_gelu'.*ViT-L-14 "
                                         "\\(pretrained='openai'\\)"):
        T.swap_text_encoder(openai_like, tiny_clip[0])
    assert openai_like.text_encoder is before  # nothing was swapped
    T.swap_text_encoder(openai_like, open_clip.create_model("pc-clip-tiny", force_quick_gelu=True))
    assert openai_like.text_encoder is not before


def test_tiny_sdxl_first_encoder_matches_its_base(tiny_clip):
    pipe = tiny_sdxl_pipeline()
    assert T.tower_mismatches(pipe.text_encoder, tiny_clip[0]) == {}
    assert T.matching_slot(pipe, tiny_clip[0]) == "text_encoder"


def test_clip_score_uses_the_evaluator_pairwise(tiny_clip):
    model, pre, tok = tiny_clip
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s = T.clip_scores(model, tok, imgs, ["a", "b", "c"], pre)
    assert s.shape == (3,) and (s.abs() <= 1).all()
    with pytest.raises(ValueError, match="pairwise"):
        T.clip_scores(model, tok, imgs, ["a"])


def test_sdxl_missing_weights_is_a_clear_error():
    with temp_workdir(data=True), pytest.raises(FileNotFoundError,
                                                match="hf download stabilityai/stable-diffusion-xl-base-1.0"):
        T.load_sdxl(get_config("paper").t2i_model, data_root(get_config("paper")), "cpu")


def test_t2i_study_base_and_paper_h14_not_applicable():
    assert S.t2i_base(get_config("paper")) == ("ViT-L-14", "openai")
    assert S.t2i_not_applicable(get_config("paper")) is None
    assert S.t2i_not_applicable(get_config("tiny")) is None
    h14 = get_config("paper-h14")
    if S.t2i_base(h14) is None:  # the default (Config.t2i_clip_model may set otherwise)
        msg = S.t2i_not_applicable(h14)
        assert "not applicable to profile 'paper-h14'" in msg and "1024 wide" in msg
        with pytest.raises(ValueError, match="not applicable"):
            S.run_t2i_arithmetic(h14, ["clip", "pc-clip"])


def test_sdxl_study_on_a_saved_stand_in(tiny_clip):
    """The paper path end to end: SDXL from <data root>/weights/<t2i_model>/, the study's two arms, rows with
    their base."""
    with temp_workdir(data=True) as d:
        cfg = get_config("tiny", corpus="coco", t2i_steps=1, t2i_image_size=64)
        tiny_sdxl_pipeline().save_pretrained(d / "data" / "weights" / cfg.t2i_model)
        save_checkpoint(tiny_clip[0], model_dir(cfg, "clip"), "pc-clip-tiny")  # the evaluator
        base = ("pc-clip-tiny", None)
        rows, shown = S._sdxl_study(cfg, ["clip", "pc-clip"], 1.0, 1, False, base=base)
        assert {r["model"] for r in rows} == {"clip"}  # the study's pc-clip is not trained yet
        save_checkpoint(tiny_clip[0], model_dir(cfg, S.T2I_PC_CLIP), "pc-clip-tiny")
        rows, shown = S._sdxl_study(cfg, ["clip", "pc-clip", "pc-clip/mse"], 1.0, 1, False, base=base)
    df = pd.DataFrame(rows)
    assert sorted(set(df.model)) == ["clip", "pc-clip"] and set(df.condition) == {"base=pc-clip-tiny"}
    assert set(df.metric) == {"clip_score", "clip_score_class_only"} and df.value.between(-1, 1).all()
    assert shown["pc-clip"].shape == (len(T.T2I_EDITS), 64, 64, 3)


def test_gallery_is_every_combination_and_statements_are_true():
    from pc_clip.world.oracle import difference_direction
    images, gal = S.attribute_gallery(categories=["glorp", "mib"])
    assert images.shape == (2 * 3 * 3 * 3 * 6, 32, 32, 3)
    rng = np.random.default_rng(0)
    for e in S.GALLERY_EDITS:
        first, second = S._edit_attrs("mib", e, e.target), S._edit_attrs("mib", e, e.source)
        assert difference_direction(first, second, e.attribute) is not None
        assert len(S.gallery_edit_statements("mib", e, 3, rng, "heldout")) == 3


def test_gallery_arithmetic_known_answer():
    _, gal = S.attribute_gallery(categories=["glorp", "mib", "skiv"])
    cats, levels = ["glorp", "mib", "skiv"], ["size_level", "brightness_level", "position_level"]
    bgs = sorted(gal.background.unique())
    by_name = {e.name: e for e in S.GALLERY_EDITS}

    def encode(texts):
        out = torch.zeros(len(texts), 3 + 3 + len(bgs))
        for i, t in enumerate(texts):
            if "|" in t:
                e = by_name[t.split("|")[0]]
                if e.column == "background":
                    out[i, 6 + bgs.index(e.target)] = 1
                else:
                    out[i, 3 + levels.index(e.column)] = 1 if e.target == 2 else -1
            else:  # a class prompt or an intended description: its species
                out[i, next(cats.index(w) for w in t.split() if w in cats)] = 1
        return torch.nn.functional.normalize(out, dim=-1)

    img = torch.zeros(len(gal), 6 + len(bgs))
    img[torch.arange(len(gal)), torch.as_tensor([cats.index(c) for c in gal.category])] = 3
    for k, col in enumerate(levels):
        img[:, 3 + k] = torch.as_tensor(gal[col].to_numpy() - 1.0, dtype=torch.float32)
    img[torch.arange(len(gal)), 6 + torch.as_tensor([bgs.index(b) for b in gal.background])] = 1
    img += 0.01 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    rows = S.gallery_arithmetic_rows(img, gal, encode, "toy", n_texts=1, sweep=(0.0,),
                                     statements=lambda c, e, n, rng, w: [f"{e.name}|{c}"] * n,
                                     eval_image_emb=torch.nn.functional.normalize(img, dim=-1),
                                     eval_encode_text=encode)
    assert {r["dataset"] for r in rows} == {"world-gallery"}  # settings go to `condition`, not into the name
    v = {(r["condition"], r["metric"]): r["value"] for r in rows}
    assert v[("", "success_rate")] == 1.0 == v[("", "species_accuracy")]
    assert v[("", "success_rate_whole_gallery")] == 1.0
    assert v[("", "success_rate_class_only")] == v[("w=0", "success_rate")] < 0.5
    # the species is the generator's part: a query whose species axis is wrong still only looks at that
    # species
    wrong = S.gallery_arithmetic_rows(img, gal,
                                      lambda t: encode([x if "|" in x else "a photo of a skiv" for x in t]),
                                      "toy", n_texts=1, statements=lambda c, e, n, rng,
                                      w: [f"{e.name}|{c}"] * n)
    w = {(r["condition"], r["metric"]): r["value"] for r in wrong}
    assert w[("", "success_rate")] == 1.0 and w[("", "species_accuracy")] == pytest.approx(1 / 3)
    assert all(v[(f"edit={e.name}", "success_rate")] == 1.0 for e in S.GALLERY_EDITS)
    assert -1 <= v[("", "clip_score")] <= 1
    with pytest.raises(ValueError, match="gallery of"):
        S.gallery_arithmetic_rows(img[:-1], gal, encode, "toy")


def test_run_t2i_arithmetic_on_stand_in_models(runs_dir, tiny_clip, capsys):
    cfg = get_config("tiny", world_n_train=100, world_n_test=50)
    for name in ("clip", "pc-clip"):
        save_checkpoint(tiny_clip[0], model_dir(cfg, name), "pc-clip-tiny")
    rows, shown = S.run_t2i_arithmetic(cfg, ["clip", "pc-clip", "pc-clip/mse"], n_texts=1,
                                       categories=["glorp", "mib", "skiv"], progress=False)
    assert "skipping model pc-clip/mse" in capsys.readouterr().out
    df = pd.DataFrame(rows)
    main = df[df.condition == ""].pivot_table(index="model", columns="metric", values="value")
    assert list(main.index) == ["clip", "pc-clip"]
    assert (main.loc["clip"] == main.loc["pc-clip"]).all()  # same weights, same numbers
    assert shown["gallery"].shape[0] == 3 * 162
    assert shown["chance"] == pytest.approx((6 / 3 + 2 / 6) / 8)


def test_finetuned_quick_gelu_tower_reloads_as_quick_gelu_and_swaps_into_sdxl(tmp_path):
    """An OpenAI-tag tower (QuickGELU) finetuned, saved and reloaded is still QuickGELU, so it fits SDXL's
    first encoder."""
    import open_clip
    from pc_clip.training.finetune import finetune
    from pc_clip.training.state import FinetuneSettings
    from pc_clip.models.clip import load_checkpoint
    torch.manual_seed(0)
    model = open_clip.create_model("pc-clip-tiny", force_quick_gelu=True)  # what loading an `openai` tag does
    tok = open_clip.get_tokenizer("pc-clip-tiny")
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(8, model.text_projection.shape[1])),
                                                     dtype=torch.float32), dim=-1)
    words = ["larger", "smaller", "brighter", "darker"]
    triples = pd.DataFrame([dict(i=i, j=j, text=f"the first object is {words[(i + j) % 4]}")
                            for i in range(8) for j in range(8) if i != j])
    cfg = get_config("tiny", ft_epochs=1, ft_batch_size=16, ft_lr=1e-3)
    run = finetune(model, tok, triples, FinetuneSettings.from_config(cfg, model_name="pc-clip-tiny"),
                   tmp_path / "ft", image_embeddings=emb, progress=False)
    reloaded, _, _ = load_checkpoint(tmp_path / "ft")
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in reloaded.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in reloaded.modules())
    ids = tok(["a dark vantile", "The first image shows a larger glorp."])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_text(ids), run.model.encode_text(ids), atol=0, rtol=0)
        assert not torch.allclose(reloaded.encode_text(ids), model.encode_text(ids))  # it was finetuned
    openai_like = tiny_sdxl_pipeline(quick_gelu=True, seed=0)
    T.swap_text_encoder(openai_like, reloaded)  # refused if the reload had turned it into GELU
    assert openai_like.text_encoder.config.hidden_act == "quick_gelu"
    with torch.no_grad():
        pooled = openai_like.text_encoder(ids).pooler_output  # the end-of-text state, before the projection
        torch.testing.assert_close(pooled @ reloaded.text_projection, reloaded.encode_text(ids), atol=1e-4,
                                   rtol=1e-4)


def test_sdxl_study_decides_the_t2i_claim_from_per_prompt_items(tiny_clip, runs_dir):
    """The SDXL arm's CLIP scores come with one item per prompt and generation seed, so the paper's T2I claim
    is decided."""
    from pc_clip.evaluation.runner import read_items, write_evaluation
    from pc_clip.report.claims import PAPER_CLAIMS, claim_verdicts
    with temp_workdir(data=True) as d:
        cfg = get_config("tiny", corpus="coco", t2i_steps=1, t2i_image_size=64)
        tiny_sdxl_pipeline().save_pretrained(d / "data" / "weights" / cfg.t2i_model)
        other = create_clip("pc-clip-tiny", seed=1)[0]  # a tower of the same architecture with other weights
        save_checkpoint(tiny_clip[0], model_dir(cfg, "clip"), "pc-clip-tiny")
        save_checkpoint(other, model_dir(cfg, S.T2I_PC_CLIP), "pc-clip-tiny")
        rows, _ = S._sdxl_study(cfg, ["clip", "pc-clip"], 1.0, 2, False, base=("pc-clip-tiny", None))
        for r in rows:
            assert len(r["items"]) == r["n"] == 2 * len(T.T2I_EDITS)
            assert r["ci_low"] <= r["value"] <= r["ci_high"]
            assert r["items"]["value"].mean() == pytest.approx(r["value"])
        results = write_evaluation(rows, cfg, "11_t2i_arithmetic")
        items = read_items(cfg)
    v = claim_verdicts(results, items, [c for c in PAPER_CLAIMS if c.name == "t2i_arithmetic"]).iloc[0]
    assert not v["observed"].startswith("not measured") and v["n_items"] == 2 * len(T.T2I_EDITS)
    assert v["agrees"] in ("yes", "no")


# ---- The tiny world text-to-image generator: pixel measurement, arithmetic conditioning, training, caching.

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
        rows.append(dict(typical_attrs(c), shape=CATEGORIES["shape"][c], radius=r,
                         brightness=float(rng.uniform(0.45, 1.0)),
                         hue=float(rng.uniform(0, 360)), saturation=0.85, background="stone", x=cx / 32,
                         cx0=cx,
                         cy0=16.0, cx1=np.nan, cy1=np.nan, cx2=np.nan, cy2=np.nan, count=1, n_distractors=0,
                         split="train"))
    return pd.DataFrame(rows)


def test_measurer_recovers_rendered_attributes():
    attrs = _rows(64)
    m = measure_generated(render_images(attrs, 32, seed=0))
    assert m["area"].min() > 0
    by_shape = attrs.assign(area=m["area"]).groupby("shape")
    # larger radius -> larger area
    assert all(np.corrcoef(g["radius"], g["area"])[0, 1] > 0.9 for _, g in by_shape)
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
    c, d, e = (text_conditioning(model, tok, [t])
               for t in ("a photo of a mib", "The first mib is brighter.", ""))
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
        first, info1 = train_or_load_generator(cache_dir(cfg), world, model, tok, settings, progress=False)
        second, info2 = train_or_load_generator(cache_dir(cfg), world, model, tok, settings, progress=False)
        assert (info1["reused"], info2["reused"]) == (False, True)
        assert info1["key"] == info2["key"]
        for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
        _, info3 = train_or_load_generator(cache_dir(cfg), world, model, tok,
                                           GeneratorSettings(steps=3, batch_size=2), progress=False)
        assert info3["reused"] is False and info3["key"] != info1["key"]
