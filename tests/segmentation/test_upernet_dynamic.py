"""UperNet on MSViT and DiT backbones: transformers' UperNet end to end, the auxiliary losses folded in by
DynamicUperNetForSemanticSegmentation, gradients reaching the gates, upcycling from a UperNet on PVTv2, MACs."""

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSemanticSegmentation,
    PvtV2Config,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from hf_msvit import DiTBackbone, DiTConfig, MSViTConfig
from hf_msvit.segmentation import DynamicUperNetForSemanticSegmentation, conv_macs_per_image


STAGES = ["stage1", "stage2", "stage3", "stage4"]
PVT_SHAPE = {"hidden_sizes": [8, 16, 24, 32], "depths": [1] * 4, "num_attention_heads": [1, 2, 3, 4], "image_size": 32}


def msvit_config(**overrides):
    values = {
        "image_size": 32, "patch_size": 4, "coarse_patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "gate_hidden_size": 16,
        "out_features": ["stem", "stage1", "stage2"], "gbas_loss_weight": 2.0,
    }  # fmt: skip
    return MSViTConfig(**{**values, **overrides})


def dit_config(**overrides):
    values = {
        **PVT_SHAPE, "sr_ratios": [4, 2, 1, 1], "mlp_ratios": [2, 2, 2, 2], "out_features": STAGES,
        "gate_init_compute_prob": 0.5, "budget_target": 0.5, "budget_loss_weight": 3.0,
    }  # fmt: skip
    return DiTConfig(**{**values, **overrides})


BACKBONES = {
    "msvit": (msvit_config, "gate_loss", "gbas_loss_weight"),
    "dit": (dit_config, "budget_loss", "budget_loss_weight"),
}


def upernet_config(backbone_config):
    return UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_channels=8, num_labels=4)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 4, (2, 32, 32), generator=generator)


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_loss_is_upernets_plus_the_weighted_backbone_loss(family):
    make_config, loss_name, weight_name = BACKBONES[family]
    torch.manual_seed(0)
    dynamic = DynamicUperNetForSemanticSegmentation(upernet_config(make_config())).eval()
    plain = UperNetForSemanticSegmentation(dynamic.config).eval()  # transformers' UperNet, same weights
    plain.load_state_dict(dynamic.state_dict())
    pixel_values, labels = batch()
    with torch.no_grad():
        ours, theirs = dynamic(pixel_values, labels=labels), plain(pixel_values, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits)
    auxiliary = getattr(ours, loss_name)
    assert auxiliary is not None and auxiliary > 0
    weight = getattr(dynamic.config.backbone_config, weight_name)
    torch.testing.assert_close(ours.loss, theirs.loss + weight * auxiliary)
    assert theirs.loss > 0 and dynamic.config.use_auxiliary_head  # UperNet's own loss holds its auxiliary head


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_backward_reaches_the_gates(family):
    make_config = BACKBONES[family][0]
    torch.manual_seed(0)
    model = DynamicUperNetForSemanticSegmentation(upernet_config(make_config())).train()
    pixel_values, labels = batch()
    model(pixel_values, labels=labels).loss.backward()
    gates = {name: p.grad for name, p in model.backbone.named_parameters() if "gate" in name and p.requires_grad}
    assert gates and any(grad is not None and grad.abs().sum() > 0 for grad in gates.values()), gates.keys()


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_joint_phase_gives_the_gate_learning_rate_to_the_gate_modules_only(family, tmp_path):
    """SegmentationTrainer's `gate_learning_rate` groups (the joint phase) hold exactly the parameters of the
    backbone's gate modules (and GBaS priors): none of UperNet's heads (BatchNorm included) or of the backbone."""
    from transformers import TrainingArguments

    from hf_msvit.models.dit_routing.layers import DiTGate
    from hf_msvit.models.msvit.batch_shaping import GeneralizedBatchShaping
    from hf_msvit.models.msvit.modeling_msvit import MSViTGate
    from hf_msvit.segmentation import SegmentationTrainer

    model = DynamicUperNetForSemanticSegmentation(upernet_config(BACKBONES[family][0]()))
    gate_modules = [m for m in model.modules() if isinstance(m, (DiTGate, MSViTGate, GeneralizedBatchShaping))]
    gate_ids = {id(p) for module in gate_modules for p in module.parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.05, report_to="none")
    optimizer = SegmentationTrainer(model=model, args=args, gate_learning_rate=1e-2).create_optimizer()
    at_gate_lr = {id(p) for group in optimizer.param_groups if group["lr"] == 1e-2 for p in group["params"]}
    assert gate_ids and at_gate_lr == gate_ids
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


def test_upcycled_dit_with_the_static_route_equals_the_upernet_on_pvt_v2():
    torch.manual_seed(0)
    static = UperNetForSemanticSegmentation(upernet_config(PvtV2Config(**PVT_SHAPE, out_features=STAGES))).eval()
    backbone = DiTBackbone.from_pvt_v2_pretrained(static.backbone, out_features=STAGES, routing_mode="static")
    upcycled = DynamicUperNetForSemanticSegmentation.from_backbone(backbone, heads_from=static).eval()
    pixel_values, labels = batch()
    with torch.no_grad():
        expected, outputs = static(pixel_values, labels=labels), upcycled(pixel_values, labels=labels)
    torch.testing.assert_close(outputs.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.loss, expected.loss, atol=1e-5, rtol=1e-5)  # static route: no budget loss
    assert outputs.token_keep_ratio.tolist() == [1.0, 1.0]


def test_macs_add_the_decode_head_convolutions_to_the_backbone():
    torch.manual_seed(0)
    model = DynamicUperNetForSemanticSegmentation(upernet_config(dit_config())).eval()
    with torch.no_grad():
        outputs = model(batch()[0])
    head = outputs.macs - outputs.backbone_macs
    assert head[0] == head[1] > 0  # the head is static: the same cost for every image
    assert outputs.backbone_macs[0] != outputs.backbone_macs[1]  # the routing is not
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    assert conv_macs_per_image(conv, conv(torch.zeros(4, 2, 5, 5))) == 5 * 5 * 3 * 2 * 3 * 3


def test_checkpoint_loads_as_plain_upernet(tmp_path):
    torch.manual_seed(0)
    model = DynamicUperNetForSemanticSegmentation(upernet_config(msvit_config())).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is UperNetForSemanticSegmentation
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch()[0]).logits, model(batch()[0]).logits)
