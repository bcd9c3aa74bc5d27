"""onnxruntime rows of the speed benchmark: the graphs `hf_msvit.export` writes (dynamic batch, fixed image size and
budget) against the HF baselines of the same weights exported the same way (`torch.onnx.export(..., dynamo=True)`).

MSViT-S/16 at fine-region budgets against ViT-S/16; its own static route is the budget 1.0 (every region fine, gate
included). DiT on PVTv2's static route and at compute budgets against PVTv2; the row gates get random directions
(`set_dit_keep_ratio`), so that they rank the tokens as a trained gate would instead of tying.

Each graph is exported once per group and timed at every batch size, interleaved round after round as the PyTorch
rows are; no per-model memory process. MACs per image come from the PyTorch model in the same mode (its `macs`
output). `onnx_max_abs_diff`: onnxruntime's largest difference from eager PyTorch on two of the benchmark's images. A
graph that fails to export gets a row with its `error` and no timing.
"""

import tempfile
from pathlib import Path

import torch
from torch import nn


class _Logits(nn.Module):
    """An HF baseline as the exported graphs are: `pixel_values -> logits`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


def export_baseline(model, path, sample) -> None:
    from hf_msvit.export import MAX_BATCH_SIZE

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_SIZE)
    program = torch.onnx.export(
        _Logits(model).eval(), (sample,), dynamo=True, dynamic_shapes=({0: batch},), input_names=["pixel_values"],
        output_names=["logits"], verbose=False,
    )  # fmt: skip
    program.save(str(path), external_data=False)


def group_models(spec, pixel_values) -> dict:
    """`{row name: (model, hf_msvit.export options, or None for the HF baseline)}` of a group."""
    from bench_speed import build_msvit_pair

    if spec["family"] == "msvit":
        vit, msvit = build_msvit_pair()
        models = {"static": (vit, None), "ours_static": (msvit, {"fine_region_budget": 1.0})}
        for ratio in spec["ratios"]:
            models[f"budget:-:{ratio}"] = (msvit, {"fine_region_budget": float(ratio)})
        return models
    from dit_bench import build_dit_pair, set_dit_keep_ratio

    pvt, dit = build_dit_pair(spec["variant"])
    set_dit_keep_ratio(dit, pixel_values, 0.5)
    models = {"static": (pvt, None), "ours_static": (dit, {"static": True})}
    for ratio in spec["ratios"]:
        models[f"budget:-:{ratio}"] = (dit, {"compute_budget": float(ratio)})
    return models


def export_and_compare(model, options, path, pixel_values, threads) -> dict:
    """Exports one row's graph to `path`; its MACs and token statistics (PyTorch) and `onnx_max_abs_diff`."""
    from bench_speed import describe

    from hf_msvit.export import export_onnx, in_export_mode, onnxruntime_session, resolve_export_mode

    sample = pixel_values[:2]
    if options is None:
        export_baseline(model, path, sample)
        with torch.no_grad():
            info, expected = {"macs_per_image": None}, model.eval()(sample).logits
    else:
        export_onnx(model, path, check=False, **options)
        with in_export_mode(model, resolve_export_mode(model, **options)) as graph, torch.no_grad():
            outputs = graph.model(sample, **graph.mode.forward_kwargs)
        info, expected = describe(outputs), outputs.logits
    (actual,) = onnxruntime_session(path, threads).run(None, {"pixel_values": sample.numpy()})
    return {**info, "onnx_max_abs_diff": float(abs(actual - expected.numpy()).max())}


def time_onnx_group(spec) -> dict:
    """Worker: `{batch size: {row name: {latency_s, ..., macs_per_image, onnx_max_abs_diff}}}` (or `{error}`)."""
    from bench_speed import interleaved_timing

    from hf_msvit.export import onnxruntime_session

    torch.set_num_threads(spec["threads"])
    generator = torch.Generator().manual_seed(1234)
    pixel_values = torch.randn(max(spec["batch_sizes"]), 3, 224, 224, generator=generator)
    entries, sessions = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for name, (model, options) in group_models(spec, pixel_values[:8]).items():
            path = Path(directory) / f"{name.replace(':', '_')}.onnx"
            try:
                entries[name] = export_and_compare(model, options, path, pixel_values, spec["threads"])
            except Exception as error:  # one row's failure is reported in its row, not the end of the run
                entries[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
                continue
            sessions[name] = onnxruntime_session(path, spec["threads"])
            print(f"    exported {name}", flush=True)
        results = {}
        for batch_size in spec["batch_sizes"]:
            feed = {"pixel_values": pixel_values[:batch_size].numpy()}
            calls = {name: (lambda s=session: lambda: s.run(None, feed)) for name, session in sessions.items()}
            timing = interleaved_timing(calls, spec)
            results[batch_size] = {name: {**entry, **timing.get(name, {})} for name, entry in entries.items()}
    return results
