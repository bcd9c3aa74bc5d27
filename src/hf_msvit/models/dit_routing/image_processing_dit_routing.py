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
"""Image processor class for DiT (PIL backend: works without torchvision), with segmentation maps."""

from transformers.image_utils import PILImageResampling
from transformers.models.segformer.image_processing_pil_segformer import (
    SegformerImageProcessorKwargs,
    SegformerImageProcessorPil,
)
from transformers.utils import auto_docstring


# Segformer's kwargs (`do_reduce_labels`), under the `<processor>Kwargs` name transformers looks up.
DiTImageProcessorKwargs = SegformerImageProcessorKwargs


@auto_docstring
class DiTImageProcessor(SegformerImageProcessorPil):
    r"""
    Converts any PIL image (grayscale, RGBA, palette, ...) to RGB, resizes it to `size`, rescales to [0, 1] and
    normalizes with the ImageNet statistics. The defaults match the PVTv2 checkpoints DiT is upcycled from
    (`OpenGVLab/pvt_v2_b*`).

    Semantic segmentation (transformers' Segformer processor, PIL backend): `segmentation_maps` are resized with
    nearest-neighbour sampling and returned as integer `labels` (never rescaled or normalized), optionally reduced by
    one (`do_reduce_labels`); `post_process_semantic_segmentation` turns logits into class maps at any size.
    """

    valid_kwargs = DiTImageProcessorKwargs
    resample = PILImageResampling.BICUBIC
    size = {"height": 224, "width": 224}
    do_convert_rgb = True


DiTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DiTImageProcessor"]
