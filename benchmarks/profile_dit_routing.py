"""Where DiT's inference time goes: the same model on its static route, with its row gates skipping tokens
(threshold mode) and in the exact-budget mode, profiled by operator (torch.profiler, CPU self time).

    python benchmarks/profile_dit_routing.py          # writes benchmarks/results/profile_dit_cpu.json
    python benchmarks/make_results_table.py           # renders it into benchmarks/RESULTS.md

The model and its routes are `bench_speed.py`'s (DiT upcycled from a random HF PVTv2, row gates set to a keep ratio
on PVTv2's route). Each forward is profiled several times, interleaved; the run with the least total time is kept.
Operators are grouped by what they do, so the table shows which parts shrink with the kept tokens and which do not.
"""

import argparse
import json
from pathlib import Path

import torch
from bench_speed import machine_description, write_results
from dit_bench import build_dit_pair, set_dit_keep_ratio
from torch.profiler import ProfilerActivity, profile


RESULTS = Path(__file__).parent / "results"
# operator name -> group; anything else is "other"
GROUPS = {
    "linear layers (GEMM)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::addmv_", "aten::addmv", "aten::matmul"),
    "convolutions (embeddings, spatial reduction, depth-wise)": ("aten::mkldnn_convolution", "aten::_convolution"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::bmm"),
    "GELU": ("aten::gelu",),
    "LayerNorm": ("aten::native_layer_norm",),
    "token gather / scatter": (
        "aten::index_select", "aten::index_copy_", "aten::index_copy", "aten::index", "aten::index_put_",
        "aten::topk", "aten::sort", "aten::argsort", "aten::nonzero", "aten::scatter_",
    ),
    "copies, fills, layout": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::_to_copy"),
}  # fmt: skip


def group_of(name: str) -> str:
    return next((group for group, names in GROUPS.items() if name in names), "other")


def profile_once(model, pixel_values, kwargs) -> dict[str, float]:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(pixel_values, **kwargs)
    totals = {}
    for event in prof.key_averages():
        group = group_of(event.key)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e3  # ms
    return totals


def profile_group(variant, batch_size, keep, repeats, threads) -> list[dict]:
    torch.set_num_threads(threads)
    _, dit = build_dit_pair(variant)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(1234))
    set_dit_keep_ratio(dit, pixel_values, keep)
    with torch.inference_mode():
        dit.config.routing_mode = "static"
        static_macs = dit(pixel_values).macs.mean().item()
        dit.config.routing_mode = "dynamic"
        budget = dit(pixel_values).macs.mean().item() / static_macs  # the threshold route's cost, as a budget
    routes = {"static route": ("static", {}), f"threshold, keep {keep}": ("dynamic", {}),
              f"compute_budget {budget:.3f}": ("dynamic", {"compute_budget": budget})}  # fmt: skip
    best = {}
    for _ in range(repeats):
        for name, (mode, kwargs) in routes.items():
            dit.config.routing_mode = mode
            profile_once(dit, pixel_values, kwargs)  # warm
            totals = profile_once(dit, pixel_values, kwargs)
            if name not in best or sum(totals.values()) < sum(best[name].values()):
                best[name] = totals
    rows = []
    for name, totals in best.items():
        row = {"variant": variant, "batch_size": batch_size, "route": name, "ms": totals}
        row["total_ms"] = sum(totals.values())
        rows.append(row)
    static_total = rows[0]["total_ms"]
    for row in rows:
        row["time_vs_static"] = row["total_ms"] / static_total
    rows[1]["mac_ratio"] = rows[2]["mac_ratio"] = budget
    rows[0]["mac_ratio"] = 1.0
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["b1"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(RESULTS / "profile_dit_cpu.json"))
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        for batch_size in args.batch_sizes:
            rows += profile_group(variant, batch_size, args.keep, args.repeats, args.threads)
            print(json.dumps(rows[-3:], indent=1), flush=True)
    payload = {"machine": machine_description(torch.device("cpu")), "threads": args.threads, "rows": rows}
    write_results(Path(args.output), payload)


if __name__ == "__main__":
    main()
