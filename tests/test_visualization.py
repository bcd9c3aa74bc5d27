"""Gate pictures: the function and the `hf-msvit visualize` command."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hf_msvit import MSViTConfig, MSViTForImageClassification, MSViTImageProcessor
from hf_msvit.cli import main
from hf_msvit.visualization import draw_msvit_gates, visualize


@pytest.fixture
def msvit_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = MSViTConfig(
        image_size=64,
        patch_size=8,
        coarse_patch_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        gate_hidden_size=16,
        num_labels=3,
    )
    model = MSViTForImageClassification(config).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    MSViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path, model


def test_fine_regions_are_tinted_and_coarse_ones_are_not():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True
    picture = np.asarray(draw_msvit_gates(image, mask, coarse_patch_size=16, patch_size=8))
    fine_pixel = picture[16 + 4, 32 + 4]  # inside region (1, 2), away from the lines
    coarse_pixel = picture[4, 4]
    assert fine_pixel[0] > 50 and fine_pixel[2] < 20  # orange tint
    assert tuple(coarse_pixel) == (0, 0, 0)
    # the 2x2 fine split is drawn inside the fine region only
    assert picture[16 + 8, 32 + 3][0] > fine_pixel[0]
    assert tuple(picture[8, 3]) == (0, 0, 0)


def test_visualize_saves_a_png(msvit_checkpoint, tmp_path):
    path, model = msvit_checkpoint
    image = Image.fromarray((np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8))
    out = tmp_path / "gates.png"
    picture = visualize(model, image, output_path=out, image_processor=MSViTImageProcessor.from_pretrained(path))
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.size == picture.size
    with pytest.raises(ValueError, match="model_type"):
        visualize(SimpleNamespace(config=SimpleNamespace(model_type="vit")), image)


def test_cli_visualize(msvit_checkpoint, tmp_path):
    path, _ = msvit_checkpoint
    image_path = tmp_path / "digit.png"
    Image.new("L", (64, 64), 0).save(image_path)
    out = tmp_path / "out.png"
    assert main(["visualize", str(path), str(image_path), "--output", str(out), "--gate-threshold", "0.3"]) == 0
    assert out.stat().st_size > 0
    assert main(["visualize", str(path), str(tmp_path / "missing.png"), "--output", str(out)]) == 2


def test_dit_routing_picture_shows_stages_and_edges(tmp_path):
    from hf_msvit import DiTConfig, DiTForImageClassification, DiTImageProcessor
    from hf_msvit.visualization import draw_dit_routing

    keep = torch.zeros(4, 4)
    keep[0, 0], keep[1, 1] = 1.0, 0.5
    edges = torch.zeros(3, 5)
    edges[0, 1] = 1.0
    picture = np.asarray(draw_dit_routing(keep, edges))
    orange = (picture[..., 0] > 200) & (picture[..., 1] > 100) & (picture[..., 1] < 180) & (picture[..., 2] < 60)
    blue = (picture[..., 2] > 200) & (picture[..., 0] < 50)
    assert orange.sum() > 0 and blue.sum() > 0
    # stage (0, 0) is filled completely, stage (1, 1) half: about 2 : 1 in orange pixels
    top, middle = orange[: picture.shape[0] // 4 + 20].sum(), orange[picture.shape[0] // 4 + 20 :].sum()
    assert 1.5 < top / middle < 2.5

    config = DiTConfig.from_variant(
        "b0",
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        image_size=64,
        num_labels=3,
    )
    model = DiTForImageClassification(config).eval()
    out = tmp_path / "route.png"
    visualize(
        model,
        Image.new("RGB", (64, 64)),
        output_path=out,
        image_processor=DiTImageProcessor(size={"height": 64, "width": 64}),
    )
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.width > 64
