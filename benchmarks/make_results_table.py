"""Renders benchmarks/RESULTS.md from the JSON files that bench_speed.py writes (benchmarks/results/speed_*.json).

    python benchmarks/make_results_table.py

Targets checked (from the project's performance issue), against the HF baseline of the same weights, uncompiled:
- MSViT at fine ratio 0.5: efficiency (measured / ideal speedup) >= 0.93 at batch 1 and at batch 32;
- MSViT with a fine-region budget of 0.5 (every image the same length): efficiency >= 0.97 at batch 1 and 32;
- MSViT at fine ratio 1.0: at most 5% slower than the ViT it came from (measured speedup >= 0.95);
- DiT's routing, scored against DiT's own static route (same kernels), keep ratio 0.7 and 0.5: efficiency vs own
  static >= 0.9 at batch 1 and 32 (the routing issue);
- DiT's kernels: on its static route within 3% of HF PVTv2 (measured speedup >= 0.97); at batch 32 peak memory at most
  1.2x PVTv2's. The "efficiency" column of DiT's dynamic rows against HF PVTv2 mixes both results and has no target.
- DiT training: a step of DiT-b0/b1 (sparse training) at most 2x the step of PVTv2 of the same size
  (`training_*.json`, from bench_training.py).

onnxruntime rows (the exported graphs, issue 20), against the exported HF baseline of the same weights:
- MSViT with a fine-region budget of 0.5: efficiency >= 0.9 at batch 32 and >= 0.85 at batch 1;
- DiT in its compute-budget mode: efficiency against its own exported static route >= 0.85.
"""

import json
from pathlib import Path


HERE = Path(__file__).parent
# (family, model, ratio or None, batch size or None) -> [(field, bound), ...]; a row meets a bound when field >= bound,
# or, for fields ending in "_ratio", when field <= bound.
TARGETS = {
    ("msvit", "dynamic", 0.5, None): [("efficiency", 0.93)],
    ("msvit", "budget", 0.5, None): [("efficiency", 0.97)],
    ("msvit", "dynamic", 1.0, None): [("measured_speedup", 0.95)],
    ("dit", "dynamic", 0.7, None): [("efficiency_vs_own_static", 0.9)],
    ("dit", "dynamic", 0.5, None): [("efficiency_vs_own_static", 0.9)],
    ("dit", "dynamic", 0.7, 32): [("efficiency_vs_own_static", 0.9), ("memory_ratio", 1.2)],
    ("dit", "ours_static", None, None): [("measured_speedup", 0.97)],
    ("dit", "ours_static", None, 32): [("measured_speedup", 0.97), ("memory_ratio", 1.2)],
}
ONNX_TARGETS = {
    ("msvit", "budget", 0.5, 32): [("efficiency", 0.9)],
    ("msvit", "budget", 0.5, 1): [("efficiency", 0.85)],
    ("dit", "budget", 0.7, None): [("efficiency_vs_own_static", 0.85)],
    ("dit", "budget", 0.5, None): [("efficiency_vs_own_static", 0.85)],
}
COLUMNS = (
    "| model | baseline | batch | ratio | batching | compiled | tokens/keep | GMACs/img | img/s | latency ms | peak "
    "MB "
    "(x baseline) | speedup | ideal | efficiency | efficiency vs own static | target |"
)


def _batching(row):
    return row.get("token_batching") or row.get("overrides", {}).get("token_batching")  # older files: "overrides"


def target_note(row) -> str:
    batching = _batching(row)
    if row.get("compile") or batching not in (None, "bucket"):
        return ""
    if row.get("error"):
        return f"export failed: {row['error']}"
    targets = ONNX_TARGETS if row.get("runtime") == "onnxruntime" else TARGETS
    notes = [
        f"{'met' if met else 'MISSED'} ({field} {value:.2f} vs {'<=' if upper else '>='} {bound})"
        for field, value, bound, upper, met in target_checks(row, targets)
    ]
    return "; ".join(notes)


def target_checks(row: dict, targets: dict) -> list[tuple[str, float, float, bool, bool]]:
    """`(field, value, bound, is_upper_bound, met)` for every target of `row` it has a value for (a batch size's
    own target first, else the one for every batch size); `*_ratio` fields are upper bounds, the rest lower."""
    key = (row["family"], row["model"], row.get("ratio"))
    bounds = targets.get((*key, row["batch_size"])) or targets.get((*key, None)) or []
    checks = []
    for field, bound in bounds:
        value = row.get(field)
        if value is not None:
            upper = field.endswith("_ratio")
            checks.append((field, value, bound, upper, value <= bound if upper else value >= bound))
    return checks


def _number(row, field, digits=2):
    value = row.get(field)
    return "-" if value is None else f"{value:.{digits}f}"


def render_row(row, with_difference=False) -> str:
    family = row["family"]
    name = "MSViT-S/16" if family == "msvit" else f"DiT-{row['variant']}"
    baseline = "ViT-S/16" if family == "msvit" else f"PVTv2-{row['variant']}"
    ratio, batching = "-", _batching(row) or "-"
    if row["model"] == "static":
        name, batching = baseline + " (HF, static)", "-"
    elif row["model"] == "ours_static":
        name += " (static route)" if family == "dit" else " (every region fine)"
    else:
        ratio = f"{row['ratio']:.2f}"
        if row["model"] == "budget":
            name, batching = name + (" (fine-region budget)" if family == "msvit" else " (compute budget)"), "-"
    if "fine_ratio" in row:
        tokens = f"fine {row['fine_ratio']:.2f}, {row['num_tokens_min_max'][0]}-{row['num_tokens_min_max'][1]} tok"
    elif "token_keep_ratio" in row or "stage_keep_ratio" in row:  # older files: "stage_keep_ratio"
        tokens = f"keep {row.get('token_keep_ratio', row.get('stage_keep_ratio')):.2f} per stage run"
    else:
        tokens = "-"
    macs = row.get("macs_per_image")
    memory = _number(row, "peak_memory_mb", 0) + (f" ({row['memory_ratio']:.2f}x)" if "memory_ratio" in row else "")
    cells = [
        name, baseline, str(row["batch_size"]), ratio, batching, "yes" if row.get("compile") else "no", tokens,
        f"{macs / 1e9:.2f}" if macs else "-", _number(row, "images_per_s", 1), _scaled(row, "latency_s", 1e3), memory,
        _number(row, "measured_speedup"), _number(row, "ideal_speedup"), _number(row, "efficiency"),
        _number(row, "efficiency_vs_own_static"), target_note(row),
    ]  # fmt: skip
    if with_difference:
        difference = row.get("onnx_max_abs_diff")
        cells.append("-" if difference is None else f"{difference:.1e}")
    return "| " + " | ".join(cells) + " |"


def _scaled(row, field, factor, digits=1):
    value = row.get(field)
    return "-" if value is None else f"{value * factor:.{digits}f}"


def render_section(machine, section, quick) -> list[str]:
    rows = section["rows"]
    with_difference = any("onnx_max_abs_diff" in row for row in rows)
    columns = COLUMNS + (" max diff |" if with_difference else "")
    where = machine.get("gpu") or machine.get("cpu") or machine["processor"]
    lines = [f"### {section.get('title', 'Results')}: {where} ({machine['device']})", ""]
    if section.get("note"):
        lines += [section["note"], ""]
    lines += [
        f"torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}, "
        f"{machine['cpu_count']} CPU cores, {rows[0]['dtype']}, {rows[0]['threads']} threads"
        + (" — quick smoke run, not for quoting" if quick else ""),
        "",
        columns,
        "|" + "---|" * (columns.count("|") - 1),
        *[render_row(row, with_difference) for row in rows],
        "",
    ]
    return lines


def render(payload) -> list[str]:
    # Files written before sections existed hold one table in "rows".
    sections = payload.get("sections") or [
        {"title": payload.get("title"), "note": payload.get("note"), "rows": payload["rows"]}
    ]
    lines = []
    for section in sections:
        if section["rows"]:
            lines += render_section(payload["machine"], section, payload.get("quick"))
    return lines


TRAINING_COLUMNS = "| model | baseline | image px | batch | s / step | step vs baseline | target |"
TRAINING_NAMES = {
    "pvt_v2": "PVTv2 (HF)",
    "dit_static": "DiT, static route",
    "dit_dense_grid": "DiT, dynamic: dense grid",
    "dit_sparse_training": "DiT, dynamic: `sparse_training=True`",
    "vit": "ViT-S/16 (HF)",
    "msvit_masked_attention": "MSViT-S, fine 0.5: `masked_attention` (both tokenizations)",
    "msvit_straight_through": "MSViT-S, fine 0.5: `straight_through` (selected tokens)",
    "msvit_straight_through_frozen_gates": "MSViT-S, fine 0.5: `straight_through`, gates frozen",
}
TRAINING_TARGETS = {"dit_dense_grid": 2.0, "dit_sparse_training": 2.0, "msvit_straight_through_frozen_gates": 1.0}


def render_training(payload) -> list[str]:
    """The training-step table of `bench_training.py`: a step's ratio to the step of the static model it was upcycled
    from (targets: DiT <= 2x PVTv2; MSViT's joint phase <= 1x ViT)."""
    machine = payload["machine"]
    lines = [
        f"### Training step (forward, backward, AdamW): {machine.get('cpu') or machine['processor']} (cpu)",
        "",
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['cpu_count']} CPU cores, "
        f"float32, {payload['threads']} threads; upcycled from random weights, same weights per group"
        + (" — quick smoke run, not for quoting" if payload.get("quick") else ""),
        "",
        TRAINING_COLUMNS,
        "|" + "---|" * (TRAINING_COLUMNS.count("|") - 1),
    ]
    for row in payload["rows"]:
        ratio = row.get("step_ratio_vs_baseline", row.get("step_ratio_vs_pvt_v2"))
        target = TRAINING_TARGETS.get(row["model"])
        note = "" if target is None else f"{'met' if ratio <= target else 'MISSED'} (<= {target:g}x)"
        baseline = "ViT-S/16" if row["variant"] == "vit_s" else f"PVTv2-{row['variant']}"
        cells = [
            TRAINING_NAMES.get(row["model"], row["model"]), baseline, str(row["image_size"]),
            str(row["batch_size"]), f"{row['step_s']:.3f}", f"{ratio:.2f}", note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render_profile(payload) -> list[str]:
    """`profile_dit_routing.py`'s table: milliseconds per forward by operator group, for each route."""
    machine, rows = payload["machine"], payload["rows"]
    groups = sorted({group for row in rows for group in row["ms"]}, key=lambda g: -rows[0]["ms"].get(g, 0.0))
    columns = "| DiT | batch | route | " + " | ".join(groups) + " | total ms | time vs static | MACs vs static |"
    lines = [
        f"### Where DiT's inference time goes (torch.profiler, CPU self time): {machine.get('cpu')} (cpu)",
        "",
        f"torch {machine['torch']}, {machine['cpu_count']} CPU cores, float32, {payload['threads']} threads; "
        "milliseconds per forward by operator group (the least total of the interleaved repeats)",
        "",
        columns,
        "|" + "---|" * (columns.count("|") - 1),
    ]
    for row in rows:
        cells = [f"DiT-{row['variant']}", str(row["batch_size"]), row["route"]]
        cells += [f"{row['ms'].get(group, 0.0):.1f}" for group in groups]
        cells += [f"{row['total_ms']:.1f}", f"{row['time_vs_static']:.2f}", f"{row['mac_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def main():
    files = sorted((HERE / "results").glob("speed_*.json"))
    lines = [
        "# Benchmark results",
        "",
        (
            "Generated by `python benchmarks/make_results_table.py` from `benchmarks/results/*.json` (written by "
            "`python benchmarks/bench_speed.py`). Each dynamic model is compared with its static baseline of the same "
            "size "
            "and weights, in the same run, timed interleaved (median over rounds). *speedup* = baseline latency / "
            "model "
            "latency; *ideal* = baseline MACs / model MACs (analytic, per image); *efficiency* = speedup / ideal; "
            "*efficiency vs own static* uses our model on its static route (MSViT with every region fine, DiT on "
            "PVTv2's "
            "route) as the baseline instead. Peak memory is the growth of a fresh process's peak RSS during the calls "
            "on "
            "CPU, `max_memory_allocated` on GPU; in brackets its ratio to the HF baseline's."
        ),
        "",
    ]
    if not files:
        lines.append("No results yet: run `python benchmarks/bench_speed.py`.")
    for path in files:
        lines += render(json.loads(path.read_text()))
    for path in sorted((HERE / "results").glob("training_*.json")):
        lines += render_training(json.loads(path.read_text()))
    for path in sorted((HERE / "results").glob("profile_dit_*.json")):
        lines += render_profile(json.loads(path.read_text()))
    output = HERE / "RESULTS.md"
    tmp = output.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
