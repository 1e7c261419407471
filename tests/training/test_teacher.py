"""The black-box teacher's cache and budget: cached images cost no call, the budget stops a run before any
call, and a failed or malformed call writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.teacher import Teacher, TeacherError, teacher_embeddings


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    out = []
    for i in range(7):
        p = tmp_path / f"img{i}.bin"
        p.write_bytes(f"image-{i}".encode() * 10)
        out.append(p)
    return out


def counting_teacher(dim: int = 4, fail_after: int | None = None, fingerprint: str = "f" * 64):
    calls: list[int] = []

    def embed(paths):
        if fail_after is not None and sum(calls) + len(paths) > fail_after:
            raise ConnectionError("teacher went away")
        calls.append(len(paths))
        vectors = np.stack([np.frombuffer(Path(p).read_bytes()[:dim], dtype=np.uint8).astype(np.float32) + 1
                            for p in paths])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return Teacher("counting", fingerprint, embed, dim=dim), calls


def test_second_run_comes_from_the_cache(images, tmp_path):
    teacher, calls = counting_teacher()
    first = teacher_embeddings(teacher, images, cache=tmp_path / "c", batch_size=3, progress=False)
    assert first.teacher_calls == 7 and first.from_cache == 0 and calls == [3, 3, 1]
    second = teacher_embeddings(teacher, images[::-1], budget=0, cache=tmp_path / "c", progress=False)
    assert second.teacher_calls == 0 and second.from_cache == 7 and sum(calls) == 7
    np.testing.assert_array_equal(second.embeddings, first.embeddings[::-1])
    np.testing.assert_allclose(np.linalg.norm(first.embeddings, axis=1), 1.0, atol=1e-6)
    other, other_calls = counting_teacher(fingerprint="0" * 64)  # another teacher: its own cache entries
    assert teacher_embeddings(other, images, cache=tmp_path / "c", progress=False).teacher_calls == 7


def test_budget_is_checked_before_any_call(images, tmp_path):
    teacher, calls = counting_teacher()
    teacher_embeddings(teacher, images[:3], cache=tmp_path / "c", progress=False)
    with pytest.raises(TeacherError, match=r"needs 4 teacher calls \(3 of 7 images are cached.*budget is 3"):
        teacher_embeddings(teacher, images, budget=3, cache=tmp_path / "c", progress=False)
    assert sum(calls) == 3  # nothing was sent for the refused run
    run = teacher_embeddings(teacher, images, budget=4, cache=tmp_path / "c", progress=False)
    assert run.teacher_calls == 4 and run.from_cache == 3


def test_duplicate_images_cost_one_call(images, tmp_path):
    teacher, calls = counting_teacher()
    twice = images[:2] + images[:2]
    run = teacher_embeddings(teacher, twice, budget=2, cache=None, progress=False)
    assert run.teacher_calls == 2 and np.array_equal(run.embeddings[:2], run.embeddings[2:])


def test_a_failed_call_writes_nothing_for_its_batch(images, tmp_path):
    teacher, calls = counting_teacher(fail_after=4)
    with pytest.raises(TeacherError, match="teacher counting failed on img3.bin and 2 more: ConnectionError"):
        teacher_embeddings(teacher, images, cache=tmp_path / "c", batch_size=3, progress=False)
    cached = sorted((tmp_path / "c").rglob("*.npy"))
    assert len(cached) == 3  # the first, successful batch only
    assert not list((tmp_path / "c").rglob("*.tmp"))


@pytest.mark.parametrize("bad, match", [
    (lambda ps: np.ones((len(ps), 5), np.float32), "returned 5-d embeddings, expected 4"),
    (lambda ps: np.full((len(ps), 4), np.nan, np.float32), "NaN or inf"),
    (lambda ps: np.ones((1, 4), np.float32), r"returned shape \(1, 4\) for 3 images"),
])
def test_malformed_teacher_output_is_an_error_and_not_cached(images, tmp_path, bad, match):
    with pytest.raises(TeacherError, match=match):
        teacher_embeddings(Teacher("bad", "b" * 64, bad, dim=4), images[:3], cache=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").rglob("*.npy"))


def test_bad_arguments(images):
    teacher, _ = counting_teacher()
    with pytest.raises(TeacherError, match="no images"):
        teacher_embeddings(teacher, [], cache=None)
    with pytest.raises(TeacherError, match="must be >= 0"):
        teacher_embeddings(teacher, images, budget=-1, cache=None)


@pytest.mark.slow
def test_a_bundle_gallery_model_and_its_checkpoint_agree_as_teachers(tmp_path, ukbench_dir):
    """The ONNX teacher (no torch) and the torch checkpoint it was exported from give the same embeddings,
    under different fingerprints; the bundle teacher refuses a folder that is not a bundle."""
    from tests.sdk.conftest import make_bundle
    from training.teacher import bundle_teacher, checkpoint_teacher

    bundle = make_bundle(tmp_path / "b")
    photos = sorted(ukbench_dir.glob("*.jpg"))[:6]
    onnx_t = bundle_teacher(bundle)
    torch_t = checkpoint_teacher(tmp_path / "b" / "ckpt" / "gallery.pt")
    assert onnx_t.dim == torch_t.dim == 32 and onnx_t.fingerprint != torch_t.fingerprint
    a = teacher_embeddings(onnx_t, photos, cache=tmp_path / "c", progress=False).embeddings
    b = teacher_embeddings(torch_t, photos, cache=tmp_path / "c", progress=False).embeddings
    assert np.abs(a - b).max() < 1e-4
    with pytest.raises(TeacherError, match="cannot use .* as a teacher"):
        bundle_teacher(tmp_path)
