"""Wall-clock benchmark: dynamic models against their static baselines, same weights, same run, same machine.

    python benchmarks/bench_speed.py                      # everything: writes benchmarks/results/speed_<device>.json
    python benchmarks/make_results_table.py               # renders benchmarks/RESULTS.md from those JSON files
    python benchmarks/bench_speed.py --quick              # a smoke run (few repeats, not for quoting)
    python benchmarks/bench_speed.py --device cuda        # GPU rows (bfloat16, sdpa); nothing else needs a GPU

Models. MSViT-S/16 is upcycled from a random HF `ViTForImageClassification` (ViT-S/16, 224 px); its fine ratio is set
by choosing the gate threshold as a quantile of the batch's gate probabilities, so the gate runs as in deployment and
images get different token counts, and, in the "budget" rows, by `fine_region_budget` (the same number of fine regions
in every image: equal lengths, no buckets). DiT-b1/b2 are upcycled from random HF `PvtV2ForImageClassification`;
their row gates are set to compute a given fraction of the tokens of every stage on PVTv2's route (`dit_bench.py`),
and, in the "budget" rows, `compute_budget` makes every image compute that fraction of the static cost (the same
tokens per stage in every image, chosen by the gates' scores).

Method. One worker process per group (family, variant, batch size): it builds the baseline, our model on its static
route (MSViT with every region fine, DiT on PVTv2's route) and the dynamic model at each ratio, then times them
interleaved, round after round (A, B, C, A, B, C, ...), so that a machine whose load changes during the run slows
every model alike; latency is the median over rounds. Peak memory is measured in a fresh process per model: the growth
of the process's peak RSS during two calls after a warm-up (CPU, reset through /proc/self/clear_refs; glibc set to
return freed blocks to the system, see `MEMORY_ENV`), or the allocator's peak (GPU). Models run in eval mode under
`torch.inference_mode()`.

onnxruntime (`--families onnx`, part of the default run, `onnx_bench.py`): the graphs `hf-msvit export` writes (MSViT
at fine-region budgets 0.25/0.5/0.75, DiT on PVTv2's route and at compute budgets 0.7/0.5) against the HF baselines
exported the same way, at the same batch sizes, with the same speedup / ideal / efficiency columns (no memory column).

Reported per row: images/s, latency per batch, peak memory (and its ratio to the baseline's), and against both the HF
baseline and our own static route: measured speedup, ideal speedup (MAC ratio, from the models' `macs`) and
efficiency = measured / ideal.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def build_msvit_pair(image_size=224, **msvit_overrides):
    from transformers import ViTConfig, ViTForImageClassification

    from hf_msvit import MSViTForImageClassification

    torch.manual_seed(0)
    vit_config = ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        image_size=image_size, patch_size=16, num_labels=1000, attn_implementation="sdpa",
    )  # fmt: skip
    vit = ViTForImageClassification(vit_config).eval()
    msvit = MSViTForImageClassification.from_vit_pretrained(vit, **msvit_overrides).eval()
    return vit, msvit


def msvit_threshold_for_ratio(msvit, pixel_values, ratio):
    """Gate threshold that makes `ratio` of the batch's regions fine (quantile of the gate probabilities)."""
    with torch.inference_mode():
        probs = msvit(pixel_values).gate_probs.flatten()
    if ratio >= 1.0:
        return 0.0
    if ratio <= 0.0:
        return 1.0
    return float(torch.quantile(probs.double(), 1.0 - ratio))


def msvit_models(spec, pixel_values):
    """`{name: (model, prepare, call kwargs)}` of an MSViT group: `prepare()` sets what differs between rows."""
    vit, msvit = build_msvit_pair()

    def batching(mode):
        return lambda: setattr(msvit.config, "token_batching", mode)

    models = {"static": (vit, None, {}), "ours_static": (msvit, batching("bucket"), {"gate_threshold": 0.0})}
    for mode in spec["token_batching"]:
        for ratio in spec["ratios"]:
            threshold = msvit_threshold_for_ratio(msvit, pixel_values, ratio)
            models[f"dynamic:{mode}:{ratio}"] = (msvit, batching(mode), {"gate_threshold": threshold})
    if "bucket" in spec["token_batching"]:  # the fixed-budget mode: every image the same length, no buckets
        for ratio in spec["ratios"]:
            if 0.0 < ratio < 1.0:
                models[f"budget:bucket:{ratio}"] = (msvit, batching("bucket"), {"fine_region_budget": float(ratio)})
    return models


def dit_models(spec, pixel_values):
    from dit_bench import build_dit_pair, dit_gate_state, set_dit_keep_ratio

    pvt, dit = build_dit_pair(spec["variant"])

    def route(mode, gates=None):
        resolved = []  # (tensor, value), looked up once the model sits on its device

        def prepare():
            dit.config.routing_mode = mode
            if gates and not resolved:
                tensors = dict(dit.named_parameters()) | dict(dit.named_buffers())
                resolved.extend((tensors[name], value) for name, value in gates.items())
            with torch.no_grad():
                for tensor, value in resolved:
                    tensor.copy_(value)

        return prepare

    models = {"static": (pvt, None, {}), "ours_static": (dit, route("static"), {})}
    for ratio in spec["ratios"]:
        set_dit_keep_ratio(dit, pixel_values, ratio)
        models[f"dynamic:-:{ratio}"] = (dit, route("dynamic", dit_gate_state(dit)), {})
    if spec.get("budgets"):  # the exact-budget mode: the same work in every image, no host syncs
        set_dit_keep_ratio(dit, pixel_values, 0.5)  # gates with a random direction: scattered top tokens
        gates = dit_gate_state(dit)
    for budget in spec.get("budgets", []):
        models[f"budget:-:{budget}"] = (dit, route("dynamic", gates), {"compute_budget": budget})
    return models


def _proc_status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_memory(device):
    """GPU: reset the allocator's peak. CPU (Linux): reset the process's peak RSS (VmHWM) to its current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        return _proc_status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def group_setup(spec):
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    pixel_values = torch.randn(spec["batch_size"], 3, 224, 224, generator=torch.Generator().manual_seed(1234))
    models = (msvit_models if spec["family"] == "msvit" else dit_models)(spec, pixel_values)
    for model, _, _ in models.values():
        model.to(device=device, dtype=dtype)
    return device, pixel_values.to(device=device, dtype=dtype), models


def make_call(models, name, pixel_values, compile_model):
    """`call()`: sets the model up for row `name` (outside any timing) and returns a function that runs it once."""
    model, prepare, kwargs = models[name]
    forward = torch.compile(model, dynamic=True) if compile_model else model

    def run():
        with torch.inference_mode():
            return forward(pixel_values, **kwargs)

    def call():
        if prepare is not None:
            prepare()
        return run

    return call


def describe(output):
    """MACs per image and token statistics of one forward."""
    info = {"macs_per_image": None}
    if getattr(output, "macs", None) is not None:
        info["macs_per_image"] = output.macs.double().mean().item()
    if getattr(output, "fine_region_mask", None) is not None:
        info["fine_ratio"] = output.fine_region_mask.float().mean().item()
        info["num_tokens_min_max"] = [int(output.num_tokens.min()), int(output.num_tokens.max())]
    if getattr(output, "token_keep_ratio", None) is not None:
        info["token_keep_ratio"] = output.token_keep_ratio.float().mean().item()  # over the stages that ran
    return info


def time_group(spec) -> dict:
    """Worker: times every model of the group interleaved; `{name: {latency_s, ..., macs_per_image}}`."""
    device, pixel_values, models = group_setup(spec)
    calls = {name: make_call(models, name, pixel_values, spec["compile"]) for name in models}
    results = {name: describe(call()()) for name, call in calls.items()}
    for name, timing in interleaved_timing(calls, spec, device).items():
        results[name].update(timing)
    return results


def interleaved_timing(calls, spec, device=torch.device("cpu")) -> dict:
    """`{name: {latency_s, min_latency_s, repeats}}`: `calls[name]()` sets row `name` up and returns its run; the
    runs are timed round after round, each round in a rotated order, and summarized by their median."""
    for _ in range(spec["warmup"]):
        for call in calls.values():
            call()()
    times, names, started = {name: [] for name in calls}, list(calls), time.perf_counter()
    while (
        min(len(t) for t in times.values()) < spec["min_rounds"] or time.perf_counter() - started < spec["min_seconds"]
    ):
        shift = len(times[names[0]]) % len(names)
        for name in names[shift:] + names[:shift]:
            run = calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
        if len(times[names[0]]) >= spec["max_rounds"]:
            break
    return {
        name: {"latency_s": statistics.median(values), "min_latency_s": min(values), "repeats": len(values)}
        for name, values in times.items()
    }


def memory_of(spec) -> float:
    """Worker: peak memory growth (MB) of the model `spec["model_name"]` over a few calls, in a fresh process."""
    device, pixel_values, models = group_setup(spec)
    keep = spec["model_name"]
    models = {keep: models[keep]}  # frees the other models before measuring
    run = make_call(models, keep, pixel_values, spec["compile"])()
    run()
    before = reset_peak_memory(device)
    for _ in range(2):
        run()
    return peak_memory_mb(device) - before


# Memory processes: glibc hands every block of 64 KiB or more back to the system when it is freed, so that the RSS
# follows the live tensors and its peak is the forward's peak (by default freed memory stays in the process and a
# later call reuses it unseen).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_worker(kind: str, spec: dict):
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as handle:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if kind == "memory":
            env.update(MEMORY_ENV)
        cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec), "--worker-output", handle.name]
        subprocess.run(cmd, check=True, env=env)
        handle.seek(0)
        return json.load(handle)


def group_rows(spec, with_memory=True) -> list[dict]:
    """Times a group, measures each model's memory, and turns the results into rows with speedups and efficiencies."""
    print(
        json.dumps({k: spec[k] for k in ("family", "variant", "batch_size", "ratios", "token_batching")}), flush=True
    )
    timed = run_worker("time", spec)
    rows = []
    for name, result in timed.items():
        model, mode, ratio = (name.split(":") + ["-", "-"])[:3]
        row = {**spec, "model": model, "ratio": None if ratio == "-" else float(ratio), **result}
        row["token_batching"] = None if mode == "-" else mode
        row["images_per_s"] = spec["batch_size"] / result["latency_s"]
        if with_memory:  # the memory process builds only what this row needs
            only = {"ratios": [row["ratio"]] if row["ratio"] is not None else [], "token_batching": [mode]}
            if spec["family"] == "dit":  # DiT's budget rows: the keep ratios are for the dynamic rows only
                only = {"ratios": only["ratios"] if model == "dynamic" else [], "budgets": only["ratios"]}
                only["budgets"] = only["budgets"] if model == "budget" else []
            row["peak_memory_mb"] = run_worker("memory", {**spec, **only, "model_name": name})
        rows.append(row)
        print(f"    {name}: {row['images_per_s']:.2f} img/s, {result['latency_s'] * 1e3:.1f} ms", flush=True)
    add_ratios(rows)
    return rows


def onnx_group_rows(spec) -> list[dict]:
    """The onnxruntime rows of a (family, variant) group at each batch size (`onnx_bench.py`), with their ratios."""
    print(json.dumps({k: spec[k] for k in ("runtime", "family", "variant", "batch_sizes", "ratios")}), flush=True)
    timed = run_worker("onnx", spec)
    rows = []
    for batch_size, results in timed.items():
        group = []
        for name, result in results.items():
            model, _, ratio = (name.split(":") + ["-", "-"])[:3]
            row = {**spec, "batch_size": int(batch_size), "model": model, "token_batching": None, **result}
            row["ratio"] = None if ratio == "-" else float(ratio)
            row.pop("batch_sizes")
            if "latency_s" in row:
                row["images_per_s"] = row["batch_size"] / row["latency_s"]
                print(f"    {name}, batch {batch_size}: {row['images_per_s']:.2f} img/s", flush=True)
            group.append(row)
        add_ratios(group)
        rows += group
    return rows


def add_ratios(rows):
    """Speedup, ideal speedup and efficiency against the HF baseline and against our static route; memory ratio.
    Rows without a latency (a graph that failed to export) get none."""
    rows = [row for row in rows if "latency_s" in row]
    by_model = {row["model"]: row for row in rows if row["model"] in ("static", "ours_static")}
    if len(by_model) < 2:
        return
    # The HF baseline reports no MACs: its cost is our static route's (tested equal to the published counts).
    static_macs = by_model["ours_static"]["macs_per_image"]
    for row in rows:
        if row["model"] == "static":
            continue
        for reference, suffix in ((by_model["static"], ""), (by_model["ours_static"], "_vs_own_static")):
            if row is reference:
                continue
            row["measured_speedup" + suffix] = reference["latency_s"] / row["latency_s"]
            row["ideal_speedup" + suffix] = static_macs / row["macs_per_image"]
            row["efficiency" + suffix] = row["measured_speedup" + suffix] / row["ideal_speedup" + suffix]
        if "peak_memory_mb" in row and by_model["static"].get("peak_memory_mb"):
            row["memory_ratio"] = row["peak_memory_mb"] / max(by_model["static"]["peak_memory_mb"], 1.0)


def machine_description(device):
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        model_name = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line]
        info["cpu"] = model_name[0].split(":", 1)[1].strip() if model_name else None
    except OSError:
        info["cpu"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--families", nargs="+", default=["msvit", "dit", "onnx"], choices=["msvit", "dit", "onnx"],
        help="onnx: the exported graphs of both families in onnxruntime (onnx_bench.py)",
    )  # fmt: skip
    parser.add_argument("--onnx-msvit-budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--onnx-dit-budgets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--msvit-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--dit-variants", nargs="+", default=["b1", "b2"])
    parser.add_argument("--dit-ratios", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    parser.add_argument("--dit-budgets", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    parser.add_argument(
        "--msvit-batching", nargs="+", default=["pad", "per_image", "pack"],
        help="MSViT token_batching alternatives measured against the default (bucket) at batch 32, fine ratio 0.5",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model peak memory processes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="time each group at least this long")
    parser.add_argument("--output", default=None)
    return parser.parse_args()


def sections(args, base) -> list[dict]:
    """The tables of one run: dynamic models against their baselines (per compile setting), MSViT batching modes."""
    result = []
    for use_compile in [False, True] if args.compile else [False]:
        rows = []
        for batch_size in args.batch_sizes:
            common = dict(base, batch_size=batch_size, compile=use_compile)
            if "msvit" in args.families:
                spec = dict(common, family="msvit", variant="s16", ratios=args.msvit_ratios, token_batching=["bucket"])
                rows += group_rows(spec, not args.no_memory)
            for variant in args.dit_variants if "dit" in args.families else []:
                spec = dict(
                    common, family="dit", variant=variant, ratios=args.dit_ratios, budgets=args.dit_budgets,
                    token_batching=["-"],
                )  # fmt: skip
                rows += group_rows(spec, not args.no_memory)
        title = "Dynamic models against their static baselines" + (" (torch.compile)" if use_compile else "")
        result.append({"title": title, "rows": rows})
    if "onnx" in args.families:
        result.append(onnx_section(args, base))
    if "msvit" in args.families and args.msvit_batching and 32 in args.batch_sizes:
        modes = ["bucket", *args.msvit_batching]
        spec = dict(
            base, family="msvit", variant="s16", batch_size=32, compile=False, ratios=[0.5], token_batching=modes
        )
        title = "MSViT token batching alternatives, batch 32, fine ratio 0.5"
        result.append({"title": title, "rows": group_rows(spec, not args.no_memory)})
    return result


def onnx_section(args, base) -> dict:
    """Exported MSViT-S/16 and DiT-b1/b2 in onnxruntime against the exported HF ViT-S/16 and PVTv2 (CPU, fp32)."""
    common = dict(base, runtime="onnxruntime", batch_sizes=args.batch_sizes, compile=False)
    rows = onnx_group_rows(dict(common, family="msvit", variant="s16", ratios=args.onnx_msvit_budgets))
    for variant in args.dit_variants:
        rows += onnx_group_rows(dict(common, family="dit", variant=variant, ratios=args.onnx_dit_budgets))
    title = "onnxruntime: exported graphs against the exported HF baselines"
    note = (
        "Graphs written by `hf_msvit.export` (dynamic batch; budget and image size baked in) and the HF models "
        "exported the same way (`torch.onnx.export(..., dynamo=True)`), run in onnxruntime's CPU provider. "
        "MSViT's own static route is the budget 1.0 (every region fine); DiT's is PVTv2's route. *max diff* is "
        "onnxruntime's largest difference from PyTorch's logits."
    )
    return {"title": title, "note": note, "rows": rows}


def run_worker_kind(kind: str, spec: dict):
    if kind == "time":
        return time_group(spec)
    if kind == "onnx":
        from onnx_bench import time_onnx_group

        return time_onnx_group(spec)
    return memory_of(spec)


def main():
    args = parse_args()
    if args.worker:
        kind, spec = args.worker
        result = run_worker_kind(kind, json.loads(spec))
        Path(args.worker_output).write_text(json.dumps(result))
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here.")
    if device.type == "cuda" and "onnx" in args.families:
        print("the onnx rows measure onnxruntime's CPU provider: left out of a --device cuda run", flush=True)
        args.families = [family for family in args.families if family != "onnx"]
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    timing = {"warmup": 1, "min_rounds": 3, "max_rounds": 3, "min_seconds": 0.0}
    if not args.quick:
        timing = {"warmup": 2, "min_rounds": 7, "max_rounds": 60, "min_seconds": args.min_seconds}
    base = dict(device=args.device, dtype=dtype, threads=args.threads, **timing)
    payload = {"machine": machine_description(device), "quick": args.quick, "sections": sections(args, base)}
    write_results(Path(args.output) if args.output else RESULTS / f"speed_{device.type}.json", payload)


def write_results(output: Path, payload: dict) -> None:
    """Writes `payload` as JSON through a temporary file, so an interrupted run never leaves a half-written file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
