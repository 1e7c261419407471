"""Real photos that ship inside installed packages: the quickstart's default real-photo views.

A user outside this team has no photo set on disk, and models fitted on the procedural objects alone do
not transfer to real photos (the issue's measurements). Two kinds of package carry photographs:

- Python packages: scikit-image (a `train` dependency) ships about twenty in skimage/data (an astronaut,
  a cat, coffee, coins, a motorcycle pair, a rocket, ...). Synthetic test images there (chessboards,
  phantoms, logos, silhouettes) are left out. matplotlib and scikit-learn ship a few too; they are not
  used, so the set does not change with whichever other packages happen to be installed.
- Debian packages that `scripts/setup.sh` installs (DEBIAN_PHOTOS): GCompris's activity photos (animals,
  fish, monuments, tools, wind and solar power, musical instruments; 1024x768 and smaller) and two
  wallpaper sets' nature photos. GCompris keeps its images inside Qt resource archives (.rcc); the photos
  are copied out of them once into the cache (PHOTO_CACHE) and read from there.

Which files count is decided here, by name, after looking at every one of them: drawings, renders and
abstract patterns are left out.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from training.errors import TrainingError

# package -> (folder inside it, the photographs in that folder)
PACKAGE_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "skimage": ("data", (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
        "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
        "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")),
}


@dataclass(frozen=True)
class DebianPhotos:
    """Photos among an installed Debian package's files (its dpkg file list), matched by glob. With
    `archive_members`, the matched files are Qt resource archives and the photos are the members matching
    those globs."""

    package: str
    files: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    archive_members: tuple[str, ...] = ()


_GCOMPRIS_ACTIVITIES = ("categorization", "erase", "explore_monuments", "explore_world_animals",
                        "explore_farm_animals", "explore_world_music")
DEBIAN_PHOTOS: tuple[DebianPhotos, ...] = (
    # GPL-3+ program; its images are CC-BY-SA / public domain (the package's copyright file, per image).
    # usCapitol is left out: the US Capitol is one of the team's PhotoTourism evaluation landmarks.
    DebianPhotos("gcompris-qt-data", tuple(f"/usr/share/gcompris-qt/rcc/{a}.rcc" for a in _GCOMPRIS_ACTIVITIES),
                 exclude=("*/usCapitol.*",),
                 archive_members=("*/resource/*.webp", "*/resource/*.jpg")),
    DebianPhotos("mate-backgrounds", ("/usr/share/backgrounds/mate/nature/*.jpg",)),  # GPL-2+ / CC-BY-SA-4.0
    DebianPhotos("lomiri-wallpapers-16.04", ("/usr/share/backgrounds/*.jpg",),  # CC-BY / CC-BY-SA / CC0
                 exclude=("*/analogpattern_*", "*/free_by_*", "*/greentock_*", "*/umang_*")),  # patterns, renders
)
DPKG_INFO = Path("/var/lib/dpkg/info")
PHOTO_CACHE = Path(os.environ.get("RETRIEVAL_SDK_PHOTO_CACHE", "~/.cache/retrieval-sdk/photos")).expanduser()
MIN_PHOTO_BYTES = 8000  # smaller archive members are icons and buttons, not photos


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def photo_sources(debian: bool = True) -> dict[str, list[Path]]:
    """Package name -> its installed photographs: PACKAGE_PHOTOS' (found without importing the packages),
    then (debian=True) DEBIAN_PHOTOS'; packages that are not installed are left out."""
    out: dict[str, list[Path]] = {}
    for package, (folder, names) in PACKAGE_PHOTOS.items():
        root = _package_dir(package)
        found = [root / folder / n for n in names if (root / folder / n).is_file()] if root is not None else []
        if found:
            out[package] = found
    for source in DEBIAN_PHOTOS if debian else ():
        found = debian_photos(source)
        if found:
            out[source.package] = found
    return out


def package_photos(debian: bool = True) -> list[Path]:
    """Every photo of `photo_sources`, in one list."""
    return [p for paths in photo_sources(debian).values() for p in paths]


def installed_files(package: str, dpkg_info: Path | None = None) -> list[str] | None:
    """The files an installed Debian package put on disk (its dpkg list under `dpkg_info`, default
    DPKG_INFO), or None when it is not installed."""
    dpkg_info = dpkg_info or DPKG_INFO
    for name in (f"{package}.list", *sorted(p.name for p in dpkg_info.glob(f"{package}:*.list"))):
        path = dpkg_info / name
        if path.is_file():
            return path.read_text(errors="replace").splitlines()
    return None


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def debian_photos(source: DebianPhotos, dpkg_info: Path | None = None, cache: Path | None = None) -> list[Path]:
    """`source`'s photos, [] when its package is not installed; archive members are copied out once into
    `cache` (default PHOTO_CACHE) and returned from there."""
    files = installed_files(source.package, dpkg_info)
    if files is None:
        return []
    chosen = sorted(f for f in files if _matches(f, source.files) and not _matches(f, source.exclude)
                    and Path(f).is_file())
    if not source.archive_members:
        return [Path(f) for f in chosen]
    folder = (cache or PHOTO_CACHE) / source.package
    return [p for archive in chosen for p in _cached_members(Path(archive), folder / Path(archive).stem, source)]


def _cached_members(archive: Path, folder: Path, source: DebianPhotos) -> list[Path]:
    """The archive's photo members as files under `folder`, extracted on first use. A marker file holds
    the archive's size and mtime and the filters: when either changed (a package upgrade, a new exclude),
    the folder is emptied and extracted again, so no stale member survives."""
    stamp = folder / ".extracted"
    key = repr((archive.stat().st_size, archive.stat().st_mtime_ns, source.archive_members, source.exclude,
                MIN_PHOTO_BYTES))
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(folder, ignore_errors=True)
        for name, data in read_qt_resources(archive):
            rel = name.lstrip("/")
            if (len(data) < MIN_PHOTO_BYTES or not _matches("/" + rel, source.archive_members)
                    or _matches("/" + rel, source.exclude)):
                continue
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)  # last: an interrupted extraction has no stamp and is redone
    return sorted(p for p in folder.rglob("*") if p.is_file() and p != stamp)


def read_qt_resources(path: Path) -> list[tuple[str, bytes]]:
    """Every file in a Qt binary resource archive (`rcc -binary`, format versions 1-3) as (path, bytes).

    Layout: "qres", then big-endian u32 version, tree, data and names offsets. Tree nodes (14 bytes; 22
    from version 2, which adds a modification time) hold a name offset, flags (2: directory, 1: zlib,
    4: zstd) and either a child count and first child index or a data offset. A name is a u16 length, a
    u32 hash and UTF-16BE text; a data entry is a u32 size and the bytes (zlib ones start with the
    uncompressed size). zstd members (Qt 6 with zstd) are not supported and raise.
    """
    blob = path.read_bytes()
    try:
        if blob[:4] != b"qres":
            raise ValueError("not a Qt resource archive (no 'qres' magic)")
        version, tree, data, names = struct.unpack(">IIII", blob[4:20])
        if version not in (1, 2, 3):
            raise ValueError(f"unknown format version {version}")
        node_size = 14 if version == 1 else 22

        def name_at(offset: int) -> str:
            length = struct.unpack(">H", blob[names + offset:names + offset + 2])[0]
            start = names + offset + 6
            return blob[start:start + 2 * length].decode("utf-16-be")

        out: list[tuple[str, bytes]] = []
        stack = [(0, "")]
        while stack:
            index, prefix = stack.pop()
            at = tree + index * node_size
            name_offset, flags = struct.unpack(">IH", blob[at:at + 6])
            name = prefix + "/" + name_at(name_offset) if index else ""
            if flags & 2:
                count, first = struct.unpack(">II", blob[at + 6:at + 14])
                if first + count > (len(blob) - tree) // node_size or (count and first <= index):
                    raise ValueError("directory entry points past the tree or back into it")
                stack += [(child, name) for child in range(first + count - 1, first - 1, -1)]
                continue
            (offset,) = struct.unpack(">I", blob[at + 10:at + 14])
            (size,) = struct.unpack(">I", blob[data + offset:data + offset + 4])
            payload = blob[data + offset + 4:data + offset + 4 + size]
            if flags & 4:
                raise ValueError(f"{name} is zstd-compressed, which this reader does not support")
            out.append((name, zlib.decompress(payload[4:]) if flags & 1 else payload))
        return out
    except (ValueError, struct.error, zlib.error, UnicodeDecodeError) as e:
        raise TrainingError(f"cannot read Qt resource archive {path}: {e} (reinstall the package that owns it)") from None
