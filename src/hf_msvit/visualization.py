"""Pictures of what the gates did on one image.

- MSViT: the image with the coarse grid drawn over it; regions tokenized fine are tinted and split into their fine
  patches, with the gate probability in the corner of each region.
- DiT: the routing grid (scales x stages): for every stage the fraction of the image's tokens it computed, for every
  downsampling edge whether the column gate took it, next to the image.

`visualize(model, image, output_path)` dispatches on the model type; `hf-msvit visualize` is the command line;
`picture(model, image, pixel_values, outputs)` draws a forward that already ran (the demo app uses it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


FINE_TINT = (255, 140, 0)
GRID_COLOR = (0, 200, 255)


def _load_image(image) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}.")


def _pixel_values(model, image: Image.Image, image_processor):
    if image_processor is None:
        from transformers import AutoImageProcessor

        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not name:
            raise ValueError("Pass image_processor= (the model was not loaded from a directory that has one).")
        image_processor = AutoImageProcessor.from_pretrained(name)
    batch = image_processor(image, return_tensors="pt")
    return batch["pixel_values"].to(device=model.device, dtype=model.dtype)


def _display_image(pixel_values: torch.Tensor, image: Image.Image, scale: int) -> Image.Image:
    """The image at the model's input resolution, upscaled by `scale` for drawing."""
    height, width = pixel_values.shape[-2:]
    return image.resize((width, height), Image.BILINEAR).resize((width * scale, height * scale), Image.NEAREST)


def draw_msvit_gates(
    image: Image.Image,
    fine_region_mask: torch.Tensor,
    coarse_patch_size: int,
    patch_size: int,
    gate_probs: torch.Tensor | None = None,
    scale: int = 1,
) -> Image.Image:
    """Draws one image's tokenization: `fine_region_mask` `(Hc, Wc)` bool, `gate_probs` `(Hc, Wc)` or None."""
    canvas = image.convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    coarse, fine = coarse_patch_size * scale, patch_size * scale
    font = ImageFont.load_default()
    rows, cols = fine_region_mask.shape
    for row in range(rows):
        for col in range(cols):
            left, top = col * coarse, row * coarse
            if bool(fine_region_mask[row, col]):
                draw.rectangle([left, top, left + coarse - 1, top + coarse - 1], fill=(*FINE_TINT, 70))
                for offset in range(fine, coarse, fine):
                    draw.line([left + offset, top, left + offset, top + coarse - 1], fill=(*FINE_TINT, 220))
                    draw.line([left, top + offset, left + coarse - 1, top + offset], fill=(*FINE_TINT, 220))
            draw.rectangle([left, top, left + coarse - 1, top + coarse - 1], outline=(*GRID_COLOR, 255))
            if gate_probs is not None and coarse >= 40:
                draw.text(
                    (left + 2, top + 1), f"{float(gate_probs[row, col]):.2f}", fill=(255, 255, 255, 255), font=font
                )
    combined = Image.alpha_composite(canvas, overlay).convert("RGB")
    num_fine = int(fine_region_mask.sum())
    caption = f"fine regions: {num_fine}/{rows * cols}"
    return _with_caption(combined, caption)


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    font = ImageFont.load_default()
    out = Image.new("RGB", (max(image.width, 8 * len(caption)), image.height + 16), (255, 255, 255))
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((2, image.height + 2), caption, fill=(0, 0, 0), font=font)
    return out


def _run_and_draw(model, image, image_processor, gate_threshold, scale, draw) -> Image.Image:
    """Runs `model` on `image` (no gradients) and returns `draw(image, pixel_values, outputs, scale=scale)`."""
    image = _load_image(image)
    pixel_values = _pixel_values(model, image, image_processor)
    with torch.no_grad():
        outputs = model(pixel_values, gate_threshold=gate_threshold)
    return draw(image, pixel_values, outputs, scale=scale)


def visualize_msvit(model, image, image_processor=None, gate_threshold=None, scale=None) -> Image.Image:
    draw = partial(msvit_picture, model.config)
    return _run_and_draw(model, image, image_processor, gate_threshold, scale, draw)


def msvit_picture(config, image: Image.Image, pixel_values, outputs, scale=None, index: int = 0) -> Image.Image:
    """The picture of image `index` of a forward that already ran (`outputs` of an MSViT with `config`)."""
    if scale is None:
        scale = max(1, 384 // max(pixel_values.shape[-2:]))
    shown = _display_image(pixel_values, image, scale)
    picture = draw_msvit_gates(
        shown,
        outputs.fine_region_mask[index].cpu(),
        config.coarse_patch_size,
        config.patch_size,
        gate_probs=outputs.gate_probs[index].cpu() if outputs.gate_probs is not None else None,
        scale=scale,
    )
    tokens, macs = int(outputs.num_tokens[index]), float(outputs.macs[index])
    return _with_caption(picture, f"{tokens} tokens, {macs / 1e9:.3f} GMACs")


def draw_dit_routing(stage_keep_ratio: torch.Tensor, downsampled: torch.Tensor, cell: int = 64) -> Image.Image:
    """Draws one image's route: `stage_keep_ratio` `(scales, stages)`, `downsampled` `(scales - 1, stages + 1)`.

    Rows are scales (stride 4 at the top), node columns left to right. A stage (box between two nodes) is filled in
    proportion to the fraction of tokens it computed; a downsampling edge is a solid arrow if taken, else a faint one.
    """
    scales, stages = stage_keep_ratio.shape
    margin, node = 40, 10
    width, height = margin * 2 + stages * cell * 2, margin + scales * cell
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()

    def node_xy(scale, column):
        return margin + column * 2 * cell, margin // 2 + scale * cell + cell // 2

    for scale in range(scales):
        draw.text((2, node_xy(scale, 0)[1] - 6), f"1/{4 * 2**scale}", fill=(0, 0, 0), font=font)
        for stage in range(stages):
            (x0, y), (x1, _) = node_xy(scale, stage), node_xy(scale, stage + 1)
            ratio = float(stage_keep_ratio[scale, stage])
            left, right, top, bottom = x0 + node, x1 - node, y - 12, y + 12
            draw.line([x0, y, x1, y], fill=(200, 200, 200), width=1)  # identity path
            draw.rectangle([left, top, right, bottom], outline=(60, 60, 60), fill=(245, 245, 245))
            if ratio > 0:
                draw.rectangle([left, top, left + int((right - left) * ratio), bottom], fill=(255, 140, 0))
            draw.text((left + 4, top + 6), f"{ratio:.2f}", fill=(0, 0, 0), font=font)
        for column in range(stages + 1):
            x, y = node_xy(scale, column)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(40, 40, 40))
            if scale < scales - 1 and column < downsampled.shape[1]:
                taken = float(downsampled[scale, column]) > 0.5
                _, y_next = node_xy(scale + 1, column)
                color, line_width = ((0, 120, 255), 3) if taken else ((220, 220, 230), 1)
                draw.line([x, y + 5, x, y_next - 5], fill=color, width=line_width)
                draw.polygon([(x - 4, y_next - 10), (x + 4, y_next - 10), (x, y_next - 5)], fill=color)
    draw.text(
        (margin, 4), "stages: fraction of tokens computed; arrows: downsampling taken", fill=(0, 0, 0), font=font
    )
    return out


def visualize_dit(model, image, image_processor=None, gate_threshold=None, scale=None) -> Image.Image:
    return _run_and_draw(model, image, image_processor, gate_threshold, scale, dit_picture)


def dit_picture(image: Image.Image, pixel_values, outputs, scale=None, index: int = 0) -> Image.Image:
    """The picture of image `index` of a DiT forward that already ran: the image next to its route."""
    routing = draw_dit_routing(outputs.stage_keep_ratio[index].float().cpu(), outputs.downsampled[index].float().cpu())
    if scale is None:
        scale = max(1, routing.height // max(pixel_values.shape[-2:]))
    shown = _display_image(pixel_values, image, scale)
    out = Image.new("RGB", (shown.width + routing.width + 8, max(shown.height, routing.height)), (255, 255, 255))
    out.paste(shown, (0, 0))
    out.paste(routing, (shown.width + 8, 0))
    return _with_caption(out, f"{float(outputs.macs[index]) / 1e9:.3f} GMACs")


def picture(model, image: Image.Image, pixel_values, outputs, **kwargs) -> Image.Image:
    """The gate picture of a forward that already ran (`outputs` of `model` on `pixel_values` from `image`), for a
    model of either type: lets a caller choose the forward's arguments (`fine_region_budget`, a forced route)."""
    model_type = _model_type(model)
    if model_type == "msvit":
        return msvit_picture(model.config, image, pixel_values, outputs, **kwargs)
    return dit_picture(image, pixel_values, outputs, **kwargs)


def _model_type(model) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ("msvit", "dit_routing"):
        raise ValueError(
            f"visualize() draws MSViT (msvit) and DiT (dit_routing) models, got model_type {model_type!r}."
        )
    return model_type


def visualize(model, image, output_path=None, image_processor=None, **kwargs) -> Image.Image:
    """Saves (if `output_path` is given) and returns a PNG-ready picture of the model's gate decisions on `image`."""
    draw = visualize_msvit if _model_type(model) == "msvit" else visualize_dit
    drawn = draw(model, image, image_processor=image_processor, **kwargs)
    if output_path is not None:
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = output_path.with_name(output_path.name + ".tmp")
        drawn.save(tmp, format="PNG")
        tmp.replace(output_path)
    return drawn


__all__ = [
    "dit_picture",
    "draw_dit_routing",
    "draw_msvit_gates",
    "msvit_picture",
    "picture",
    "visualize",
    "visualize_dit",
    "visualize_msvit",
]
