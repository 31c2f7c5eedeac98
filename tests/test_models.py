"""Tests of `pc_clip.models`: checkpoints that prove themselves with a checksum, and reload exactly."""
import json
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pc_clip.core.config import embedding_options, get_config
from pc_clip.core.run import cache_dir
from pc_clip.data.imagedata import ImageDataset
from pc_clip.models.embed import embed_images, kept_indices
from pc_clip.training.finetune import finetune
from pc_clip.training.state import FinetuneSettings
from pc_clip.models.clip import CheckpointError, create_clip, load_clip, save_checkpoint
from pc_clip.core.registry import clip_source, model_dir


# ---- Checkpoints that prove themselves and runs that cannot replace good models: a truncated model is
# named and

N = 10


@pytest.fixture(scope="module")
def tiny():
    model, preprocess, tok = create_clip("pc-clip-tiny", seed=0)
    rng = np.random.default_rng(0)
    emb = F.normalize(torch.tensor(rng.normal(size=(N, model.text_projection.shape[1])), dtype=torch.float32),
                      dim=-1)
    words = ["larger", "smaller", "redder", "bluer"]
    triples = pd.DataFrame([dict(i=i, j=j, text=f"the first object is {words[(i + 2 * j) % 4]}")
                            for i in range(N) for j in range(N) if i != j]).iloc[:48]
    return model, preprocess, tok, emb, triples


def cfg(**kw):
    return get_config("tiny",
                      **{"ft_epochs": 1, "ft_batch_size": 16, "ft_lr": 1e-3, "ft_max_pairs": None, **kw})


def train(tiny, c, **kw):
    model, _, tok, emb, triples = tiny
    return finetune(model, tok, triples, FinetuneSettings.from_config(c, **kw), model_dir(c, "pc-clip"),
                    image_embeddings=emb, progress=False)


def test_truncated_finetuned_model_is_named_and_rebuilt(tiny, runs_dir):
    c = cfg()
    save_checkpoint(tiny[0], model_dir(c, "clip"), "pc-clip-tiny")
    good = train(tiny, c)
    weights = model_dir(c, "pc-clip") / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_clip(**clip_source(c, "pc-clip", "cpu"))
    assert str(weights) in str(e.value) and "delete" in str(e.value) and "03_finetune" in str(e.value)
    rebuilt = train(tiny, c)  # the finetuning stage rebuilds it instead of dying
    assert not rebuilt.reused
    loaded = load_clip(**clip_source(c, "pc-clip", "cpu"))[0]
    assert all(torch.equal(a, b)
               for a, b in zip(loaded.state_dict().values(), good.model.state_dict().values()))


def test_diverging_run_keeps_the_good_model_and_fails(tiny, runs_dir):
    c = cfg(ft_epochs=2)
    good = train(tiny, c)
    folder = model_dir(c, "pc-clip")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(FloatingPointError, match="diverged"):
        train(tiny, c, lr=1e6)  # the same folder, forced: the guard trips, nothing is marked finished
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert json.loads((folder / "finetune.json").read_text())["run_key"] == good.run_key
    assert train(tiny, c).reused


def test_override_run_leaves_the_default_models_untouched(tiny, runs_dir):
    c = cfg()
    train(tiny, c)
    default = model_dir(c, "pc-clip")
    snapshot = {p.name: p.read_bytes() for p in default.iterdir() if p.is_file()}
    fast = c.replace(ft_lr=1e6)
    assert model_dir(fast, "pc-clip") != default and model_dir(fast, "clip") == model_dir(c, "clip")
    with pytest.raises(FloatingPointError):
        train(tiny, fast)
    assert {p.name: p.read_bytes() for p in default.iterdir() if p.is_file()} == snapshot
    other = train(tiny, c.replace(ft_lr=1e-4))  # a healthy override: its own finished model
    assert other.out_dir == model_dir(c.replace(ft_lr=1e-4), "pc-clip") and not other.reused
    assert {p.name: p.read_bytes() for p in default.iterdir() if p.is_file()} == snapshot


def test_cached_embeddings_keep_the_skip_count(tiny, runs_dir, tmp_path):
    model, preprocess, _, _, _ = tiny
    rng = np.random.default_rng(1)
    paths = []
    for k in range(8):
        paths.append(tmp_path / f"{k}.jpg")
        if k % 3 == 1:
            paths[-1].write_bytes(b"\xff\xd8 truncated jpeg")
        else:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    make = lambda: ImageDataset("files", "test", ["x"], np.zeros(8), paths=paths, root=tmp_path)
    first_ds, again_ds = make(), make()
    with pytest.warns(RuntimeWarning, match="skipped 3 unreadable"):
        first = embed_images(model, first_ds, cache_dir(cfg()), **embedding_options(cfg()),
                             preprocess=preprocess, progress=False)
    again = embed_images(model, again_ds, cache_dir(cfg()), **embedding_options(cfg()),
                         preprocess=preprocess, progress=False)
    assert first_ds.n_skipped == again_ds.n_skipped == 3
    assert torch.equal(first, again) and kept_indices(again_ds).tolist() == [0, 2, 3, 5, 6]


def test_checkpoints_of_the_configured_epochs_are_kept(tiny, runs_dir):
    """The paper keeps its models after epochs 10 and 20 (`ft_keep_epochs`); here epoch 2 of 4 stays beside
    the newest, the others are deleted, and the kept one holds the weights a 2-epoch run ends with."""
    from safetensors.torch import load_file
    from pc_clip.training.state import epoch_checkpoints
    assert get_config("paper").ft_keep_epochs == (10, 20) and get_config("tiny").ft_keep_epochs == ()
    run = train(tiny, cfg(ft_epochs=4, ft_keep_epochs=(2,)))
    assert [p.name for p in epoch_checkpoints(run.out_dir)] == ["epoch-002", "epoch-004"]
    two = train(tiny, cfg(ft_epochs=2))
    assert [p.name for p in epoch_checkpoints(two.out_dir)] == ["epoch-002"]  # default: only the newest
    kept = load_file(str(run.out_dir / "epochs" / "epoch-002" / "open_clip_model.safetensors"))
    assert all(torch.equal(kept[k], v) for k, v in two.model.state_dict().items())
