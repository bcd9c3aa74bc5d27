"""Wall-clock benchmark: dynamic models against their static baselines, same weights, same run, same machine.

MSViT-S/16 is upcycled from a random HF `ViTForImageClassification` (ViT-S/16, 224 px); its fine ratio is set by
choosing the gate threshold as a quantile of the gate probabilities of the batch, so the gate runs as in deployment
and images get different token counts. DiT-b1/b2 are upcycled from random HF `PvtV2ForImageClassification`; their
keep ratio is set through the row gates' thresholds (see `dit_rows`). Each measurement runs in a fresh subprocess
(so peak memory is that configuration's) with the models in eval mode under `torch.inference_mode()`.

    python benchmarks/bench_speed.py                      # full sweep, writes benchmarks/results/speed_<device>.json
    python benchmarks/bench_speed.py --quick              # a smoke run (small repeat counts)
    python benchmarks/make_results_table.py               # renders benchmarks/RESULTS.md from the JSON files

Reported per row: images/s, latency per batch (median), peak memory during the timed calls above what the process
held before them (peak RSS on CPU, reset through /proc/self/clear_refs; allocator peak on GPU),
measured speedup over the baseline, ideal speedup (MAC ratio, from the models' analytic `macs`), and
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


# --------------------------------------------------------------------------------------------------------- models


def build_msvit_pair(image_size=224, **msvit_overrides):
    from transformers import ViTConfig, ViTForImageClassification

    from hf_msvit import MSViTForImageClassification

    torch.manual_seed(0)
    vit_config = ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        image_size=image_size, patch_size=16, num_labels=1000, attn_implementation="sdpa",
    )
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


# ---------------------------------------------------------------------------------------------------- measurement


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


def time_call(fn, device, min_repeats, min_seconds, warmup):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return statistics.median(times), len(times)


def worker(spec: dict) -> dict:
    """Measures one (model, batch size, ratio) configuration; runs in its own process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    generator = torch.Generator().manual_seed(1234)
    pixel_values = torch.randn(spec["batch_size"], 3, 224, 224, generator=generator)

    if spec["family"] == "msvit":
        baseline, dynamic = build_msvit_pair(**spec.get("overrides", {}))
    else:
        from dit_bench import build_dit_pair

        baseline, dynamic = build_dit_pair(spec["variant"], **spec.get("overrides", {}))

    kwargs = {}
    if spec["family"] == "msvit" and spec["model"] == "dynamic":
        kwargs["gate_threshold"] = msvit_threshold_for_ratio(dynamic, pixel_values, spec["ratio"])
    if spec["family"] == "dit" and spec["model"] == "dynamic":
        from dit_bench import set_dit_keep_ratio

        set_dit_keep_ratio(dynamic, pixel_values, spec["ratio"])

    if spec["model"] == "ours_static":
        # our implementation on the static route: separates kernel differences from routing savings
        dynamic.config.routing_mode = "static"
    model = baseline if spec["model"] == "static" else dynamic
    del baseline, dynamic
    model = model.to(device=device, dtype=dtype)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    if spec.get("compile"):
        model = torch.compile(model, dynamic=True)

    with torch.inference_mode():
        out = model(pixel_values, **kwargs)
    macs = out.macs.double().mean().item() if getattr(out, "macs", None) is not None else None
    extra = {}
    if getattr(out, "fine_region_mask", None) is not None:
        extra["fine_ratio"] = out.fine_region_mask.float().mean().item()
        extra["num_tokens_min_max"] = [int(out.num_tokens.min()), int(out.num_tokens.max())]
    if getattr(out, "token_keep_ratio", None) is not None:
        extra["stage_keep_ratio"] = out.token_keep_ratio.float().mean().item()  # over the stages that ran

    memory_before = reset_peak_memory(device)

    def run():
        with torch.inference_mode():
            model(pixel_values, **kwargs)

    latency, repeats = time_call(run, device, spec["min_repeats"], spec["min_seconds"], spec["warmup"])
    memory = peak_memory_mb(device) - memory_before
    return {
        **spec,
        "latency_s": latency,
        "images_per_s": spec["batch_size"] / latency,
        "repeats": repeats,
        "macs_per_image": macs,
        "peak_memory_mb": memory,
        **extra,
    }


def run_worker(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as handle:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-output", handle.name]
        subprocess.run(cmd, check=True, env=env)
        handle.seek(0)
        return json.load(handle)


def static_macs(family, variant, overrides):
    if family == "msvit":
        _, msvit = build_msvit_pair(**overrides)
        return msvit.static_macs(fine=True)
    from dit_bench import static_dit_macs

    return static_dit_macs(variant, **overrides)


def machine_description(device):
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
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
    import transformers

    info["transformers"] = transformers.__version__
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--families", nargs="+", default=["msvit", "dit"], choices=["msvit", "dit"])
    parser.add_argument("--msvit-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--dit-variants", nargs="+", default=["b1", "b2"])
    parser.add_argument("--dit-ratios", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    parser.add_argument("--token-batching", nargs="+", default=["bucket"],
                        help="MSViT token_batching modes to measure (bucket, pad, per_image)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    if args.worker:
        result = worker(json.loads(args.worker))
        Path(args.worker_output).write_text(json.dumps(result))
        return

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    timing = (
        dict(warmup=1, min_repeats=3, min_seconds=0.0) if args.quick else dict(warmup=3, min_repeats=10, min_seconds=5.0)
    )
    base = dict(device=args.device, dtype=dtype, threads=args.threads, **timing)
    compile_options = [False, True] if args.compile else [False]
    rows = []

    def measure(spec):
        print(json.dumps({k: spec[k] for k in ("family", "model", "batch_size", "ratio") if k in spec}), flush=True)
        result = run_worker(spec)
        print(f"    {result['images_per_s']:.2f} img/s, {result['latency_s'] * 1e3:.1f} ms", flush=True)
        rows.append(result)
        return result

    for use_compile in compile_options:
        for batch_size in args.batch_sizes:
            if "msvit" in args.families:
                common = dict(base, family="msvit", variant="s16", batch_size=batch_size, compile=use_compile)
                static = measure(dict(common, model="static", ratio=1.0))
                static_cost = static_macs("msvit", "s16", {})
                for mode in args.token_batching:
                    for ratio in args.msvit_ratios:
                        row = measure(dict(common, model="dynamic", ratio=ratio, overrides={"token_batching": mode}))
                        row["baseline_latency_s"] = static["latency_s"]
                        row["baseline_macs_per_image"] = static_cost
            if "dit" in args.families:
                for variant in args.dit_variants:
                    common = dict(base, family="dit", variant=variant, batch_size=batch_size, compile=use_compile)
                    static = measure(dict(common, model="static", ratio=1.0))
                    static_cost = static_macs("dit", variant, {})
                    ours = measure(dict(common, model="ours_static", ratio=1.0))
                    ours["baseline_latency_s"] = static["latency_s"]
                    ours["baseline_macs_per_image"] = static_cost
                    for ratio in args.dit_ratios:
                        row = measure(dict(common, model="dynamic", ratio=ratio))
                        row["baseline_latency_s"] = static["latency_s"]
                        row["baseline_macs_per_image"] = static_cost

    for row in rows:
        if row["model"] != "static":
            row["measured_speedup"] = row["baseline_latency_s"] / row["latency_s"]
            row["ideal_speedup"] = row["baseline_macs_per_image"] / row["macs_per_image"]
            row["efficiency"] = row["measured_speedup"] / row["ideal_speedup"]

    output = Path(args.output) if args.output else RESULTS / f"speed_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_description(device), "quick": args.quick, "rows": rows}
    # Write to a temporary file first so an interrupted run never leaves a half-written result file.
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
