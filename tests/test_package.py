"""Package-level contracts: Auto registration on import, model folders fit for remote code, mlinter and ruff clean."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_msvit


MODELS = Path(hf_msvit.__file__).parent / "models"
MLINTER = shutil.which("mlinter", path=str(Path(sys.executable).parent)) or shutil.which("mlinter")
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
ROOT = Path(__file__).resolve().parent.parent


def test_import_registers_the_auto_classes():
    assert CONFIG_MAPPING["msvit"] is hf_msvit.MSViTConfig
    config = AutoConfig.for_model("msvit", image_size=64, hidden_size=32, num_attention_heads=4)
    assert isinstance(config, hf_msvit.MSViTConfig)
    assert AutoModel._model_mapping[hf_msvit.MSViTConfig] is hf_msvit.MSViTModel
    assert AutoModelForImageClassification._model_mapping[hf_msvit.MSViTConfig] is hf_msvit.MSViTForImageClassification


@pytest.mark.parametrize("path", sorted(MODELS.glob("*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_folders_import_only_siblings(path):
    """Model folders are copied flat to the Hub: only `from .sibling import` relative imports may appear."""
    source = path.read_text()
    assert not re.search(r"^\s*from\s+\.\.", source, re.MULTILINE), f"{path} uses a parent-relative import"
    assert not re.search(r"^\s*(from|import)\s+hf_msvit", source, re.MULTILINE), f"{path} imports hf_msvit"


@pytest.mark.skipif(MLINTER is None, reason="transformers-mlinter is installed with the test extra")
def test_mlinter_is_clean_on_the_model_folders():
    result = subprocess.run([MLINTER, "--no-progress", str(MODELS)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.skipif(RUFF is None, reason="ruff is installed with the test extra")
@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree (its ruff configuration)")
def test_ruff_is_clean_on_the_tree():
    result = subprocess.run([RUFF, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
