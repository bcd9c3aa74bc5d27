"""Upcycling PVTv2 into DiT: with the static route the converted model is exactly the PVTv2 it came from."""

import pytest
import torch
from transformers import PvtV2Backbone, PvtV2Config, PvtV2ForImageClassification, ViTConfig, ViTModel

from hf_msvit import DiTBackbone, DiTConfig, DiTForImageClassification, DiTModel


def tiny_pvt_v2(**overrides) -> PvtV2ForImageClassification:
    values = {
        "image_size": 64,
        "hidden_sizes": [8, 16, 24, 32],
        "depths": [1, 2, 1, 1],
        "num_attention_heads": [1, 2, 3, 4],
        "sr_ratios": [4, 2, 1, 1],
        "mlp_ratios": [2, 2, 2, 2],
        "num_labels": 5,
    }
    values.update(overrides)
    torch.manual_seed(0)
    model = PvtV2ForImageClassification(PvtV2Config(**values)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping cannot pass by accident
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def pixels(batch=2):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pvt_checkpoint(tmp_path_factory):
    model = tiny_pvt_v2()
    path = tmp_path_factory.mktemp("pvt_v2")
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("source", ["directory", "model"])
def test_static_route_reproduces_pvt_v2_logits(pvt_checkpoint, source):
    pvt, path = pvt_checkpoint
    source = path if source == "directory" else pvt
    dit = DiTForImageClassification.from_pvt_v2_pretrained(source, routing_mode="static")
    dit.eval()
    assert dit.config.model_type == "dit_routing" and dit.config.id2label == pvt.config.id2label
    batch = pixels()
    with torch.no_grad():
        expected = pvt(batch, output_hidden_states=True)
        actual = dit(batch, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)
    for ours, theirs in zip(actual.hidden_states[1:], expected.hidden_states):  # stage outputs, strides 4..32
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_every_grid_copy_starts_from_its_pvt_v2_stage(pvt_checkpoint):
    pvt, _ = pvt_checkpoint
    dit = DiTModel.from_pvt_v2_pretrained(pvt, num_routing_columns=5)
    reference = pvt.state_dict()
    for column in range(5):
        for scale in range(4):
            torch.testing.assert_close(
                dit.grid[scale][column].blocks[0].attention.query.weight,
                reference[f"pvt_v2.encoder.layers.{scale}.blocks.0.attention.query.weight"],
            )
    for column in range(6):
        torch.testing.assert_close(
            dit.patch_embeddings[2][column].proj.weight,
            reference["pvt_v2.encoder.layers.3.patch_embedding.proj.weight"],
        )
    torch.testing.assert_close(dit.stem.proj.weight, reference["pvt_v2.encoder.layers.0.patch_embedding.proj.weight"])
    # copies are independent parameters, free to specialize during training
    first, second = dit.grid[1][0].blocks[0].mlp.dense1.weight, dit.grid[1][1].blocks[0].mlp.dense1.weight
    assert first.data_ptr() != second.data_ptr()


def test_backbone_static_route_equals_pvt_v2_backbone(pvt_checkpoint):
    _, path = pvt_checkpoint
    stages = ["stage1", "stage2", "stage3", "stage4"]
    dit = DiTBackbone.from_pvt_v2_pretrained(path, routing_mode="static", out_features=stages).eval()
    reference = PvtV2Backbone.from_pretrained(path, out_features=stages).eval()
    batch = pixels()
    with torch.no_grad():
        ours, theirs = dit(batch).feature_maps, reference(batch).feature_maps
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_converted_model_runs_in_every_mode_and_full_costs_more(pvt_checkpoint):
    pvt, _ = pvt_checkpoint
    macs = {}
    for mode in ("static", "full", "dynamic"):
        # the paper's init (every gate open with p = gate_init_compute_prob = 0.9) instead of upcycling's static route
        dit = DiTForImageClassification.from_pvt_v2_pretrained(pvt, routing_mode=mode, gate_init="all_open").eval()
        with torch.no_grad():
            out = dit(pixels())
        assert torch.isfinite(out.logits).all()
        macs[mode] = out.macs[0].item()
    assert macs["full"] > 3 * macs["static"]
    # all-open gates: the dynamic route starts close to the full grid
    assert macs["dynamic"] > 0.9 * macs["full"]


def test_non_pvt_v2_checkpoint_gives_a_clear_error(tmp_path):
    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    vit.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only PVTv2 checkpoints"):
        DiTForImageClassification.from_pvt_v2_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="Expected a PVTv2 model"):
        DiTModel.from_pvt_v2_pretrained(vit)


def test_linear_attention_pvt_v2_is_rejected():
    with pytest.raises(ValueError, match="linear_attention"):
        DiTModel.from_pvt_v2_pretrained(tiny_pvt_v2(linear_attention=True))


def test_static_route_is_exact_on_a_wider_grid(pvt_checkpoint):
    """With more columns than scales the staircase ends early and the rows pass by identity to the last column."""
    pvt, _ = pvt_checkpoint
    dit = DiTForImageClassification.from_pvt_v2_pretrained(pvt, routing_mode="static", num_routing_columns=6).eval()
    odd = torch.randn(2, 3, 75, 50, generator=torch.Generator().manual_seed(1))  # any input size, as PVTv2
    with torch.no_grad():
        torch.testing.assert_close(dit(pixels()).logits, pvt(pixels()).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(dit(odd).logits, pvt(odd).logits, atol=1e-4, rtol=0)


def test_upcycled_dynamic_model_starts_exactly_on_the_pvt_v2_route(pvt_checkpoint):
    """Default upcycling (`gate_init="static_route"`): at step 0 the dynamic model is PVTv2 (logits, route) at 1.00x
    the static cost (its gates add the rest)."""
    pvt, _ = pvt_checkpoint
    dit = DiTForImageClassification.from_pvt_v2_pretrained(pvt)
    assert dit.config.routing_mode == "dynamic" and dit.config.gate_init == "static_route"
    assert dit.config.gate_noise_scale == 0.0  # upcycling trains on the route inference takes
    assert dit.config.sparse_training  # ... computing only the stages some token runs
    dit.eval()
    batch = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, expected = dit(batch), pvt(batch).logits
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(out.stage_keep_ratio, torch.eye(4).expand(4, 4, 4))
    staircase = torch.zeros(3, 5)
    staircase[[0, 1, 2], [1, 2, 3]] = 1
    assert torch.equal(out.downsampled, staircase.expand(4, 3, 5))
    dit.config.routing_mode = "static"
    with torch.no_grad():
        static = dit(batch)
    dit.config.routing_mode = "dynamic"
    gates = out.macs - static.macs  # the only extra: the gates' own cost (tiny widths make it 1% here)
    assert (gates > 0).all() and (gates < 0.015 * static.macs).all(), gates / static.macs
    # training prices the same route (deterministic decisions): the budget loss at step 0 is (1.00 - target) ** 2
    dit.train()
    torch.manual_seed(0)
    trained = dit(batch, labels=torch.tensor([0, 1, 2, 3]))
    budget_loss = trained.budget_loss
    torch.testing.assert_close(trained.macs, out.macs)  # no Gumbel noise: the training forward took the same route
    expected_cost = (out.macs - dit.classifier.weight.numel()).mean() / dit.dit.static_macs()
    torch.testing.assert_close(budget_loss, (expected_cost - dit.config.budget_target) ** 2)


def test_upcycled_pvt_v2_b0_costs_1_00x_at_step_0():
    """PVTv2-b0 at 96 px (the built-in data's size) upcycled: the dynamic model costs 1.00x the static route."""
    pvt_config = PvtV2Config(**DiTConfig.from_variant("b0").pvt_v2_shape(), image_size=96, num_labels=10)
    torch.manual_seed(0)
    pvt = PvtV2ForImageClassification(pvt_config).eval()
    dit = DiTForImageClassification.from_pvt_v2_pretrained(pvt).eval()
    batch = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = dit(batch)
        torch.testing.assert_close(out.logits, pvt(batch).logits, atol=1e-4, rtol=0)
    cost = (out.macs / dit.static_macs()).tolist()
    assert [f"{c:.2f}" for c in cost] == ["1.00", "1.00"] and min(cost) >= 1.0, cost
