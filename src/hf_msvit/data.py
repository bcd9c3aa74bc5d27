# Copyright 2026 The hf_msvit Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The built-in dataset: real handwritten digits pasted on structured backgrounds, generated locally.

scikit-learn ships 1,797 handwritten digits (8x8 pixels, 17 gray levels; the UCI "optdigits" test set) and two real
photographs (`china.jpg`, `flower.jpg`, 427x640) inside its wheel, so nothing is downloaded. Each digit is upscaled
(24-32 px) and pasted, bright on darker ground, at a seeded random position of a 96x96 canvas.

The canvas (`background`):
- `"photo"` (default): a random crop of one of the two photographs, grayscale, its contrast reduced so the digit
  stays the brightest thing. Sky and blurred areas are smooth, buildings, trees and petals are detailed: regions
  differ continuously in how much detail they hold, so a gate that must tokenize a given fraction of them finely has
  a real choice to make (on a blank canvas every empty region looks the same and gets the same decision).
- `"blank"`: black with faint noise (the earlier variant: only the digit's regions hold anything).

Generation is deterministic: the same arguments give the same images, labels and split on every machine.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np


DIGIT_NAMES = [str(d) for d in range(10)]
BACKGROUNDS = ("photo", "blank")


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The built-in digits dataset needs scikit-learn (it ships the handwritten digits, no download): "
            "`pip install scikit-learn` or `pip install hf_msvit[examples]`. Or pass --dataset_name / --train_dir."
        ) from error
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _load_photos() -> list[np.ndarray]:
    """scikit-learn's two sample photographs as grayscale float arrays in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [
        np.asarray(Image.fromarray(image).convert("L"), dtype=np.float32) / 255.0
        for image in load_sample_images().images
    ]


@dataclass
class CanvasStyle:
    """How canvases are drawn: `background` (`"photo"` or `"blank"`), the side of the square photo crop in source
    pixels (sampled in `crop_range`, then resized to the canvas: small crops are smooth, large ones detailed), the
    photo's brightness range after contrast reduction (`photo_max` sampled in `contrast_range`), and pixel noise."""

    background: str = "photo"
    crop_range: tuple[int, int] = (96, 400)
    contrast_range: tuple[float, float] = (0.35, 0.6)
    noise_std: float = 0.03

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}.")


def _photo_crop(photos, rng: np.random.Generator, canvas_size: int, style: CanvasStyle) -> np.ndarray:
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(style.crop_range[0], min(style.crop_range[1], *photo.shape) + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = np.asarray(crop.resize((canvas_size, canvas_size), Image.BILINEAR), dtype=np.float32)
    crop = (crop - crop.min()) / max(float(crop.max() - crop.min()), 1e-6)
    return crop * rng.uniform(*style.contrast_range)


def render_digits_on_canvas(
    images: np.ndarray,
    labels: np.ndarray,
    canvas_size: int = 64,
    digit_size: int | tuple[int, int] = (20, 28),
    copies: int = 1,
    noise_std: float | None = None,
    seed: int = 0,
    position_step: int = 1,
    style: CanvasStyle | None = None,
):
    """Renders each 8x8 digit `copies` times on a `canvas_size` canvas.

    Returns `(list of PIL images, labels, positions, digit masks)`. `digit_size` is the side the digit is upscaled to,
    or a `(min, max)` range sampled per image. Digits are white on darker ground (like the sklearn data), pasted at a
    uniformly random position that keeps them inside the canvas, with `top` and `left` multiples of `position_step`.
    `positions` holds `(top, left, size)` per image; `digit masks` are boolean `(canvas, canvas)` arrays of the
    digit's stroke pixels (for segmentation labels and for checking what a gate selects). `noise_std` overrides
    `style.noise_std`.
    """
    from PIL import Image

    style = style or CanvasStyle(background="blank")
    noise = style.noise_std if noise_std is None else noise_std
    rng = np.random.default_rng(seed)
    low, high = (digit_size, digit_size) if isinstance(digit_size, int) else digit_size
    if not 8 <= low <= high <= canvas_size:
        raise ValueError(f"digit_size {digit_size} must lie between 8 and canvas_size ({canvas_size}).")
    photos = _load_photos() if style.background == "photo" else None
    out_images, out_labels, positions, masks = [], [], [], []
    for _ in range(copies):
        for image, label in zip(images, labels):
            size = int(rng.integers(low, high + 1))
            digit = Image.fromarray((image * 255).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
            top, left = (
                int(v) * position_step for v in rng.integers(0, (canvas_size - size) // position_step + 1, size=2)
            )
            strokes = np.zeros((canvas_size, canvas_size), dtype=np.float32)
            strokes[top : top + size, left : left + size] = np.asarray(digit, dtype=np.float32) / 255.0
            canvas = _compose(strokes, photos, rng, style, noise)
            out_images.append(Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L"))
            out_labels.append(int(label))
            positions.append((top, left, size))
            masks.append(strokes > 0.5)
    return out_images, out_labels, positions, masks


def _compose(strokes: np.ndarray, photos, rng: np.random.Generator, style: CanvasStyle, noise: float) -> np.ndarray:
    """The canvas in [0, 1]: the background (a photo crop, or black), the strokes over it, then pixel noise."""
    canvas = np.zeros_like(strokes) if photos is None else _photo_crop(photos, rng, strokes.shape[0], style)
    canvas = np.maximum(canvas, strokes)
    if noise > 0:
        canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0)


def _split_indices(num_digits: int, validation_fraction: float, test_fraction: float, seed: int) -> dict:
    """Source-digit indices per split. Test digits come first in one seeded permutation, then validation, then train:
    the held-out digits (validation + test) are the same set for any split of them between the two."""
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}.")
    if not 0.0 < validation_fraction + test_fraction < 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must lie in (0, 1) (some digits must be left to train on and some "
            f"held out), got {validation_fraction} + {test_fraction}."
        )
    order = np.random.default_rng(seed).permutation(num_digits)
    num_held_out = int(round(num_digits * (validation_fraction + test_fraction)))
    num_test = int(round(num_digits * test_fraction))
    splits = {"train": order[num_held_out:], "validation": order[num_test:num_held_out], "test": order[:num_test]}
    return {name: np.sort(indices) for name, indices in splits.items() if len(indices)}


def _render_splits(
    canvas_size, digit_size, copies, validation_fraction, test_fraction, noise_std, seed, position_step, background
):
    """Per split: `(indices, rendered images, labels, positions, masks)`, split by source digit."""
    images, labels = _load_sklearn_digits()
    style = CanvasStyle(background=background, noise_std=noise_std)
    rendered = {}
    splits = _split_indices(len(labels), validation_fraction, test_fraction, seed)
    for split_number, (split, indices) in enumerate(splits.items()):
        rendered[split] = (np.tile(indices, copies), *render_digits_on_canvas(
            images[indices], labels[indices], canvas_size=canvas_size, digit_size=digit_size, copies=copies,
            seed=seed * 1000 + split_number + 1, position_step=position_step, style=style,
        ))  # fmt: skip
    return rendered


def load_digits_on_canvas(
    canvas_size: int = 96,
    digit_size: int | tuple[int, int] = (24, 32),
    copies: int = 2,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    noise_std: float = 0.03,
    seed: int = 0,
    position_step: int = 16,
    background: str = "photo",
):
    """The built-in classification dataset as a `datasets.DatasetDict` with `train`, `validation` and `test` splits.

    Digits are pasted at random positions on a `position_step`-pixel grid (by default 16 px: the fine patch grid of a
    ViT/16), so the patches a digit falls into look the same wherever it lands; a small ViT trained from scratch for a
    minute then learns the task. `background` is `"photo"` (default: crops of scikit-learn's sample photographs, see
    the module docstring) or `"blank"`.

    Features: `image` (`datasets.Image`, grayscale PIL images of `canvas_size` x `canvas_size`), `label`
    (`ClassLabel` with names "0".."9"), `top`, `left`, `digit_size` (where the digit was pasted) and `source_index`
    (the index of the digit in scikit-learn's set).

    The split is by source digit: the `validation_fraction` and `test_fraction` of the 1,797 handwritten digits that
    form the validation and test splits never appear in training, at any position, nor in each other. Validation is
    for every choice (learning rates, recipes, early decisions), test for the numbers reported. With the defaults:
    2,876 training, 358 validation and 360 test images (1,438 / 179 / 180 digits; the training digits are the same as
    with the earlier two-way split of 80/20, whose validation digits are now split in two). Each source digit is
    rendered `copies=2` times at different positions, sizes and backgrounds, 96x96 px.
    """
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=DIGIT_NAMES),
            "top": datasets.Value("int32"),
            "left": datasets.Value("int32"),
            "digit_size": datasets.Value("int32"),
            "source_index": datasets.Value("int32"),
        }
    )
    rendered = _render_splits(
        canvas_size, digit_size, copies, validation_fraction, test_fraction, noise_std, seed, position_step, background
    )
    return _dataset_dict(rendered, features, _classification_columns)


def _classification_columns(sources, images, labels, positions, masks) -> dict:
    columns = {"image": images, "label": labels, "source_index": sources.tolist()}
    columns.update({name: [p[i] for p in positions] for i, name in enumerate(("top", "left", "digit_size"))})
    return columns


def _segmentation_columns(sources, images, labels, positions, masks) -> dict:
    from PIL import Image

    maps = [Image.fromarray((mask * (1 + label)).astype(np.uint8), mode="L") for mask, label in zip(masks, labels)]
    return {"image": images, "label": maps, "digit": labels, "source_index": sources.tolist()}


def _dataset_dict(rendered: dict, features, columns_of_split):
    """A `datasets.DatasetDict` of the `_render_splits` output, each split's columns made by `columns_of_split`."""
    import datasets

    splits = {
        split: datasets.Dataset.from_dict(columns_of_split(*rendered_split), features=features)
        for split, rendered_split in rendered.items()
    }
    return datasets.DatasetDict(splits)


def load_digits_on_canvas_segmentation(*args, **kwargs):
    """The built-in semantic-segmentation dataset: the canvases of `load_digits_on_canvas` (same arguments, same
    images) with a per-pixel label map: 0 for background, `1 + digit` on the digit's stroke pixels.

    Features: `image` (grayscale PIL image), `label` (PIL image of mode "L" holding class ids 0-10; the column name
    follows transformers' `run_semantic_segmentation.py`), `digit` (the image-level class), `source_index`.
    Class names are `SEGMENTATION_LABELS`. Split by source digit, as the classification data.
    """
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            "digit": datasets.ClassLabel(names=DIGIT_NAMES),
            "source_index": datasets.Value("int32"),
        }
    )
    canvas_args = inspect.signature(load_digits_on_canvas).bind(*args, **kwargs)
    canvas_args.apply_defaults()
    return _dataset_dict(_render_splits(**canvas_args.arguments), features, _segmentation_columns)


# The same arguments as `load_digits_on_canvas`, also for `help()` and `inspect`.
load_digits_on_canvas_segmentation.__signature__ = inspect.signature(load_digits_on_canvas)

SEGMENTATION_LABELS = ["background"] + [f"digit {name}" for name in DIGIT_NAMES]


def region_detail_fraction(images, region_size: int = 32, threshold: float = 0.04) -> float:
    """The data's own ceiling for a region gate: the fraction of `region_size` regions whose pixel standard deviation
    (in [0, 1] units) exceeds `threshold`, i.e. regions with any structure in them. On a blank canvas only the digit's
    regions qualify; with photo backgrounds most regions hold some detail, in varying amounts."""
    stds = []
    for image in images:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        rows, cols = pixels.shape[0] // region_size, pixels.shape[1] // region_size
        regions = pixels[: rows * region_size, : cols * region_size].reshape(rows, region_size, cols, region_size)
        stds.append(regions.std(axis=(1, 3)).ravel())
    return float((np.concatenate(stds) > threshold).mean())


__all__ = [
    "BACKGROUNDS",
    "DIGIT_NAMES",
    "SEGMENTATION_LABELS",
    "CanvasStyle",
    "load_digits_on_canvas",
    "load_digits_on_canvas_segmentation",
    "region_detail_fraction",
    "render_digits_on_canvas",
]
