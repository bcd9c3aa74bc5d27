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
"""The built-in dataset: real handwritten digits placed at random positions on a larger blank canvas.

scikit-learn ships 1,797 handwritten digits (8x8 pixels, 17 gray levels; the UCI "optdigits" test set) inside its
wheel, so nothing is downloaded. Each digit is upscaled (24-32 px), pasted at a seeded random position on a blank
96x96 canvas and lightly noised. Most of the canvas is empty: coarse tokens suffice there, fine tokens matter on the digit,
which is exactly what a dynamic tokenizer should learn.

Generation is deterministic: the same arguments give the same images, labels and split on every machine.
"""

from __future__ import annotations

import numpy as np


DIGIT_NAMES = [str(d) for d in range(10)]
DATASET_NAME = "hf-msvit/digits-on-canvas"  # the name used in model cards; the data is generated locally


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


def render_digits_on_canvas(
    images: np.ndarray,
    labels: np.ndarray,
    canvas_size: int = 64,
    digit_size: int | tuple[int, int] = (20, 28),
    copies: int = 1,
    noise_std: float = 0.03,
    seed: int = 0,
    position_step: int = 1,
):
    """Renders each 8x8 digit `copies` times on a `canvas_size` canvas; returns `(list of PIL images, labels, positions)`.

    `digit_size` is the side the digit is upscaled to, or a `(min, max)` range sampled per image. Digits are white
    on black (like the sklearn data), pasted at a uniformly random position that keeps them inside the canvas, with
    `top` and `left` multiples of `position_step`.
    `positions` holds `(top, left, size)` per image, useful to check what a gate selects.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    low, high = (digit_size, digit_size) if isinstance(digit_size, int) else digit_size
    if not 8 <= low <= high <= canvas_size:
        raise ValueError(f"digit_size {digit_size} must lie between 8 and canvas_size ({canvas_size}).")
    out_images, out_labels, positions = [], [], []
    for _ in range(copies):
        for image, label in zip(images, labels):
            size = int(rng.integers(low, high + 1))
            digit = Image.fromarray((image * 255).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
            top, left = (
                int(v) * position_step for v in rng.integers(0, (canvas_size - size) // position_step + 1, size=2)
            )
            canvas = np.zeros((canvas_size, canvas_size), dtype=np.float32)
            canvas[top : top + size, left : left + size] = np.asarray(digit, dtype=np.float32) / 255.0
            if noise_std > 0:
                canvas += rng.normal(0.0, noise_std, size=canvas.shape).astype(np.float32)
            canvas = np.clip(canvas, 0.0, 1.0)
            out_images.append(Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L"))
            out_labels.append(int(label))
            positions.append((top, left, size))
    return out_images, out_labels, positions


def load_digits_on_canvas(
    canvas_size: int = 96,
    digit_size: int | tuple[int, int] = (24, 32),
    copies: int = 2,
    validation_fraction: float = 0.2,
    noise_std: float = 0.03,
    seed: int = 0,
    position_step: int = 16,
):
    """The built-in dataset as a `datasets.DatasetDict` with `train` and `validation` splits.

    Digits are pasted at random positions on a `position_step`-pixel grid (by default 16 px: the fine patch grid of a
    ViT/16), so the patches a digit falls into look the same wherever it lands. A small ViT trained from scratch for a
    minute then learns the task; with `position_step=1` (any pixel offset) it needs many times more steps.

    Features: `image` (`datasets.Image`, grayscale PIL images of `canvas_size` x `canvas_size`), `label`
    (`ClassLabel` with names "0".."9"), `top`, `left`, `digit_size` (where the digit was pasted) and `source_index`
    (the index of the digit in scikit-learn's set).

    The split is by source digit: the `validation_fraction` of the 1,797 handwritten digits that form the validation
    split never appear in training, at any position. With the defaults: 2,876 training and 718 validation images
    (each source digit rendered `copies=2` times at different positions and sizes), 96x96 px, digits of 24-32 px.
    """
    import datasets

    images, labels = _load_sklearn_digits()
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}.")
    order = np.random.default_rng(seed).permutation(len(labels))
    num_val = int(round(len(labels) * validation_fraction))
    split_indices = {"train": np.sort(order[num_val:]), "validation": np.sort(order[:num_val])}

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
    splits = {}
    for split_number, (split, indices) in enumerate(split_indices.items()):
        rendered, split_labels, positions = render_digits_on_canvas(
            images[indices],
            labels[indices],
            canvas_size=canvas_size,
            digit_size=digit_size,
            copies=copies,
            noise_std=noise_std,
            seed=seed * 1000 + split_number + 1,
            position_step=position_step,
        )
        sources = np.tile(indices, copies)
        splits[split] = datasets.Dataset.from_dict(
            {
                "image": rendered,
                "label": split_labels,
                "top": [p[0] for p in positions],
                "left": [p[1] for p in positions],
                "digit_size": [p[2] for p in positions],
                "source_index": sources.tolist(),
            },
            features=features,
        )
    return datasets.DatasetDict(splits)


__all__ = ["DATASET_NAME", "DIGIT_NAMES", "load_digits_on_canvas", "render_digits_on_canvas"]
