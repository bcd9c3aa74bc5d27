"""DiT pieces of the speed benchmark: build a DiT / PVTv2 pair with the same weights and set a token keep ratio.

A randomly initialized DiT's gates decide arbitrarily, so the benchmark sets the route explicitly: the column gates
open exactly PVTv2's downsampling edges (the static route), and the row gate of every stage on that route computes
`ratio` of its tokens (random token choice through a random gate direction, bias calibrated on the batch), while the
stages off the route are closed. At `ratio=1` this is the static PVTv2 path plus the cost of the gates; below 1 it
measures how much of the skipped compute turns into speed.
"""

import torch


OPEN = 30.0  # a gate logit margin no feature overturns


def build_dit_pair(variant, image_size=224, **dit_overrides):
    from transformers import PvtV2Config, PvtV2ForImageClassification

    from hf_msvit import DiTConfig, DiTForImageClassification

    torch.manual_seed(0)
    pvt_config = PvtV2Config(**DiTConfig.from_variant(variant).pvt_v2_shape(), image_size=image_size, num_labels=1000)
    pvt = PvtV2ForImageClassification(pvt_config).eval()
    dit = DiTForImageClassification.from_pvt_v2_pretrained(pvt, routing_mode="dynamic", **dit_overrides).eval()
    return pvt, dit


def static_dit_macs(variant, image_size=224, **_):
    from hf_msvit import DiTConfig
    from hf_msvit.models.dit_routing.modeling_dit_routing import dit_route_macs

    config = DiTConfig.from_variant(variant, image_size=image_size, num_labels=1000)
    head = config.hidden_sizes[-1] * 1000
    return dit_route_macs(config, image_size, image_size, "static") + head


def dit_gate_state(dit) -> dict[str, torch.Tensor]:
    """The values of every gate parameter and buffer, by name: loading them back restores this route."""
    return {
        name: tensor.detach().clone()
        for name, tensor in [*dit.named_parameters(), *dit.named_buffers()]
        if "_gates." in name
    }


def _set_gate(gate, direction, bias):
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
        if direction is not None:
            gate.weight[1].copy_(direction)
        gate.bias[1] = bias
        gate.ema_steps.zero_()  # use the weights just set, not an EMA


@torch.no_grad()
def set_dit_keep_ratio(dit, pixel_values, ratio):
    """Static route with every stage on it computing `ratio` of its tokens (see the module docstring)."""
    model = dit.dit if hasattr(dit, "dit") else dit.base_model
    config = model.config
    static = config.static_columns
    for scale in range(config.num_encoder_blocks - 1):
        for column, gate in enumerate(model.column_gates[scale]):
            _set_gate(gate, None, OPEN if column == static[scale] + 1 else -OPEN)
    generator = torch.Generator().manual_seed(0)
    for scale in range(config.num_encoder_blocks):
        for column, gate in enumerate(model.row_gates[scale]):
            _set_gate(gate, None, OPEN if column == static[scale] else -OPEN)
    # calibrate the on-route row gates one scale at a time, on the features they actually see
    for scale in range(config.num_encoder_blocks):
        gate = model.row_gates[scale][static[scale]]
        if ratio >= 1.0:
            continue
        direction = torch.randn(config.hidden_sizes[scale], generator=generator)
        captured = []
        handle = gate.register_forward_hook(
            lambda module, args, output, store=captured: store.append(args[0].detach())
        )
        dit(pixel_values)
        handle.remove()
        scores = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]) @ direction
        threshold = torch.quantile(scores.double(), 1.0 - ratio).item() if ratio > 0 else scores.max().item() + 1
        _set_gate(gate, direction, -threshold)
    return dit
