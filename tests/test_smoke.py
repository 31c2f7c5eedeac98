"""Tests of `pc_clip.smoke`: stand-ins built in the real on-disk layouts, checked by their hashes."""
import time
import numpy as np
import pytest
import torch

from pc_clip.core.run import data_root
from pc_clip.core.config import get_config
from pc_clip.smoke.standins import (BUILD_ORDER, CHAT_LM, DATASET_PATHS, MANIFEST, build_paper_smoke,
    read_manifest, scene, scene_caption, standin_checksums)
from pc_clip.core.registry import backend_options, clip_source, dataset_options, judge_options


# ---- The `paper-smoke` stand-ins, built once into a temporary data root, as the `paper` code path reads
# them.

SPLITS = {"coco": "train", "flowers102": "train"}  # the rest: "test"


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins") / "data"
    start = time.perf_counter()
    info = build_paper_smoke(root, seed=0, progress=False)
    print(f"\nstand-ins built in {time.perf_counter() - start:.0f} s: {info['seconds']}")
    assert info["built"] == list(BUILD_ORDER)
    return root


@pytest.fixture
def cfg(smoke_root, monkeypatch, tmp_path):
    monkeypatch.setenv("PC_CLIP_DATA", str(smoke_root))
    monkeypatch.setenv("PC_CLIP_RUNS", str(tmp_path / "runs"))
    return get_config("paper-smoke", device="cpu")


def test_second_build_skips_everything_and_a_changed_file_is_rebuilt(smoke_root):
    assert build_paper_smoke(smoke_root, progress=False)["built"] == []
    target = smoke_root / "Animals_with_Attributes2" / "testclasses.txt"
    target.write_text("antelope\n")
    assert build_paper_smoke(smoke_root, progress=False)["built"] == ["awa2"]
    assert target.read_text() == "grizzly+bear\nkiller+whale\n"
    assert set(read_manifest(smoke_root)["items"]) == set(BUILD_ORDER)


def test_clip_loads_through_the_paper_path_and_encodes(cfg):
    from pc_clip.models.clip import load_clip
    assert data_root(cfg) / "weights" / cfg.model_name / cfg.pretrained
    model, preprocess, tokenizer = load_clip(**clip_source(cfg, "clip", device="cpu"))
    from PIL import Image
    image = preprocess(Image.new("RGB", (8, 8), (200, 30, 30)))[None]
    assert image.shape == (1, 3, 64, 64)
    with torch.no_grad():
        img, txt = model.encode_image(image), model.encode_text(tokenizer(["two red buses in the street"]))
    assert img.shape == txt.shape == (1, 64) and torch.isfinite(img).all()
    with pytest.raises(RuntimeError):  # 32-px world images are refused, as by the paper's 224-px models
        model.encode_image(torch.zeros(1, 3, 32, 32))


def test_chat_lm_in_4bit_writes_parseable_differences_and_verdicts(cfg):
    """The profile's generator and judge, loaded as the paper path loads them (NF4), on 20 unseen caption
    pairs."""
    from pc_clip.differences.records import build_record, make_backend
    from pc_clip.differences.judge import judge_records, make_judge, verdict_counts
    assert cfg.generator == cfg.judge == CHAT_LM and cfg.load_in_4bit
    backend = make_backend(**backend_options(cfg))
    assert backend.config["load_in_4bit"]
    rng = np.random.default_rng([7, 7])
    items = [{"key": str(k), "caption_a": scene_caption(scene(rng), k),
              "caption_b": scene_caption(scene(rng), k + 2)}
             for k in range(20)]
    records = [build_record(it, out, backend, "differences")
               for it, out in zip(items, backend.generate(items))]
    accepted = sum(len(r["statements"]) for r in records)
    rejected = sum(len(r["rejected"]) for r in records)
    assert accepted > rejected and accepted >= 30, [r["raw"] for r in records[:3]]
    rewrites = [{"key": f"r{k}", "caption": it["caption_a"]} for k, it in enumerate(items)]
    kept = [build_record(it, out, backend, "rewrite")
            for it, out in zip(rewrites, backend.generate(rewrites, "rewrite"))]
    assert sum(bool(r["statements"]) for r in kept) > len(kept) / 2
    classes = [{"key": "c", "category_a": "killer whale", "category_b": "maple tree"}]
    assert build_record(classes[0], backend.generate(classes, "category")[0],
                        backend, "category")["statements"]
    judged = judge_records([r for r in records if r["statements"]],
                           make_judge(cfg.judge, **judge_options(cfg)), progress=False)
    counts = verdict_counts(judged)
    assert counts["unparsed"] < (counts["consistent"] + counts["inconsistent"]) / 10, counts


def test_sdxl_stand_in_loads_and_its_first_encoder_is_the_clips_text_tower(cfg):
    from pc_clip.models.clip import load_checkpoint
    from pc_clip.t2i.sdxl import load_sdxl, matching_slot, tower_mismatches
    pipe = load_sdxl(cfg.t2i_model, data_root(cfg), device="cpu")
    clip = load_checkpoint(data_root(cfg) / "weights" / cfg.t2i_clip_model / cfg.t2i_clip_pretrained)[0]
    assert tower_mismatches(pipe.text_encoder, clip) == {} and matching_slot(pipe, clip) == "text_encoder"
    assert torch.equal(pipe.text_encoder.embeddings.token_embedding.weight, clip.token_embedding.weight)


@pytest.mark.parametrize("name", DATASET_PATHS)
def test_every_data_set_loads_with_the_stand_in_checksums(cfg, name):
    from pc_clip.data.datasets import load_dataset
    with standin_checksums(data_root(cfg)):
        ds = load_dataset(name, **dataset_options(cfg), split=SPLITS.get(name, "test"))
    assert len(ds) > 0
    if name == "coco":
        assert len(ds) == 40 and all(len(c) == 5 for c in ds.captions)
        assert len({c[0] for c in ds.captions}) > 20  # varied captions to pair
    else:
        assert len(ds.classnames) >= 3


def test_paper_path_reads_cifar_and_flowers_fixtures_without_help(cfg):
    """pc_clip.data.datasets must wrap its torchvision loaders in standin_checksums (the papermill kernels
    import nothing else)."""
    from pc_clip.data.datasets import load_dataset
    assert (data_root(cfg) / MANIFEST).exists()
    for name in ("cifar100", "flowers102"):
        assert len(load_dataset(name, **dataset_options(cfg), split=SPLITS.get(name, "test"))) > 0
