"""On-disk fixture layouts of the paper's data sets, loaded through the real loaders of
`pc_clip.data.datasets`."""
import json
import sys
import types
import urllib.error
import warnings
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import pc_clip.data.datasets as datasets_module
from pathlib import Path
from PIL import Image

from pc_clip.core.config import get_config
from pc_clip.core.run import project_root
from pc_clip.data.imagedata import (DATASET_INFO, DatasetNotFoundError, ImageDataset, iter_images,
    visual_attribute_mask)
from pc_clip.data.datasets import DATASETS, canonical_name, load_dataset
from pc_clip.smoke.fixtures import (FLOWERS102_FIXTURE_CLASSES as FLOWERS_FIXTURE_CLASSES,
    accept_fixture_checksums, fixture_colour, make_fixture, temp_workdir)
from pc_clip.core.registry import dataset_options

REAL = [d for d in DATASETS if d != "world"]


def nearest_class(img: Image.Image, n_classes: int = 4) -> int:
    "Which fixture class painted this (solid-colour, JPEG-compressed) image."
    px = np.asarray(img.convert("RGB"), float).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(px - fixture_colour(k)).sum() for k in range(n_classes)]))


# ---------------------------------------------------------------- every data set, through load_dataset

EXPECTED = {  # name: (split, first classnames, n images)
    "cifar100": ("test", ["apple", "camel", "hamster", "maple tree"], 8),
    "cub": ("all", ["black footed albatross", "laysan albatross", "sooty albatross"], 6),
    "eurosat": ("all", ["annual crop", "forest", "sea or lake"], 6),
    "flowers102": ("train", ["pink primrose", "hard-leaved pocket orchid"], 6),
    "sun397": ("all", ["abbey", "outdoor apartment building", "bakery shop"], 12),
    "awa2": ("all", ["antelope", "grizzly bear", "killer whale"], 6),
    "coco": ("train", [], 3),
}


@pytest.mark.parametrize("name", REAL)
def test_fixture_loads_with_aligned_labels(name, tmp_path):
    split, classnames, n = EXPECTED[name]
    with accept_fixture_checksums():
        ds = load_dataset(name, make_fixture(name, tmp_path), split)
    assert isinstance(ds, ImageDataset) and ds.name == name
    assert ds.classnames[: len(classnames)] == classnames
    assert len(ds) == n and ds.labels.dtype == np.int64
    if name == "coco":
        assert (ds.labels == -1).all() and all(len(c) == 2 for c in ds.captions)
        return
    assert ds.labels.min() >= 0 and ds.labels.max() < len(ds.classnames)
    # images and labels stay aligned: fixture class k (k-th class of the fixture) is painted fixture_colour(k)
    fixture_class = FLOWERS_FIXTURE_CLASSES.index if name == "flowers102" else int
    for i in range(len(ds)):
        assert nearest_class(ds.image(i)) == fixture_class(int(ds.labels[i])), (name, i)


def test_config_data_root_and_env(tmp_path):
    with temp_workdir(data=True) as d:
        make_fixture("cub", d / "data")
        assert len(load_dataset("CUB-200", **dataset_options(get_config("tiny")), split="all")) == 6
    make_fixture("cub", tmp_path / "mydata")
    cfg = get_config("tiny", data_root=str(tmp_path / "mydata"))
    assert len(load_dataset("cub", **dataset_options(cfg), split="test")) == 3


def test_names_and_unknown_split(tmp_path):
    assert canonical_name("Flowers") == "flowers102" and canonical_name("CIFAR-100") == "cifar100"
    with pytest.raises(KeyError, match="known: coco"):
        canonical_name("imagenet")
    make_fixture("cifar100", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("cifar100", tmp_path, "val")


# ---------------------------------------------------------------- missing or incomplete folders

@pytest.mark.parametrize("name", REAL)
def test_missing_folder_names_layout(name, tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, tmp_path / "empty", "train" if name in ("coco", "flowers102") else "test")
    msg = str(e.value)
    first_line_of_tree = DATASET_INFO[name].layout.splitlines()[0]
    assert first_line_of_tree in msg and "PC_CLIP_DATA" in msg and "http" in msg
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("name, remove, split", [
    ("cub", "CUB_200_2011/train_test_split.txt", "test"),
    ("awa2", "Animals_with_Attributes2/testclasses.txt", "test"),
    ("flowers102", "flowers-102/setid.mat", "test"),
    ("coco", "coco/annotations/captions_val2017.json", "val"),
    ("cifar100", "cifar-100-python/meta", "test"),
    ("sun397", "SUN397/ClassName.txt", "all"),
])
def test_incomplete_folder_names_missing_file(name, remove, split, tmp_path):
    make_fixture(name, tmp_path)
    (tmp_path / remove).unlink()
    with accept_fixture_checksums(), pytest.raises(DatasetNotFoundError, match=remove.replace(".", r"\.")):
        load_dataset(name, tmp_path, split)


def test_empty_eurosat_folder(tmp_path):
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        load_dataset("eurosat", tmp_path, "all")
    (tmp_path / "eurosat" / "2750").rmdir()
    (tmp_path / "EuroSAT_RGB").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        load_dataset("eurosat", tmp_path, "all")


# ---------------------------------------------------------------- downloads

@pytest.mark.parametrize("name, url", [("coco", "cocodataset.org"), ("cub", "caltech.edu"), ("awa2", "AwA2")])
def test_manual_download_datasets_say_where(name, url, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"cannot download.*by hand(?s:.*){url}"):
        load_dataset(name, tmp_path, "test", download=True)


def test_offline_torchvision_download_gives_advice(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(RuntimeError, match="could not download CIFAR-100(?s:.*)cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path, "test", download=True)


# ---------------------------------------------------------------- the torchvision code paths

@pytest.mark.parametrize("name, split", [("cifar100", "test"), ("flowers102", "val")])
def test_torchvision_checksums_are_not_bypassed(name, split, tmp_path):
    "The loaders use torchvision as it is: files that differ from the release are refused, with a message."
    make_fixture(name, tmp_path)
    with pytest.raises(RuntimeError, match="not those of the official .*MD5"):
        load_dataset(name, tmp_path, split)
    with accept_fixture_checksums():  # what tests and stand-in runs do
        assert len(load_dataset(name, tmp_path, split)) > 0
    with pytest.raises(RuntimeError, match="MD5"):  # and the check is back afterwards
        load_dataset(name, tmp_path, split)


def test_cifar100_torchvision_reads_the_official_pickles(tmp_path):
    with accept_fixture_checksums():
        ds = load_dataset("cifar100", make_fixture("cifar100", tmp_path), "test")
        tv = torchvision.datasets.CIFAR100(tmp_path, train=False)
    assert ds.classnames == [c.replace("_", " ") for c in tv.classes]
    np.testing.assert_array_equal(ds.arrays, tv.data)
    assert ds.labels.tolist() == tv.targets


def test_torchvision_accepts_our_fixtures(tmp_path):
    "Our EuroSAT/SUN397 fixtures are what torchvision itself reads (an independent check of the layout)."
    make_fixture("eurosat", tmp_path)
    make_fixture("sun397", tmp_path)
    assert len(torchvision.datasets.EuroSAT(tmp_path)) == len(load_dataset("eurosat", tmp_path, "all"))
    assert len(torchvision.datasets.SUN397(tmp_path)) == len(load_dataset("sun397", tmp_path, "all"))


# ---------------------------------------------------------------- splits

def test_official_splits_are_disjoint_and_complete(tmp_path):
    for name, splits, full in [("cub", ("train", "test"), "all"), ("sun397", ("train", "test"), "all"),
                               ("flowers102", ("train", "val", "test"), None),
                               ("eurosat", ("train", "test"), "all")]:
        make_fixture(name, tmp_path, n_per_class=6)
        with accept_fixture_checksums():
            parts = [set(map(str, load_dataset(name, tmp_path, s).paths)) for s in splits]
        assert all(parts) and sum(map(len, parts)) == len(set().union(*parts)), name
        if full:
            assert set().union(*parts) == set(map(str, load_dataset(name, tmp_path, full).paths)), name


def test_sun397_without_partitions_uses_hash_split(tmp_path):
    make_fixture("sun397", tmp_path, n_per_class=10)
    with_parts = load_dataset("sun397", tmp_path, "test")
    for f in (tmp_path / "SUN397" / "Partitions").iterdir():
        f.unlink()
    test, train = load_dataset("sun397", tmp_path, "test"), load_dataset("sun397", tmp_path, "train")
    assert len(test) + len(train) == 60 and not set(test.paths) & set(train.paths)
    assert set(test.paths) != set(with_parts.paths)


def test_sun397_official_partitions_next_to_the_images(tmp_path):
    "Partitions.zip unpacked at the data root (Partitions/ next to SUN397/) still gives the official split."
    make_fixture("sun397", tmp_path, n_per_class=10)
    official = load_dataset("sun397", tmp_path, "test")
    (tmp_path / "SUN397" / "Partitions").rename(tmp_path / "Partitions")
    moved = load_dataset("sun397", tmp_path, "test")
    assert [p.name for p in moved.paths] == [p.name for p in official.paths]
    # the fixture's Testing_01 holds the odd images
    assert all(int(p.stem[-10:-7]) % 2 == 1 for p in moved.paths)


def test_eurosat_rgb_release_layout(tmp_path):
    """The current EuroSAT release unpacks to EuroSAT_RGB/<Class>/; it loads, with the same split as
    eurosat/2750/."""
    rgb = load_dataset("eurosat",
                       make_fixture("eurosat", tmp_path / "a", n_per_class=10, layout="EuroSAT_RGB"), "test")
    old = load_dataset("eurosat", make_fixture("eurosat", tmp_path / "b", n_per_class=10), "test")
    assert rgb.classnames == ["annual crop", "forest", "sea or lake"] and len(rgb) > 0
    assert [p.relative_to(rgb.root) for p in rgb.paths] == [p.relative_to(old.root) for p in old.paths]
    assert rgb.root == tmp_path / "a" / "EuroSAT_RGB"


def test_data_readme_documents_every_file_the_loaders_need(tmp_path):
    "data/README.md names every file whose absence stops a loader (AwA2's class lists included)."
    readme = (project_root() / "data" / "README.md").read_text()
    needed = {"awa2": ["Animals_with_Attributes2/trainclasses.txt",
                       "Animals_with_Attributes2/testclasses.txt",
                       "Animals_with_Attributes2/classes.txt", "Animals_with_Attributes2/predicates.txt",
                       "Animals_with_Attributes2/predicate-matrix-binary.txt"],
              "cub": ["CUB_200_2011/images.txt", "CUB_200_2011/classes.txt",
                      "CUB_200_2011/image_class_labels.txt", "CUB_200_2011/train_test_split.txt"],
              "flowers102": ["flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
              "sun397": ["SUN397/ClassName.txt"], "cifar100": ["cifar-100-python/meta"]}
    for name, files in needed.items():
        for f in files:
            root = make_fixture(name, tmp_path / f.replace("/", "_"))
            (root / f).unlink()
            with accept_fixture_checksums(), pytest.raises(DatasetNotFoundError):
                load_dataset(name, root, "train" if "trainclasses" in f else "test")
            assert Path(f).name in readme, f"data/README.md does not mention {f}, which {name} needs"
    for layout in ("EuroSAT_RGB/", "eurosat/2750/", "Partitions/Training_01.txt"):
        assert layout in readme, layout


def test_awa2_class_split_keeps_all_classnames(tmp_path):
    make_fixture("awa2", tmp_path)
    test = load_dataset("awa2", tmp_path, "test")
    train = load_dataset("awa2", tmp_path, "train")
    assert test.labels.tolist() == [1, 1, 2, 2] and sorted(set(train.labels.tolist())) == [0]
    assert len(test.classnames) == 3 and test.class_attributes.shape == (3, 6)


# ---------------------------------------------------------------- hand-written real formats

def test_cub_real_format_with_attributes_next_to_folder(tmp_path):
    "CUB as the official archive unpacks: attributes.txt beside CUB_200_2011/, percentages in the matrix."
    base = tmp_path / "CUB_200_2011"
    rel = "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    (base / "images" / rel).parent.mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(base / "images" / rel)
    (base / "images.txt").write_text(f"1 {rel}\n")
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 200.Common_Yellowthroat\n")
    (base / "image_class_labels.txt").write_text("1 1\n")
    (base / "train_test_split.txt").write_text("1 0\n")
    (tmp_path / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n"
                                             "2 has_wing_color::blue\n")
    (base / "attributes").mkdir()
    (base / "attributes" / "class_attribute_labels_continuous.txt").write_text(
        "0.000000 50.000000\n100.000000 25.000000\n")
    ds = load_dataset("cub", tmp_path, "test")
    assert ds.classnames == ["black footed albatross", "common yellowthroat"]
    assert ds.raw_classnames[0] == "001.Black_footed_Albatross"
    np.testing.assert_allclose(ds.class_attributes, [[0, 0.5], [1, 0.25]])
    assert ds.attribute_names == ["has_bill_shape::curved_(up_or_down)", "has_wing_color::blue"]


def test_cub_without_attributes_still_loads(tmp_path):
    make_fixture("cub", tmp_path)
    (tmp_path / "attributes.txt").unlink()  # beside CUB_200_2011/, as in the official archive
    ds = load_dataset("cub", tmp_path, "all")
    assert ds.class_attributes is None and len(ds) == 6


def test_awa2_real_format(tmp_path):
    "Tab-separated index files, space-separated 0/1 matrix, `+` in class names."
    base = tmp_path / "Animals_with_Attributes2"
    (base / "JPEGImages" / "grizzly+bear").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(base / "JPEGImages" / "grizzly+bear" / "grizzly+bear_10001.jpg")
    (base / "classes.txt").write_text("1\tantelope\n2\tgrizzly+bear\n")
    (base / "predicates.txt").write_text("1\tblack\n2\tfast\n3\tlongneck\n")
    (base / "predicate-matrix-binary.txt").write_text("0 1 0\n1 0 0\n")
    ds = load_dataset("awa2", tmp_path, "all")
    assert ds.classnames == ["antelope", "grizzly bear"] and ds.labels.tolist() == [1]
    assert ds.attribute_names == ["black", "fast", "longneck"]
    assert visual_attribute_mask(ds).tolist() == [True, False, True]
    (base / "predicate-matrix-binary.txt").write_text("0 1\n1 0\n")
    with pytest.raises(ValueError, match="expected \\(2 classes, 3 predicates\\)"):
        load_dataset("awa2", tmp_path, "all")


def test_coco_captions_all_per_image(tmp_path):
    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    images = [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"},
              {"id": 632, "file_name": "000000000632.jpg"}]
    anns = [{"id": 3, "image_id": 285, "caption": "A big  bear.\n"},
            {"id": 1, "image_id": 139, "caption": "A room."},
            {"id": 2, "image_id": 285, "caption": "A brown bear sitting."}]
    (ann / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    ds = load_dataset("coco", tmp_path, "test")  # COCO test has no captions: reads val
    assert ds.split == "val" and len(ds) == 2  # image 632 has no caption
    assert ds.captions == [["A room."], ["A brown bear sitting.", "A big bear."]]
    assert ds.paths[1].name == "000000000285.jpg" and ds.image_info["image_id"].tolist() == [139, 285]


# ---------------------------------------------------------------- corrupt images

@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_images_are_skipped_and_counted(tmp_path, num_workers):
    ds = load_dataset("eurosat", make_fixture("eurosat", tmp_path, n_per_class=3), "all")
    ds.paths[2].write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    ds.paths[6].write_bytes(ds.paths[6].read_bytes()[:100])  # truncated
    ds.paths[7].unlink()  # deleted after listing
    with pytest.warns(RuntimeWarning, match="skipped 3 unreadable image"):
        batches = list(iter_images(ds, batch_size=4, num_workers=num_workers, progress=False))
    kept = torch.cat([b[2] for b in batches]).tolist()
    assert kept == [0, 1, 3, 4, 5, 8]
    assert ds.n_skipped == 3 and ds.skipped == {2, 6, 7}
    for x, y, idx in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8) and len(x) == len(y) == len(idx)
        assert y.tolist() == ds.labels[idx.numpy()].tolist()
    # a second pass counts each bad image once
    with pytest.warns(RuntimeWarning):
        list(iter_images(ds, batch_size=4, progress=False))
    assert ds.n_skipped == 3


def test_iter_images_with_a_transform_and_indices(tmp_path):
    with accept_fixture_checksums():
        ds = load_dataset("cifar100", make_fixture("cifar100", tmp_path), "test")
    to_float = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, so nothing is warned
        (x, y, idx), = iter_images(ds, batch_size=8, transform=to_float, indices=[6, 1, 2], progress=False)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert idx.tolist() == [6, 1, 2] and y.tolist() == [3, 0, 1]


# ---------------------------------------------------------------- the Shapes world

def fake_world(monkeypatch):
    "A four-image world in place of the Shapes world `load_dataset('world')` reads (the loader's own names)."
    attrs = pd.DataFrame({"category": ["glorp", "mib", "glorp", "mib"],
                          "split": ["test", "test", "train", "val"],
                          "size": [7.0, 4.0, 7.5, 3.0]})
    world = types.SimpleNamespace(images=np.zeros((4, 32, 32, 3), np.uint8), attrs=attrs,
                                  captions=["a big glorp", "a mib", "a glorp", "a small mib"])
    monkeypatch.setattr(datasets_module, "make_world", lambda **settings: world)
    monkeypatch.setattr(datasets_module, "CATEGORY_NAMES", ["mib", "glorp"])
    monkeypatch.setattr(datasets_module, "class_attribute_table",
                        lambda: pd.DataFrame({"large": [0, 1], "red": [1, 0]}, index=["mib", "glorp"]))


def test_world_through_registry(monkeypatch):
    fake_world(monkeypatch)
    ds = load_dataset("world", **dataset_options(get_config("tiny")), split="test")
    assert ds.classnames == ["mib", "glorp"] and ds.labels.tolist() == [1, 0]
    assert ds.captions == [["a big glorp"], ["a mib"]] and ds.arrays.shape == (2, 32, 32, 3)
    assert ds.attribute_names == ["large", "red"] and ds.class_attributes.tolist() == [[0, 1], [1, 0]]
    assert ds.image_info["size"].tolist() == [7.0, 4.0]


def test_world_val_split(monkeypatch):
    "The world's validation split loads by name, disjoint from train and test."
    fake_world(monkeypatch)
    val = load_dataset("world", **dataset_options(get_config("tiny")), split="val")
    assert val.split == "val" and val.captions == [["a small mib"]] and val.labels.tolist() == [0]
    sizes = {s: set(load_dataset("world", **dataset_options(get_config("tiny")), split=s).image_info["size"])
             for s in ("train", "val", "test")}
    assert not (sizes["val"] & sizes["train"]) and not (sizes["val"] & sizes["test"])


def test_real_world_if_present():
    cfg = get_config("tiny", world_n_train=40, world_n_test=20)
    with temp_workdir():
        ds = load_dataset("world", **dataset_options(cfg), split="test")
    assert len(ds) == 20 and ds.arrays.dtype == np.uint8 and ds.arrays.shape[1:] == (32, 32, 3)
    assert set(ds.classnames) >= set(ds.image_info["category"]) and ds.class_attributes is not None
    x, y, idx = next(iter_images(ds, batch_size=8, progress=False))
    assert x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar100", "flowers102"])
def test_a_stand_in_manifest_in_a_real_data_root_does_not_bypass_md5(name, tmp_path, monkeypatch):
    """Only `paper-smoke` accepts a file by its recorded sha256; on `paper` the official MD5 decides,
    manifest or not."""
    import hashlib
    from pc_clip.data.imagedata import STANDIN_MANIFEST
    root = make_fixture(name, tmp_path / "data")  # not the official files: their MD5 differs
    files = {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(root.rglob("*")) if f.is_file()}
    (root / STANDIN_MANIFEST).write_text(json.dumps({"items": {name: {"key": "k", "files": files}}}))
    monkeypatch.setenv("PC_CLIP_DATA", str(root))
    split = EXPECTED[name][0]
    with pytest.raises(RuntimeError, match="torchvision refused .*official"):
        load_dataset(name, **dataset_options(get_config("paper")), split=split)
    with pytest.raises(RuntimeError, match="torchvision refused"):
        load_dataset(name, root, split)  # a folder alone: official sums too
    # the stand-in profile
    assert (len(load_dataset(name, **dataset_options(get_config("paper-smoke")), split=split))
            == EXPECTED[name][2])
    victim = next(f for f in sorted(root.rglob("*"))
                  if f.is_file() and f.suffix in (".mat", "") and f.name != "meta"
                  and f.parent.name == ("cifar-100-python" if name == "cifar100" else "flowers-102"))
    victim.write_bytes(victim.read_bytes() + b"x")  # a changed file no longer matches its recorded sha256
    with pytest.raises(RuntimeError, match="torchvision refused"):
        load_dataset(name, **dataset_options(get_config("paper-smoke")), split=split)


def test_data_does_not_import_the_stand_ins():
    """pc_clip.data reads a checksum manifest as plain data; importing it loads neither
    pc_clip.smoke.standins nor pc_clip.testing."""
    import subprocess
    code = ("import sys, pc_clip.data.datasets; print(sorted(m for m in sys.modules "
            "if m in ('pc_clip.smoke.standins', 'pc_clip.smoke.fixtures')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
