"""load_splits over local sources (imagefolder, parquet, arrow, save_to_disk, list files), the Hub path,
column detection and the bad-input errors."""
import os
import re

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from lt_zoo.data import (ImageReadError, attach_transform, collate, create_transform, load_list_file,
                         load_splits, resolve_columns)


def rgb(value, size=6):
    return PIL.Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def image_dataset(n, image_column="img", label_column="label", num_classes=3, extra=None):
    cols = {image_column: [rgb(10 * i) for i in range(n)], label_column: [i % num_classes for i in range(n)]}
    feats = {image_column: datasets.Image(), label_column: datasets.ClassLabel(num_classes=num_classes)}
    for name in extra or ():
        cols[name], feats[name] = [0] * n, datasets.Value("int64")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def test_imagefolder(tmp_path):
    root = tmp_path / "folder"
    counts = {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 2}}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                rgb(40 * i + (cls == "dog") * 100).save(root / split / cls / f"{i}.png")
    splits = load_splits("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf"))
    assert splits.class_names == ["cat", "dog"]
    assert (splits.image_column, splits.label_column) == ("image", "label")
    assert sorted(splits.train[:]["label"]) == [0, 0, 0, 1, 1]
    assert sorted(splits.test[:]["label"]) == [0, 1, 1]
    # "a given split": pick the folder names explicitly
    only = load_splits("imagefolder", data_dir=str(root), train_split="test", test_split=None,
                       cache_dir=str(tmp_path / "hf"))
    assert len(only.train) == 3 and only.test is None


def test_parquet_cifar100_style_columns(tmp_path):
    for split, n in (("train", 9), ("test", 6)):
        image_dataset(n, "img", "fine_label", extra=["coarse_label"]).to_parquet(str(tmp_path / f"{split}.parquet"))
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    splits = load_splits("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert (splits.image_column, splits.label_column) == ("img", "fine_label")
    assert splits.class_names == ["0", "1", "2"] and (len(splits.train), len(splits.test)) == (9, 6)
    np.testing.assert_array_equal(np.asarray(splits.train[4]["img"]), np.full((6, 6, 3), 40))
    coarse = load_splits("parquet", data_files=files, label_column="coarse_label", cache_dir=str(tmp_path / "hf"))
    assert coarse.label_column == "coarse_label" and coarse.class_names == ["0"]  # int column -> ClassLabel


def test_arrow_and_disk(tmp_path):
    dd = datasets.DatasetDict({"train": image_dataset(8), "test": image_dataset(4)})
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = load_splits("disk", data_dir=str(tmp_path / "saved"))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (8, 4, 3)
    arrow = {s: [os.path.join(tmp_path, "saved", s, f) for f in os.listdir(tmp_path / "saved" / s)
                 if f.endswith(".arrow")] for s in ("train", "test")}
    from_arrow = load_splits("arrow", data_files=arrow, cache_dir=str(tmp_path / "hf"))
    assert from_arrow.train[:]["label"] == splits.train[:]["label"]
    image_dataset(3).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="single Dataset"):
        load_splits("disk", data_dir=str(tmp_path / "single"))


def test_hub_source_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict({"train": image_dataset(6, "img", "fine_label", extra=["coarse_label"]),
                                     "test": image_dataset(3, "img", "fine_label", extra=["coarse_label"])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_splits("uoft-cs/cifar100", cache_dir="/some/cache")
    assert calls == [("uoft-cs/cifar100", {"data_dir": None, "data_files": None, "cache_dir": "/some/cache"})]
    assert (splits.image_column, splits.label_column, splits.source) == ("img", "fine_label", "uoft-cs/cifar100")
    with pytest.raises(ValueError, match=r"split 'validation' not found .*available splits: \['train', 'test'\]"):
        load_splits("uoft-cs/cifar100", test_split="validation")


def test_string_labels_become_shared_classlabel(tmp_path):
    def make(names):
        return datasets.Dataset.from_dict({"image": [rgb(1)] * len(names), "labels": names},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "labels": datasets.Value("string")}))
    datasets.DatasetDict({"train": make(["b", "c", "b"]), "test": make(["a", "b"])}).save_to_disk(str(tmp_path / "d"))
    splits = load_splits("disk", data_dir=str(tmp_path / "d"))
    assert splits.label_column == "labels" and splits.class_names == ["a", "b", "c"]
    assert splits.train[:]["labels"] == [1, 2, 1] and splits.test[:]["labels"] == [0, 1]


def test_column_errors_list_available_columns():
    plain = datasets.Dataset.from_dict({"pixels": [1], "target": [0]})
    with pytest.raises(ValueError, match=r"no image column .*available columns: \['pixels', 'target'\]"):
        resolve_columns(plain)
    both = image_dataset(2, "img", "label", extra=["image"])
    with pytest.raises(ValueError, match=r"ambiguous image column: \['image', 'img'\]"):
        resolve_columns(both)
    labels = image_dataset(2, "img", "label", extra=["labels"])
    with pytest.raises(ValueError, match=r"ambiguous label column: \['label', 'labels'\]"):
        resolve_columns(labels)
    assert resolve_columns(labels, label_column="labels") == ("img", "labels")
    with pytest.raises(ValueError, match=r"label column 'fine' not found; available columns: \['img', 'label'\]"):
        resolve_columns(image_dataset(2), label_column="fine")


def test_load_splits_column_and_source_errors(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"img": [0], "label": [0]}),
                               "test": datasets.Dataset.from_dict({"img": [0], "label": [0]})})
    dd.save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(TypeError, match="expected datasets.Image"):
        load_splits("disk", data_dir=str(tmp_path / "noimg"))
    datasets.DatasetDict({"train": image_dataset(2, "picture"), "test": image_dataset(2, "picture")}).save_to_disk(
        str(tmp_path / "odd"))
    with pytest.raises(ValueError, match=r"available columns: \['picture', 'label'\]"):
        load_splits("disk", data_dir=str(tmp_path / "odd"))
    assert load_splits("disk", data_dir=str(tmp_path / "odd"), image_column="picture").image_column == "picture"
    with pytest.raises(ValueError, match="needs data_files"):
        load_splits("parquet")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_splits("disk")


# ---- list files (ImageNet-LT / Places-LT / iNat format) ----

def write_tree(root, entries):
    for rel, value in entries:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb(value).save(root / rel)


def test_list_file_loader(tmp_path):
    root = tmp_path / "imgs"
    write_tree(root, [("train/n01/a.jpg", 10), ("train/n02/b.png", 20), ("val/c.png", 30)])
    (tmp_path / "train.txt").write_text("train/n01/a.jpg 0\n\ntrain/n02/b.png 4\n# a comment\n")
    (tmp_path / "test.txt").write_text("val/c.png 2\n")
    ds = load_list_file(tmp_path / "train.txt", root)
    assert ds[:]["label"] == [0, 4] and ds.features["label"].num_classes == 5
    assert ds[1]["image"].size == (6, 6) and np.asarray(ds[1]["image"])[0, 0, 0] == 20
    assert load_list_file(tmp_path / "train.txt", root, num_classes=9).features["label"].num_classes == 9
    with pytest.raises(ValueError, match="label 4 but num_classes=3"):
        load_list_file(tmp_path / "train.txt", root, num_classes=3)
    splits = load_splits("listfile", data_dir=str(root),
                         data_files={"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")})
    assert splits.num_classes == 5 and len(splits.train) == 2 and splits.test[:]["label"] == [2]


@pytest.mark.parametrize("bad_line,match", [
    ("train/x.png", "expected '<path> <int label>', got 1 fields"),
    ("train/x.png 3 extra", "got 3 fields"),
    ("train/x.png cat", "label 'cat' is not an integer"),
    ("train/x.png -1", "negative label -1"),
])
def test_list_file_bad_line_names_file_and_line(tmp_path, bad_line, match):
    write_tree(tmp_path, [("train/x.png", 1)])
    lst = tmp_path / "list.txt"
    lst.write_text(f"train/x.png 0\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=re.escape(f"{lst}:3: ") + ".*" + match):
        load_list_file(lst, tmp_path)


def test_list_file_missing_image_named_before_loading(tmp_path):
    write_tree(tmp_path, [("a.png", 1)])
    (tmp_path / "list.txt").write_text("a.png 0\nmissing/b.png 1\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing" / "b.png"))):
        load_list_file(tmp_path / "list.txt", tmp_path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_names_index_and_path(tmp_path, num_workers):
    write_tree(tmp_path, [("ok0.png", 1), ("ok1.png", 2), ("ok3.png", 3)])
    (tmp_path / "broken.jpg").write_bytes(b"not really a jpeg")
    (tmp_path / "list.txt").write_text("ok0.png 0\nok1.png 1\nbroken.jpg 1\nok3.png 0\n")
    ds = load_list_file(tmp_path / "list.txt", tmp_path)
    tf = create_transform("eval", input_size=6, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    view = attach_transform(ds, tf, "image", "label")
    assert view[1]["label"] == 1 and view[3]["image"].shape == (3, 6, 6)
    with pytest.raises(ImageReadError, match=re.escape(f"index 2 (file '{tmp_path / 'broken.jpg'}')")):
        view[2]
    loader = torch.utils.data.DataLoader(view, batch_size=4, num_workers=num_workers, collate_fn=collate)
    with pytest.raises(ImageReadError, match=re.escape(f"index 2 (file '{tmp_path / 'broken.jpg'}')")):
        next(iter(loader))
