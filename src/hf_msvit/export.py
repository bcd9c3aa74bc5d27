"""Export MSViT and DiT with fixed shapes: `torch.export` programs and ONNX files that run in onnxruntime.

Only the modes whose tensor shapes do not depend on the image export:

- MSViT with a `fine_region_budget`: every image has the same number of fine regions, so the same token count;
- DiT on PVTv2's static route (`static=True`), or with a `compute_budget`: every stage on PVTv2's route computes the
  same number of tokens in every image.

The batch dimension stays dynamic; the image size, the mode and the budget are baked into the graph (and recorded in
the ONNX file's metadata). MSViT's threshold mode and DiT's learned routing choose a different amount of work per
image, so their graphs would have data-dependent shapes: asking for them raises `ExportModeError`, which names the mode
that exports.

    >>> from hf_msvit.export import export_onnx
    >>> export_onnx("path/to/msvit-checkpoint", "msvit.onnx", fine_region_budget=0.5)  # doctest: +SKIP

onnx, onnxscript and onnxruntime (the `export` extra) are imported only by the functions that need them.
"""

import inspect
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn


# The largest batch the exported graphs accept (torch.export needs a bound for its symbolic batch size).
MAX_BATCH_SIZE = 4096
_SUPPORTED = (
    "MSViTModel",
    "MSViTForImageClassification",
    "MSViTForSemanticSegmentation",
    "DiTModel",
    "DiTForImageClassification",
)


class ExportModeError(ValueError):
    """The model's routing mode gives data-dependent shapes, so it cannot be exported with fixed shapes."""


class ExportCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportMode:
    """What an exported graph assumes: the routing mode and budget, the image size, the output it returns."""

    model_type: str
    mode: str  # "fine_region_budget", "static_route", "full_route" or "compute_budget"
    budget: float | int | None
    image_size: tuple[int, int]
    output_name: str  # "logits" for the task heads, "last_hidden_state" for the base models
    forward_kwargs: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)

    def describe(self) -> str:
        budget = "" if self.budget is None else f" {self.budget}"
        return f"{self.model_type} {self.mode}{budget}, {self.image_size[0]}x{self.image_size[1]} px"

    def metadata(self) -> dict[str, str]:
        """The ONNX metadata properties an exported file carries (strings)."""
        return {
            "hf_msvit.model_type": self.model_type,
            "hf_msvit.mode": self.mode,
            "hf_msvit.budget": json.dumps(self.budget),
            "hf_msvit.image_size": json.dumps(list(self.image_size)),
            "hf_msvit.output": self.output_name,
        }


@dataclass
class OnnxExport:
    """Result of `export_onnx`: the file written, what it assumes, and the largest difference between onnxruntime's
    and PyTorch's outputs on random images (`None` when not checked)."""

    path: Path
    mode: ExportMode
    max_abs_diff: float | None


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _output_name(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in _SUPPORTED:
        raise TypeError(f"export takes one of {', '.join(_SUPPORTED)}; got {name}.")
    return "last_hidden_state" if name.endswith("Model") else "logits"


def _msvit_mode(model, fine_region_budget, compute_budget, static, image_size) -> ExportMode:
    config = model.config
    if compute_budget is not None or static:
        raise ExportModeError(
            "compute_budget and static are DiT modes. MSViT exports with a fine_region_budget (CLI: "
            "--fine-region-budget 0.5); a budget of 1.0 tokenizes every region fine, the ViT it came from."
        )
    budget = config.fine_region_budget if fine_region_budget is None else fine_region_budget
    if budget is None:
        raise ExportModeError(
            "MSViT exports only in fine_region_budget mode (e.g. fine_region_budget=0.5, CLI --fine-region-budget "
            "0.5): every image then has the same token count. The threshold mode (gate_threshold) gives every image "
            "its own number of tokens, a data-dependent shape."
        )
    config.check_fine_region_budget(budget)
    if image_size is not None and _pair(image_size) != config.image_hw:
        raise ValueError(
            f"MSViT's position embeddings fix its image size to {config.image_hw}; got image_size={image_size}."
        )
    kwargs = {"fine_region_budget": budget}
    return ExportMode("msvit", "fine_region_budget", budget, config.image_hw, _output_name(model), kwargs)


def _dit_mode(model, fine_region_budget, compute_budget, static, image_size) -> ExportMode:
    config = model.config
    if fine_region_budget is not None:
        raise ExportModeError("fine_region_budget is MSViT's mode; DiT exports with static=True or compute_budget.")
    if static and compute_budget is not None:
        raise ValueError("Pass either static=True (PVTv2's route) or compute_budget, not both.")
    size, output = _pair(image_size or config.image_size), _output_name(model)
    budget = None if static else (config.compute_budget if compute_budget is None else compute_budget)
    if budget is not None:
        config.check_compute_budget(budget)
        return ExportMode("dit_routing", "compute_budget", budget, size, output, {"compute_budget": budget})
    if static or config.routing_mode == "static":
        return ExportMode("dit_routing", "static_route", None, size, output, {}, {"routing_mode": "static"})
    if config.routing_mode == "full":
        return ExportMode("dit_routing", "full_route", None, size, output)
    raise ExportModeError(
        "DiT's learned routing (routing_mode='dynamic': column gates and thresholded row gates) decides per image "
        "which stages and how many tokens run, a data-dependent graph. Export PVTv2's static route (static=True, CLI "
        "--static) or the exact-budget mode (compute_budget=0.7, CLI --compute-budget 0.7)."
    )


def resolve_export_mode(model, fine_region_budget=None, compute_budget=None, static=False, image_size=None):
    """The `ExportMode` of `model` with these options; `ExportModeError` for a mode with data-dependent shapes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "msvit":
        return _msvit_mode(model, fine_region_budget, compute_budget, static, image_size)
    if model_type == "dit_routing":
        return _dit_mode(model, fine_region_budget, compute_budget, static, image_size)
    raise TypeError(f"export takes an MSViT or DiT model; got {type(model).__name__}.")


def load_model(model_or_path) -> nn.Module:
    """A model as it is, or the checkpoint at a path / Hub id loaded with the class its config names."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from transformers import AutoConfig, AutoModelForImageClassification

    import hf_msvit

    config = AutoConfig.from_pretrained(model_or_path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(hf_msvit, architecture or "", None) or AutoModelForImageClassification
    return model_class.from_pretrained(model_or_path)


class _GraphModule(nn.Module):
    """`pixel_values -> output` of `model` in `mode`: the one tensor an exported graph returns."""

    def __init__(self, model: nn.Module, mode: ExportMode):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values, **self.mode.forward_kwargs, return_dict=True)
        return getattr(outputs, self.mode.output_name)


@contextmanager
def in_export_mode(model: nn.Module, mode: ExportMode):
    """Eval mode and the mode's config overrides (e.g. DiT's static route) within the block, which gets the
    `pixel_values -> output` module that is exported; the model's own mode is restored afterwards. Also the way to
    run the eager model as the graph runs it (`graph.model(pixel_values, **mode.forward_kwargs)` for every output)."""
    saved = {name: getattr(model.config, name) for name in mode.config_overrides}
    was_training = model.training
    for name, value in mode.config_overrides.items():
        setattr(model.config, name, value)
    model.eval()
    try:
        yield _GraphModule(model, mode)
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)
        model.train(was_training)


def example_pixel_values(model: nn.Module, mode: ExportMode, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Random `(batch_size, channels, height, width)` images of the exported size, in the model's dtype."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, model.config.num_channels, *mode.image_size)
    parameter = next(model.parameters())
    return torch.randn(shape, generator=generator).to(device=parameter.device, dtype=parameter.dtype)


def _trace(model: nn.Module, mode: ExportMode, batch_size: int, dynamic_batch: bool):
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must lie in [1, {MAX_BATCH_SIZE}], got {batch_size}.")
    if dynamic_batch and batch_size < 2:
        batch_size = 2  # torch.export specializes sizes 0 and 1: trace with 2 images, the graph takes any number
    sample = example_pixel_values(model, mode, batch_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_SIZE)
    with in_export_mode(model, mode) as graph, torch.enable_grad():
        # Autograd on: DiT's static route then runs its plain dense stages (the same values as the inference path,
        # and a graph without the selection machinery); the budget modes take their selected-token path either way.
        program = torch.export.export(graph, (sample,), dynamic_shapes=({0: batch},) if dynamic_batch else None)
    return program, sample


def export_program(
    model_or_path,
    fine_region_budget: int | float | None = None,
    compute_budget: float | None = None,
    static: bool = False,
    batch_size: int = 2,
    image_size: int | tuple[int, int] | None = None,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """`torch.export` of `pixel_values -> logits` (`last_hidden_state` for the base models) in a fixed-shape mode.

    Args:
        model_or_path: an MSViT / DiT model, or the path or Hub id of a checkpoint.
        fine_region_budget: MSViT: regions tokenized fine per image (`float` fraction or `int` count); default: the
            config's value.
        compute_budget: DiT: fraction of the static route's cost every image computes; default the config's.
        static: DiT: PVTv2's static route.
        batch_size: images of the example input (the batch size itself when `dynamic_batch=False`).
        image_size: DiT: the image size the graph takes (default the config's); MSViT's is fixed by its config.
        dynamic_batch: keep the batch dimension symbolic (default) or bake `batch_size` in.
    """
    traced = _load_and_trace(
        model_or_path, fine_region_budget, compute_budget, static, batch_size, image_size, dynamic_batch
    )
    return traced.program


class _Traced(NamedTuple):
    model: nn.Module
    mode: ExportMode
    program: torch.export.ExportedProgram
    sample: torch.Tensor


def _load_and_trace(
    model_or_path, fine_region_budget, compute_budget, static, batch_size, image_size, dynamic_batch
) -> _Traced:
    """What `export_program` does, with the model, mode and example input it traced (`export_onnx` checks those)."""
    model = load_model(model_or_path)
    mode = resolve_export_mode(model, fine_region_budget, compute_budget, static, image_size)
    return _Traced(model, mode, *_trace(model, mode, batch_size, dynamic_batch))


def onnxruntime_session(path, num_threads: int | None = None):
    """An onnxruntime CPU session of the ONNX file at `path` (`num_threads`: intra-op threads, default ORT's)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("Running ONNX files needs onnxruntime: pip install 'hf_msvit[export]'.") from error
    options = onnxruntime.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path, model: nn.Module, mode: ExportMode, batch_sizes=(1, 3), atol: float = 1e-4) -> float:
    """Runs the ONNX file at `path` in onnxruntime on random images of each batch size and returns the largest
    absolute difference from `model`'s eager outputs; `ExportCheckError` when it exceeds `atol`."""
    session = onnxruntime_session(path)
    worst = 0.0
    for seed, batch_size in enumerate(batch_sizes, start=1):
        pixel_values = example_pixel_values(model, mode, batch_size, seed=seed)
        with in_export_mode(model, mode) as graph, torch.no_grad():
            expected = graph(pixel_values).float().cpu().numpy()
        (actual,) = session.run(None, {"pixel_values": pixel_values.float().cpu().numpy()})
        worst = max(worst, float(abs(actual - expected).max()))
    if worst > atol:
        raise ExportCheckError(
            f"onnxruntime's {mode.output_name} differ from PyTorch's by up to {worst:.3g} (> {atol:g}) for "
            f"{mode.describe()}; the ONNX file was not written."
        )
    return worst


def preprocessing_metadata(image_processor) -> dict[str, str]:
    """What an image processor does before the graph, as ONNX metadata (resize, rescale, normalize)."""
    keys = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize")
    settings = image_processor.to_dict()  # what `save_pretrained` writes: JSON types
    values = {key: settings.get(key) for key in (*keys, "image_mean", "image_std")}
    return {"hf_msvit.preprocessing": json.dumps(values)}


def _save_atomically(onnx_program, path: Path, verify) -> float | None:
    """Saves to a temporary file beside `path`, runs `verify(temporary path)`, then renames: a failed export or check
    leaves no half-written file and an existing `path` untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        onnx_program.save(temporary, external_data=False)
        result = verify(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return result


def export_onnx(
    model_or_path,
    output_path,
    *,
    opset_version: int | None = None,
    image_processor=None,
    check: bool = True,
    atol: float = 1e-4,
    **export_args,
) -> OnnxExport:
    """Exports `pixel_values -> logits` to the ONNX file `output_path` (`torch.onnx.export(..., dynamo=True)` of the
    `export_program` graph, input `pixel_values`, one output named like the model output). `export_args` are
    `export_program`'s arguments (`fine_region_budget`, `compute_budget`, `static`, `batch_size`, `image_size`,
    `dynamic_batch`), with its defaults. `image_processor`: its preprocessing is recorded in the metadata (loaded
    from the checkpoint when `model_or_path` is a path and it has one). `check`: run the file in onnxruntime and
    compare with PyTorch (`atol`) before it replaces `output_path`."""
    bound = inspect.signature(export_program).bind(model_or_path, **export_args)
    bound.apply_defaults()
    model, mode, program, sample = _load_and_trace(**bound.arguments)
    batch_size, dynamic_batch = bound.arguments["batch_size"], bound.arguments["dynamic_batch"]
    onnx_program = torch.onnx.export(
        program, (sample,), dynamo=True, input_names=["pixel_values"], output_names=[mode.output_name],
        opset_version=opset_version, verbose=False,
    )  # fmt: skip
    onnx_program.model.metadata_props.update(mode.metadata())
    image_processor = image_processor or _checkpoint_processor(model_or_path)
    if image_processor is not None:
        onnx_program.model.metadata_props.update(preprocessing_metadata(image_processor))
    batch_sizes = (1, batch_size + 1) if dynamic_batch else (batch_size,)

    def verify(path):
        return check_onnx(path, model, mode, batch_sizes, atol) if check else None

    path = Path(output_path)
    return OnnxExport(path, mode, _save_atomically(onnx_program, path, verify))


def _checkpoint_processor(model_or_path):
    if isinstance(model_or_path, nn.Module):
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_or_path)
    except (OSError, ValueError):
        return None


__all__ = [
    "ExportCheckError",
    "ExportMode",
    "ExportModeError",
    "OnnxExport",
    "check_onnx",
    "export_onnx",
    "export_program",
    "in_export_mode",
    "load_model",
    "onnxruntime_session",
    "preprocessing_metadata",
    "resolve_export_mode",
]
