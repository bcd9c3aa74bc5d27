"""The built-in digits-on-canvas dataset: deterministic, no download, digit where it says, disjoint splits."""

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from hf_msvit.data import DIGIT_NAMES, load_digits_on_canvas  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return load_digits_on_canvas(canvas_size=64, digit_size=(16, 24), copies=1, validation_fraction=0.2, seed=3)


def test_structure(small):
    assert isinstance(small, datasets.DatasetDict)
    assert set(small) == {"train", "validation"}
    features = small["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel) and features["label"].names == DIGIT_NAMES
    assert len(small["train"]) + len(small["validation"]) == 1797
    assert len(small["validation"]) == round(1797 * 0.2)
    image = small["train"][0]["image"]
    assert image.size == (64, 64)
    assert set(small["train"]["label"]) == set(range(10))


def test_splits_are_disjoint_by_source_digit(small):
    train, val = set(small["train"]["source_index"]), set(small["validation"]["source_index"])
    assert not train & val


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
