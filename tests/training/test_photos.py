"""The real photos shipped in installed packages: found without ../shared, all readable, no synthetic ones."""

from __future__ import annotations

from sdk.preprocess import load_image
from training.photos import PACKAGE_PHOTOS, package_photos


def test_scikit_image_photos_are_found_and_readable():
    photos = package_photos()
    skimage = [p for p in photos if "skimage" in p.parts]
    assert len(skimage) == len(PACKAGE_PHOTOS["skimage"][1]) == 20  # scikit-image is a `train` dependency
    for path in photos:
        img = load_image(path)
        assert min(img.size) >= 100, path  # photographs, not icons
    names = {p.name for p in photos}
    assert not names & {"chessboard_RGB.png", "phantom.png", "logo.png", "horse.png"}
