"""data_loader.py: the validation split, statistics, normalisation and augmentation, and the
real data when it is there (the test skips when it is absent).
"""
from pathlib import Path

import numpy as np
import pytest

import cifar10
import data_loader
from data_loader import DataError

pytestmark = pytest.mark.timeout(60)

REAL_DATA = Path(__file__).resolve().parent.parent / "data" / "cifar-10-batches-py"


# --- serving ---------------------------------------------------------------------------------


def synthetic(n=600, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return images, rng.permutation(np.arange(n) % 10)


def test_split_is_stratified_seeded_and_a_partition():
    images, labels = synthetic()
    train_x, train_y, val_x, val_y = data_loader.split_validation(images, labels, 100, seed=0)
    assert train_x.shape == (500, 3072) and val_x.shape == (100, 3072)
    assert np.bincount(val_y, minlength=10).tolist() == [10] * 10
    # Every image lands in exactly one part, with its own label.
    rows = {row.tobytes(): y for row, y in zip(images, labels)}
    parts = [(row.tobytes(), y) for x, ys in ((train_x, train_y), (val_x, val_y))
             for row, y in zip(x, ys)]
    assert sorted(parts) == sorted(rows.items())
    again = data_loader.split_validation(images, labels, 100, seed=0)
    other = data_loader.split_validation(images, labels, 100, seed=1)
    np.testing.assert_array_equal(again[2], val_x)
    assert not np.array_equal(other[2], val_x)


def test_split_shares_remainders_and_refuses_impossible_sizes():
    images, labels = synthetic(n=100)
    labels = np.repeat(np.arange(10), [30, 20, 10, 10, 5, 5, 5, 5, 5, 5])
    _, _, _, val_y = data_loader.split_validation(images, labels, 13, seed=3)
    counts = np.bincount(val_y, minlength=10)
    # Shares 3.9, 2.6, 1.3, 1.3, 0.65 x 6: the 6 left over go to the largest fractions.
    assert counts[:4].tolist() == [4, 2, 1, 1] and sorted(counts[4:]) == [0, 1, 1, 1, 1, 1]
    for size in (0, 100, 101):
        with pytest.raises(DataError, match="val-size"):
            data_loader.split_validation(images, labels, size)


def test_statistics_come_from_the_training_split():
    images, labels = synthetic()
    train_x, _, _, _ = data_loader.split_validation(images, labels, 100, seed=0)
    mean, std = data_loader.compute_stats(train_x)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3072,)
    np.testing.assert_allclose(mean, train_x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, train_x.std(axis=0), rtol=1e-5)
    full_mean, _ = data_loader.compute_stats(images)
    assert not np.allclose(mean, full_mean)
    small_chunks = data_loader.compute_stats(train_x, chunk_size=7)
    np.testing.assert_array_equal(small_chunks[0], mean)
    np.testing.assert_array_equal(small_chunks[1], std)


def test_a_constant_pixel_gets_unit_std():
    images, _ = synthetic(n=50)
    images[:, 5] = 7
    mean, std = data_loader.compute_stats(images)
    assert mean[5] == 7 and std[5] == 1
    assert np.isfinite(data_loader.normalize(images, mean, std)).all()


def test_normalize_matches_the_formula_and_fills_the_buffer():
    images, _ = synthetic(n=128)
    mean, std = data_loader.compute_stats(images)
    expected = (images.astype(np.float64) - mean) / std
    x = data_loader.normalize(images, mean, std)
    assert x.dtype == np.float32 and x.shape == images.shape
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    for dtype in (np.float32, np.float64):
        buffer = np.empty(images.shape, dtype)
        assert data_loader.normalize(images, mean, std, out=buffer) is buffer
        np.testing.assert_allclose(buffer, expected, rtol=1e-5, atol=1e-5)


def shifted(image, dy, dx):
    """Reference shift of a (3, 32, 32) image: down by dy, right by dx, zeros coming in."""
    out = np.roll(image, (dy, dx), axis=(1, 2))
    out[:, :dy] = 0 if dy > 0 else out[:, :dy]
    out[:, dy:] = 0 if dy < 0 else out[:, dy:]
    out[:, :, :dx] = 0 if dx > 0 else out[:, :, :dx]
    out[:, :, dx:] = 0 if dx < 0 else out[:, :, dx:]
    return out


def matches(original, augmented, flip, translate):
    """Each augmented image's (flipped, dy, dx), or None where no candidate explains it."""
    found = []
    for a, b in zip(original.reshape(-1, 3, 32, 32), augmented.reshape(-1, 3, 32, 32)):
        hits = [(f, dy, dx) for f in ({False, flip}) for dy in range(-translate, translate + 1)
                for dx in range(-translate, translate + 1)
                if np.array_equal(shifted(a[:, :, ::-1] if f else a, dy, dx), b)]
        found.append(hits[0] if len(hits) == 1 else None)
    return found


def test_flip_gives_each_image_or_its_mirror():
    images, _ = synthetic(n=64)
    before = images.copy()
    out = data_loader.augment(images, np.random.default_rng(0), flip=True, translate=0)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)  # a copy: the input is untouched
    found = matches(images, out, flip=True, translate=0)
    assert None not in found and {f for f, _, _ in found} == {False, True}
    same = data_loader.augment(images, np.random.default_rng(0), flip=False, translate=0)
    np.testing.assert_array_equal(same, images)
    assert same is not images


@pytest.mark.parametrize("flip", [False, True])
def test_translate_shifts_each_image_with_zero_fill(flip):
    images, _ = synthetic(n=300)
    before = images.copy()
    out = data_loader.augment(images, np.random.default_rng(1), flip=flip, translate=2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)
    found = matches(images, out, flip=flip, translate=2)
    assert None not in found  # every image, in its place, is a shift (and mirror) of itself
    assert len({(dy, dx) for _, dy, dx in found}) == 25
    assert {f for f, _, _ in found} == ({False, True} if flip else {False})


def test_a_pixel_moves_by_the_shift():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 1, 10, 20] = 255  # green, row 10, column 20
    images = np.repeat(image.reshape(1, 3072), 200, axis=0)
    out = data_loader.augment(images, np.random.default_rng(2), flip=False, translate=3)
    where = [np.argwhere(o.reshape(3, 32, 32)) for o in out]
    assert all(len(w) == 1 and w[0][0] == 1 for w in where)
    moves = {(w[0][1] - 10, w[0][2] - 20) for w in where}
    assert moves == {(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)}


def test_a_pixel_shifted_out_leaves_zeros():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, :, 0, 0] = 200  # the top-left corner leaves the frame when shifted up or left
    images = np.repeat(image.reshape(1, 3072), 100, axis=0)
    out = data_loader.augment(images, np.random.default_rng(3), flip=False, translate=1)
    kept = out.reshape(-1, 3, 32, 32).any(axis=(1, 2, 3))
    assert 0 < kept.sum() < 100 and set(np.unique(out)) == {0, 200}


# --- the real data ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no CIFAR-10 at {REAL_DATA}")
def test_the_real_cifar10():
    train_x, train_y, test_x, test_y = data_loader.load_data(REAL_DATA.parent)
    assert train_x.shape == (50000, 3072) and test_x.shape == (10000, 3072)
    assert train_x.dtype == test_x.dtype == np.uint8
    assert train_y.dtype == test_y.dtype == np.int64
    assert np.bincount(train_y).tolist() == [5000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    for name in cifar10.TRAIN_FILES + [cifar10.TEST_FILE]:
        assert len(cifar10.read_batch(REAL_DATA / name)[1]) == 10000


def test_mixup_blends_pairs_of_the_batch_and_their_labels():
    images, labels = synthetic(64)
    prep = data_loader.Preprocessing(np.zeros(3072, np.float32), np.ones(3072, np.float32))
    config = {"flip": False, "translate": 0, "rotate": 0, "mixup": 0.4}
    idx = np.arange(10, 42)
    x, y, (lam, y2) = data_loader.training_batch(images, labels, idx, np.random.default_rng(5),
                                                  prep, config)
    assert 0 < lam < 1 and np.array_equal(y, labels[idx]) and sorted(y2) == sorted(y)
    rows = images[idx].astype(np.float64)
    blends = lam * rows[:, None] + (1 - lam) * rows[None, :]  # every pair (i, j)
    partner = np.isclose(blends, x[:, None], atol=1e-3).all(axis=2)
    assert partner.any(axis=1).all()  # each input is a blend of two images of the batch
    assert np.array_equal(y[partner.argmax(axis=1)], y2)  # labelled by its partner
    plain = data_loader.training_batch(images, labels, idx, np.random.default_rng(5), prep,
                                       {**config, "mixup": 0})
    assert plain[2] is None and np.array_equal(plain[0], rows.astype(np.float32))


def test_a_half_turn_is_both_mirrors_and_small_turns_keep_the_centre():
    images, _ = synthetic(4)
    n = len(images)
    half = np.tile((np.cos(np.pi), np.sin(np.pi)), (n, 1))
    turned = data_loader.warp(images, np.zeros(n, bool), np.zeros((n, 2), int), half)
    upside_down = images.reshape(n, 3, 32, 32)[:, :, ::-1, ::-1].reshape(n, 3072)
    assert np.allclose(turned, upside_down, atol=1e-6)
    smooth = np.full((n, 3072), 100, np.uint8)  # a flat image stays flat inside the frame
    small = np.tile((np.cos(0.1), np.sin(0.1)), (n, 1))
    inner = data_loader.warp(smooth, np.zeros(n, bool), np.zeros((n, 2), int), small)
    inner = inner.reshape(n, 3, 32, 32)[:, :, 4:28, 4:28]
    assert np.allclose(inner, 100, atol=1e-4)
    flips, shifts, turns = data_loader.draw_augmentation(1000, np.random.default_rng(0),
                                                         rotate=10)
    angles = np.degrees(np.arctan2(turns[:, 1], turns[:, 0]))
    assert -10 <= angles.min() < -9 and 9 < angles.max() <= 10
