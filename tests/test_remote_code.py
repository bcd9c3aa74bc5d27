"""Checkpoints carry their code: `save_pretrained` of any of our classes copies the model folder's files and writes
an `auto_map` naming every Auto class, a checkpoint loads where hf_msvit is not installed (trust_remote_code=True)
with the same outputs, and after `import hf_msvit` it loads quietly with the installed classes."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

import hf_msvit
from hf_msvit import DiTBackbone, DiTModel, MSViTBackbone, MSViTForSemanticSegmentation, MSViTModel

from remote_code import run_without_hf_msvit
from tiny_models import tiny_dit, tiny_msvit, tiny_processor


@dataclass(frozen=True)
class Family:
    model_type: str
    build: object  # tiny classifier factory
    code_files: frozenset  # what a checkpoint must carry besides weights and configs
    auto_map: dict  # config.json's auto_map
    base_class: type
    extra_outputs: tuple = ()  # outputs compared besides the logits
    extra_classes: dict = field(default_factory=dict)  # Auto class -> class of our own, saved on its own


MSVIT = Family(
    model_type="msvit",
    build=lambda: tiny_msvit(image_size=64, num_labels=3),
    code_files=frozenset(
        {"configuration_msvit.py", "modeling_msvit.py", "batch_shaping.py", "convert_vit_to_msvit.py"}
    ),
    auto_map={
        "AutoConfig": "configuration_msvit.MSViTConfig",
        "AutoModel": "modeling_msvit.MSViTModel",
        "AutoModelForImageClassification": "modeling_msvit.MSViTForImageClassification",
        "AutoModelForSemanticSegmentation": "modeling_msvit.MSViTForSemanticSegmentation",
        "AutoBackbone": "modeling_msvit.MSViTBackbone",
    },
    base_class=MSViTModel,
    extra_outputs=("num_tokens",),
    extra_classes={"AutoModelForSemanticSegmentation": MSViTForSemanticSegmentation, "AutoBackbone": MSViTBackbone},
)
DIT = Family(
    model_type="dit_routing",
    # a partly routed model (every gate at p=0.5, strong init): the sparse paths run remotely too
    build=lambda: tiny_dit(gate_init_compute_prob=0.5, initializer_range=0.2),
    code_files=frozenset(
        {
            "configuration_dit_routing.py",
            "modeling_dit_routing.py",
            "layers.py",
            "routing.py",
            "sparse_inference.py",
            "convert_pvt_v2_to_dit_routing.py",
        }
    ),
    auto_map={
        "AutoConfig": "configuration_dit_routing.DiTConfig",
        "AutoModel": "modeling_dit_routing.DiTModel",
        "AutoModelForImageClassification": "modeling_dit_routing.DiTForImageClassification",
        "AutoBackbone": "modeling_dit_routing.DiTBackbone",
    },
    base_class=DiTModel,
    extra_outputs=("macs",),
    extra_classes={"AutoBackbone": DiTBackbone},
)
FAMILIES = pytest.mark.parametrize("family", [MSVIT, DIT], ids=lambda f: f.model_type)


def saved_checkpoint(family: Family, folder):
    model = family.build().eval()
    model.save_pretrained(folder)
    tiny_processor(family.model_type, image_size=64).save_pretrained(folder)
    return model


@FAMILIES
def test_every_class_saves_its_code_and_the_full_auto_map(family, tmp_path):
    classifier = family.build()
    for name, model in {
        "classification": classifier,
        "base": family.base_class(classifier.config),
        **{auto: cls(classifier.config) for auto, cls in family.extra_classes.items()},
    }.items():
        model.save_pretrained(tmp_path / name)
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert family.code_files <= files, (name, files)
        assert json.loads((tmp_path / name / "config.json").read_text())["auto_map"] == family.auto_map, name
    tiny_processor(family.model_type).save_pretrained(tmp_path / "processor")
    processor_config = json.loads((tmp_path / "processor" / "preprocessor_config.json").read_text())
    assert set(processor_config["auto_map"]) == {"AutoImageProcessor"}
    assert (tmp_path / "processor" / f"image_processing_{family.model_type}.py").is_file()


@FAMILIES
def test_checkpoint_loads_without_hf_msvit(family, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model = saved_checkpoint(family, checkpoint)
    assert not any(p.suffix == ".bin" for p in checkpoint.iterdir())
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values)
    if family is DIT:
        assert 0 < expected.stage_keep_ratio.mean() < 1
    names = ("logits", *family.extra_outputs)
    torch.save({"pixels": pixel_values, **{name: expected[name] for name in names}}, tmp_path / "expected.pt")
    extra_classes = {auto: cls.__name__ for auto, cls in family.extra_classes.items()}

    run_without_hf_msvit(
        f"""
        import torch
        import transformers
        from PIL import Image
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

        path = {str(checkpoint)!r}
        model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__name__ == {type(model).__name__!r}, type(model)
        assert not type(model).__module__.startswith("hf_msvit")
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(expected["pixels"])
        # another process, possibly another thread count: equal up to float rounding
        for name in {names!r}:
            torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

        assert type(AutoModel.from_pretrained(path, trust_remote_code=True)).__name__ == {family.base_class.__name__!r}
        for auto_name, class_name in {extra_classes!r}.items():
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            config.out_features = config.stage_names[1:]
            extra = getattr(transformers, auto_name).from_config(config, trust_remote_code=True)
            assert type(extra).__name__ == class_name, type(extra)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(processor).__name__ == {type(tiny_processor(family.model_type)).__name__!r}
        batch = processor(Image.new("LA", (50, 70)), return_tensors="pt")
        assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
        """,
        modules_cache=str(tmp_path / "modules"),
    )


@FAMILIES
def test_installed_package_wins_without_a_prompt(family, tmp_path):
    """With hf_msvit imported, a checkpoint carrying auto_map loads with the installed classes, without
    trust_remote_code and without a trust prompt (which would fail in this non-interactive process)."""
    model = saved_checkpoint(family, tmp_path)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is type(model)
    assert type(AutoModel.from_pretrained(tmp_path)) is family.base_class


PROMPT = "Do you wish to run the custom code"
PIPELINE_SNIPPET = """
from PIL import Image
from transformers import pipeline

for path in {paths!r}:
    classifier = pipeline("image-classification", model=path, **{kwargs!r})
    assert type(classifier.model).__module__.startswith({module_prefix!r}), type(classifier.model)
    predictions = classifier(Image.new("RGB", (50, 70), (90, 160, 30)), top_k=2)
    assert len(predictions) == 2 and {{"label", "score"}} <= set(predictions[0]), predictions
    print("OK", path, predictions[0]["label"])
"""


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "remote_code"])
def test_pipeline_never_asks(installed, tmp_path):
    """`pipeline()` on a saved checkpoint runs in a process with no stdin: with hf_msvit imported, no question and the
    installed classes; without hf_msvit, `trust_remote_code=True` loads the copied code. (pipeline() also tries
    `AutoVideoProcessor`, which derives a remote video-processor reference from the image processor's `auto_map` and
    asked "run the custom code? [y/N]" until hf_msvit registered that it has no video processor.)"""
    paths = []
    for family in (MSVIT, DIT):
        saved_checkpoint(family, tmp_path / family.model_type)
        paths.append(str(tmp_path / family.model_type))
    if installed:
        snippet = "import hf_msvit\n" + PIPELINE_SNIPPET.format(paths=paths, kwargs={}, module_prefix="hf_msvit.")
        result = run_with_hf_msvit(snippet, cwd=tmp_path)
    else:
        snippet = PIPELINE_SNIPPET.format(
            paths=paths, kwargs={"trust_remote_code": True}, module_prefix="transformers_modules."
        )
        result = run_without_hf_msvit(snippet, modules_cache=str(tmp_path / "modules"))
    output = result.stdout + result.stderr
    assert PROMPT not in output, output
    assert output.count("OK ") == 2, output


def run_with_hf_msvit(snippet: str, cwd) -> subprocess.CompletedProcess:
    """Runs `snippet` in a fresh process that imports this hf_msvit (as installed, or from this checkout's src/),
    Hub offline and no stdin: an interactive prompt would read EOF."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(hf_msvit.__file__).parents[1]), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", snippet], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=cwd,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"STDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result
