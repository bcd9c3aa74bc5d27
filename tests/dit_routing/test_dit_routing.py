"""DiT routing: config checks, input checks, variants, sparse paths against the dense reference, MAC accounting
(analytic vs FlopCounterMode vs the paper), eval determinism, eager = sdpa, torch.compile, backbone, pipeline."""

import pytest
import torch
from _dit_tiny import build, pixels, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from hf_msvit import DiTBackbone, DiTConfig, DiTModel
from hf_msvit.models.dit_routing.layers import DiTGate, DiTStage
from hf_msvit.models.dit_routing.routing import dit_route_macs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"routing_mode": "sometimes"}, "routing_mode"),
        ({"depths": [1, 1, 1]}, "depths has 3 entries"),
        ({"hidden_sizes": [8, 16, 24, 30], "num_attention_heads": [1, 2, 3, 4]}, "divisible"),
        ({"num_routing_columns": 3}, "num_routing_columns"),
        ({"gumbel_temperature": 0.0}, "gumbel_temperature"),
        ({"gate_ema_momentum": 1.0}, "gate_ema_momentum"),
        ({"gate_init_compute_prob": 1.0}, "gate_init_compute_prob"),
        ({"budget_target": 0.0}, "budget_target"),
        ({"budget_loss_weight": -1.0}, "budget_loss_weight"),
        ({"sr_ratios": [8, 4, 0, 1]}, "sr_ratios"),
    ],
)
def test_inconsistent_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig(**overrides)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 64, 64), r"\(batch_size, 3, height, width\), got \(2, 1, 64, 64\)"),
        ((2, 4, 64, 64), "num_channels=3"),
        ((3, 64, 64), r"shape \(batch_size, 3, height, width\)"),
        ((0, 3, 64, 64), "no image"),
        ((1, 3, 8, 8), "spatial-reduction ratio"),
    ],
)
def test_bad_pixel_values_give_a_value_error_naming_the_expected_shape(shape, message):
    model = build()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(torch.zeros(shape))


def test_from_variant_gives_pvt_v2_shapes():
    expected_depths = {"b0": [2, 2, 2, 2], "b1": [2, 2, 2, 2], "b2": [3, 4, 6, 3], "b3": [3, 4, 18, 3],
                       "b4": [3, 8, 27, 3], "b5": [3, 6, 40, 3]}  # fmt: skip
    for name, depths in expected_depths.items():
        config = DiTConfig.from_variant(name)
        assert config.depths == depths
        assert config.hidden_sizes == ([32, 64, 160, 256] if name == "b0" else [64, 128, 320, 512])
        assert config.mlp_ratios == ([4, 4, 4, 4] if name == "b5" else [8, 8, 4, 4])
        assert config.num_attention_heads == [1, 2, 5, 8]
        assert config.sr_ratios == [8, 4, 2, 1]
        assert config.num_routing_columns == 4 and config.routing_mode == "dynamic"
    config = DiTConfig.from_variant("B2", routing_mode="static", num_labels=10)
    assert config.routing_mode == "static" and config.num_labels == 10
    with pytest.raises(ValueError, match="Unknown DiT variant"):
        DiTConfig.from_variant("b9")


def test_config_round_trip_and_trainer_keys(tmp_path):
    config = tiny_config(routing_mode="full", budget_target=0.8)
    config.save_pretrained(tmp_path)
    loaded = DiTConfig.from_pretrained(tmp_path)
    assert loaded.routing_mode == "full" and loaded.budget_target == 0.8 and loaded.depths == [1, 2, 1, 1]
    for key in ("budget_loss", "macs", "downsampled", "stage_keep_ratio", "token_keep_ratio"):
        assert key in DiTConfig.keys_to_ignore_at_inference


@pytest.mark.parametrize("stage_input", ["full_map", "masked_map"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("scale", [0, 1, 3])
def test_stage_gather_path_equals_dense_masked_reference(scale, attn_implementation, stage_input):
    config = tiny_config(attn_implementation=attn_implementation, stage_input=stage_input)
    model = DiTModel(config).eval()
    stage: DiTStage = model.grid[scale][0]
    side = 16 >> scale
    generator = torch.Generator().manual_seed(scale)
    hidden = torch.randn(4, side * side, config.hidden_sizes[scale], generator=generator)
    selected = torch.rand(4, side * side, generator=generator) < 0.5
    selected[1] = True  # one image computes every token
    selected[2] = False  # one computes none
    selected[3, 1:] = False  # one computes a single token
    selected[3, 0] = True
    with torch.no_grad():
        reference = stage(hidden, side, side, selected.float())
        gathered = stage.forward_selected(hidden, side, side, selected)
        dense = stage(hidden, side, side)
    torch.testing.assert_close(gathered, reference, atol=1e-5, rtol=1e-5)
    # skipped tokens pass by identity; an image with every token selected equals the plain stage
    torch.testing.assert_close(gathered[~selected], hidden[~selected])
    torch.testing.assert_close(gathered[1], dense[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage_input", ["full_map", "masked_map"])
def test_model_sparse_inference_equals_dense_reference(monkeypatch, stage_input):
    """The inference forward (sub-batches, gathered tokens, skipped nodes) gives the same outputs as the dense training
    path run with the same (deterministic) gate decisions."""
    model = build(stage_input=stage_input)
    batch = pixels(4)
    with torch.no_grad():
        sparse = model(batch, output_hidden_states=True)
    assert 0 < sparse.stage_keep_ratio.mean() < 1, "the random gates should route part of the tokens"
    assert 0 < sparse.downsampled.mean() < 1, "the random gates should route part of the images"

    deterministic = DiTGate.forward

    def eval_decisions(gate, features, threshold=0.5):
        was_training = gate.training
        gate.training = False
        try:
            return deterministic(gate, features, threshold)
        finally:
            gate.training = was_training

    monkeypatch.setattr(DiTGate, "forward", eval_decisions)
    model.train()  # dense path: every node computed, multiplied by the decisions (no dropout / drop-path here)
    with torch.no_grad():
        dense = model(batch, output_hidden_states=True)
    torch.testing.assert_close(dense.logits, sparse.logits, atol=1e-5, rtol=1e-5)
    for dense_map, sparse_map in zip(dense.hidden_states, sparse.hidden_states):
        torch.testing.assert_close(dense_map, sparse_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.macs, sparse.macs)
    torch.testing.assert_close(dense.stage_keep_ratio, sparse.stage_keep_ratio)
    torch.testing.assert_close(dense.downsampled, sparse.downsampled)


def test_masked_map_stage_input_changes_what_kept_tokens_see():
    """`stage_input="masked_map"` (Eq. 4 literally) feeds the stage G * F: kept tokens get other values than with the
    full map, skipped tokens keep their input values either way."""
    outputs = {}
    for stage_input in ("full_map", "masked_map"):
        stage = build(DiTModel, stage_input=stage_input).grid[0][0]
        hidden = torch.randn(2, 256, 8, generator=torch.Generator().manual_seed(0))
        selected = torch.rand(2, 256, generator=torch.Generator().manual_seed(1)) < 0.5
        with torch.no_grad():
            outputs[stage_input] = stage.forward_selected(hidden, 16, 16, selected)
        torch.testing.assert_close(outputs[stage_input][~selected], hidden[~selected])
    assert not torch.allclose(outputs["full_map"][selected], outputs["masked_map"][selected], atol=1e-3)


def test_image_output_does_not_depend_on_the_batch():
    model = build()
    batch = pixels(4)
    with torch.no_grad():
        together = model(batch)
        alone = [model(batch[i : i + 1]) for i in range(4)]
    torch.testing.assert_close(torch.cat([o.logits for o in alone]), together.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([o.macs for o in alone]), together.macs)
    assert len(set(together.macs.tolist())) > 1, "images should take different routes"


def test_static_and_full_macs_equal_the_analytic_count():
    for mode in ("static", "full"):
        model = build(routing_mode=mode)
        with torch.no_grad():
            out = model(pixels(2))
        head = model.classifier.weight.numel()
        expected = dit_route_macs(model.config, 64, 64, mode) + head
        assert out.macs.tolist() == [expected, expected]
        route_macs = model.static_macs() if mode == "static" else model.full_grid_macs()
        dit_macs = model.dit.static_macs() if mode == "static" else model.dit.full_grid_macs()
        assert route_macs == expected == dit_macs + head
        assert out.budget_loss is None
        keep = out.stage_keep_ratio[0]
        if mode == "static":
            assert torch.equal(keep, torch.eye(4)), keep  # stage i at column i, every token
            taken = torch.zeros(3, 5)
            taken[[0, 1, 2], [1, 2, 3]] = 1
            assert torch.equal(out.downsampled[0], taken)
        else:
            assert torch.equal(keep, torch.ones(4, 4)) and torch.equal(out.downsampled[0], torch.ones(3, 5))


@pytest.mark.parametrize("size", [(64, 64), (75, 50)])
@pytest.mark.parametrize("routing_mode", ["static", "full", "dynamic"])
def test_macs_match_flop_counter(routing_mode, size):
    """The analytic per-image `macs` equal what FlopCounterMode measures on the same forward, within 2%.

    One image per forward: in a batch, the gather path pads every image to the most selected tokens of the batch,
    and that padding is compute the batch spends but no image's `macs` (see benchmarks/RESULTS.md for its cost)."""
    model = build(routing_mode=routing_mode)  # eager attention: CPU sdpa kernels are invisible to FlopCounterMode
    batch = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
    for image in batch:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model(image[None])
        measured_macs = counter.get_total_flops() / 2
        assert measured_macs > 0
        assert abs(out.macs.item() - measured_macs) / measured_macs < 0.02, (out.macs.item(), measured_macs)


# PVTv2's published GFLOPs at 224x224 (PVTv2 paper, Table 1 of the DiT paper).
PUBLISHED_PVT_V2_GMACS = {"b1": 2.1, "b2": 4.0, "b3": 6.9, "b4": 10.1, "b5": 11.8}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PVT_V2_GMACS))
def test_static_route_matches_published_pvt_v2_gmacs(variant):
    config = DiTConfig.from_variant(variant, routing_mode="static")  # analytic: no weights are built
    gmacs = (dit_route_macs(config, 224, 224, "static") + 512 * 1000) / 1e9
    published = PUBLISHED_PVT_V2_GMACS[variant]
    assert abs(gmacs - published) / published < 0.03, (variant, gmacs, published)


def test_full_route_costs_about_four_times_static_for_b2():
    config = DiTConfig.from_variant("b2")
    static = dit_route_macs(config, 224, 224, "static")
    full = dit_route_macs(config, 224, 224, "full")
    assert 3.8 < full / static < 4.3, full / static  # the paper's "Fully": 15.6 vs 3.8 GFLOPs (x4.1)
    assert abs(full / 1e9 - 15.6) / 15.6 < 0.05, full / 1e9


def test_analytic_route_cost_needs_a_fixed_route():
    with pytest.raises(ValueError, match="static"):
        dit_route_macs(tiny_config(), 64, 64, "dynamic")


def test_output_node_is_reached_even_with_every_column_gate_closed():
    model = build()
    with torch.no_grad():
        for row in model.dit.column_gates:
            for gate in row:
                gate.bias.copy_(torch.tensor([10.0, -10.0]))
        out = model(pixels(2), output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    # only the last column's edges are taken (forced open), so each scale is entered exactly there
    assert torch.equal(out.downsampled[:, :, :-1], torch.zeros(2, 3, 4))
    assert torch.equal(out.downsampled[:, :, -1], torch.ones(2, 3))
    assert (out.stage_keep_ratio[:, 1:] == 0).all()  # no stage below scale 0 ran
    assert (out.macs < dit_route_macs(model.config, 64, 64, "static")).all()


@pytest.mark.parametrize("routing_mode", ["static", "dynamic"])
def test_eager_equals_sdpa(routing_mode):
    model = build(routing_mode=routing_mode)
    batch = pixels(3)
    with torch.no_grad():
        eager = model(batch)
        model.set_attn_implementation("sdpa")
        sdpa = model(batch)
    torch.testing.assert_close(sdpa.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa.macs, eager.macs)


def test_torch_compile_static_route_is_one_graph():
    model = build(routing_mode="static", attn_implementation="sdpa")
    batch = pixels(2)
    with torch.no_grad():
        expected = model(batch)
        actual = torch.compile(model, backend="aot_eager", fullgraph=True)(batch)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.macs, expected.macs)


def test_torch_compile_dynamic_route_matches_eager():
    """Data-dependent routing compiles with graph breaks (`_can_compile_fullgraph = False`); a 2x2 grid is quick."""
    torch._dynamo.reset()
    model = build(
        attn_implementation="sdpa", num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 2], sr_ratios=[2, 1], mlp_ratios=[2, 2], patch_sizes=[7, 3], strides=[4, 2],
        num_routing_columns=2,
    )  # fmt: skip
    batch = pixels(2)
    with torch.no_grad():
        expected = model(batch)
        actual = torch.compile(model, backend="eager")(batch)
    assert 0 < expected.stage_keep_ratio.mean() < 1
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.macs, expected.macs)


def test_backbone_from_classification_checkpoint(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    # transformers 5.23's `AutoBackbone.from_pretrained` asks the Hub whether a *local* path is a repo (and fails), so
    # load with the class; `AutoBackbone.from_config` (what dense heads call) is checked below.
    backbone = DiTBackbone.from_pretrained(tmp_path, out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    batch = pixels(2)
    with torch.no_grad():
        features = backbone(batch).feature_maps
        hidden = model.dit(batch, output_hidden_states=True).hidden_states
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    for feature, reference in zip(features, hidden[1:]):
        torch.testing.assert_close(feature, reference)


def test_backbone_plugs_into_upernet():
    from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

    backbone_config = tiny_config(out_features=["stage1", "stage2", "stage3", "stage4"])
    assert isinstance(AutoBackbone.from_config(backbone_config), DiTBackbone)
    config = UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_in_channels=24, num_labels=4)
    model = UperNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        logits = model(pixels(2)).logits
    assert logits.shape == (2, 4, 64, 64)


def test_return_dict_false_in_config_gives_tuples():
    model = build(return_dict=False)
    with torch.no_grad():
        logits, _budget_loss, macs, _downsampled, stage_keep, keep = model(pixels(2))
    assert logits.shape == (2, 5) and macs.shape == (2,) and stage_keep.shape == (2, 4, 4) and keep.shape == (2,)
    backbone = build(DiTBackbone, return_dict=False, out_features=["stage1", "stage4"])
    with torch.no_grad():
        feature_maps = backbone(pixels(2))[0]
    assert [f.shape[1] for f in feature_maps] == [8, 32]


def test_pipeline_and_trainer_see_only_logits(tmp_path):
    """`keys_to_ignore_at_inference` keeps `macs`, gates and the budget loss out of Trainer's predictions."""
    from PIL import Image
    from transformers import Trainer, TrainingArguments, pipeline

    from hf_msvit import DiTImageProcessor

    model = build()
    processor = DiTImageProcessor(size={"height": 64, "width": 64})
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    assert len(classifier(Image.new("RGB", (40, 50)), top_k=2)) == 2

    data = [{"pixel_values": pixels(1, seed=i)[0], "labels": i % 5} for i in range(4)]
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        max_steps=2, report_to=[], save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert seen["shape"] == (4, 5) and "eval_accuracy" in metrics


@pytest.mark.parametrize("block_floats", [None, 1 << 19, 64])  # None: the one-step plan of accelerators
@pytest.mark.parametrize("stage_input", ["full_map", "masked_map"])
def test_inference_paths_equal_the_dense_training_path(monkeypatch, block_floats, stage_input):
    """The inference stage (cache-blocked MLP: a few images and a slice of the intermediate channels at a time;
    gathered tokens) equals the plain dense path autograd uses, for every token and for a selection (fp32, 1e-5). A
    tiny block size forces one image and a few channels per step."""
    from hf_msvit.models.dit_routing import sparse_inference

    monkeypatch.setattr(sparse_inference, "FEED_FORWARD_BLOCK_FLOATS", block_floats)
    config = tiny_config(stage_input=stage_input, mlp_ratios=[4, 4, 4, 4], depths=[2, 2, 2, 2])
    stage = DiTModel(config).grid[1][0].eval()
    hidden = torch.randn(3, 64, config.hidden_sizes[1], generator=torch.Generator().manual_seed(0))
    selected = torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) < 0.6
    selected[0] = True
    with torch.no_grad():
        for mask in (None, selected):
            with torch.enable_grad():  # grad mode: `forward` takes the plain dense path
                reference = stage(hidden, 8, 8, None if mask is None else mask.float())
            fast = stage(hidden, 8, 8) if mask is None else stage.forward_selected(hidden, 8, 8, mask)
            torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=1e-5)
    if block_floats == 64:
        channels, blocks = sparse_inference.TokenSelection.every_token(3, 64).feed_forward_plan(64, 64)
        assert channels < 64 and len(blocks) == 3  # really blocked
