"""A saved MSViT checkpoint loads where hf_msvit is not installed (trust_remote_code=True), with the same outputs."""

import json

import torch
from remote_code import run_without_hf_msvit

from hf_msvit import MSViTConfig, MSViTForImageClassification, MSViTImageProcessor


def test_checkpoint_loads_without_hf_msvit(tmp_path):
    torch.manual_seed(0)
    config = MSViTConfig(
        image_size=64, patch_size=8, coarse_patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, gate_hidden_size=16, num_labels=3,
    )
    model = MSViTForImageClassification(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    MSViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(checkpoint)

    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_msvit.py",
            "modeling_msvit.py", "batch_shaping.py", "convert_vit_to_msvit.py",
            "image_processing_msvit.py"} <= files, files
    assert not any(name.endswith(".bin") for name in files)
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}

    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model(pixel_values)
    torch.save({"logits": expected.logits, "num_tokens": expected.num_tokens}, tmp_path / "expected.pt")

    run_without_hf_msvit(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

        path = {str(checkpoint)!r}
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__name__ == "MSViTForImageClassification", type(model)
        assert not type(model).__module__.startswith("hf_msvit")
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(pixels)
        torch.testing.assert_close(out.logits, expected["logits"], atol=1e-6, rtol=0)
        assert torch.equal(out.num_tokens, expected["num_tokens"])

        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        assert type(base).__name__ == "MSViTModel"
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(processor).__name__ == "MSViTImageProcessor"
        batch = processor(Image.new("LA", (50, 70)), return_tensors="pt")
        assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
        print("remote code OK")
        """,
        modules_cache=str(tmp_path / "modules"),
    )


def test_installed_package_wins_without_a_prompt(tmp_path):
    """With hf_msvit imported, a checkpoint carrying auto_map loads with the installed classes, no trust prompt."""
    model = MSViTForImageClassification(
        MSViTConfig(image_size=64, patch_size=8, coarse_patch_size=16, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=4, intermediate_size=48, gate_hidden_size=16)
    )
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is MSViTForImageClassification
