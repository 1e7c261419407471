"""Dataset readers, splits and ImageDataset on folders built here, plus the real revisited gnd files,
Fashion-MNIST and the procedural instance set."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import training  # noqa: F401  (installs the torchvision shim before anything else)
from sdk.preprocess import ImageError, PreprocessSpec, load_image
from training.data import (
    FASHION_MNIST_CLASSES,
    DatasetError,
    ImageDataset,
    LabelledImages,
    csv_manifest,
    fashion_mnist,
    fashion_mnist_arrays,
    gldv2_csv,
    image_folder,
    make_instance_set,
    read_idx,
    revisited,
    split_classes,
    split_query_gallery,
)
from training.transforms import eval_transform


def write_image(path, size=(20, 16), colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    Image.new("RGB", size, colour).save(path, format=fmt)


def toy(n_classes: int, per_class: int) -> LabelledImages:
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    return LabelledImages([f"img{i}.jpg" for i in range(len(labels))], labels, tuple(f"c{c}" for c in range(n_classes)))


# ---------------------------------------------------------------- image folder


def test_image_folder_reads_classes_in_order_and_skips_non_images(tmp_path):
    write_image(tmp_path / "cat" / "a.jpg")
    write_image(tmp_path / "cat" / "b.PNG")
    write_image(tmp_path / "cat" / "nested" / "c.webp")
    write_image(tmp_path / "ant" / "x.JPEG")
    write_image(tmp_path / "ant" / "y.bmp")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / "._x.jpg").write_bytes(b"mac resource fork")
    (tmp_path / "README.md").write_text("loose file at the root")

    data = image_folder(tmp_path)
    assert data.classes == ("ant", "cat")
    assert [p.name for p in data.paths] == ["x.JPEG", "y.bmp", "a.jpg", "b.PNG", "c.webp"]
    assert data.labels == [0, 0, 1, 1, 1]


def test_image_folder_errors_say_what_layout_is_expected(tmp_path):
    with pytest.raises(DatasetError, match=r"image folder not found: .*missing.*expected .*/<class>/<image>\.jpg"):
        image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match=r"no class subfolders with images .*expected .*/<class>/<image>\.jpg"):
        image_folder(tmp_path)
    write_image(tmp_path / "loose.jpg")  # images directly in root are not a class layout
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders with images"):
        image_folder(tmp_path)
    write_image(tmp_path / "dog" / "d.jpg")
    with pytest.raises(DatasetError, match="class folders without images .*empty_class"):
        image_folder(tmp_path)


# ---------------------------------------------------------------- ImageDataset


def test_image_dataset_returns_eval_tensor_and_label(tmp_path):
    write_image(tmp_path / "a" / "1.jpg", colour=(255, 0, 0))
    write_image(tmp_path / "b" / "2.png", colour=(0, 0, 255))
    data = image_folder(tmp_path)
    spec = PreprocessSpec(input_size=(8, 8))
    ds = ImageDataset(data, eval_transform(spec))
    assert len(ds) == 2 and ds.classes == ("a", "b") and ds.labels == [0, 1]
    x, y = ds[1]
    assert y == 1 and x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert x[2].mean() > x[0].mean()  # blue image: blue channel above red after normalisation
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]


def test_image_dataset_accepts_pil_items_and_validates_items(tmp_path):
    img = Image.new("L", (10, 10), 128)  # grey: load_image converts to RGB
    ds = ImageDataset([(img, 0)], eval_transform(PreprocessSpec(input_size=(4, 4))), classes=["only"])
    assert ds[0][0].shape == (3, 4, 4)
    with pytest.raises(DatasetError, match="items must be .*pairs"):
        ImageDataset([("a.jpg",)], eval_transform(PreprocessSpec()))
    with pytest.raises(DatasetError, match="label 3 outside 0..0"):
        ImageDataset([(img, 3)], eval_transform(PreprocessSpec()), classes=["only"])
    with pytest.raises(TypeError, match="transform must be callable"):
        ImageDataset([(img, 0)], transform="eval")


def test_image_dataset_corrupt_or_missing_file_raises_image_error_naming_it(tmp_path):
    bad = tmp_path / "c" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage, not a jpeg" * 10)
    ds = ImageDataset(image_folder(tmp_path), eval_transform(PreprocessSpec()))
    with pytest.raises(ImageError, match=r"cannot read image .*broken\.jpg.*valid JPEG"):
        ds[0]
    ds = ImageDataset([(tmp_path / "gone.jpg", 0)], eval_transform(PreprocessSpec()))
    with pytest.raises(ImageError, match=r"image not found: .*gone\.jpg"):
        ds[0]


# ---------------------------------------------------------------- CSV manifest and GLDv2


def test_csv_manifest_resolves_paths_and_orders_labels_naturally(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    write_image(tmp_path / "imgs" / "b.jpg")
    abs_img = tmp_path / "elsewhere" / "c.jpg"
    write_image(abs_img)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(f"path,label,extra\nimgs/a.jpg,10,x\nimgs/b.jpg,2,y\n{abs_img},10,z\n")
    data = csv_manifest(csv_path)
    assert data.classes == ("2", "10")  # numeric labels sort as numbers
    assert data.labels == [1, 0, 1]
    assert data.paths == [tmp_path / "imgs" / "a.jpg", tmp_path / "imgs" / "b.jpg", abs_img]
    assert all(p.is_file() for p in data.paths)

    other = csv_manifest(csv_path, root=tmp_path / "imgs")
    assert other.paths[0] == tmp_path / "imgs" / "imgs" / "a.jpg"
    assert other.paths[2] == abs_img  # absolute paths ignore root


def test_csv_manifest_errors(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,class\na.jpg,cat\n")
    with pytest.raises(DatasetError, match=r"header file,class; expected a header row 'path,label'"):
        csv_manifest(wrong)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(DatasetError, match="header but no rows"):
        csv_manifest(empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("path,label\na.jpg,cat\n,dog\n")
    with pytest.raises(DatasetError, match="line 3: empty path or label"):
        csv_manifest(blank)
    with pytest.raises(DatasetError, match="CSV manifest not found"):
        csv_manifest(tmp_path / "nope.csv")


def test_gldv2_train_csv_maps_ids_to_nested_paths(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "id,url,landmark_id\n"
        "6e158a47eb2ca3f6,http://x/1.jpg,142820\n"
        "202cd79556f30760,http://x/2.jpg,9\n"
        "3ad87684c99c06e1,http://x/3.jpg,142820\n"
    )
    data = gldv2_csv(csv_path, tmp_path / "train")
    assert data.classes == ("9", "142820")
    assert data.labels == [1, 0, 1]
    assert data.paths[0] == tmp_path / "train" / "6" / "e" / "1" / "6e158a47eb2ca3f6.jpg"
    write_image(data.paths[1])
    assert ImageDataset(data, eval_transform(PreprocessSpec(input_size=(4, 4))))[1][1] == 0


def test_gldv2_clean_csv_and_wrong_header(tmp_path):
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n1,aaa111 bbb222\n7,ccc333\n")
    data = gldv2_csv(clean, tmp_path)
    assert data.labels == [0, 0, 1] and data.paths[2] == tmp_path / "c" / "c" / "c" / "ccc333.jpg"
    wrong = tmp_path / "bad.csv"
    wrong.write_text("image,landmark\nabc,1\n")
    with pytest.raises(DatasetError, match=r"expected a header row 'id,landmark_id'.*landmark_id,images"):
        gldv2_csv(wrong, tmp_path)


# ---------------------------------------------------------------- revisited Oxford / Paris (real gnd)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_crops_queries_by_gnd_box(tmp_path, revisitop_dir, name):
    with open(revisitop_dir / f"gnd_{name}.pkl", "rb") as f:
        cfg = pickle.load(f)
    root = tmp_path / name
    (root / "jpg").mkdir(parents=True)
    os.symlink(revisitop_dir / f"gnd_{name}.pkl", root / f"gnd_{name}.pkl")
    # one 1024x1024 stand-in (position-coded gradient) under every query name and a few database names
    yy, xx = np.mgrid[0:1024, 0:1024]
    standin = root / "standin.jpg"
    Image.fromarray(np.stack([xx // 4, yy // 4, (xx + yy) // 8], -1).astype(np.uint8)).save(standin, quality=95)
    for n in cfg["qimlist"] + cfg["imlist"][:3]:
        os.symlink(standin, root / "jpg" / f"{n}.jpg")

    data = revisited(root, name)
    full = load_image(standin)
    assert len(data.queries) == len(data.gnd) == 70
    assert len(data.database) == len(cfg["imlist"]) and data.database.classes == tuple(cfg["imlist"])
    assert data.database.paths[0] == root / "jpg" / f"{cfg['imlist'][0]}.jpg"
    assert data.queries.labels == list(range(70)) and data.queries.classes == tuple(cfg["qimlist"])
    for q in (0, 17, 69):
        x1, y1, x2, y2 = (int(round(v)) for v in cfg["gnd"][q]["bbx"])
        crop = data.queries.paths[q]
        assert crop.size == (x2 - x1, y2 - y1) != full.size  # the crop box is applied
        assert np.array_equal(np.asarray(crop), np.asarray(full)[y1:y2, x1:x2])
    # database images stay lazy paths and load through ImageDataset
    assert ImageDataset(data.database, eval_transform(PreprocessSpec(input_size=(8, 8))))[0][0].shape == (3, 8, 8)


@pytest.mark.shared_data
def test_revisited_errors(tmp_path, revisitop_dir):
    with pytest.raises(DatasetError, match=r"ground truth not found: .*gnd_roxford5k\.pkl \(download"):
        revisited(tmp_path, "roxford5k")
    shutil.copy(revisitop_dir / "gnd_roxford5k.pkl", tmp_path)
    with pytest.raises(DatasetError, match=r"image folder not found: .*jpg \(expected .*/<imname>\.jpg"):
        revisited(tmp_path, "roxford5k")
    (tmp_path / "jpg").mkdir()
    with pytest.raises(ImageError, match=r"image not found: .*all_souls_000013\.jpg"):
        revisited(tmp_path, "roxford5k")  # query images must exist: they are cropped on reading


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_arrays_shapes_labels_and_classes(fashion_mnist_dir):
    train = fashion_mnist_arrays(fashion_mnist_dir, "train")
    test = fashion_mnist_arrays(fashion_mnist_dir, "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [6000] * 10  # balanced, labels 0..9
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes == FASHION_MNIST_CLASSES and train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    assert 60 < train.images.mean() < 90  # real pictures, not zeros


def test_fashion_mnist_items_are_rgb_pil_images(fashion_mnist_dir):
    arrays = fashion_mnist_arrays(fashion_mnist_dir, "test", limit=5)
    data = fashion_mnist(fashion_mnist_dir, "test", limit=5)
    assert len(data) == 5 and data.labels == arrays.labels.tolist()
    img = data.paths[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    rgb = np.asarray(img)
    assert np.array_equal(rgb[..., 0], arrays.images[0]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    x, y = ImageDataset(data, eval_transform(PreprocessSpec(input_size=(32, 32))))[0]
    assert x.shape == (3, 32, 32) and y == data.labels[0]


def _idx_bytes(magic: int, shape, body: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + body


def test_read_idx_validates_magic_shape_and_length(tmp_path):
    good = tmp_path / "ok-idx1.gz"
    good.write_bytes(gzip.compress(_idx_bytes(0x00000801, (3,), bytes([1, 2, 3]))))
    assert read_idx(good, ndim=1).tolist() == [1, 2, 3]
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(gzip.compress(b"PK\x03\x04 this is a zip, not idx"))
    with pytest.raises(DatasetError, match=r"not an idx file: magic 504b0304"):
        read_idx(garbage)
    with pytest.raises(DatasetError, match="holds a 1-d array, expected 3-d"):
        read_idx(good, ndim=3)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(0x00000803, (2, 28, 28), b"\x00" * 100))
    with pytest.raises(DatasetError, match=r"truncated: header says shape \(2, 28, 28\)"):
        read_idx(short)
    notgz = tmp_path / "fake.gz"
    notgz.write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match="cannot read idx file"):
        read_idx(notgz)


def test_fashion_mnist_bad_files_and_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"Fashion-MNIST not found .*apt-get install dataset-fashion-mnist"):
        fashion_mnist_arrays(tmp_path / "none")
    with pytest.raises(DatasetError, match="lacks train-images-idx3-ubyte.gz"):
        fashion_mnist_arrays(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78" + b"\x00" * 64))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(0x801, (1,), b"\x00")))
    with pytest.raises(DatasetError, match="not an idx file: magic 12345678"):
        fashion_mnist_arrays(tmp_path)
    with pytest.raises(DatasetError, match="split must be 'train' or 'test'"):
        fashion_mnist_arrays(tmp_path, split="val")


# ---------------------------------------------------------------- splits


def test_split_classes_disjoint_relabelled_and_seeded():
    data = toy(10, 3)
    train, held = split_classes(data, held_out=0.3, seed=1)
    assert len(held.classes) == 3 and len(train.classes) == 7
    assert set(train.classes).isdisjoint(held.classes) and set(train.classes) | set(held.classes) == set(data.classes)
    assert sorted(set(train.labels)) == list(range(7)) and sorted(set(held.labels)) == list(range(3))
    for part in (train, held):  # every image keeps its class name through the relabelling
        for path, y in zip(part.paths, part.labels):
            assert data.classes[data.labels[data.paths.index(path)]] == part.classes[y]
    again = split_classes(data, held_out=0.3, seed=1)[1]
    assert again.classes == held.classes
    assert {split_classes(data, held_out=3, seed=s)[1].classes for s in range(5)} != {held.classes}
    with pytest.raises(DatasetError, match="need at least one on each side"):
        split_classes(data, held_out=10)
    with pytest.raises(DatasetError, match=r"fraction must be in \(0, 1\)"):
        split_classes(data, held_out=1.5)


def test_split_query_gallery_per_class_and_seeded():
    labels = [0, 0, 0, 1, 1, 2]  # class 2 has a single image: it stays in the gallery as a distractor
    data = LabelledImages([f"i{k}" for k in range(6)], labels, ("a", "b", "c"))
    queries, gallery = split_query_gallery(data, seed=0)
    assert sorted(queries.labels) == [0, 1]
    assert set(queries.paths).isdisjoint(gallery.paths) and len(queries) + len(gallery) == 6
    assert "i5" in gallery.paths and gallery.classes == data.classes
    assert split_query_gallery(data, seed=0)[0].paths == queries.paths
    assert {tuple(split_query_gallery(data, seed=s)[0].paths) for s in range(10)} != {tuple(queries.paths)}
    with pytest.raises(DatasetError, match="no class has more than 3 images"):
        split_query_gallery(data, queries_per_class=3)


def test_labelled_images_validates_pairs():
    with pytest.raises(DatasetError, match="2 images but 1 labels"):
        LabelledImages(["a", "b"], [0], ("x",))
    with pytest.raises(DatasetError, match="label 4 is outside 0..1"):
        LabelledImages(["a"], [4], ("x", "y"))


# ---------------------------------------------------------------- procedural instance set


@pytest.fixture(scope="module")
def instance_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("instances")
    return out, make_instance_set(out, n_objects=20, n_views=6, image_size=96, seed=0)


def test_instance_set_layout_reads_back_with_image_folder(instance_set):
    out, data = instance_set
    assert len(data) == 120 and len(data.classes) == 20
    assert data.paths[7] == out / "object_001" / "view_01.jpg"
    back = image_folder(out)
    assert back.classes == data.classes and back.labels == data.labels and back.paths == data.paths
    assert Image.open(data.paths[0]).size == (96, 96)


def test_instance_set_is_deterministic_for_a_seed(tmp_path, instance_set):
    _, data = instance_set
    again = make_instance_set(tmp_path / "a", n_objects=2, n_views=3, image_size=96, seed=0)
    other = make_instance_set(tmp_path / "b", n_objects=2, n_views=3, image_size=96, seed=1)
    for k in range(3):  # object 0 is the same whatever n_objects is
        assert np.array_equal(np.asarray(Image.open(again.paths[k])), np.asarray(Image.open(data.paths[k])))
    assert not np.array_equal(np.asarray(Image.open(again.paths[0])), np.asarray(Image.open(other.paths[0])))


def _colour_histogram(path) -> np.ndarray:
    q = np.asarray(Image.open(path).convert("RGB")) // 64
    h = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64).astype(np.float64)
    return np.sqrt(h / h.sum())


def test_instance_set_views_match_their_object_but_differ(instance_set):
    _, data = instance_set
    x = np.stack([_colour_histogram(p) for p in data.paths])
    y = np.asarray(data.labels)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    accuracy = (y[sim.argmax(1)] == y).mean()
    assert accuracy > 0.7, f"same-object nearest-neighbour accuracy {accuracy:.2f} (chance is 5/119)"
    views = [np.asarray(Image.open(p), np.float32) for p in data.paths[:6]]
    diffs = [np.abs(views[0] - v).mean() for v in views[1:]]
    assert min(diffs) > 10, f"views of one object are near-identical (mean abs diff {min(diffs):.1f})"
