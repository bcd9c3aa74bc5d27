"""A saved DiT checkpoint loads where hf_msvit is not installed (trust_remote_code=True), with the same outputs."""

import json

import torch
from remote_code import run_without_hf_msvit

from hf_msvit import DiTConfig, DiTForImageClassification, DiTImageProcessor


def test_checkpoint_loads_without_hf_msvit(tmp_path):
    torch.manual_seed(0)
    config = DiTConfig(
        image_size=64, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
        sr_ratios=[4, 2, 1, 1], mlp_ratios=[2, 2, 2, 2], num_labels=3, gate_init_compute_prob=0.5,
        initializer_range=0.2,
    )  # fmt: skip
    model = DiTForImageClassification(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    DiTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(checkpoint)

    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_dit_routing.py",
            "modeling_dit_routing.py", "convert_pvt_v2_to_dit_routing.py", "image_processing_dit_routing.py"} <= files, files
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone"}

    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model(pixel_values)
    assert 0 < expected.stage_keep_ratio.mean() < 1  # a partly routed model: the sparse paths run remotely too
    torch.save({"logits": expected.logits, "macs": expected.macs}, tmp_path / "expected.pt")

    run_without_hf_msvit(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel
        from transformers import AutoModelForImageClassification

        path = {str(checkpoint)!r}
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__name__ == "DiTForImageClassification", type(model)
        assert not type(model).__module__.startswith("hf_msvit")
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(pixels)
        torch.testing.assert_close(out.logits, expected["logits"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.macs, expected["macs"])

        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert type(base).__name__ == "DiTModel"
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        config.out_features = ["stage1", "stage2", "stage3", "stage4"]
        backbone = AutoBackbone.from_config(config, trust_remote_code=True)
        assert type(backbone).__name__ == "DiTBackbone"
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(processor).__name__ == "DiTImageProcessor"
        batch = processor(Image.new("LA", (50, 70)), return_tensors="pt")
        assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
        print("remote code OK")
        """,
        modules_cache=str(tmp_path / "modules"),
    )


def test_installed_package_wins_without_a_prompt(tmp_path):
    """With hf_msvit imported, a checkpoint carrying auto_map loads with the installed classes, no trust prompt."""
    config = DiTConfig(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1])
    DiTForImageClassification(config).save_pretrained(tmp_path)
    from transformers import AutoModel, AutoModelForImageClassification

    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is DiTForImageClassification
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "DiTModel"
