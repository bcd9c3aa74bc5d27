"""Helpers of the demo tests (not a test module): tiny checkpoints and where artifacts go."""

import os
from pathlib import Path

from tiny_models import tiny_dit, tiny_msvit, tiny_processor


DEMO_MODEL_ENV = "HF_MSVIT_DEMO_MODEL"  # a real checkpoint for the app fixture instead of a tiny random one
REPO_ROOT = Path(__file__).resolve().parents[2]


def save_tiny_checkpoint(folder: Path, model_type: str = "msvit") -> Path:
    """A tiny random classifier of 64x64 px images with its processor (MSViT: a 4x4 grid of regions)."""
    model = tiny_msvit(image_size=64) if model_type == "msvit" else tiny_dit()
    model.eval().save_pretrained(folder)
    tiny_processor(model_type, image_size=64).save_pretrained(folder)
    return folder


def artifact_dir() -> Path:
    """Where tests leave files for people to look at ($HF_MSVIT_TEST_ARTIFACTS, default test-artifacts/)."""
    folder = Path(os.environ.get("HF_MSVIT_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
