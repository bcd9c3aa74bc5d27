"""MSViT segmentation checkpoints load where hf_msvit is not installed (trust_remote_code=True), with the same outputs:
the segmentation model, its image processor (with segmentation maps), the backbone, and UperNet on that backbone."""

import json

import torch
from transformers import UperNetConfig

from hf_msvit import MSViTBackbone, MSViTConfig, MSViTForSemanticSegmentation, MSViTImageProcessor
from hf_msvit.segmentation import DynamicUperNetForSemanticSegmentation

from remote_code import run_without_hf_msvit


TINY = {
    "image_size": 32, "patch_size": 4, "coarse_patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 48, "gate_hidden_size": 16, "num_labels": 3,
}  # fmt: skip


def test_segmentation_checkpoints_load_without_hf_msvit(tmp_path):
    torch.manual_seed(0)
    segmenter = MSViTForSemanticSegmentation(MSViTConfig(**TINY)).eval()
    segmenter.save_pretrained(tmp_path / "segmenter")
    MSViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "segmenter")
    backbone = MSViTBackbone(MSViTConfig(**TINY, out_features=["stem", "stage1", "stage2"])).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    upernet = DynamicUperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone.config, hidden_size=16, auxiliary_channels=8, num_labels=3)
    ).eval()
    upernet.save_pretrained(tmp_path / "upernet")
    auto_map = json.loads((tmp_path / "segmenter" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSemanticSegmentation"] == "modeling_msvit.MSViTForSemanticSegmentation"
    assert "AutoBackbone" in json.loads((tmp_path / "backbone" / "config.json").read_text())["auto_map"]

    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {
            "logits": segmenter(pixel_values, gate_threshold=0.5).logits,
            "maps": backbone(pixel_values, gate_threshold=0.5).feature_maps,
            "upernet": upernet(pixel_values).logits,
        }
    torch.save({"pixels": pixel_values, **expected}, tmp_path / "expected.pt")

    run_without_hf_msvit(
        f"""
        import numpy as np, torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import (AutoBackbone, AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation,
                                  UperNetForSemanticSegmentation)

        root = {str(tmp_path)!r}
        data = torch.load(root + "/expected.pt")
        model = AutoModelForSemanticSegmentation.from_pretrained(root + "/segmenter", trust_remote_code=True).eval()
        assert type(model).__name__ == "MSViTForSemanticSegmentation"
        assert not type(model).__module__.startswith("hf_msvit")
        with torch.no_grad():
            torch.testing.assert_close(model(data["pixels"], gate_threshold=0.5).logits, data["logits"])

        processor = AutoImageProcessor.from_pretrained(root + "/segmenter", trust_remote_code=True)
        label_map = Image.fromarray(np.full((40, 30), 2, dtype=np.uint8))
        batch = processor(Image.new("RGB", (30, 40)), segmentation_maps=label_map, return_tensors="pt")
        assert tuple(batch["labels"].shape) == (1, 32, 32) and batch["labels"].unique().tolist() == [2]

        # AutoBackbone.from_pretrained asks the Hub for local folders in transformers 5.23: build from the config
        config = AutoConfig.from_pretrained(root + "/backbone", trust_remote_code=True)
        backbone = AutoBackbone.from_config(config, trust_remote_code=True).eval()
        backbone.load_state_dict(load_file(root + "/backbone/model.safetensors"))
        with torch.no_grad():
            for ours, theirs in zip(backbone(data["pixels"], gate_threshold=0.5).feature_maps, data["maps"]):
                torch.testing.assert_close(ours, theirs)

        # UperNet's backbone config names model_type "msvit": register the remote classes, then UperNet loads
        AutoConfig.register("msvit", type(config))
        AutoBackbone.register(type(config), type(backbone))
        upernet = UperNetForSemanticSegmentation.from_pretrained(root + "/upernet").eval()
        with torch.no_grad():
            torch.testing.assert_close(upernet(data["pixels"]).logits, data["upernet"])
        print("remote code OK")
        """,
        modules_cache=str(tmp_path / "modules"),
    )
