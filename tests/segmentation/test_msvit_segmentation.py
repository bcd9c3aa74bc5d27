"""MSViTForSemanticSegmentation and MSViTBackbone: the ViT equivalence, loss, MACs, feature maps, Auto classes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoBackbone,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from hf_msvit import MSViTBackbone, MSViTConfig, MSViTForSemanticSegmentation, MSViTImageProcessor, MSViTModel


TINY = {
    "image_size": 32, "patch_size": 4, "coarse_patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 48, "gate_hidden_size": 16,
}  # fmt: skip


def tiny_segmenter(num_labels=5, seed=0, **overrides):
    torch.manual_seed(seed)
    return MSViTForSemanticSegmentation(MSViTConfig(**{**TINY, "num_labels": num_labels, **overrides}))


def pixels(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny_vit(vit_class=ViTModel):
    torch.manual_seed(0)
    shared = ["image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    config = ViTConfig(**{name: TINY[name] for name in [*shared, "intermediate_size"]}, num_labels=7)
    return vit_class(config).eval()


@pytest.mark.parametrize("vit_class", [ViTModel, ViTForImageClassification])
def test_all_fine_equals_the_same_decoder_on_the_vit_tokens(vit_class):
    vit = tiny_vit(vit_class)
    model = MSViTForSemanticSegmentation.from_vit_pretrained(vit, num_labels=5, coarse_patch_size=8)
    x = pixels()
    all_fine = torch.ones(3, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        ours = model(x, fine_region_mask=all_fine).logits
        tokens = (vit.vit if vit_class is ViTForImageClassification else vit)(x).last_hidden_state[:, 1:]
        grid = model.decode_head(tokens).transpose(1, 2).reshape(3, 5, 8, 8)
        expected = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.shape == (3, 5, 32, 32)


def test_coarse_regions_are_decoded_once_and_fill_their_fine_patches():
    model = tiny_segmenter().eval()
    decoded = []
    model.decode_head.register_forward_hook(lambda module, args, output: decoded.append(output))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True  # one fine region (4 tokens), 15 coarse ones
    with torch.no_grad():
        outputs = model(pixels(1), fine_region_mask=mask)
    assert outputs.num_tokens.tolist() == [1 + 15 + 4]
    grid = model.msvit.fine_grid_features(decoded[0], outputs.fine_region_mask)  # (1, labels, 8, 8) before upsampling
    coarse_region = grid[0, :, 2:4, 4:6]  # region (1, 2) is coarse: one token's scores on its 2x2 fine patches
    assert torch.equal(coarse_region, coarse_region[:, :1, :1].expand_as(coarse_region))
    fine_region = grid[0, :, 0:2, 0:2]
    assert not torch.equal(fine_region, fine_region[:, :1, :1].expand_as(fine_region))


def test_loss_is_pixel_cross_entropy_with_ignore_index_plus_weighted_gate_loss():
    model = tiny_segmenter(gbas_loss_weight=3.0).eval()
    labels = torch.randint(0, 5, (3, 32, 32), generator=torch.Generator().manual_seed(2))
    labels[:, :10] = model.config.semantic_loss_ignore_index
    with torch.no_grad():
        outputs = model(pixels(), labels=labels, gate_threshold=0.5)
    expected = F.cross_entropy(outputs.logits, labels, ignore_index=255) + 3.0 * outputs.gate_loss
    torch.testing.assert_close(outputs.loss, expected)
    with pytest.raises(ValueError, match="at least 2 labels"):
        tiny_segmenter(num_labels=1)(pixels(), labels=torch.zeros(3, 32, 32, dtype=torch.long))


def test_pixel_loss_alone_trains_the_gate():
    model = tiny_segmenter(gbas_loss_weight=0.0).train()
    labels = torch.randint(0, 5, (3, 32, 32), generator=torch.Generator().manual_seed(2))
    model(pixels(), labels=labels).loss.backward()
    assert model.msvit.embeddings.gate.layers[0].weight.grad.abs().sum() > 0


def test_each_gate_learns_what_the_other_tokenization_would_give_its_own_pixels():
    """Masked-attention training: restoring the tokens on the fine grid is a hard choice, and the gate still gets, per
    region, the gradient of swapping it: `<grad, fine token - coarse token>` summed over its patches. The values are
    those of the kept tokens alone."""
    model = tiny_segmenter(gbas_loss_weight=0.0, gate_noise_scale=0.0).train()
    outputs = model.msvit(pixels())
    hidden, fine = outputs.last_hidden_state.detach(), outputs.fine_region_mask
    assert 0 < fine.float().mean() < 1  # both tokenizations present
    values = outputs.gate_values.detach().requires_grad_(True)
    plain = model.msvit.fine_grid_features(hidden, fine)
    grid = model.msvit.fine_grid_features(hidden, fine, values)
    assert torch.equal(grid, plain)
    weights = torch.randn_like(grid)
    (grid * weights).sum().backward()
    fine_tokens = hidden[:, 1 + 16 :].transpose(1, 2).reshape(3, 32, 8, 8)
    coarse_tokens = hidden[:, 1:17].transpose(1, 2).reshape(3, 32, 4, 4)
    coarse_tokens = coarse_tokens.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    per_patch = (weights * (fine_tokens - coarse_tokens)).sum(1)  # (3, 8, 8)
    expected = per_patch.reshape(3, 4, 2, 4, 2).sum((2, 4))
    torch.testing.assert_close(values.grad, expected)


def test_macs_count_the_decoder_on_the_kept_tokens():
    model = tiny_segmenter().eval()
    with torch.no_grad():
        outputs = model(pixels(), gate_threshold=0.5)
        encoder = MSViTModel.forward(model.msvit, pixels(), gate_threshold=0.5)
        all_fine = model(pixels(), fine_region_mask=torch.ones(3, 4, 4, dtype=torch.bool))
    decoder = (outputs.num_tokens - 1) * 5 * 32
    torch.testing.assert_close(outputs.macs, encoder.macs + decoder.float())
    assert len(set(outputs.num_tokens.tolist())) > 1  # images took different tokenizations
    assert all_fine.macs.tolist() == [model.static_macs()] * 3


def test_an_image_is_segmented_the_same_alone_and_in_a_batch():
    model = tiny_segmenter().eval()
    x = pixels(4)
    with torch.no_grad():
        batched = model(x, gate_threshold=0.5)
        alone = [model(x[i : i + 1], gate_threshold=0.5) for i in range(4)]
    assert len(set(batched.num_tokens.tolist())) > 1
    for index, single in enumerate(alone):
        torch.testing.assert_close(batched.logits[index], single.logits[0], atol=1e-5, rtol=1e-5)


def test_backbone_maps_are_the_layer_tokens_on_the_fine_grid():
    config = MSViTConfig(**TINY, out_features=["stem", "stage1", "stage2"])
    backbone = MSViTBackbone(config).eval()
    encoder = MSViTModel(config, add_pooling_layer=False).eval()
    encoder.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        maps = backbone(pixels(), gate_threshold=0.5).feature_maps
        outputs = encoder(pixels(), gate_threshold=0.5)
    assert len(set(outputs.num_tokens.tolist())) > 1
    expected_last = encoder.fine_grid_features(outputs.last_hidden_state, outputs.fine_region_mask)
    torch.testing.assert_close(maps[-1], expected_last, atol=1e-5, rtol=1e-5)
    assert [tuple(m.shape) for m in maps] == [(3, 32, 8, 8)] * 3


def test_backbone_upcycled_from_vit_gives_its_layer_outputs_when_all_fine():
    vit = tiny_vit()
    backbone = MSViTBackbone.from_vit_pretrained(vit, coarse_patch_size=8, out_indices=[1, 2])
    with torch.no_grad():
        maps = backbone(pixels(), fine_region_mask=torch.ones(3, 4, 4, dtype=torch.bool)).feature_maps
        hidden = vit(pixels(), output_hidden_states=True).hidden_states
    for feature_map, state in zip(maps, hidden[1:]):
        expected = vit.layernorm(state)[:, 1:].transpose(1, 2).reshape(3, 32, 8, 8)
        torch.testing.assert_close(feature_map, expected, atol=1e-5, rtol=1e-5)


def test_backbone_reports_the_gate_and_trains_it():
    backbone = MSViTBackbone(MSViTConfig(**TINY, out_indices=[2])).train()
    outputs = backbone(pixels())
    assert outputs.gate_loss is not None and outputs.fine_region_mask.shape == (3, 4, 4)
    (outputs.feature_maps[0].square().mean() + outputs.gate_loss).backward()
    assert backbone.embeddings.gate.layers[0].weight.grad.abs().sum() > 0


def test_auto_classes(tmp_path):
    model = tiny_segmenter().eval()
    model.save_pretrained(tmp_path)
    MSViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is MSViTForSemanticSegmentation
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()).logits, model(pixels()).logits)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MSViTImageProcessor
    # transformers 5.23's AutoBackbone.from_pretrained asks the Hub even for a local folder: build from the config
    backbone = AutoBackbone.from_config(MSViTConfig(**TINY, out_indices=[1, 2]))
    assert type(backbone) is MSViTBackbone and backbone.out_features == ["stage1", "stage2"]
