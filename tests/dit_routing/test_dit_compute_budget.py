"""DiT's exact-budget inference mode (`compute_budget`): it spends what it is asked (within 2%), equals the dense
reference run with the same tokens (fp32, 1e-5), gives every image the same work, and rejects what it cannot do."""

import pytest
import torch
from _dit_tiny import build, pixels
from huggingface_hub.errors import StrictDataclassFieldValidationError

from hf_msvit import DiTConfig, DiTForImageClassification
from hf_msvit.models.dit_routing.layers import DiTGate
from hf_msvit.models.dit_routing.routing import compute_budget_tokens, dit_route_macs


@pytest.mark.parametrize("variant, size", [("b0", 96), ("b1", 224), ("b2", 224)])
def test_planned_tokens_cost_the_budget_within_two_percent(variant, size):
    config = DiTConfig.from_variant(variant)
    static = dit_route_macs(config, size, size, "static")
    for budget in (0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97, 1.0):
        tokens = compute_budget_tokens(config, size, size, budget)
        model_free_cost = _analytic_cost(config, size, tokens)
        assert abs(model_free_cost / static - budget) <= 0.02 * budget, (budget, tokens)


def _analytic_cost(config, size, tokens):
    """The static route's cost minus the skipped tokens' per-token MACs, plus the row gates that rank them."""
    from hf_msvit.models.dit_routing.layers import DiTBlockLayer
    from hf_msvit.models.dit_routing.routing import scale_sizes

    cost = dit_route_macs(config, size, size, "static")
    for scale, ((height, width), count) in enumerate(zip(scale_sizes(config, size, size), tokens)):
        if count < height * width:
            per_token = DiTBlockLayer.macs(config, scale, height, width)[1]
            cost += -config.depths[scale] * (height * width - count) * per_token
            cost += height * width * config.hidden_sizes[scale]
    return cost


def test_forward_reports_the_budget_it_spent_and_every_image_spends_the_same():
    model = build(routing_mode="dynamic")
    static = model.static_macs()
    head = model.classifier.weight.numel()
    with torch.no_grad():
        spent = [model(pixels(3), compute_budget=budget).macs for budget in (0.7, 0.8, 0.9, 1.0)]
    for budget, macs in zip((0.7, 0.8, 0.9, 1.0), spent):
        assert torch.all(macs == macs[0]), "every image computes the same"
        assert abs((macs[0] - head) / (static - head) - budget) <= 0.02 * budget
    assert spent[0][0] < spent[1][0] < spent[2][0] < spent[3][0]


@pytest.mark.parametrize("stage_input", ["full_map", "masked_map"])
def test_budget_mode_equals_the_dense_reference_with_the_same_tokens(monkeypatch, stage_input):
    """The dense training path, with every gate forced to the budget mode's decisions (PVTv2's route; on it, the
    top-scoring tokens), computes the same logits and maps."""
    model = build(stage_input=stage_input)
    batch, budget = pixels(4), 0.8
    with torch.no_grad():
        fast = model(batch, compute_budget=budget, output_hidden_states=True)
    tokens = compute_budget_tokens(model.config, 64, 64, budget)
    assert any(count < side * side for count, side in zip(tokens, (16, 8, 4, 2))), "the budget should skip tokens"
    scale_of_width = {width: scale for scale, width in enumerate(model.config.hidden_sizes)}

    def budget_decisions(gate, features, threshold=0.5):
        if features.ndim == 2:  # a column gate on pooled features: PVTv2's edges
            return torch.full(features.shape[:1], float(gate.on_static_route))
        if not gate.on_static_route:
            return torch.zeros(features.shape[:2])
        count = tokens[scale_of_width[features.shape[-1]]]
        top = gate.open_probability(features).topk(count, dim=1).indices
        return torch.zeros(features.shape[:2]).scatter_(1, top, 1.0)

    monkeypatch.setattr(DiTGate, "forward", budget_decisions)
    model.train()  # the dense path: every node computed and multiplied by the decisions
    with torch.no_grad():
        dense = model(batch, output_hidden_states=True)
    torch.testing.assert_close(fast.logits, dense.logits, atol=1e-5, rtol=1e-5)
    for fast_map, dense_map in zip(fast.hidden_states, dense.hidden_states):
        torch.testing.assert_close(fast_map, dense_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.stage_keep_ratio, dense.stage_keep_ratio)


def test_full_budget_is_the_static_route_and_outputs_do_not_depend_on_the_batch():
    model = build()
    batch = pixels(3)
    with torch.no_grad():
        full = model(batch, compute_budget=1.0)
        model.config.routing_mode = "static"
        static = model(batch)
        model.config.routing_mode = "dynamic"
        together = model(batch, compute_budget=0.75).logits
        alone = torch.cat([model(batch[i : i + 1], compute_budget=0.75).logits for i in range(3)])
    torch.testing.assert_close(full.logits, static.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full.macs, static.macs)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_config_field_is_used_and_round_trips(tmp_path):
    model = build(compute_budget=0.8)
    with torch.no_grad():
        from_config = model(pixels(2)).macs
        from_argument = model(pixels(2), compute_budget=0.8).macs
    torch.testing.assert_close(from_config, from_argument)
    model.save_pretrained(tmp_path)
    assert DiTForImageClassification.from_pretrained(tmp_path).config.compute_budget == 0.8


@pytest.mark.parametrize("budget", [0.0, 1.2, -0.5, True, "half"])
def test_out_of_range_budget_is_a_clear_error(budget):
    # a wrong type is refused by the strict dataclass's own validator, a wrong value by ours
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match="compute_budget"):
        DiTConfig(compute_budget=budget)
    with pytest.raises(ValueError, match="compute_budget must be a fraction"), torch.no_grad():
        build()(pixels(1), compute_budget=budget)


def test_unreachable_budget_and_training_are_clear_errors():
    model = build()
    with pytest.raises(ValueError, match="out of reach"), torch.no_grad():
        model(pixels(1), compute_budget=0.1)
    model.train()
    with pytest.raises(ValueError, match="inference mode"):
        model(pixels(1), compute_budget=0.8)


def test_calibrated_profile_follows_the_trained_allocation_and_spends_the_budget(tmp_path):
    """`calibrate_compute_budget` records what the learned route computes per scale; the budget mode then keeps that
    allocation (a scale the route skips stays skipped), still within 2% of the budget, and the profile is saved."""
    model = build()
    with torch.no_grad():
        for gate in model.dit.row_gates[1]:  # no stage of scale 1 ever computes a token
            gate.bias.copy_(torch.tensor([0.0, -30.0]))
            gate.weight.zero_()
        threshold_route = model(pixels(4))
    profile = model.calibrate_compute_budget(pixels(4))
    assert profile[1] == 0.0 and all(0.0 < p <= 1.0 for i, p in enumerate(profile) if i != 1)
    expected = threshold_route.stage_keep_ratio.sum(2).mean(0).clamp(max=1.0)
    torch.testing.assert_close(torch.tensor(profile), expected, atol=1e-4, rtol=0)
    static, head = model.static_macs(), model.classifier.weight.numel()
    with torch.no_grad():
        out = model(pixels(3), compute_budget=0.5)
    assert abs((out.macs[0] - head) / (static - head) - 0.5) <= 0.02 * 0.5
    assert torch.all(out.stage_keep_ratio[:, 1] == 0), "the scale the trained route skips stays skipped"
    with pytest.raises(ValueError, match="ask for a budget in that range"), torch.no_grad():
        model(pixels(1), compute_budget=0.95)  # more than the route without scale 1 can cost
    model.save_pretrained(tmp_path)
    assert DiTForImageClassification.from_pretrained(tmp_path).config.compute_budget_profile == profile


def test_bad_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="compute_budget_profile"):
        DiTConfig(compute_budget_profile=[1.0, 0.5])
    with pytest.raises(ValueError, match="compute_budget_profile"):
        DiTConfig(compute_budget_profile=[0.0, 0.0, 0.0, 0.0])
