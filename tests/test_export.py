"""hf_msvit.export and `hf-msvit export`: fixed-shape graphs of MSViT (fine-region budget) and DiT (static route,
compute budget) with a dynamic batch, in torch.export and in onnxruntime, equal to eager PyTorch; early, named errors
for the data-dependent modes; no half-written file on failure."""

import json
import subprocess
import sys

import pytest
import torch

from hf_msvit import MSViTBackbone, MSViTForSemanticSegmentation
from hf_msvit.cli import main
from hf_msvit.export import (
    ExportCheckError,
    ExportModeError,
    export_onnx,
    export_program,
    onnxruntime_session,
    resolve_export_mode,
)

from tiny_models import tiny_dit, tiny_msvit, tiny_msvit_config, tiny_processor


onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def images(batch_size, size, seed=0):
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_segmenter(seed=0):
    torch.manual_seed(seed)
    return MSViTForSemanticSegmentation(tiny_msvit_config(num_labels=3)).eval()


def eager(model, pixel_values, **kwargs):
    with torch.no_grad():
        return model.eval()(pixel_values, **kwargs).logits


def onnxruntime_logits(path, pixel_values):
    return torch.from_numpy(onnxruntime_session(path).run(None, {"pixel_values": pixel_values.numpy()})[0])


@pytest.mark.parametrize(
    "build, kwargs, size, eager_kwargs",
    [
        (tiny_msvit, {"fine_region_budget": 0.5}, 32, {"fine_region_budget": 0.5}),
        (tiny_dit, {"static": True}, 64, None),
    ],
    ids=["msvit-classification", "dit-static-route"],
)
def test_exported_program_equals_eager_at_any_batch_size(build, kwargs, size, eager_kwargs):
    model = build()
    program = export_program(model, **kwargs)
    if eager_kwargs is None:  # DiT's static route is a config mode
        model.config.routing_mode = "static"
    for batch_size in (1, 5):
        pixel_values = images(batch_size, size, seed=batch_size)
        with torch.no_grad():
            exported = program.module()(pixel_values)
        torch.testing.assert_close(exported, eager(model, pixel_values, **(eager_kwargs or {})), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def msvit_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("msvit")
    tiny_msvit(seed=3).save_pretrained(path)
    tiny_processor("msvit", 32).save_pretrained(path)
    return path


def test_cli_exports_msvit_budget_mode_that_onnxruntime_runs_like_pytorch(msvit_checkpoint, tmp_path, capsys):
    output = tmp_path / "msvit.onnx"
    assert main(["export", str(msvit_checkpoint), str(output), "--fine-region-budget", "0.5"]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msvit.onnx"]
    metadata = {prop.key: prop.value for prop in onnx.load(output).metadata_props}
    assert metadata["hf_msvit.mode"] == "fine_region_budget" and json.loads(metadata["hf_msvit.budget"]) == 0.5
    assert json.loads(metadata["hf_msvit.image_size"]) == [32, 32]
    assert json.loads(metadata["hf_msvit.preprocessing"])["size"] == {"height": 32, "width": 32}
    model = tiny_msvit(seed=3)
    for batch_size in (1, 6):
        pixel_values = images(batch_size, 32, seed=batch_size)
        expected = eager(model, pixel_values, fine_region_budget=0.5)
        torch.testing.assert_close(onnxruntime_logits(output, pixel_values), expected, atol=1e-4, rtol=1e-4)


def test_onnx_segmentation_logits_match_pytorch(tmp_path):
    model = tiny_segmenter()
    result = export_onnx(model, tmp_path / "segmenter.onnx", fine_region_budget=3)
    assert result.max_abs_diff <= 1e-4 and result.mode.output_name == "logits"
    pixel_values = images(4, 32, seed=7)
    logits = onnxruntime_logits(result.path, pixel_values)
    assert logits.shape == (4, 3, 32, 32)
    torch.testing.assert_close(logits, eager(model, pixel_values, fine_region_budget=3), atol=1e-4, rtol=1e-4)


def test_onnx_dit_static_route_matches_pytorch_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny_dit().train()
    result = export_onnx(model, tmp_path / "dit.onnx", static=True, batch_size=3)
    assert model.config.routing_mode == "dynamic" and model.training, "export restores the model's mode"
    assert result.mode.mode == "static_route"
    pixel_values = images(2, 64, seed=11)
    model.config.routing_mode = "static"
    torch.testing.assert_close(
        onnxruntime_logits(result.path, pixel_values), eager(model, pixel_values), atol=1e-4, rtol=1e-4
    )


def test_failed_check_keeps_the_old_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"previous export")

    def fails(*args, **kwargs):
        raise ExportCheckError("onnxruntime differs")

    monkeypatch.setattr("hf_msvit.export.check_onnx", fails)
    with pytest.raises(ExportCheckError):
        export_onnx(tiny_msvit(), output, fine_region_budget=0.25)
    assert output.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize(
    "build, kwargs, error, words",
    [
        (tiny_msvit, {}, ExportModeError, ["fine_region_budget", "gate_threshold"]),
        (tiny_msvit, {"static": True}, ExportModeError, ["fine_region_budget"]),
        (tiny_msvit, {"fine_region_budget": 0.5, "image_size": 64}, ValueError, ["image size"]),
        (tiny_msvit, {"fine_region_budget": 1.5}, ValueError, ["fine_region_budget"]),
        (tiny_dit, {}, ExportModeError, ["static=True", "compute_budget"]),
        (tiny_dit, {"fine_region_budget": 0.5}, ExportModeError, ["static=True"]),
        (tiny_dit, {"static": True, "compute_budget": 0.8}, ValueError, ["not both"]),
        (tiny_dit, {"compute_budget": 1.5}, ValueError, ["compute_budget"]),
        (lambda: MSViTBackbone(tiny_msvit_config()), {"fine_region_budget": 0.5}, TypeError, ["MSViTBackbone"]),
    ],
)
def test_modes_with_data_dependent_shapes_fail_early_naming_the_mode_that_exports(build, kwargs, error, words):
    with pytest.raises(error) as raised:
        resolve_export_mode(build(), **kwargs)
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_a_batch_size_out_of_range_is_refused_before_tracing():
    with pytest.raises(ValueError, match="batch_size"):
        export_program(tiny_msvit(), fine_region_budget=0.5, batch_size=0)


def test_cli_reports_a_mode_that_does_not_export(msvit_checkpoint, tmp_path, capsys):
    assert main(["export", str(msvit_checkpoint), str(tmp_path / "m.onnx")]) == 2
    assert "fine_region_budget" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_budget_in_the_config_is_the_default():
    assert resolve_export_mode(tiny_msvit(fine_region_budget=4)).budget == 4
    assert resolve_export_mode(tiny_dit(compute_budget=0.8)).mode == "compute_budget"
    assert resolve_export_mode(tiny_dit(routing_mode="static")).mode == "static_route"


def test_importing_the_package_and_its_export_tools_loads_no_onnx_package():
    code = (
        "import sys, hf_msvit, hf_msvit.export, hf_msvit.cli; "
        "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def random_gates_dit():
    """A DiT whose row gates rank the tokens (random weights), for the exact-budget mode."""
    return tiny_dit(seed=1, initializer_range=0.2)


def test_dit_compute_budget_exports_with_a_dynamic_batch():
    model = random_gates_dit()
    program = export_program(model, compute_budget=0.7)
    pixel_values = images(5, 64)
    torch.testing.assert_close(program.module()(pixel_values), eager(model, pixel_values, compute_budget=0.7))


def test_dit_compute_budget_onnx_at_a_fixed_batch_matches_pytorch(tmp_path):
    """Also the regression test of onnxruntime 1.32's MatmulTransposeFusion, which miscomputed `tokens @ vector` (a
    1-D MatMul operand) in the row-gate score: the budget mode then ranked the wrong tokens."""
    export_onnx(random_gates_dit(), tmp_path / "dit.onnx", compute_budget=0.7, dynamic_batch=False)


def test_the_documented_numpy_preprocessing_equals_the_image_processor():
    """docs/deploy.md preprocesses from the file's metadata without transformers: the same pixels as the processor."""
    import numpy as np
    from PIL import Image

    from hf_msvit.export import preprocessing_metadata

    processor = tiny_processor("msvit", 32)
    steps = json.loads(preprocessing_metadata(processor)["hf_msvit.preprocessing"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    resized = image.convert("RGB").resize((steps["size"]["width"], steps["size"]["height"]), Image.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) * steps["rescale_factor"]
    pixels = (pixels - np.array(steps["image_mean"], np.float32)) / np.array(steps["image_std"], np.float32)
    expected = processor(image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixels.transpose(2, 0, 1)[None], expected, atol=1e-6)
