"""MSViT behaviour: dynamic tokenization, upcycling exactness, batching, MACs, Auto classes, pipeline."""

import tempfile

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    pipeline,
)

from hf_msvit import MSViTConfig, MSViTForImageClassification, MSViTImageProcessor, MSViTModel
from hf_msvit.models.msvit.convert_vit_to_msvit import JOINT_PHASE_NOISE_SCALE
from hf_msvit.models.msvit.modeling_msvit import MSViTLayer, partition_by_length, patchify, sample_gate

from tiny_models import tiny_msvit_config


def tiny_config(**overrides) -> MSViTConfig:
    """The shared tiny MSViT at 64 px (4x4 coarse regions) with 5 labels."""
    return tiny_msvit_config(**{"image_size": 64, "num_labels": 5, **overrides})


def tiny_vit(**overrides) -> ViTForImageClassification:
    values = {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "num_labels": 5,
    }
    values.update(overrides)
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**values)).eval()


def mixed_model(**overrides) -> MSViTForImageClassification:
    """A random model whose gate sends roughly half the regions fine (different token counts per image)."""
    torch.manual_seed(0)
    model = MSViTForImageClassification(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.msvit.embeddings.gate.layers:
            layer.weight.mul_(8.0)
    return model


def images(batch=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 64, 64, generator=generator)


# ---------------------------------------------------------------------------------------------- upcycling from ViT


def test_all_fine_equals_source_vit_logits():
    vit = tiny_vit()
    model = MSViTForImageClassification.from_vit_pretrained(vit, coarse_patch_size=16, gate_hidden_size=16)
    x = images(4)
    with torch.no_grad():
        expected = vit(x).logits
        got = model(x, fine_region_mask=torch.ones(4, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.num_tokens, torch.full((4,), 65))


def test_upcycling_from_directory_reuses_every_backbone_weight():
    vit = tiny_vit()
    with tempfile.TemporaryDirectory() as tmp:
        vit.save_pretrained(tmp)
        model = MSViTForImageClassification.from_vit_pretrained(tmp, coarse_patch_size=16, gbas_target_ratio=0.3)
    assert model.config.gbas_target_ratio == 0.3
    assert model.config.id2label == vit.config.id2label
    vit_state = vit.state_dict()
    new = []
    for key, value in model.state_dict().items():
        source = key.replace("msvit.", "vit.", 1)
        if source in vit_state:
            assert torch.equal(value, vit_state[source]), key
        else:
            new.append(key)
    assert new and all(k.startswith(("msvit.embeddings.gate.", "msvit.batch_shaping.")) for k in new), new


def test_base_model_upcycling_matches_vit_model():
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
        )
    ).eval()
    model = MSViTModel.from_vit_pretrained(vit, coarse_patch_size=16)
    x = images(2)
    with torch.no_grad():
        expected = vit(x)
        got = model(x, fine_region_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)


def test_non_vit_checkpoint_gets_a_clear_error():
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    with pytest.raises(ValueError, match="Expected a ViT checkpoint"):
        MSViTForImageClassification.from_vit_pretrained(resnet)
    with tempfile.TemporaryDirectory() as tmp:
        resnet.save_pretrained(tmp)
        with pytest.raises(ValueError, match="model_type 'vit'.*'resnet'"):
            MSViTForImageClassification.from_vit_pretrained(tmp)


# --------------------------------------------------------------------------------------------- dynamic tokenization


def test_fine_region_mask_overrides_the_gate_and_sets_token_counts():
    model = mixed_model()
    x = images(3)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[1, 0, 0] = True
    mask[2] = True
    with torch.no_grad():
        out = model(x, fine_region_mask=mask)
    # CLS + one token per coarse region + 3 more for each fine region (2x2 fine patches per region)
    assert out.num_tokens.tolist() == [1 + 16, 1 + 16 + 3, 1 + 64]
    assert torch.equal(out.fine_region_mask, mask)
    assert out.gate_probs is None and out.gate_loss is None


@pytest.mark.parametrize("shape", [(3, 16), (3, 4, 5), (2, 4, 4)])
def test_wrong_fine_region_mask_shape_raises(shape):
    model = mixed_model()
    with pytest.raises(ValueError, match="fine_region_mask must have shape"):
        model(images(3), fine_region_mask=torch.ones(shape, dtype=torch.bool))


def test_wrong_image_size_and_threshold_raise():
    model = mixed_model()
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="gate_threshold"):
        model(images(1), gate_threshold=1.5)


def test_eval_decisions_follow_the_threshold():
    model = mixed_model()
    x = images(6)
    with torch.no_grad():
        default = model(x)
        low, high = model(x, gate_threshold=0.2), model(x, gate_threshold=0.8)
    assert torch.equal(default.fine_region_mask, default.gate_probs >= 0.5)
    assert torch.equal(high.fine_region_mask, default.gate_probs >= 0.8)
    assert low.num_tokens.sum() > default.num_tokens.sum() > high.num_tokens.sum()
    assert len(set(default.num_tokens.tolist())) > 1, "the test needs different token counts per image"
    scale2 = 4
    assert torch.equal(default.num_tokens, 1 + 16 + (scale2 - 1) * default.fine_region_mask.flatten(1).sum(1))


def test_eval_is_deterministic_and_training_samples():
    model = mixed_model()
    x = images(6)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first.logits, second.logits)
    model.train()
    torch.manual_seed(3)
    sampled = [model(x).fine_region_mask for _ in range(4)]
    assert any(not torch.equal(sampled[0], other) for other in sampled[1:]), "Gumbel noise should vary decisions"


@pytest.mark.parametrize("mode", ["bucket", "pad", "per_image", "pack"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_equals_one_at_a_time_with_mixed_lengths(mode, attn):
    model = mixed_model(token_batching=mode, attn_implementation=attn)
    x = images(6)
    with torch.no_grad():
        batched = model(x)
        assert len(set(batched.num_tokens.tolist())) > 1
        for i in range(6):
            single = model(x[i : i + 1])
            torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-5)
            assert batched.num_tokens[i] == single.num_tokens[0]
            n = int(single.num_tokens[0])
            assert batched.attention_mask[i].sum() == n


def test_hidden_states_are_padded_per_image():
    model = mixed_model(attn_implementation="eager")
    x = images(4)
    with torch.no_grad():
        out = model.msvit(x, output_hidden_states=True, output_attentions=True)
    max_len = int(out.num_tokens.max())
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.hidden_states[0].shape == (4, max_len, 32)
    assert out.attentions[0].shape == (4, 4, max_len, max_len)
    # keys beyond an image's tokens get no attention
    for i, n in enumerate(out.num_tokens.tolist()):
        assert out.attentions[0][i, :, :n, n:].abs().sum() == 0
        assert out.last_hidden_state[i, n:].abs().sum() == 0
    assert (out.num_tokens < max_len).any(), "the test needs padding"


def test_training_step_reaches_gate_and_priors_with_mixed_lengths():
    model = mixed_model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    out = model(images(6), labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    assert out.gate_loss is not None and out.gate_loss > 0
    torch.testing.assert_close(
        out.loss,
        torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3, 4, 0]))
        + model.config.gbas_loss_weight * out.gate_loss,
    )
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_partition_by_length():
    lengths = [5, 40, 6, 41, 5, 39, 80]
    assert partition_by_length(lengths, "pad", 16) == [list(range(7))]
    assert partition_by_length(lengths, "per_image", 16) == [[i] for i in range(7)]
    groups = partition_by_length(lengths, "bucket", 16)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert [sorted(g) for g in groups] == [[0, 2, 4], [1, 3, 5], [6]]

    def cost(gs):
        return sum(len(g) * max(lengths[i] for i in g) + 16 for g in gs)

    assert cost(groups) < cost([list(range(7))])
    # a large fixed cost per group makes one padded group optimal
    assert partition_by_length(lengths, "bucket", 10_000) == [sorted(range(7), key=lengths.__getitem__)]


# ------------------------------------------------------------------------------------------------------------ MACs


def test_macs_follow_the_token_counts():
    model = mixed_model()
    x = images(4)
    with torch.no_grad():
        out = model(x)
    config = model.config
    for n, macs in zip(out.num_tokens.tolist(), out.macs.tolist()):
        tokens = n - 1
        expected = (
            config.num_hidden_layers * MSViTLayer.macs(config, n)
            + tokens * 3 * 8 * 8 * 32  # patch embedding of the tokens that entered
            + 16 * (3 * 16 * 16 * 16 + 16 * 16 * 2 + 16)  # gate on 16 regions
            + 32 * 5  # classifier
        )
        assert macs == pytest.approx(expected, rel=1e-6)
    all_fine = model(x[:1], fine_region_mask=torch.ones(1, 4, 4, dtype=torch.bool)).macs
    assert float(all_fine) == pytest.approx(model.static_macs(), rel=1e-6)


@pytest.mark.parametrize("fine_ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("gate", [False, True])
def test_analytic_macs_match_flop_counter(fine_ratio, gate):
    # eager attention: FlopCounterMode has no formula for the CPU fused SDPA kernel and would count 0 for it
    model = mixed_model(gbas_target_ratio=0.5, attn_implementation="eager")
    x = images(1)
    num_fine = int(round(fine_ratio * 16))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, torch.randperm(16, generator=torch.Generator().manual_seed(0))[:num_fine]] = True
    with torch.no_grad():
        if gate:
            with FlopCounterMode(display=False) as counter:
                out = model(x, gate_threshold=1.0 - fine_ratio)
        else:
            with FlopCounterMode(display=False) as counter:
                out = model(x, fine_region_mask=mask.reshape(1, 4, 4))
    measured_macs = counter.get_total_flops() / 2
    assert float(out.macs[0]) == pytest.approx(measured_macs, rel=0.02)


# ------------------------------------------------------------------------------------------ Auto classes, pipeline


def test_auto_classes_and_pipeline_use_the_installed_classes():
    model = mixed_model()
    processor = MSViTImageProcessor(size={"height": 64, "width": 64})
    model.config.id2label = {i: f"class_{i}" for i in range(5)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        assert isinstance(AutoConfig.from_pretrained(tmp), MSViTConfig)
        assert isinstance(AutoModel.from_pretrained(tmp), MSViTModel)
        loaded = AutoModelForImageClassification.from_pretrained(tmp)
        assert isinstance(loaded, MSViTForImageClassification)
        assert isinstance(AutoImageProcessor.from_pretrained(tmp), MSViTImageProcessor)
        x = images(2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits)

        from PIL import Image

        classifier = pipeline("image-classification", model=tmp)
        result = classifier(Image.new("RGB", (80, 50), (200, 30, 30)), top_k=3)
        assert len(result) == 3 and result[0]["label"].startswith("class_")


def test_torch_compile_gives_the_same_outputs():
    # aot_eager traces with dynamo/AOTAutograd like inductor does, without the minutes of C++ compilation on CPU.
    model = mixed_model()
    x = images(4)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="aot_eager", dynamic=True)
        got = compiled(x)
    torch.testing.assert_close(got.logits, expected.logits)
    assert torch.equal(got.num_tokens, expected.num_tokens)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_gate_starts_at_the_target_ratio(target):
    """Fresh and upcycled gates start with every region near p(fine) = gbas_target_ratio."""
    x = images(4)
    fresh = MSViTForImageClassification(tiny_config(gbas_target_ratio=target)).eval()
    upcycled = MSViTForImageClassification.from_vit_pretrained(
        tiny_vit(), coarse_patch_size=16, gbas_target_ratio=target
    )
    for model in (fresh, upcycled):
        with torch.no_grad():
            probs = model(x).gate_probs
        assert float(probs.mean()) == pytest.approx(target, abs=0.05)


# ---------------------------------------------------------------------------------- training modes, budget, sizes


def test_masked_attention_training_computes_the_selected_tokenization():
    """Masked-attention training (both tokenizations in the sequence, keys weighted by the sampled decisions) gives
    the logits of the selected tokenization for the same decisions, and gradients reach the gate."""
    x, labels = images(4), torch.tensor([0, 1, 2, 3])
    outputs = {}
    for mode in ("masked_attention", "straight_through"):
        model = mixed_model(gate_training_mode=mode).train()
        torch.manual_seed(5)
        out = model(x, labels=labels)
        out.loss.backward()
        outputs[mode] = out
        assert model.msvit.embeddings.gate.layers[0].weight.grad.abs().sum() > 0
    masked, selected = outputs["masked_attention"], outputs["straight_through"]
    assert torch.equal(masked.fine_region_mask, selected.fine_region_mask)
    assert 0 < masked.fine_region_mask.float().mean() < 1, "the test needs both tokenizations"
    torch.testing.assert_close(masked.logits, selected.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(masked.num_tokens, selected.num_tokens)
    torch.testing.assert_close(masked.macs, selected.macs)
    assert masked.attention_mask.shape == (4, 1 + 16 + 64)
    assert torch.equal(masked.attention_mask.sum(1), masked.num_tokens)


@pytest.mark.parametrize("budget", [5, 0.25, 0, 16])
def test_fine_region_budget_tokenizes_the_top_k_regions(budget):
    model = mixed_model()
    x = images(6)
    with torch.no_grad():
        out = model(x, fine_region_budget=budget)
        count = budget if isinstance(budget, int) else round(budget * 16)
        assert out.fine_region_mask.flatten(1).sum(1).tolist() == [count] * 6
        assert out.num_tokens.tolist() == [1 + 16 + 3 * count] * 6  # every image the same length: no padding
        probs = out.gate_probs.flatten(1)
        chosen, rest = (
            probs.masked_fill(~out.fine_region_mask.flatten(1), 2.0),
            probs.masked_fill(out.fine_region_mask.flatten(1), -1.0),
        )
        assert (chosen.min(1).values >= rest.max(1).values).all()  # the k highest gate probabilities
        same = model(x, fine_region_mask=out.fine_region_mask)
        torch.testing.assert_close(out.logits, same.logits, atol=1e-5, rtol=1e-5)
        gate = model.msvit.embeddings.gate.macs(16)
        torch.testing.assert_close(out.macs, same.macs + gate)
        model.config.fine_region_budget = budget  # the config field does the same
        torch.testing.assert_close(model(x).logits, out.logits)


@pytest.mark.parametrize("budget", [17, -1, 1.5, True, "half"])
def test_bad_fine_region_budget_is_a_clear_error(budget):
    model = mixed_model()
    with pytest.raises(ValueError, match="fine_region_budget must be"):
        model(images(1), fine_region_budget=budget)
    # the config rejects it too (values: ValueError; wrong types: the strict dataclass's validation error)
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match="fine_region_budget"):
        tiny_config(fine_region_budget=budget)


def test_empty_batch_is_a_clear_error():
    model = mixed_model()
    with pytest.raises(ValueError, match="no image"):
        model(torch.zeros(0, 3, 64, 64))


@pytest.mark.parametrize(
    "backbone",
    [
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},  # ViT-S/16
        {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},  # ViT-Ti/16
        {
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "image_size": 96,
        },  # the built-in data's ViT
        {
            "hidden_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "intermediate_size": 192,
            "image_size": 96,
        },  # its former small ViT: the gate's narrowest width
    ],
)
@pytest.mark.parametrize("gate_input", ["pixels", "embeddings"])
def test_default_gate_costs_at_most_two_percent_of_the_static_vit(backbone, gate_input):
    config = MSViTConfig(**backbone, gate_input=gate_input)
    model = MSViTModel(config)
    regions = config.coarse_grid[0] * config.coarse_grid[1]
    fraction = model.embeddings.gate.macs(regions) / model.static_macs()
    assert fraction <= 0.02 or config.gate_hidden_size == 8, (config.gate_hidden_size, fraction)
    assert fraction <= 0.025


def test_fine_grid_features_restore_the_mixed_tokens():
    """Tokens back on the fine grid: with every region fine, the ViT's patch tokens; a coarse token fills its region;
    both layouts (selected tokens, masked-attention training) give the same grid."""
    vit = tiny_vit()
    model = MSViTModel.from_vit_pretrained(vit.vit, coarse_patch_size=16)
    x = images(3)
    with torch.no_grad():
        all_fine = model(x, fine_region_mask=torch.ones(3, 4, 4, dtype=torch.bool))
        grid = model.fine_grid_features(all_fine.last_hidden_state, all_fine.fine_region_mask)
        expected = vit.vit(x).last_hidden_state[:, 1:].transpose(1, 2).reshape(3, 32, 8, 8)
        torch.testing.assert_close(grid, expected, atol=1e-5, rtol=0)

    mixed = mixed_model()
    torch.manual_seed(0)
    mixed.train()
    masked = mixed.msvit(x)  # masked-attention layout
    mixed.eval()
    with torch.no_grad():
        selected = mixed.msvit(x, fine_region_mask=masked.fine_region_mask)
        grid_selected = mixed.msvit.fine_grid_features(selected.last_hidden_state, selected.fine_region_mask)
    grid_masked = mixed.msvit.fine_grid_features(masked.last_hidden_state, masked.fine_region_mask).detach()
    torch.testing.assert_close(grid_masked, grid_selected, atol=1e-5, rtol=1e-5)
    image, region = 0, masked.fine_region_mask[0].flatten().tolist().index(False)
    row, col = divmod(region, 4)
    cell = grid_selected[image, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].flatten(1)
    assert torch.equal(cell, cell[:, :1].expand(-1, 4))  # a coarse token covers its 2x2 fine patches


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_gate_level_calibration_holds_the_target_fraction(target):
    """Training keeps a running (1 - target) quantile of the gate logits (training decisions unchanged); inference
    subtracts it: whatever the raw level (here pushed far down, where an uncalibrated gate tokenizes nothing fine),
    the target fraction of regions of the data seen in training scores p >= 0.5."""
    model = mixed_model(gbas_target_ratio=target)
    with torch.no_grad():
        model.msvit.embeddings.gate.logit_bias.fill_(-20.0)
    x = images(8)
    model.train()
    with torch.no_grad():
        for _ in range(30):
            train = model(x)
    assert not train.fine_region_mask.any()  # training decisions follow the raw logits
    model.eval()
    with torch.no_grad():
        evaluation = model(x)
    assert float(evaluation.fine_region_mask.float().mean()) == pytest.approx(target, abs=0.02)
    uncalibrated = mixed_model(gbas_target_ratio=target, gate_level_calibration=False)
    uncalibrated.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not uncalibrated.eval()(x).fine_region_mask.any()


NOISE_FREE = {"gate_noise_scale": 0.0}
SAMPLED = {"gate_noise_scale": JOINT_PHASE_NOISE_SCALE}  # the examples' joint phase


def train_gate_from_bias(level_weight: float, target: float, steps: int = 120, decisions=NOISE_FREE):
    """Trains only the gate of a model started at bias -20 (an uncalibrated gate tokenizes nothing fine there) with
    its gate loss, Adam at lr 0.1 decaying to 0; returns the fine ratio of the training decisions over the last
    quarter of the steps, and of inference on new images with the calibration offset applied and without."""
    torch.manual_seed(0)
    config = tiny_config(gbas_target_ratio=target, gate_level_loss_weight=level_weight, **decisions)
    model = MSViTForImageClassification(config).train()
    gate = model.msvit.embeddings.gate
    with torch.no_grad():
        gate.logit_bias.fill_(-20.0)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    ratios = []
    for step in range(steps):
        outputs = model(images(8, seed=step))
        optimizer.zero_grad()
        outputs.gate_loss.backward()
        optimizer.step()
        schedule.step()
        ratios.append(float(outputs.fine_region_mask.float().mean()))
    inference = []
    with torch.no_grad():
        for gate.calibration in (True, False):
            inference.append(float(model.eval()(images(16, seed=steps)).fine_region_mask.float().mean()))
    return sum(ratios[-steps // 4 :]) / (steps // 4), *inference


@pytest.mark.parametrize("decisions", [NOISE_FREE, SAMPLED], ids=["noise-free", "sampled (joint phase)"])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_level_term_brings_a_saturated_gate_to_the_target_in_training(target, decisions):
    """From bias -20 the GBaS loss on probabilities has no gradient left (sigmoid' ~ 2e-9): training decisions stay
    all coarse, and only inference's calibration offset would hide it. The level term is linear in the logits: the
    training decisions themselves (noise-free, or sampled as upcycled gates train) reach the target, and inference
    needs no calibration to follow."""
    stuck, stuck_calibrated, stuck_uncalibrated = train_gate_from_bias(0.0, target, decisions=decisions)
    assert stuck < 0.01 and stuck_uncalibrated == 0.0 and stuck_calibrated > target / 2
    ratio, calibrated, uncalibrated = train_gate_from_bias(1.0, target, decisions=decisions)
    assert ratio == pytest.approx(target, abs=0.05)
    assert uncalibrated == pytest.approx(target, abs=0.1) and calibrated == pytest.approx(uncalibrated, abs=0.05)


AT_TARGET = {**SAMPLED, "gate_sampling_level": "target"}  # the classification example's joint phase


@pytest.mark.parametrize("target", [0.25, 0.75])
def test_sampling_at_the_target_level_needs_the_level_term_for_inference(target):
    """Cut at the target (`gate_sampling_level="target"`), every batch of sampled training decisions has the target
    fraction fine, even from bias -20 where nothing would be fine at the threshold: training sees inference's token
    mix. The cut alone does not move the gate: inference stays all coarse unless the level term brings it there."""
    stuck, _, stuck_uncalibrated = train_gate_from_bias(0.0, target, decisions=AT_TARGET)
    assert stuck == pytest.approx(target, abs=0.02) and stuck_uncalibrated == 0.0
    ratio, _, uncalibrated = train_gate_from_bias(1.0, target, decisions=AT_TARGET)
    assert ratio == pytest.approx(target, abs=0.02) and uncalibrated == pytest.approx(target, abs=0.1)


def test_sample_gate_at_the_target_ranks_the_noisy_logits_of_the_whole_batch():
    """The target cut keeps round(target * regions) of the batch, not of each image (images differ in how much
    detail they have), ranked on the noisy logits, and its straight-through gradient is centred on the cut (between
    the last region kept and the first dropped), not on the threshold; with no noise the decisions stay inference's."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0], [-2.0, -3.0, -4.0, -5.0]], requires_grad=True)
    soft, hard = sample_gate(logits, 1.0, 0.5, noise_scale=1e-4, target_ratio=0.25)
    assert (hard > 0.5).tolist() == [[True, True, False, False], [False] * 4]
    assert soft[0, 1].item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=1e-3)  # cut at 3.5
    hard.sum().backward()
    slopes = torch.sigmoid(logits.detach() - 3.5) * torch.sigmoid(3.5 - logits.detach())  # centred on the cut 3.5
    torch.testing.assert_close(logits.grad, slopes - slopes.mean(), atol=1e-3, rtol=0)  # less their mean: see below
    # ranked decisions ignore a shift of every logit, and so does their gradient: the task reorders, the level term
    # alone moves the level
    scores = torch.randn(4, 9, requires_grad=True)
    _, hard = sample_gate(scores, 1.0, 0.5, noise_scale=0.5, target_ratio=0.25)
    (hard * torch.randn(4, 9)).sum().backward()
    assert abs(scores.grad.sum().item()) < 1e-5 and scores.grad.abs().sum() > 0.1
    torch.manual_seed(0)
    _, hard = sample_gate(torch.zeros(16, 36), 1.0, 0.5, noise_scale=0.5, target_ratio=0.3)
    assert hard.sum() == round(0.3 * 16 * 36) and 0 < hard.sum(1).min() < hard.sum(1).max()
    _, hard = sample_gate(logits.detach(), 1.0, 0.5, noise_scale=0.0, target_ratio=0.25)
    assert hard.sum() == 4  # noise-free: logits >= 0
    with pytest.raises(ValueError, match="gate_sampling_level must be one of"):
        tiny_config(gate_sampling_level="quantile")


def test_level_term_is_bounded_when_the_quantile_jumps():
    """A saturated two-mode gate (logits at -50 and +50) puts the batch quantile on one mode: the level term's pull
    stays that of a one-logit shift (gradient 2 in all) instead of growing with the jump (a squared 50-logit shift
    swamped every other gradient under gradient clipping), and it still points the level the right way."""
    model = MSViTModel(tiny_config(gbas_target_ratio=0.5))
    logits = torch.cat([torch.full((60,), -50.0), torch.full((40,), 50.0)]).requires_grad_()
    loss = model._level_loss(logits)
    loss.backward()
    assert loss.item() < 100 and float(logits.grad.sum()) == pytest.approx(-2.0)  # descent raises every logit
    small = torch.linspace(-1, 1, 100).add(0.3).requires_grad_()  # quantile 0.3 above the threshold: quadratic
    model._level_loss(small).backward()
    assert float(small.grad.sum()) == pytest.approx(0.6, rel=1e-3)


def test_logit_penalty_pulls_saturated_logits_back():
    """`gate_logit_loss_weight` adds the mean squared logit to the gate loss: a gate drifted to -60 gets a pull back
    proportional to how far it drifted (the level term's pull is capped at a one-logit shift), and the decisions are
    those of the same gate without it."""
    x = images(4)
    outputs = {}
    for weight in (0.0, 0.01):
        torch.manual_seed(0)
        model = MSViTModel(tiny_config(gbas_target_ratio=0.25, gate_level_loss_weight=1.0,
                                       gate_logit_loss_weight=weight, gate_noise_scale=0.0)).train()  # fmt: skip
        gate = model.embeddings.gate
        with torch.no_grad():
            gate.logit_bias.fill_(-60.0)
        out = model(x)
        out.gate_loss.backward()
        with torch.no_grad():
            logits = gate(patchify(x, model.config.coarse_patch_size))
        outputs[weight] = (out, float(gate.logit_bias.grad), logits)
    (plain, plain_grad, logits), (penalized, penalized_grad, _) = outputs[0.0], outputs[0.01]
    assert torch.equal(plain.fine_region_mask, penalized.fine_region_mask)
    added = float(penalized.gate_loss.detach() - plain.gate_loss.detach())
    assert added == pytest.approx(0.01 * float(logits.pow(2).mean()), rel=1e-4)
    assert penalized_grad - plain_grad == pytest.approx(0.02 * float(logits.mean()), rel=1e-3)
    # descent raises the bias; the level term's pull stays -2 (capped), the penalty's grows with the drift
    assert plain_grad == pytest.approx(-2.0, rel=1e-3) and penalized_grad < -3.0


def test_noise_free_training_takes_the_decisions_inference_takes():
    """`gate_noise_scale=0`: the training forward tokenizes exactly as uncalibrated inference does (the operating point
    inference computes), and the straight-through values still carry the gate's gradient."""
    model = mixed_model(gate_noise_scale=0.0, gate_level_calibration=False)
    x = images(6)
    with torch.no_grad():
        inference = model.eval()(x).fine_region_mask
    train = model.train()(x, labels=torch.zeros(6, dtype=torch.long))
    assert torch.equal(train.fine_region_mask, inference) and 0 < inference.float().mean() < 1
    train.loss.backward()
    assert model.msvit.embeddings.gate.layers[0].weight.grad.abs().sum() > 0
