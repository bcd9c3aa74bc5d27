"""hf_msvit.hub: what would be uploaded (intercepted at the huggingface_hub boundary), the model card, loading the
uploaded folder without hf_msvit, and failures that leave local files intact."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import TrainingArguments

from hf_msvit import hub

from remote_code import run_without_hf_msvit
from tiny_models import tiny_dit, tiny_msvit, tiny_processor


MSVIT_DIR = Path(hub.__file__).parent / "models" / "msvit"
EVAL = {"eval_accuracy": 0.8125, "eval_gmacs": 0.0021, "eval_fine_region_ratio": 0.375, "eval_loss": 0.5}


class FakeHub:
    """Stands in for the Hub: records create_repo / upload_folder calls and keeps a copy of the uploaded folder."""

    def __init__(self, store: Path, fail_at: str | None = None):
        self.store, self.fail_at, self.calls = store, fail_at, []

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail_at == "create_repo":
            raise huggingface_hub.errors.HfHubHTTPError("401 Unauthorized: invalid token")
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        if self.fail_at == "upload":
            raise ConnectionError("connection reset while uploading")
        shutil.copytree(folder_path, self.store / repo_id.replace("/", "--"))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    def patch(self):
        fake = self

        def create_repo(api, repo_id, **kwargs):
            return fake.create_repo(api, repo_id, **kwargs)

        def upload_folder(api, **kwargs):
            return fake.upload_folder(api, **kwargs)

        return mock.patch.multiple(huggingface_hub.HfApi, create_repo=create_repo, upload_folder=upload_folder)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_push_uploads_weights_config_code_processor_and_card(tmp_path):
    model = tiny_msvit(num_labels=3).eval()
    processor = tiny_processor()
    fake = FakeHub(tmp_path / "hub")
    args = TrainingArguments(
        str(tmp_path / "out"), learning_rate=3e-4, per_device_train_batch_size=16, use_cpu=True, report_to="none"
    )
    with fake.patch():
        url = hub.push_to_hub(
            model,
            "someone/msvit-tiny",
            image_processor=processor,
            eval_metrics=EVAL,
            training_args=args,
            base_model="google/vit-base-patch16-224",
            dataset_name="beans",
        )
    assert url == "https://huggingface.co/someone/msvit-tiny/commit/abc"
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]  # one commit
    uploaded = tmp_path / "hub" / "someone--msvit-tiny"
    files = set(os.listdir(uploaded))
    assert {f for f in files if not f.endswith(".py")} == {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    code = {f for f in files if f.endswith(".py")}
    assert {"configuration_msvit.py", "modeling_msvit.py", "image_processing_msvit.py"} <= code
    assert code <= {p.name for p in MSVIT_DIR.glob("*.py")}

    config = json.loads((uploaded / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_msvit.MSViTConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_msvit.MSViTModel"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_msvit.MSViTForImageClassification"
    processor_config = json.loads((uploaded / "preprocessor_config.json").read_text())
    assert "AutoImageProcessor" in processor_config["auto_map"]

    card = ModelCard.load(uploaded / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert data["base_model"] == "google/vit-base-patch16-224"
    assert data["datasets"] == ["beans"]
    assert data["metrics"] == ["accuracy"]
    assert {"custom_code", "vision", "image-classification", "msvit"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["task"]["type"] == "image-classification"
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == pytest.approx(0.8125)
    body = card.text
    assert "trust_remote_code=True" in body and 'repo = "someone/msvit-tiny"' in body
    assert "0.0021" in body and "0.375" in body  # measured MACs and fine-region ratio
    assert f"{model.static_macs() / 1e9:.4f}"[:5] in body  # static backbone MACs
    assert "learning_rate" in body and "0.0003" in body
    assert "## Limitations" in body and "{{" not in body

    # The uploaded folder loads where hf_msvit is not installed, with the same logits.
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save({"pixels": pixel_values, "logits": expected}, tmp_path / "expected.pt")
    run_without_hf_msvit(
        f"""
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(uploaded)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("hf_msvit")
        processor = AutoImageProcessor.from_pretrained({str(uploaded)!r}, trust_remote_code=True)
        assert processor.size["height"] == 32
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(saved["pixels"]).logits
        # another process (and possibly another thread count): equal up to float rounding
        torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-6)
        """,
        modules_cache=str(tmp_path / "modules"),
    )


@pytest.mark.parametrize("step", ["create_repo", "upload"])
def test_failed_push_names_the_step_and_leaves_local_checkpoint_intact(tmp_path, step):
    model = tiny_msvit(num_labels=3).eval()
    processor = tiny_processor()
    local = tmp_path / "checkpoint"
    hub.save_for_hub(model, str(local), image_processor=processor, eval_metrics=EVAL)
    before = _digest(local)
    fake = FakeHub(tmp_path / "hub", fail_at=step)
    with fake.patch(), pytest.raises(hub.HubPushError) as info:
        hub.push_to_hub(model, "someone/msvit-tiny", image_processor=processor, eval_metrics=EVAL)
    assert info.value.step == step
    assert "someone/msvit-tiny" in str(info.value) and repr(step) in str(info.value)
    assert _digest(local) == before
    assert not (tmp_path / "hub").exists()


def test_script_push_to_hub(tmp_path, capsys):
    """`--push_to_hub` goes through hf_msvit.hub; a failed upload exits non-zero with the local checkpoint intact."""
    pytest.importorskip("sklearn")
    from example_script import load_script, script_args

    script = load_script()
    push = {"push_to_hub": True, "hub_model_id": "someone/digits"}
    fake = FakeHub(tmp_path / "hub")
    with fake.patch():
        script.main(script_args(tmp_path / "ok", **push))
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    uploaded = tmp_path / "hub" / "someone--digits"
    assert (uploaded / "model.safetensors").is_file()
    card = ModelCard.load(uploaded / "README.md")
    # The built-in data has no Hub id: no `datasets` metadata and, as in transformers' cards, no model-index without
    # a dataset; the card's text names the data and reports the accuracy.
    assert "datasets" not in card.data.to_dict() and "model-index" not in card.data.to_dict()
    assert "digits-on-canvas, built into hf_msvit" in card.text and "hf-msvit/" not in card.text

    failing = FakeHub(tmp_path / "hub2", fail_at="upload")
    with failing.patch(), pytest.raises(SystemExit) as info:
        script.main(script_args(tmp_path / "fail", **push))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "PUSH FAILED" in err and "'upload'" in err and "intact" in err
    assert (tmp_path / "fail" / "model.safetensors").is_file() and (tmp_path / "fail" / "README.md").is_file()


def test_dit_model_card(tmp_path):
    card = hub.build_model_card(
        tiny_dit(),
        repo_id="someone/dit-tiny",
        eval_metrics={"eval_accuracy": 0.5, "eval_gmacs": 0.01, "eval_token_keep_ratio": 0.7},
        base_model="OpenGVLab/pvt_v2_b0",
    )
    data = card.data.to_dict()
    assert data["base_model"] == "OpenGVLab/pvt_v2_b0" and "dit_routing" in data["tags"]
    assert "token keep ratio" in card.text and "0.7" in card.text and "{{" not in card.text
    assert "Upcycled from [OpenGVLab/pvt_v2_b0]" in card.text and "budget_target" in card.text


def test_card_keeps_local_paths_out_of_the_metadata(tmp_path):
    """A local checkpoint or dataset folder is named in the text, never as a Hub id in the metadata."""
    card = hub.build_model_card(
        tiny_msvit(num_labels=3), eval_metrics=EVAL, base_model=str(tmp_path), dataset_name=str(tmp_path)
    )
    data = card.data.to_dict()
    assert "base_model" not in data and "datasets" not in data and "model-index" not in data
    assert f"Upcycled from the ViT checkpoint `{tmp_path}`" in card.text
    assert "| accuracy" in card.text and "0.8125" in card.text
