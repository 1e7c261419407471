"""The real photos shipped in installed packages: found without ../shared, all readable, no synthetic ones;
the Debian packages' photos (dpkg file lists, Qt resource archives, the extraction cache)."""

from __future__ import annotations

import struct
import zlib

import pytest

from sdk.preprocess import load_image
from training.compatible import CompatConfig, photo_views
from training.errors import TrainingError
from training.photos import (PACKAGE_PHOTOS, DebianPhotos, debian_photos, installed_files,
                             package_photos, photo_sources, read_qt_resources)


def test_scikit_image_photos_are_found_and_readable():
    photos = package_photos(debian=False)
    skimage = [p for p in photos if "skimage" in p.parts]
    assert len(skimage) == len(PACKAGE_PHOTOS["skimage"][1]) == 20  # scikit-image is a `train` dependency
    for path in photos:
        img = load_image(path)
        assert min(img.size) >= 100, path  # photographs, not icons
    names = {p.name for p in photos}
    assert not names & {"chessboard_RGB.png", "phantom.png", "logo.png", "horse.png"}


def _installed(package: str) -> bool:
    return installed_files(package) is not None


@pytest.mark.skipif(not _installed("gcompris-qt-data"), reason="gcompris-qt-data is not installed (scripts/setup.sh installs it)")
def test_debian_photos_are_found_readable_and_leave_out_the_evaluation_landmark(tmp_path, monkeypatch):
    monkeypatch.setattr("training.photos.PHOTO_CACHE", tmp_path)
    sources = photo_sources()
    assert list(sources)[0] == "skimage" and len(sources["gcompris-qt-data"]) >= 200
    for package in ("mate-backgrounds", "lomiri-wallpapers-16.04"):
        assert len(sources.get(package, [])) >= 10, package
    for path in [p for paths in sources.values() for p in paths][::7]:  # every 7th: all sources, a few seconds
        assert min(load_image(path).size) >= 100, path
    every = [p.name for paths in sources.values() for p in paths]
    assert not [n for n in every if n.startswith(("usCapitol", "analogpattern_", "umang_"))]
    assert photo_sources(debian=False).keys() == {"skimage"}


def _rcc(files: dict[str, bytes], compressed: set[str] = frozenset(), version: int = 2) -> bytes:
    """A Qt binary resource archive as `rcc -binary` writes it (children of a directory stored together)."""
    tree: list[dict] = [{"name": "", "dir": {}}]
    for path, data in files.items():
        node = tree[0]
        parts = path.split("/")
        for part in parts[:-1]:
            node = node["dir"].setdefault(part, {"name": part, "dir": {}})
        node["dir"][parts[-1]] = {"name": parts[-1], "data": data, "zlib": path in compressed}
    order, queue = [tree[0]], [tree[0]]
    while queue:  # breadth first: each directory's children get consecutive indices
        node = queue.pop(0)
        if "dir" in node:
            node["first"] = len(order)
            order += node["dir"].values()
            queue += node["dir"].values()
    names, data, nodes = b"", b"", b""
    for node in order:
        name_offset = len(names)
        names += struct.pack(">HI", len(node["name"]), 0) + node["name"].encode("utf-16-be")
        if "dir" in node:
            nodes += struct.pack(">IHII", name_offset, 2, len(node["dir"]), node["first"])
        else:
            payload = struct.pack(">I", len(node["data"])) + zlib.compress(node["data"]) if node["zlib"] else node["data"]
            nodes += struct.pack(">IHHHI", name_offset, 1 if node["zlib"] else 0, 0, 0, len(data))
            data += struct.pack(">I", len(payload)) + payload
        if version >= 2:
            nodes += struct.pack(">Q", 0)
    header = 20
    return b"qres" + struct.pack(">IIII", version, header, header + len(nodes), header + len(nodes) + len(data)) + nodes + data + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_qt_resource_archives_are_read_with_nested_folders_and_zlib(tmp_path, version):
    files = {"gcompris/a/resource/x.webp": b"raw" * 10, "gcompris/a/resource/sub/y.jpg": b"zipped" * 50, "top.txt": b"t"}
    path = tmp_path / "a.rcc"
    path.write_bytes(_rcc(files, {"gcompris/a/resource/sub/y.jpg"}, version))
    assert {name.lstrip("/"): data for name, data in read_qt_resources(path)} == files


def test_a_damaged_archive_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.rcc"
    path.write_bytes(b"not an archive")
    with pytest.raises(TrainingError, match=r"cannot read Qt resource archive .*bad.rcc: not a Qt resource archive"):
        read_qt_resources(path)
    good = _rcc({"a/b.jpg": b"x" * 100}, {"a/b.jpg"})
    path.write_bytes(good[:-20])  # names cut off
    with pytest.raises(TrainingError, match="reinstall the package"):
        read_qt_resources(path)


def test_an_archive_whose_folder_points_back_into_the_tree_is_an_error_not_a_loop(tmp_path):
    blob = bytearray(_rcc({"a/b.jpg": b"x"}))
    tree = struct.unpack(">I", blob[8:12])[0]
    struct.pack_into(">I", blob, tree + 22 + 10, 0)  # folder "a" (node 1) lists the root as its first child
    (tmp_path / "loop.rcc").write_bytes(bytes(blob))
    with pytest.raises(TrainingError, match="points past the tree or back into it"):
        read_qt_resources(tmp_path / "loop.rcc")


def test_debian_photos_follow_the_dpkg_list_globs_and_cache_archive_members(tmp_path, monkeypatch):
    info, root, cache = tmp_path / "info", tmp_path / "root", tmp_path / "cache"
    info.mkdir()
    (root / "walls").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "pattern_x.jpg", "c.png"):
        (root / "walls" / name).write_bytes(b"x")
    big = b"p" * 9000
    archive = root / "act.rcc"
    archive.write_bytes(_rcc({"g/act/resource/cat.webp": big, "g/act/resource/tiny.webp": b"icon",
                              "g/act/resource/usCapitol.webp": big, "g/act/other/dog.webp": big}, {"g/act/resource/cat.webp"}))
    listed = [str(root), str(root / "walls"), *(str(root / "walls" / n) for n in ("a.jpg", "b.jpg", "pattern_x.jpg", "c.png")),
              str(archive), str(root / "walls" / "gone.jpg")]  # a listed file removed since: skipped
    (info / "walls-pkg.list").write_text("\n".join(listed) + "\n")
    (info / "game-data:all.list").write_text(str(archive) + "\n")  # multi-arch list name

    walls = DebianPhotos("walls-pkg", (f"{root}/walls/*.jpg",), exclude=("*/pattern_*",))
    assert debian_photos(walls, info, cache) == [root / "walls" / "a.jpg", root / "walls" / "b.jpg"]
    assert debian_photos(DebianPhotos("not-installed", ("*",)), info, cache) == []

    game = DebianPhotos("game-data", (f"{root}/*.rcc",), exclude=("*/usCapitol.*",), archive_members=("*/resource/*.webp",))
    found = debian_photos(game, info, cache)
    assert [p.relative_to(cache).as_posix() for p in found] == ["game-data/act/g/act/resource/cat.webp"]
    assert found[0].read_bytes() == big  # decompressed; the icon (too small), the landmark and other/ left out

    def must_not_read(path):
        raise AssertionError("the cache is current: the archive must not be read again")

    monkeypatch.setattr("training.photos.read_qt_resources", must_not_read)
    assert debian_photos(game, info, cache) == found
    archive.write_bytes(archive.read_bytes() + b"\0")  # the package was upgraded: extract again
    with pytest.raises(AssertionError, match="must not be read again"):
        debian_photos(game, info, cache)
    monkeypatch.undo()
    stricter = DebianPhotos("game-data", game.files, exclude=(*game.exclude, "*/cat.*"), archive_members=game.archive_members)
    assert debian_photos(stricter, info, cache) == []  # a new exclude empties the stale copy, not just hides it
    assert [p.name for p in (cache / "game-data").rglob("*.webp")] == []


def test_photo_crops_spread_a_budget_over_the_photos():
    auto = CompatConfig()
    assert [photo_views(auto, n) for n in (1, 20, 100, 275, 1000, 100000)] == [40, 40, 40, 14, 4, 4]
    assert photo_views(CompatConfig(photo_views=7), 1000) == 7
    assert photo_views(CompatConfig(photo_crop_budget=800), 20) == 40 and photo_views(CompatConfig(photo_crop_budget=800), 40) == 20
