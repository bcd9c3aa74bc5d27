"""The demo's plain functions (no server): analysis of one image under each knob, the static side, the budget
slider that appears only for models with a budget mode, errors, and no gradio import from the package."""

import subprocess
import sys

import pytest
import torch

from hf_msvit import DiTForImageClassification
from hf_msvit.demo import (
    BUDGET,
    THRESHOLD,
    analyze,
    budget_argument,
    build_app,
    knob_kwargs,
    load_demo_model,
    main,
    static_route_model,
    summary_markdown,
)
from hf_msvit.hub import DEMO_APP_PY
from hf_msvit.models.msvit.modeling_msvit import budget_count

from _demo_helpers import REPO_ROOT, save_tiny_checkpoint
from tiny_models import tiny_dit, tiny_processor


@pytest.fixture(scope="module", params=["msvit", "dit_routing"])
def demo_model(request, tmp_path_factory):
    return load_demo_model(str(save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)))


def test_threshold_moves_gmacs_tokens_and_picture(demo_model, demo_examples):
    """Threshold 0 computes every gated token / region, 1 none: the GMACs, token counts and pictures follow; the
    static side does not move and costs what `static_macs()` says."""
    everything = analyze(demo_model, demo_examples[0], THRESHOLD, gate_threshold=0.0)
    nothing = analyze(demo_model, demo_examples[0], THRESHOLD, gate_threshold=1.0)
    assert nothing.gmacs < everything.gmacs
    assert nothing.tokens < everything.tokens
    assert nothing.gate_picture.tobytes() != everything.gate_picture.tobytes()
    assert nothing.static_gmacs == everything.static_gmacs
    assert nothing.static_gmacs == pytest.approx(demo_model.model.static_macs() / 1e9)
    assert nothing.static_picture.tobytes() == everything.static_picture.tobytes()
    labels = set(demo_model.model.config.id2label.values())
    assert len(nothing.labels) == min(5, len(labels)) and set(nothing.labels) <= labels
    assert list(nothing.labels.values()) == sorted(nothing.labels.values(), reverse=True)
    assert 0 < sum(everything.static_labels.values()) <= 1 + 1e-6
    summary = summary_markdown(nothing, demo_model.model_type)
    assert summary.startswith(f"### {nothing.gmacs:.4g} GMACs for this image") and "gate_threshold=1" in summary


def test_msvit_static_side_is_every_region_fine(demo_examples, tmp_path):
    demo = load_demo_model(str(save_tiny_checkpoint(tmp_path)))
    assert static_route_model(demo.model) is demo.model  # the route is the forward's fine_region_mask
    result = analyze(demo, demo_examples[0], THRESHOLD, gate_threshold=1.0)
    regions = demo.model.config.coarse_grid[0] * demo.model.config.coarse_grid[1]
    assert result.fine_regions == (0, regions)
    assert result.static_tokens == 1 + 4 * regions  # CLS + every region as 4 fine tokens


def test_msvit_exact_budget(demo_examples, tmp_path):
    demo = load_demo_model(str(save_tiny_checkpoint(tmp_path)))
    regions = demo.model.config.coarse_grid[0] * demo.model.config.coarse_grid[1]
    for budget in (0.25, 0.75):
        result = analyze(demo, demo_examples[-1], BUDGET, gate_threshold=0.5, budget=budget)
        assert result.fine_regions == (budget_count(budget, regions), regions)
        assert result.setting == f"fine_region_budget={budget:g}"


class NoBudgetDiT(DiTForImageClassification):
    """A DiT whose forward takes no `compute_budget` (as before the exact-budget mode existed)."""

    def forward(self, pixel_values, labels=None, gate_threshold=None, **kwargs):
        return super().forward(pixel_values, labels=labels, gate_threshold=gate_threshold, **kwargs)


def test_budget_slider_only_where_the_forward_takes_a_budget(tmp_path):
    pytest.importorskip("gradio")
    dit = tiny_dit().eval()
    plain = NoBudgetDiT(dit.config).eval()
    assert budget_argument(plain) is None and budget_argument(dit) == "compute_budget"
    with pytest.raises(ValueError, match="no exact-budget mode"):
        knob_kwargs(plain, BUDGET, 0.5, 0.5)
    with pytest.raises(ValueError, match="knob must be"):
        knob_kwargs(dit, "budget", 0.5, 0.5)
    assert knob_kwargs(dit, BUDGET, 0.5, 0.9) == {"compute_budget": 0.9}
    for model, visible in ((plain, False), (dit, True)):
        app = build_app(_demo(model))
        components = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
        assert components["budget"].visible is visible
        assert ("exact budget" in [choice[0] for choice in components["knob"].choices]) is visible


def _demo(model):
    from hf_msvit.demo import DemoModel

    return DemoModel("tiny", model, tiny_processor("dit_routing", 64), static_route_model(model))


def test_dit_static_side_is_pvt_v2_route(tmp_path):
    model = tiny_dit().eval()
    static = static_route_model(model)
    assert static is not model and static.config.routing_mode == "static" and model.config.routing_mode == "dynamic"
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert float(static(pixel_values).macs[0]) == pytest.approx(model.static_macs())


def test_bad_checkpoints_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="Could not load"):
        load_demo_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="No checkpoint given"):
        load_demo_model("")
    from transformers import ViTConfig

    ViTConfig(image_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="MSViT and DiT models"):
        load_demo_model(str(tmp_path))
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "Could not load" in capsys.readouterr().err


def test_app_file_and_no_gradio_on_import():
    """demo/app.py is what a Space runs (test_space.py starts it); importing hf_msvit and its tools never imports
    gradio."""
    assert (REPO_ROOT / "demo" / "app.py").read_text(encoding="utf-8") == DEMO_APP_PY
    code = (
        "import sys, hf_msvit, hf_msvit.demo, hf_msvit.hub, hf_msvit.cli, hf_msvit.visualization\n"
        "assert 'gradio' not in sys.modules, 'gradio imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr


def test_dit_budget_knob_runs_compute_budget_and_refuses_what_it_cannot_do(tmp_path):
    """DiT's exact-budget slider drives `compute_budget`: the GMACs follow it; a budget below the cheapest route
    shows the model's error instead of failing the app."""
    from PIL import Image

    from hf_msvit import demo as demo_module

    tiny_dit().save_pretrained(tmp_path)
    tiny_processor("dit_routing", 64).save_pretrained(tmp_path)
    loaded = demo_module.load_demo_model(str(tmp_path))
    assert demo_module.budget_argument(loaded.model) == "compute_budget"
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    cheap = demo_module.analyze(loaded, image, demo_module.BUDGET, budget=0.8)
    full = demo_module.analyze(loaded, image, demo_module.BUDGET, budget=1.0)
    assert abs(cheap.gmacs / full.gmacs - 0.8) < 0.03 and abs(full.compute_ratio - 1.0) < 1e-6
    outputs = demo_module.app_outputs(loaded, image, demo_module.BUDGET, 0.5, 0.05)
    assert outputs[0] is None and "compute_budget" in outputs[-1]
