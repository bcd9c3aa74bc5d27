"""Renders the results tables of README.md and docs/*.md from the committed results files, in place.

    python benchmarks/readme_tables.py          # rewrite every marked block of README.md and docs/*.md
    python benchmarks/readme_tables.py --check  # exit 1 (and name the blocks) where a block differs from the files

A block is the text between `<!-- results: NAME -->` and `<!-- /results -->`; NAME is a key of `RENDERERS`.
Sources: benchmarks/study/results.json (study.py), benchmarks/segmentation_study/results.json
(segmentation_study.py), benchmarks/dit_study/results.json (dit_study.py) and benchmarks/results/*.json
(bench_speed.py). Rows are rendered from what the files hold (a row's `label` when it has one), so new row kinds
appear without a change here; a `<key>_min` / `<key>_max` pair is printed as `mean [min-max]`.

`unbacked_numbers` is the other half of the check (tests/test_readme_numbers.py): every number in a markdown table
of README.md and docs/*.md must appear, at its printed precision, among the numbers of the committed results files.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from make_results_table import ONNX_TARGETS, TARGETS, target_checks


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def load(relative: str) -> dict:
    return json.loads((HERE / relative).read_text())


def number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def span(row: dict, key: str, digits: int = 3) -> str:
    """`mean [min-max]` where the row has the spread of `key` over more than one seed, else the value."""
    low, high = row.get(key + "_min"), row.get(key + "_max")
    if low is None or high is None or row.get("seeds", 2) < 2:
        return number(row.get(key), digits)
    return f"{row[key]:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


# ---------------------------------------------------------------- the accuracy-compute study (study.py)

STATIC_NAMES = {"vit16": "ViT/16", "vit32": "ViT/32", "pvt_b0": "PVTv2-b0"}
STATIC_REFERENCE = {"vit16": "vit16", "vit32": "vit16", "pvt_b0": "pvt_b0"}  # compute vs which static backbone
FAMILY_OF_STATIC = {"vit16": "msvit", "vit32": "msvit", "pvt_b0": "dit"}  # shown above that family's rows
DYNAMIC_NAMES = {"msvit": ("MSViT target {target}", "fine"), "dit": ("DiT-b0 budget {target}", "keep")}
TARGET_NAMES = {"msvit": "fine {target}", "dit": "compute {target}"}


def learning_rate(text: str) -> str:
    mantissa, exponent = f"{float(text):.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def static_row(label: str, result: dict, fraction: float) -> list[str]:
    """Accuracy ± its standard error over images; a row over seeds: mean [min-max] and how many seeds."""
    accuracy = f"{result['accuracy']:.3f} ± {result['accuracy_se']:.3f}"
    if result.get("seeds", 1) > 1:
        label, accuracy = f"{label} ({result['seeds']} seeds)", span(result, "accuracy")
    return [label, accuracy, f"{result['gmacs']:.4f}", f"{fraction:.2f}", "-", "-", "-", "-"]


def study_static_rows(payload: dict) -> dict[str, list[list[str]]]:
    """Static baselines grouped by the dynamic family they are shown with: the best of each lr sweep, the
    all-coarse ViT/32, and any `baselines` rows (`label`, `family`, accuracy, accuracy_se, gmacs, macs_fraction)."""
    static, best = payload["static"], payload["best"]
    groups: dict[str, list[list[str]]] = {}
    for kind, name in best.items():
        result, reference = static[name], static[best.get(STATIC_REFERENCE.get(kind, kind), name)]
        label = f"{STATIC_NAMES.get(kind, kind)} (static, lr {learning_rate(name.split('_lr')[1])})"
        groups.setdefault(FAMILY_OF_STATIC.get(kind, kind), []).append(
            static_row(label, result, result["gmacs"] / reference["gmacs"])
        )
    if "vit16_to_coarse" in payload:
        coarse, vit16 = payload["vit16_to_coarse"], static[best["vit16"]]
        groups["msvit"].append(
            static_row("ViT/16 -> all-coarse ViT/32, fine-tuned", coarse, coarse["gmacs"] / vit16["gmacs"])
        )
    for row in payload.get("baselines", []):
        groups.setdefault(row["family"], []).append(static_row(row["label"], row, row["macs_fraction"]))
    return groups


def study_dynamic_row(row: dict) -> list[str]:
    label_format, token_kind = DYNAMIC_NAMES.get(row["family"], (row["family"] + " {target}", ""))
    label = row.get("label") or label_format.format(target=row["target"])
    target = row.get("target_label") or TARGET_NAMES.get(row["family"], "{target}").format(target=row["target"])
    return [
        label, span(row, "accuracy"), number(row["gmacs"], 4), span(row, "macs_fraction"),
        f"{token_kind} {span(row, 'token_ratio')}".strip(), target,
        number(row.get("train_token_ratio"), 3), number(row.get("train_macs_fraction"), 3),
    ]  # fmt: skip


def split_line(payload: dict) -> str:
    split = payload.get("split", "validation")
    return f"Split: {split} ({payload['num_images']} images)" + (
        " — quick smoke run, not for quoting." if payload.get("quick") else "."
    )


def render_study(payload: dict | None = None) -> list[str]:
    payload = payload or load("study/results.json")
    header = ["model", "accuracy", "GMACs / image", "compute vs static (eval)", "token ratio (eval)", "target",
              "token ratio (train)", "compute (train)"]  # fmt: skip
    static = study_static_rows(payload)
    rows, families = [], list(dict.fromkeys([*static, *(row["family"] for row in payload["summary"])]))
    for family in families:
        rows += static.get(family, [])
        rows += [study_dynamic_row(row) for row in payload["summary"] if row["family"] == family]
    return [split_line(payload), "", *table(header, rows)]


def largest_step(points: list[tuple[float, float]]) -> str:
    """The largest fall of compute between two adjacent thresholds, e.g. `0.5 -> 0.6: 0.84 -> 0.36`."""
    steps = [(before[1] - after[1], before, after) for before, after in zip(points, points[1:])]
    if not steps:
        return "-"
    _, before, after = max(steps, key=lambda step: step[0])
    return f"{before[0]:g} -> {after[0]:g}: {before[1]:.2f} -> {after[1]:.2f}"


def sweep_table(rows: list[tuple[str, dict]], compute) -> list[str]:
    """One row per model: `accuracy / compute` at every threshold evaluated, and where compute falls most."""
    thresholds = sorted({float(t) for _, sweep in rows for t in sweep})
    header = ["model", *(f"{t:g}" for t in thresholds), "largest step of compute"]
    lines = []
    for label, sweep in rows:
        by_threshold = {float(t): point for t, point in sweep.items()}
        cells = [
            f"{by_threshold[t]['accuracy']:.3f} / {compute(by_threshold[t]):.2f}" if t in by_threshold else "-"
            for t in thresholds
        ]
        points = [(t, compute(by_threshold[t])) for t in thresholds if t in by_threshold]
        lines.append([label, *cells, largest_step(points)])
    return table(header, lines)


def render_study_thresholds(payload: dict | None = None) -> list[str]:
    payload = payload or load("study/results.json")
    static, best = payload["static"], payload["best"]
    reference = {"msvit": static[best["vit16"]]["gmacs"], "dit": static[best["pvt_b0"]]["gmacs"]}
    blocks = []
    for family in dict.fromkeys(row["family"] for row in payload["summary"]):
        rows = [(study_dynamic_row(row)[0], row["sweep"]) for row in payload["summary"] if row["family"] == family]
        blocks += [*sweep_table(rows, lambda point, f=family: point["gmacs"] / reference[f]), ""]
    return [split_line(payload) + " Accuracy / compute vs static, mean over seeds, at every `gate_threshold`:", "",
            *blocks[:-1]]  # fmt: skip


def render_msvit_seeds(payload: dict | None = None) -> list[str]:
    """Per seed: eval and train fine ratio, accuracy, and the fine ratio at every threshold evaluated."""
    payload = payload or load("study/results.json")
    pattern = re.compile(r"^msvit_(?:(?P<recipe>.+)_)?t(?P<target>[\d.]+)_s(?P<seed>\d+)$")
    runs = [(pattern.match(name), run) for name, run in payload["dynamic"].items()]
    runs = sorted(((m, run) for m, run in runs if m), key=lambda r: (r[0]["recipe"] or "", float(r[0]["target"]),
                                                                     int(r[0]["seed"])))  # fmt: skip
    thresholds = sorted({float(t) for _, run in runs for t in run["sweep"]})
    header = ["target", "seed", "eval fine ratio", "train fine ratio", "accuracy",
              *(f"fine at {t:g}" for t in thresholds)]  # fmt: skip
    rows = []
    for match, run in runs:
        sweep = {float(t): point for t, point in run["sweep"].items()}
        target = match["target"] + (f" ({match['recipe']})" if match["recipe"] else "")
        rows.append([
            target, match["seed"], f"{run['eval']['token_ratio']:.3f}", number(run.get("train_token_ratio"), 3),
            f"{run['eval']['accuracy']:.3f}",
            *(f"{sweep[t]['token_ratio']:.3f}" if t in sweep else "-" for t in thresholds),
        ])  # fmt: skip
    return [split_line(payload), "", *table(header, rows)]


def render_msvit_level(payload: dict | None = None) -> list[str]:
    """MSViT's level per row: the ratio in training and at inference with and without the calibration offset, the
    offset, and the fine ratio on distributions no model trained on (blank canvases, photograph tiles)."""
    payload = payload or load("study/results.json")
    header = ["model", "target", "train", "test", "test, uncalibrated", "logit offset", "accuracy, uncalibrated",
              "blank canvases", "photo tiles", "gate logits 1% / 99%"]  # fmt: skip
    rows = []
    for row in payload["summary"]:
        if "logit_offset" not in row:
            continue
        pairs = [
            f"{span(row, key)} / {span(row, key + '_uncalibrated')}"
            for key in ("blank_token_ratio", "photo_tiles_token_ratio")
        ]
        rows.append([row["label"], f"{row['target']:g}", span(row, "train_token_ratio"), span(row, "token_ratio"),
                     span(row, "token_ratio_uncalibrated"), span(row, "logit_offset", 2),
                     span(row, "accuracy_uncalibrated"), *pairs, logit_range(row)])  # fmt: skip
    caption = (split_line(payload) + " Fine ratio; the other distributions calibrated / uncalibrated; the gate's"
               " logits on test (the lowest seed's 1% quantile / the highest seed's 99%):")  # fmt: skip
    return [caption, "", *table(header, rows)]


def logit_range(row: dict) -> str:
    if "logit_q01_min" not in row:
        return "-"
    return f"{row['logit_q01_min']:.1f} / {row['logit_q99_max']:.1f}"


def render_msvit_training_step() -> list[str]:
    """MSViT-S's training step against ViT-S's per mode (bench_training.py), and the study's accuracy of the default
    joint phase against the cheaper one (selected tokens, gates frozen) at target 0.5."""
    from make_results_table import TRAINING_NAMES

    payload = load("results/training_msvit_cpu.json")
    rows = [row for row in payload["rows"] if row["variant"] == "vit_s"]
    header = ["MSViT-S training mode", "image px", "batch", "s / step", "step vs ViT-S"]
    cells = [[TRAINING_NAMES.get(row["model"], row["model"]), str(row["image_size"]), str(row["batch_size"]),
              f"{row['step_s']:.3f}", f"{row['step_ratio_vs_baseline']:.2f}"] for row in rows]  # fmt: skip
    study = load("study/results.json")
    chosen = [row for row in study["summary"] if row.get("label", "").startswith("MSViT target 0.5")]
    accuracy = [[row["label"], span(row, "accuracy"), span(row, "token_ratio")] for row in chosen]
    machine = payload["machine"]
    line = (
        f"{machine.get('cpu') or machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
        f"float32, {payload['threads']} threads" + (" — quick smoke run." if payload.get("quick") else ".")
    )
    return [line, "", *table(header, cells), "", split_line(study), "",
            *table(["MSViT (study)", "accuracy", "fine ratio"], accuracy)]  # fmt: skip


# ---------------------------------------------------------------- DiT recipes and knobs (dit_study.py)

RECIPE_NAMES = {
    "sparse": "sparse training, joint 180 steps",
    "sparse_warmup": "sparse training, joint 180 steps, warming up over a tenth of each phase",
    "sparse_long": "sparse training, joint 540 steps",
    "paper": "the paper's choices (Gumbel noise, sampled pricing, masked map), dense grid, joint 180 steps",
}


def recipe_label(row: dict) -> str:
    return row.get("label") or RECIPE_NAMES.get(row["recipe"], row["recipe"])


def dit_study_rows() -> tuple[dict, list[dict]]:
    payload = load("dit_study/results.json")
    order = list(RECIPE_NAMES)
    rank = {recipe: index for index, recipe in enumerate(order)}
    rows = sorted(payload["summary"], key=lambda row: (rank.get(row["recipe"], len(order)), -row["budget"]))
    return payload, rows


def render_dit_recipes() -> list[str]:
    payload, summary = dit_study_rows()
    pvt = payload["pvt_b0"]
    header = ["DiT-b0 recipe", "budget", "seeds", "accuracy", "vs PVTv2-b0", "eval compute", "train compute",
              "train min / run", "validation accuracy"]  # fmt: skip
    rows = [
        [recipe_label(row), f"{row['budget']:g}", str(row["seeds"]), span(row, "accuracy"),
         f"{row['accuracy'] - pvt['accuracy']:+.3f}", span(row, "macs_fraction"),
         number(row.get("train_macs_fraction"), 3), number(row.get("train_minutes"), 1),
         span(row, "validation_accuracy") if "validation_accuracy" in row else "-"]
        for row in summary
    ]  # fmt: skip
    caption = f"{split_line(payload)[:-1]}; PVTv2-b0 (static): {pvt['accuracy']:.3f} ± {pvt['accuracy_se']:.3f}"
    fair = payload.get("pvt_b0_fair", {})
    caption += (
        "".join(
            f"; + {row['steps']} steps (as long as `{recipe}`): {row['accuracy']:.3f} ± {row['accuracy_se']:.3f}"
            for recipe, row in fair.items()
        )
        + "."
    )
    return [caption, "", *table(header, rows)]


def render_dit_thresholds() -> list[str]:
    payload, summary = dit_study_rows()
    rows = [(f"{recipe_label(row)}, budget {row['budget']:g}", row["thresholds"]) for row in summary]
    return [
        split_line(payload) + " Accuracy / compute vs PVTv2-b0, mean over seeds, at every `gate_threshold`:",
        "",
        *sweep_table(rows, lambda point: point["macs_fraction"]),
    ]


# ---------------------------------------------------------------- semantic segmentation (segmentation_study.py)

SEGMENTATION_STATIC = {"msvit": "vit", "dit": "pvt", "msvit_static": "vit", "dit_static": "pvt"}
TOKEN_KIND = {"msvit": "fine", "dit": "keep", "msvit_static": "fine", "dit_static": "keep"}


def render_segmentation() -> list[str]:
    """Every row of the file: the static models, the dynamic ones and their forced-static variants."""
    payload = load("segmentation_study/results.json")
    rows = payload["rows"]
    static = {row["family"]: row for row in rows if row["family"] not in SEGMENTATION_STATIC}
    header = ["model", "mean IoU", "GMACs / image", "backbone compute vs static", "token ratio"]
    lines = []
    for row in rows:
        reference = static.get(SEGMENTATION_STATIC.get(row["family"], row["family"]))
        fraction = "-" if reference is None else f"{row['backbone_gmacs'] / reference['backbone_gmacs']:.2f}"
        kind = TOKEN_KIND.get(row["family"])
        tokens = f"{kind} {span(row, 'token_ratio', 2)}" if kind else "-"
        lines.append([row["name"], span(row, "mean_iou"), number(row["gmacs"], 4), fraction, tokens])
    seeds = payload.get("seeds", [payload["seed"]] if "seed" in payload else [])
    caption = f"Split: {payload.get('split', 'validation')} ({rows[0]['num_images']} images), seeds {seeds}."
    return [caption, "", *table(header, lines)]


# ---------------------------------------------------------------- speed (bench_speed.py -> benchmarks/results/)


def speed_rows(name: str, section: int = 0) -> tuple[dict, list[dict]]:
    payload = load(f"results/{name}.json")
    sections = payload.get("sections") or [{"rows": payload["rows"]}]
    return payload, sections[section]["rows"]


def find(rows: list[dict], **fields) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in fields.items())), None)


def target_cell(row: dict, targets: dict) -> str:
    notes = [
        f"{'<=' if upper else '>='} {bound}{'x' if field in ('measured_speedup', 'memory_ratio') else ''}: "
        f"{'met' if met else '**missed**'}"
        for field, _, bound, upper, met in target_checks(row, targets)
    ]
    return "; ".join(notes) or "-"


def msvit_setting(row: dict) -> str:
    if row["model"] == "ours_static" or row.get("ratio") == 1.0:
        return "every region fine"
    if row["model"] == "budget":
        return f"`fine_region_budget` {row['ratio']:g}"
    return f"fine {row['ratio']:.2f} (threshold, {row.get('token_batching') or 'bucket'})"


def render_speed_msvit() -> list[str]:
    """MSViT's PyTorch rows at fine ratio 0.5 and every region fine, against HF ViT-S/16."""
    payload, rows = speed_rows("speed_cpu_msvit")
    header = ["model vs baseline", "batch", "setting", "speedup", "ideal", "efficiency (vs own static)",
              "peak memory vs baseline", "target"]  # fmt: skip
    lines = []
    order = {"dynamic": 1, "budget": 2}
    rows = [row for row in rows if row["model"] in order and row.get("ratio") in (0.5, 1.0)]
    for row in sorted(rows, key=lambda row: (row["batch_size"], row["ratio"] != 1.0, order[row["model"]])):
        efficiency = number(row["efficiency"], 2)
        if row.get("efficiency_vs_own_static") is not None and row["ratio"] != 1.0:
            efficiency += f" ({row['efficiency_vs_own_static']:.2f})"
        lines.append([
            "MSViT-S/16 vs HF ViT-S/16", str(row["batch_size"]), msvit_setting(row),
            f"{row['measured_speedup']:.2f}x", f"{row['ideal_speedup']:.2f}x", efficiency,
            f"{row['memory_ratio']:.2f}x", target_cell(row, TARGETS),
        ])  # fmt: skip
    return [machine_line(payload), "", *table(header, lines)]


def machine_line(payload: dict) -> str:
    machine, row = payload["machine"], (payload.get("sections") or [payload])[-1]["rows"][0]
    return (
        f"{machine.get('cpu') or machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
        f"{row['dtype']}, {row['threads']} threads"
        + (" — quick smoke run, not for quoting." if payload["quick"] else ".")
    )


def vs_own_static(row: dict | None, bold_below: float | None = 0.9) -> str:
    """`speedup / ideal / efficiency` against the model's own static route; efficiency bold under its target."""
    if row is None:
        return "-"
    efficiency = f"{row['efficiency_vs_own_static']:.2f}"
    if bold_below is not None and row["efficiency_vs_own_static"] < bold_below:
        efficiency = f"**{efficiency}**"
    return f"{row['measured_speedup_vs_own_static']:.2f}x / {row['ideal_speedup_vs_own_static']:.2f}x / {efficiency}"


def dit_settings(rows: list[dict]) -> list[tuple[str, float]]:
    """The routed settings in the file, threshold mode (`dynamic`) first; keep ratio 1.0 is the static route."""
    settings = {(row["model"], row["ratio"]) for row in rows if row["model"] in ("dynamic", "budget")}
    settings.discard(("dynamic", 1.0))
    return sorted(settings, key=lambda setting: (setting[0] != "dynamic", -setting[1]))


def setting_name(model: str, ratio: float) -> str:
    return f"keep {ratio:g} (threshold)" if model == "dynamic" else f"`compute_budget` {ratio:g}"


def render_speed_dit() -> list[str]:
    """DiT's routing against its own static route, one row per variant and batch size, one column per setting."""
    payload, rows = speed_rows("speed_cpu")
    settings = dit_settings(rows)
    cases = list(dict.fromkeys((row["variant"], row["batch_size"]) for row in rows if row["family"] == "dit"))
    cases.sort(key=lambda case: (case[1], case[0]))
    header = ["DiT", "batch", *(f"{setting_name(*s)}: speedup / ideal / efficiency" for s in settings)]
    lines = [
        [variant, str(batch), *(vs_own_static(find(rows, family="dit", variant=variant, batch_size=batch, model=m,
                                                   ratio=r)) for m, r in settings)]
        for variant, batch in cases
    ]  # fmt: skip
    return [machine_line(payload) + " Target: efficiency 0.9 (bold: under it).", "", *table(header, lines),
            "", kernels_line(rows)]  # fmt: skip


def kernels_line(rows: list[dict]) -> str:
    static = [row for row in rows if row["family"] == "dit" and row["model"] == "ours_static"]
    by_batch = {}
    for row in static:
        by_batch.setdefault(row["batch_size"], []).append(row)
    parts = [
        " / ".join(f"{row['measured_speedup']:.2f}x" for row in group) + f" at batch {batch}"
        for batch, group in by_batch.items()
    ]
    variants = " / ".join(dict.fromkeys(row["variant"] for row in static))
    memory = [row["memory_ratio"] for row in static if row.get("memory_ratio") is not None]
    return (
        f"DiT's kernels against HF PVTv2 (a separate result): its static route is faster by {' and '.join(parts)} "
        f"({variants}), at {min(memory):.2f}-{max(memory):.2f}x the peak memory."
    )


def render_speed_dit_efficiency() -> list[str]:
    """docs/dit.md: efficiency against DiT's own static route, every routed setting in the file."""
    payload, rows = speed_rows("speed_cpu")
    cases = list(dict.fromkeys((row["variant"], row["batch_size"]) for row in rows if row["family"] == "dit"))
    cases.sort(key=lambda case: (case[1], case[0]))
    header = ["efficiency vs DiT's static route (target 0.9)", *(f"{v}, batch {b}" for v, b in cases)]
    lines = []
    for model, ratio in dit_settings(rows):
        found = [find(rows, family="dit", variant=v, batch_size=b, model=model, ratio=ratio) for v, b in cases]
        lines.append([setting_name(model, ratio), *(number(r and r["efficiency_vs_own_static"], 2) for r in found)])
    found = [find(rows, family="dit", variant=v, batch_size=b, model="ours_static") for v, b in cases]
    lines.append(["DiT's static route vs HF PVTv2: speedup (kernels)",
                  *("-" if r is None else f"{r['measured_speedup']:.2f}x" for r in found)])  # fmt: skip
    return [machine_line(payload), "", *table(header, lines)]


def render_onnx() -> list[str]:
    """docs/deploy.md: the exported graphs in onnxruntime, per batch size `speedup / ideal / efficiency`."""
    payload, rows = speed_rows("speed_cpu_onnx", section=-1)
    batches = sorted({row["batch_size"] for row in rows})
    header = ["exported graph vs exported baseline", *(f"batch {b}: speedup / ideal / efficiency" for b in batches),
              "target"]  # fmt: skip
    lines = []
    for family, variant, model, ratio in dict.fromkeys(
        (r["family"], r["variant"], r["model"], r.get("ratio")) for r in rows if r["model"] != "static"
    ):
        found = [find(rows, family=family, variant=variant, model=model, ratio=ratio, batch_size=b) for b in batches]
        lines.append([onnx_label(family, variant, model, ratio), *(onnx_cell(r) for r in found),
                      "; ".join(f"batch {r['batch_size']} {target_cell(r, ONNX_TARGETS)}" for r in found
                                if r and target_cell(r, ONNX_TARGETS) != "-") or "-"])  # fmt: skip
    return [machine_line(payload), "", *table(header, lines)]


def onnx_label(family: str, variant: str, model: str, ratio) -> str:
    name = "MSViT-S/16" if family == "msvit" else f"DiT-{variant}"
    baseline = "ViT-S/16" if family == "msvit" else f"PVTv2-{variant}"
    if model == "ours_static":
        return f"{name} {'every region fine' if family == 'msvit' else 'static route'} vs {baseline}"
    if family == "msvit":
        return f"{name} `fine_region_budget` {ratio:g} vs {baseline}"
    return f"{name} `compute_budget` {ratio:g} vs its static route"


def onnx_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["family"] == "dit" and row["model"] == "budget":
        return vs_own_static(row, bold_below=None)
    if row["model"] == "ours_static":
        return f"{row['measured_speedup']:.2f}x"
    return f"{row['measured_speedup']:.2f}x / {row['ideal_speedup']:.2f}x / {row['efficiency']:.2f}"


# ---------------------------------------------------------------- every number in a table has a source

NUMBER = re.compile(r"(?<![\w./])([-+]?)(\d+(?:\.\d+)?)(%|x)?(?![\w/])")
NOT_A_NUMBER = re.compile(r"`[^`]*`|\d+(?:\.\d+)?e[-+]?\d+|\[[^\]]*\]\([^)]*\)")  # code, 1e-3, links
# Columns whose numbers are settings, not measurements (a header that starts with one of these words).
SETTING_HEADERS = re.compile(r"^(target|budget|batch|seeds?|seed|learning rate|lr|setting|default|threshold|"
                             r"key|phase|mode|cli flag|choice)\b", re.IGNORECASE)  # fmt: skip
# Tables that describe settings (first header one of these words): no measured numbers in them.
SETTING_TABLES = re.compile(r"^(phase|mode|key|choice|file|folder|what|model type|option)\b", re.IGNORECASE)
NOT_MEASURED = "<!-- numbers: not measured"  # a comment on the line above a table: analytic or quoted numbers


def numbers_in(text: str) -> list[str]:
    """The numbers of a text as printed (sign, digits, `%`), code spans, links and `1e-3`-style settings aside."""
    text = NOT_A_NUMBER.sub(" ", text)
    return [sign + digits + (unit if unit == "%" else "") for sign, digits, unit in NUMBER.findall(text)]


def printed_forms(value: float) -> set[str]:
    forms = {f"{value:.{digits}f}" for digits in range(6)}
    return forms | {f"{-value:.{digits}f}" for digits in range(6)} | {f"+{value:.{digits}f}" for digits in range(6)}


def json_numbers(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for key, v in value.items() for n in json_numbers(key) + json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    try:
        return [float(value)]  # keys such as "0.35" (a threshold)
    except (TypeError, ValueError):
        return []


def source_numbers(root: Path = HERE) -> set[str]:
    """Every number of the committed results files (json and md under `benchmarks/`), in every printed form."""
    found: set[str] = set()
    for path in sorted(root.rglob("*.json")):
        for value in json_numbers(json.loads(path.read_text())):
            found |= printed_forms(value)
    for path in sorted(root.rglob("*.md")):
        for text in numbers_in(path.read_text()):
            found.add(text.lstrip("+").rstrip("%"))
            found |= printed_forms(float(text.rstrip("%")))
    return found


def backed(text: str, sources: set[str]) -> bool:
    if text.endswith("%"):
        digits = text[:-1].split(".")
        places = len(digits[1]) if len(digits) > 1 else 0
        return f"{float(text[:-1]) / 100:.{places + 2}f}" in sources
    return text in sources or text.lstrip("+") in sources


def markdown_tables(text: str):
    """(line number, header cells, rows of cells, exempt) for every table outside fenced code."""
    lines, fenced, index = text.splitlines(), False, 0
    while index < len(lines):
        line = lines[index]
        fenced ^= line.startswith("```")
        if fenced or not line.startswith("|") or index + 1 >= len(lines) or not lines[index + 1].startswith("|-"):
            index += 1
            continue
        start, rows = index, []
        index += 2
        while index < len(lines) and lines[index].startswith("|"):
            rows.append(cells(lines[index]))
            index += 1
        exempt = start > 0 and lines[start - 1].startswith(NOT_MEASURED)
        yield start + 1, cells(line), rows, exempt


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def unbacked_numbers(text: str, sources: set[str]) -> list[str]:
    """`line: number (column)` for every number in a measured column of a table that no results file holds.
    The first column (the row's name), the header, setting columns and tables marked not measured are skipped."""
    missing = []
    for line, header, rows, exempt in markdown_tables(text):
        if exempt or SETTING_TABLES.match(header[0]):
            continue
        measured = [not SETTING_HEADERS.match(NOT_A_NUMBER.sub("", name).strip()) for name in header]
        for offset, row in enumerate(rows):
            for column, cell in enumerate(row[1:], 1):
                if column < len(measured) and not measured[column]:
                    continue
                name = header[column] if column < len(header) else "?"
                missing += [f"{line + 2 + offset}: {n} ({name})" for n in numbers_in(cell) if not backed(n, sources)]
    return missing


RENDERERS = {
    "study": render_study,
    "msvit-level": render_msvit_level,
    "msvit-training-step": render_msvit_training_step,
    "study-thresholds": render_study_thresholds,
    "msvit-seeds": render_msvit_seeds,
    "dit-recipes": render_dit_recipes,
    "dit-thresholds": render_dit_thresholds,
    "segmentation": render_segmentation,
    "speed-msvit": render_speed_msvit,
    "speed-dit": render_speed_dit,
    "speed-dit-efficiency": render_speed_dit_efficiency,
    "onnx": render_onnx,
}


def render_blocks(text: str) -> str:
    """`text` with every marked block replaced by what its renderer gives from the committed files."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown results block {name!r}; known: {sorted(RENDERERS)}")
        return match.group(1) + "\n".join(RENDERERS[name]()) + "\n" + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report blocks that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        rendered = render_blocks(text)
        if rendered == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(rendered)
    verb = "differ from the results files" if args.check else "rewritten"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "every results block is up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
