"""Real photos that ship inside installed Python packages: the quickstart's default real-photo views.

A user outside this team has no photo set on disk, and models fitted on the procedural objects alone do
not transfer to real photos (the issue's measurements). scikit-image (a `train` dependency) ships about
twenty photographs in skimage/data (an astronaut, a cat, coffee, coins, a motorcycle pair, a rocket, ...).
Synthetic test images there (chessboards, phantoms, logos, silhouettes) are left out. Only the `train`
extra's own package is used, so the set (and the quickstart's figures) does not change with whichever
other packages happen to be installed (matplotlib and scikit-learn ship a few photos too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# package -> (folder inside it, the photographs in that folder)
PACKAGE_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "skimage": ("data", (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
        "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
        "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")),
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_photos() -> list[Path]:
    """The photographs of PACKAGE_PHOTOS that are installed here (found without importing the packages)."""
    out: list[Path] = []
    for package, (folder, names) in PACKAGE_PHOTOS.items():
        root = _package_dir(package)
        if root is not None:
            out += [root / folder / n for n in names if (root / folder / n).is_file()]
    return out
