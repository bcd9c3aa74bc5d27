"""Fixtures of the demo tests: the example images, and the app launched on a free port with a tiny checkpoint saved
locally (or the one named by $HF_MSVIT_DEMO_MODEL, e.g. the main job's runs/msvit-digits for the README
screenshot)."""

import os
from types import SimpleNamespace

import pytest

from hf_msvit.demo import build_app, example_images, load_demo_model

from _demo_helpers import DEMO_MODEL_ENV, save_tiny_checkpoint


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from gradio in tests


@pytest.fixture(scope="session")
def demo_examples(tmp_path_factory):
    pytest.importorskip("sklearn", reason="the example images come from scikit-learn (pip install -e '.[test]')")
    return example_images(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def launched_app(tmp_path_factory, demo_examples):
    """The MSViT demo served by gradio on the first free port from 7860 (closed at the end of the session)."""
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
    name = os.environ.get(DEMO_MODEL_ENV) or str(save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint")))
    demo = load_demo_model(name)
    app = build_app(demo, examples=demo_examples)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield SimpleNamespace(url=url, demo=demo, examples=demo_examples)
    finally:
        app.close()
