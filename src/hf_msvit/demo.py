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
"""The interactive demo of the compute knob (a Gradio app, also what a Hugging Face Space runs).

    python demo/app.py --model runs/msvit-digits        # or: python -m hf_msvit.demo --model <dir or Hub id>

For an uploaded or example image it shows the top-5 labels, the gate picture (`hf_msvit.visualization`), the GMACs
this image cost against the static backbone's and the token counts, live under a `gate_threshold` slider and an
exact-budget slider (MSViT's `fine_region_budget`; DiT's `compute_budget` where its forward takes one), next to the
same image through the static backbone (MSViT with every region fine, DiT on PVTv2's route).

The logic is plain functions (`load_demo_model`, `analyze`, `example_images`); only `build_app` and `main` import
gradio, so importing this module (or hf_msvit) never does. Models never import this module.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import visualization


MODEL_ENV = "HF_MSVIT_MODEL"  # the checkpoint a Space (or `python demo/app.py` without --model) loads
MODEL_TYPES = ("msvit", "dit_routing")
THRESHOLD, BUDGET = "gate threshold", "exact budget"
TOP_K = 5
THRESHOLD_LABEL = "gate_threshold (knob 'gate threshold'; higher: fewer fine regions / tokens computed, less compute)"


@dataclass
class DemoModel:
    """A loaded checkpoint: the model, its image processor, and the same weights on the static route."""

    name: str
    model: torch.nn.Module
    processor: object
    static_model: torch.nn.Module  # MSViT: the model itself (the route is a forward argument); DiT: a static copy

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


@dataclass
class Analysis:
    """What the demo shows for one image: labels, pictures, GMACs and token counts, dynamic and static."""

    labels: dict[str, float]  # top-5 label -> probability
    static_labels: dict[str, float]
    gate_picture: Image.Image
    static_picture: Image.Image
    gmacs: float
    static_gmacs: float
    tokens: float  # MSViT: tokens entering the encoder; DiT: fraction of the route's tokens computed
    static_tokens: float
    setting: str  # the knob this forward ran with, e.g. "gate_threshold=0.5"
    fine_regions: tuple[int, int] | None = None  # MSViT: (fine, all) regions

    @property
    def compute_ratio(self) -> float:
        return self.gmacs / self.static_gmacs


def load_demo_model(name: str) -> DemoModel:
    """Loads an MSViT / DiT classifier and its image processor from a local directory or a Hub id."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    import hf_msvit  # noqa: F401  (registers the Auto classes)

    if not name:
        raise ValueError(f"No checkpoint given: pass --model (a directory or Hub id) or set {MODEL_ENV}.")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load {name!r}: expected a checkpoint directory or Hub id with config.json and "
            f"preprocessor_config.json (e.g. runs/msvit-digits after the README's main job). {error}"
        ) from error
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"The demo shows MSViT and DiT models {MODEL_TYPES}, {name!r} is a {config.model_type!r}.")
    model = AutoModelForImageClassification.from_pretrained(name).eval()
    processor = AutoImageProcessor.from_pretrained(name)
    return DemoModel(name=name, model=model, processor=processor, static_model=static_route_model(model))


def static_route_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model that computes the static backbone: MSViT itself (with `fine_region_mask` all True, see
    `static_outputs`), DiT as a copy with `routing_mode="static"` (PVTv2's route, read at every forward)."""
    if model.config.model_type == "msvit":
        return model
    static = copy.deepcopy(model).eval()
    static.config.routing_mode = "static"
    return static


def budget_argument(model) -> str | None:
    """The forward argument of the exact-budget knob: MSViT's `fine_region_budget`; DiT's `compute_budget` once its
    forward takes one; None if the model has no budget mode."""
    if model.config.model_type == "msvit":
        return "fine_region_budget"
    return "compute_budget" if "compute_budget" in inspect.signature(model.forward).parameters else None


def knob_kwargs(model, knob: str, gate_threshold: float, budget: float) -> dict:
    """The forward arguments of one knob setting (`knob` is `THRESHOLD` or `BUDGET`)."""
    if knob == THRESHOLD:
        return {"gate_threshold": float(gate_threshold)}
    if knob != BUDGET:
        raise ValueError(f"knob must be {THRESHOLD!r} or {BUDGET!r}, got {knob!r}.")
    name = budget_argument(model)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no exact-budget mode (its forward takes no compute_budget).")
    return {name: float(budget)}


def static_outputs(demo: DemoModel, pixel_values: torch.Tensor):
    if demo.model_type == "msvit":
        mask = torch.ones(pixel_values.shape[0], *demo.model.config.coarse_grid, dtype=torch.bool)
        return demo.model(pixel_values, fine_region_mask=mask.to(pixel_values.device))
    return demo.static_model(pixel_values)


def top_labels(logits: torch.Tensor, id2label: dict, k: int = TOP_K) -> dict[str, float]:
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(k, probs.shape[-1]))
    return {str(id2label.get(int(i), int(i))): float(v) for v, i in zip(values, indices)}


def _tokens(model_type: str, outputs) -> float:
    return float(outputs.num_tokens[0]) if model_type == "msvit" else float(outputs.token_keep_ratio[0])


def to_rgb(image) -> Image.Image:
    """A PIL image from what the app receives (PIL image, numpy array or path)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    return image.convert("RGB")


def analyze(demo: DemoModel, image, knob: str = THRESHOLD, gate_threshold: float = 0.5, budget: float = 0.5):
    """Runs one image through the model at one knob setting and through the static backbone."""
    image = to_rgb(image)
    kwargs = knob_kwargs(demo.model, knob, gate_threshold, budget)
    model = demo.model
    pixel_values = demo.processor(image, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    with torch.no_grad():
        outputs, static = model(pixel_values, **kwargs), static_outputs(demo, pixel_values)
    id2label = model.config.id2label
    fine_regions = None
    if demo.model_type == "msvit":
        fine_regions = (int(outputs.fine_region_mask[0].sum()), outputs.fine_region_mask[0].numel())
    return Analysis(
        labels=top_labels(outputs.logits[0], id2label),
        static_labels=top_labels(static.logits[0], id2label),
        gate_picture=visualization.picture(model, image, pixel_values, outputs),
        static_picture=visualization.picture(model, image, pixel_values, static),
        gmacs=float(outputs.macs[0]) / 1e9,
        static_gmacs=float(static.macs[0]) / 1e9,
        tokens=_tokens(demo.model_type, outputs),
        static_tokens=_tokens(demo.model_type, static),
        setting=", ".join(f"{key}={value:g}" for key, value in kwargs.items()),
        fine_regions=fine_regions,
    )


def summary_markdown(result: Analysis, model_type: str) -> str:
    """The numbers under the pictures (the browser test reads the first line's GMACs)."""
    if model_type == "msvit":
        fine, regions = result.fine_regions
        tokens = f"{result.tokens:.0f} ({fine} of {regions} regions fine)"
        static_tokens, static_setting = f"{result.static_tokens:.0f} (every region fine)", "ViT: every region fine"
    else:
        tokens = f"{result.tokens:.1%} of the route's tokens computed"
        static_tokens, static_setting = f"{result.static_tokens:.1%}", "PVTv2's route (routing_mode=static)"
    return (
        f"### {result.gmacs:.4g} GMACs for this image: {result.compute_ratio:.1%} of the static backbone "
        f"({result.static_gmacs:.4g} GMACs)\n\n"
        "| | this image | static backbone |\n|---|---|---|\n"
        f"| GMACs | {result.gmacs:.4g} | {result.static_gmacs:.4g} |\n"
        f"| tokens | {tokens} | {static_tokens} |\n"
        f"| setting | {result.setting} | {static_setting} |\n"
    )


def example_images(folder: str | Path | None = None, num_digits: int = 4) -> list[Path]:
    """Example images written to `folder` (a new temporary folder by default, which Gradio may serve): digits on
    canvas from the built-in data's test digits, and the two photographs scikit-learn ships."""
    from sklearn.datasets import load_sample_images

    from .data import CanvasStyle, _load_sklearn_digits, _split_indices, render_digits_on_canvas

    folder = Path(folder or tempfile.mkdtemp(prefix="hf_msvit_demo_"))
    folder.mkdir(parents=True, exist_ok=True)
    digits, labels = _load_sklearn_digits()
    chosen = _split_indices(len(digits), 0.1, 0.1, seed=0)["test"][:num_digits]
    rendered, rendered_labels, _, _ = render_digits_on_canvas(
        digits[chosen], labels[chosen], canvas_size=96, digit_size=(24, 32), seed=7, position_step=16,
        style=CanvasStyle(background="photo"),
    )  # fmt: skip
    paths = []
    for number, (image, label) in enumerate(zip(rendered, rendered_labels)):
        paths.append(folder / f"digit_{number}_label_{label}.png")
        image.save(paths[-1])
    photos = load_sample_images()
    for filename, photo in zip(photos.filenames, photos.images):
        paths.append(folder / Path(filename).name)
        Image.fromarray(photo).save(paths[-1])
    return paths


def build_app(demo: DemoModel, examples: list | None = None, gate_threshold: float = 0.5):
    """The Gradio Blocks app (imports gradio here). Its one endpoint `/analyze` takes (image, knob, threshold,
    budget) and returns (gate picture, static picture, labels, static labels, summary markdown)."""
    import gradio as gr

    budget_name = budget_argument(demo.model)
    knobs = [THRESHOLD] + ([BUDGET] if budget_name else [])

    def run(image, knob, threshold, budget):
        return app_outputs(demo, image, knob, threshold, budget)

    with gr.Blocks(title=f"hf_msvit demo: {demo.name}") as app:
        gr.Markdown(_header(demo))
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="input-image", height=320)
                if examples:
                    gr.Examples(examples=[[str(path)] for path in examples], inputs=[image])
            with gr.Column():
                knob = gr.Radio(knobs, value=THRESHOLD, label="compute knob", elem_id="knob")
                threshold = gr.Slider(
                    0.0, 1.0, value=gate_threshold, step=0.01, label=THRESHOLD_LABEL, elem_id="threshold"
                )
                budget = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.01, label=_budget_label(budget_name), elem_id="budget",
                    visible=budget_name is not None,
                )  # fmt: skip
                summary = gr.Markdown(elem_id="summary")
        with gr.Row():
            gate_picture = gr.Image(label="dynamic: the gate's decisions", elem_id="gate-picture", format="png")
            static_picture = gr.Image(label="static backbone", elem_id="static-picture", format="png")
        with gr.Row():
            labels = gr.Label(num_top_classes=TOP_K, label="top-5 (dynamic)", elem_id="labels")
            static_labels = gr.Label(num_top_classes=TOP_K, label="top-5 (static backbone)", elem_id="static-labels")
        inputs = [image, knob, threshold, budget]
        outputs = [gate_picture, static_picture, labels, static_labels, summary]
        image.change(run, inputs, outputs, api_name="analyze")
        for control in (knob, threshold, budget):
            control.change(run, inputs, outputs, api_name=False)
    return app


def app_outputs(demo: DemoModel, image, knob: str, gate_threshold: float, budget: float) -> tuple:
    """The app's outputs for one setting: (gate picture, static picture, labels, static labels, summary)."""
    if image is None:
        return None, None, None, None, "Upload an image or pick an example."
    try:
        result = analyze(demo, image, knob, gate_threshold, budget)
    except ValueError as error:  # a setting the model refuses (e.g. a DiT budget below its cheapest route)
        return None, None, None, None, f"**Cannot run this setting:** {error}"
    summary = summary_markdown(result, demo.model_type)
    return result.gate_picture, result.static_picture, result.labels, result.static_labels, summary


def _budget_label(budget_name: str | None) -> str:
    if budget_name == "fine_region_budget":
        return "exact budget: fraction of regions tokenized fine (fine_region_budget; knob 'exact budget')"
    return "exact budget: fraction of the static compute (compute_budget; knob 'exact budget')"


def _header(demo: DemoModel) -> str:
    kind = "MSViT (mixed-scale tokens)" if demo.model_type == "msvit" else "DiT (dynamic token routing)"
    return (
        f"## {kind}: `{demo.name}`\n"
        "Move the knob: the gate picture, the labels and the GMACs follow; the static backbone on the right is "
        "the same weights computing everything."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The MSViT / DiT compute-knob demo (Gradio).")
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV), help=f"checkpoint dir or Hub id (${MODEL_ENV})")
    parser.add_argument("--host", default=None, help="address to serve on (default: gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error(f"give --model (a checkpoint directory or Hub id) or set the {MODEL_ENV} environment variable")
    try:
        demo = load_demo_model(args.model)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    build_app(demo, examples=example_images()).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
