"""The built-in digits-on-canvas dataset: deterministic, no download, digit where it says, disjoint splits."""

import numpy as np
import pytest


datasets = pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from hf_msvit.data import (  # noqa: E402 (after the importorskips)
    DIGIT_NAMES,
    SEGMENTATION_LABELS,
    _split_indices,
    load_digits_on_canvas,
    load_digits_on_canvas_segmentation,
    region_detail_fraction,
)


@pytest.fixture(scope="module")
def small():
    return load_digits_on_canvas(
        canvas_size=64, digit_size=(16, 24), copies=1, validation_fraction=0.2, seed=3, background="blank"
    )


@pytest.fixture(scope="module")
def photo():
    return load_digits_on_canvas(canvas_size=64, digit_size=(16, 24), copies=1, seed=3)


def test_structure(small):
    assert isinstance(small, datasets.DatasetDict)
    assert set(small) == {"train", "validation", "test"}
    features = small["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel) and features["label"].names == DIGIT_NAMES
    assert len(small["train"]) + len(small["validation"]) + len(small["test"]) == 1797
    assert len(small["validation"]) + len(small["test"]) == round(1797 * 0.3)
    assert len(small["test"]) == round(1797 * 0.1)
    image = small["train"][0]["image"]
    assert image.size == (64, 64)
    assert set(small["train"]["label"]) == set(range(10))


def test_splits_are_disjoint_by_source_digit(small):
    train, val, test = (set(small[name]["source_index"]) for name in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test


def test_default_split_keeps_the_two_way_training_digits():
    """Validation and test split the earlier 20% held-out digits; the training digits (and so every model trained on
    them) are unchanged, and the test digits were never trained on."""
    three_way = _split_indices(1797, 0.1, 0.1, seed=0)
    two_way_train = _split_indices(1797, 0.2, 0.0, seed=0)
    assert set(two_way_train) == {"train", "validation"}
    assert np.array_equal(three_way["train"], two_way_train["train"])
    held_out = np.sort(np.concatenate([three_way["validation"], three_way["test"]]))
    assert np.array_equal(held_out, two_way_train["validation"])
    assert (len(three_way["train"]), len(three_way["validation"]), len(three_way["test"])) == (1438, 179, 180)


@pytest.mark.parametrize("fractions", [(0.0, 0.0), (0.6, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_bad_split_fractions_say_what_is_wrong(fractions):
    with pytest.raises(ValueError, match="fraction"):
        _split_indices(100, *fractions, seed=0)


def test_digit_is_where_recorded_and_canvas_is_blank_elsewhere(small):
    for row in small["validation"].select(range(20)):
        pixels = np.asarray(row["image"], dtype=np.float32) / 255.0
        top, left, size = row["top"], row["left"], row["digit_size"]
        assert 16 <= size <= 24 and 0 <= top <= 64 - size and 0 <= left <= 64 - size
        inside = pixels[top : top + size, left : left + size]
        outside = pixels.copy()
        outside[top : top + size, left : left + size] = 0
        assert inside.max() > 0.5  # the strokes
        assert outside.mean() < 0.05  # faint noise only


def test_deterministic():
    a = load_digits_on_canvas(canvas_size=32, digit_size=12, copies=1, seed=1)
    b = load_digits_on_canvas(canvas_size=32, digit_size=12, copies=1, seed=1)
    c = load_digits_on_canvas(canvas_size=32, digit_size=12, copies=1, seed=2)
    for i in (0, 5, 100):
        assert np.array_equal(np.asarray(a["train"][i]["image"]), np.asarray(b["train"][i]["image"]))
    assert a["train"]["top"] == b["train"]["top"]
    assert a["validation"]["source_index"] != c["validation"]["source_index"]


def test_copies_use_new_positions():
    data = load_digits_on_canvas(canvas_size=64, digit_size=20, copies=2, seed=0)
    train = data["train"]
    half = len(train) // 2
    assert train["source_index"][:half] == train["source_index"][half:]
    assert train["top"][:half] != train["top"][half:]


def test_photo_background_gives_regions_a_range_of_detail(photo, small):
    """The default canvases hold structure outside the digit, in varying amounts; the blank ones do not."""
    photo_images, blank_images = photo["validation"]["image"], small["validation"]["image"]
    photo_fraction = region_detail_fraction(photo_images, region_size=16)
    blank_fraction = region_detail_fraction(blank_images, region_size=16)
    assert photo_fraction > 0.6 and blank_fraction < 0.4, (photo_fraction, blank_fraction)
    region_stds = []
    for image in photo_images[:50]:
        pixels = np.asarray(image, dtype=np.float32).reshape(4, 16, 4, 16) / 255.0
        region_stds.append(pixels.std(axis=(1, 3)).ravel())
    quartiles = np.quantile(np.concatenate(region_stds), [0.25, 0.5, 0.75])
    assert quartiles[0] < quartiles[1] < quartiles[2] and quartiles[2] > 2 * quartiles[0], quartiles  # a continuum
    for row in photo["validation"].select(range(20)):  # the digit stays the brightest thing on the canvas
        pixels = np.asarray(row["image"], dtype=np.float32) / 255.0
        top, left, size = row["top"], row["left"], row["digit_size"]
        outside = pixels.copy()
        outside[top : top + size, left : left + size] = 0
        assert pixels[top : top + size, left : left + size].max() > outside.max() + 0.2


def test_segmentation_variant_labels_the_digit_pixels():
    seg = load_digits_on_canvas_segmentation(canvas_size=64, digit_size=(16, 24), copies=1, seed=3)
    cls = load_digits_on_canvas(canvas_size=64, digit_size=(16, 24), copies=1, seed=3)
    assert len(SEGMENTATION_LABELS) == 11
    for index in (0, 7, 42):
        row, same = seg["validation"][index], cls["validation"][index]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(same["image"]))  # the same canvases
        labels = np.asarray(row["label"])
        assert labels.shape == (64, 64) and set(np.unique(labels)) == {0, 1 + row["digit"]}
        top, left, size = same["top"], same["left"], same["digit_size"]
        inside = np.zeros_like(labels, dtype=bool)
        inside[top : top + size, left : left + size] = True
        assert not (labels[~inside] > 0).any() and (labels[inside] > 0).mean() > 0.1


def test_bad_background_is_a_clear_error():
    with pytest.raises(ValueError, match="background must be one of"):
        load_digits_on_canvas(canvas_size=32, digit_size=12, copies=1, background="noise")
