"""The accuracy-compute study on the built-in data: one command, fixed seeds, about an hour on 2 CPU cores.

    python benchmarks/study.py             # everything -> benchmarks/study/{results.md,results.json,*.png}
    python benchmarks/study.py --quick     # a smoke run (minutes; numbers meaningless)

Every model is trained by `examples/run_image_classification.py` (the Trainer recipe users run) on the built-in
digits-on-photo data (96 px canvases, 2,876 training / 718 validation images, split by source digit):

1. Static baselines from scratch with a learning-rate sweep each (the best by validation accuracy is kept and the sweep
   reported): ViT/16, ViT/32 (same width and depth) and PVTv2-b0.
2. The baseline the question needs: the best ViT/16 turned into the ViT/32 that computes exactly what MSViT computes
   with every region coarse (kernel upsampled, position embeddings area-averaged), fine-tuned as long as MSViT trains.
3. MSViT upcycled from the best ViT/16 at target fine ratios 0.25 and 0.5 (gate-only phase, then joint), 3 seeds each;
   every trained model is evaluated with `gate_threshold` swept (a curve per model).
4. DiT-b0 upcycled from the best PVTv2-b0 at budgets 0.6 and 0.8, 3 seeds each, its row-gate threshold swept.

Training runs go two at a time, one torch thread each (on 2 cores that is faster than one run on two threads). Every
run writes a marker when done, so an interrupted study resumes where it stopped.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


HERE = Path(__file__).parent
ROOT = HERE.parent
SCRIPT = ROOT / "examples" / "run_image_classification.py"
VIT = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--intermediate_size", "256"]
SWEEPS = {"vit16": [1e-3, 2e-3, 4e-3], "vit32": [1e-3, 2e-3, 4e-3], "pvt_b0": [1.5e-4, 3e-4, 6e-4]}
TARGETS, BUDGETS, SEEDS = [0.25, 0.5], [0.6, 0.8], [0, 1, 2]
MSVIT_THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
DIT_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7]
COMMON = ["--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true"]


def run(output_dir: Path, args: list[str]) -> Path:
    """One run of the example script in its own process (one thread); skipped when its marker exists."""
    marker = output_dir / "study_done.json"
    if not marker.exists():
        started = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        log = output_dir.parent / f"{output_dir.name}.log"  # not with_suffix: "lr0.001" has a dot
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            cmd = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *COMMON, *args]
            subprocess.run(cmd, check=True, env=env, stdout=handle, stderr=subprocess.STDOUT)
        marker.write_text(json.dumps({"args": args, "seconds": time.time() - started}))
    return output_dir


def run_all(jobs: dict[str, tuple[Path, list[str]]]) -> dict[str, Path]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, path, args) for name, (path, args) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def steps(quick: bool, full: list[str], short: list[str]) -> list[str]:
    return short if quick else full


def static_jobs(runs: Path, quick: bool) -> dict:
    vit_steps = steps(quick, ["--backbone_epochs", "15"], ["--backbone_max_steps", "4"])
    pvt_steps = steps(quick, ["--backbone_epochs", "10"], ["--backbone_max_steps", "4"])
    kinds = {
        "vit16": [*VIT, "--patch_size", "16", *vit_steps],
        "vit32": [*VIT, "--patch_size", "32", *vit_steps],
        "pvt_b0": ["--model_type", "dit_routing", "--pvt_variant", "b0", *pvt_steps],
    }
    return {
        f"{kind}_lr{lr}": (
            runs / f"{kind}_lr{lr}",
            [*args, "--backbone_only", "true", "--backbone_learning_rate", str(lr)],
        )
        for kind, args in kinds.items()
        for lr in SWEEPS[kind]
    }


def dynamic_jobs(runs: Path, best: dict, quick: bool) -> dict:
    vit16, pvt = best["vit16"] / "phase-backbone" / "final", best["pvt_b0"] / "phase-backbone" / "final"
    msvit_steps = steps(
        quick,
        ["--gate_only_epochs", "2", "--num_train_epochs", "6"],
        ["--gate_only_max_steps", "3", "--max_steps", "3"],
    )
    dit_steps = steps(
        quick,
        ["--gate_only_max_steps", "90", "--max_steps", "180", "--learning_rate", "5e-4"],
        ["--gate_only_max_steps", "3", "--max_steps", "3"],
    )
    jobs = {}
    for seed in SEEDS:
        for target in TARGETS:
            args = [
                "--model_name_or_path",
                str(vit16),
                "--coarse_patch_size",
                "32",
                "--gbas_target_ratio",
                str(target),
            ]
            jobs[f"msvit_t{target}_s{seed}"] = (
                runs / f"msvit_t{target}_s{seed}",
                [*args, *msvit_steps, "--gate_learning_rate", "1e-2", "--seed", str(seed)],
            )
        for budget in BUDGETS:
            args = ["--model_name_or_path", str(pvt), "--budget_target", str(budget), "--budget_loss_weight", "10"]
            jobs[f"dit_b{budget}_s{seed}"] = (
                runs / f"dit_b{budget}_s{seed}",
                [*args, *dit_steps, "--gate_learning_rate", "1e-3", "--seed", str(seed)],
            )
    return jobs


def coarse_vit_from_vit16(vit16_dir: Path, output_dir: Path, quick: bool) -> Path:
    """The ViT/32 that computes what MSViT computes with every region coarse, from a ViT/16 (exact: a coarse token is
    the 16 px embedding of the region averaged 2x2, i.e. a 32 px kernel made of the 16 px kernel's pixels repeated 2x2
    over 4; coarse positions are the 2x2 means of the fine ones), fine-tuned for the 8 epochs MSViT trains (2 + 6)."""
    marker = output_dir / "study_done.json"
    if marker.exists():
        return output_dir
    from transformers import AutoImageProcessor, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    from hf_msvit.data import load_digits_on_canvas
    from hf_msvit.training import ImageTransform, collate_fn

    started = time.time()
    torch.set_num_threads(2)
    fine = ViTForImageClassification.from_pretrained(vit16_dir)
    config = ViTConfig(**{**fine.config.to_dict(), "patch_size": 32})
    coarse = ViTForImageClassification(config)
    state = fine.state_dict()
    kernel = state["vit.embeddings.patch_embeddings.projection.weight"]
    state["vit.embeddings.patch_embeddings.projection.weight"] = (
        kernel.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4
    )
    positions = state["vit.embeddings.position_embeddings"]
    side = int(math.isqrt(positions.shape[1] - 1))
    grid = positions[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    state["vit.embeddings.position_embeddings"] = torch.cat([positions[:, :1], pooled], dim=1)
    coarse.load_state_dict(state)
    processor = AutoImageProcessor.from_pretrained(vit16_dir)
    data = load_digits_on_canvas(copies=1 if quick else 2)
    train = data["train"].with_transform(ImageTransform(processor))
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=8, max_steps=3 if quick else -1, learning_rate=5e-4,
        weight_decay=0.05, per_device_train_batch_size=32, save_strategy="no", report_to="none", use_cpu=True,
        remove_unused_columns=False, logging_steps=50, disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(model=coarse, args=args, train_dataset=train, data_collator=collate_fn).train()
    coarse.save_pretrained(output_dir / "final")
    processor.save_pretrained(output_dir / "final")
    marker.write_text(json.dumps({"seconds": time.time() - started}))
    return output_dir


class Validation:
    """The validation split, preprocessed once per image-processor setting."""

    def __init__(self, quick: bool):
        from hf_msvit.data import load_digits_on_canvas

        split = load_digits_on_canvas(copies=1 if quick else 2)["validation"]
        if quick:
            split = split.select(range(64))
        self.images = [image.convert("RGB") for image in split["image"]]
        self.labels = torch.tensor(split["label"])
        self._cache = {}

    def pixels(self, processor) -> torch.Tensor:
        key = processor.to_json_string()
        if key not in self._cache:
            self._cache[key] = processor(self.images, return_tensors="pt")["pixel_values"]
        return self._cache[key]


@torch.no_grad()
def evaluate(model, pixel_values, labels, static_gmacs: float, batch_size: int = 128, **forward_kwargs) -> dict:
    """Accuracy (and its standard error), GMACs per image and token ratio (mean, std over images). Per-image compute is
    read with `ComputeSpent`, the same reading Trainer's metrics use; static models cost `static_gmacs` each."""
    from hf_msvit.training import ComputeSpent

    model.eval()
    correct, gmacs, ratios = [], [], []
    for start in range(0, len(labels), batch_size):
        outputs = model(pixel_values[start : start + batch_size], **forward_kwargs)
        correct += (outputs.logits.argmax(-1) == labels[start : start + batch_size]).tolist()
        spent = ComputeSpent.from_outputs(outputs)
        if spent is not None:
            gmacs += (spent.macs.double() / 1e9).tolist()
            ratios += spent.token_ratio.tolist()
    correct = np.array(correct, dtype=float)
    gmacs = np.array(gmacs) if gmacs else np.full(len(correct), static_gmacs)
    result = {
        "accuracy": float(correct.mean()),
        "accuracy_se": float(correct.std(ddof=1) / math.sqrt(len(correct))),
        "gmacs": float(gmacs.mean()),
        "gmacs_std": float(gmacs.std()),
        "macs_fraction": float(gmacs.mean() / static_gmacs),
    }
    if ratios:
        result.update(token_ratio=float(np.mean(ratios)), token_ratio_std=float(np.std(ratios)))
    return result


def static_gmacs(path: Path) -> float:
    """Analytic GMACs per image of a trained static backbone, with the package's one formula per family."""
    from transformers import AutoConfig

    from hf_msvit import DiTForImageClassification
    from hf_msvit.models.msvit.modeling_msvit import vit_macs

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "vit":
        patches = (config.image_size // config.patch_size) ** 2
        return (vit_macs(config, patches) + config.hidden_size * config.num_labels) / 1e9
    return DiTForImageClassification.from_pvt_v2_pretrained(str(path)).static_macs() / 1e9


def load(path: Path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)


def train_ratios(run_dir: Path) -> dict:
    """Training-time compute of a run's last logging window (the script's all_results.json)."""
    results = json.loads((run_dir / "all_results.json").read_text())
    ratio = results.get("train_fine_region_ratio", results.get("train_token_keep_ratio"))
    return {"train_token_ratio": ratio, "train_macs_fraction": results.get("train_macs_fraction")}


def evaluate_static(runs: dict, validation: Validation) -> dict:
    """`{run name: metrics}` of the static sweeps' final models."""
    results = {}
    for name, run_dir in runs.items():
        path = run_dir / "phase-backbone" / "final"
        model, processor = load(path)
        results[name] = evaluate(model, validation.pixels(processor), validation.labels, static_gmacs(path))
        print(name, json.dumps(results[name]), flush=True)
    return results


def best_of_sweeps(static: dict, runs: dict) -> tuple[dict, dict]:
    """The best learning rate of each sweep (validation accuracy): `({kind: run dir}, {kind: run name})`."""
    best_dirs, best_names = {}, {}
    for kind in SWEEPS:
        name = max((n for n in static if n.startswith(kind + "_lr")), key=lambda n: static[n]["accuracy"])
        best_dirs[kind], best_names[kind] = runs[name], name
    return best_dirs, best_names


def evaluate_dynamic(runs: dict, validation: Validation) -> dict:
    """Every dynamic run at its default operating point and along its threshold sweep."""
    results = {}
    for name, run_dir in runs.items():
        model, processor = load(run_dir)
        pixels, static = validation.pixels(processor), model.static_macs() / 1e9
        thresholds = MSVIT_THRESHOLDS if name.startswith("msvit") else DIT_THRESHOLDS
        sweep = {t: evaluate(model, pixels, validation.labels, static, gate_threshold=t) for t in thresholds}
        results[name] = {"eval": sweep[0.5], "sweep": sweep, **train_ratios(run_dir)}
        print(name, json.dumps(results[name]["eval"]), flush=True)
    return results


def summarize(dynamic: dict) -> list[dict]:
    """Mean and spread over seeds per (family, target)."""
    rows = []
    for family, targets in (("msvit", TARGETS), ("dit", BUDGETS)):
        for target in targets:
            runs = [
                r for n, r in dynamic.items() if n.startswith(f"{family}_{'t' if family == 'msvit' else 'b'}{target}_")
            ]
            row = {"family": family, "target": target, "seeds": len(runs)}
            for key, source in (
                ("accuracy", "eval"),
                ("token_ratio", "eval"),
                ("macs_fraction", "eval"),
                ("gmacs", "eval"),
            ):
                values = [r[source][key] for r in runs]
                row[key], row[key + "_min"], row[key + "_max"] = float(np.mean(values)), min(values), max(values)
            for key in ("train_token_ratio", "train_macs_fraction"):
                values = [r[key] for r in runs if r.get(key) is not None]
                row[key] = float(np.mean(values)) if values else None
            sweeps = [r["sweep"] for r in runs]
            row["sweep"] = {
                t: {k: float(np.mean([s[t][k] for s in sweeps])) for k in ("accuracy", "gmacs", "token_ratio")}
                for t in sweeps[0]
            }
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per phase")
    parser.add_argument("--output", default=str(HERE / "study"))
    args = parser.parse_args()
    started = time.time()
    out = Path(args.output)
    runs_dir = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    global SEEDS
    if args.quick:
        SEEDS = [0]

    static_runs = run_all(static_jobs(runs_dir, args.quick))
    validation = Validation(args.quick)
    static = evaluate_static(static_runs, validation)
    best_dirs, best_names = best_of_sweeps(static, static_runs)
    coarse_dir = coarse_vit_from_vit16(
        best_dirs["vit16"] / "phase-backbone" / "final", runs_dir / "vit16_to_coarse", args.quick
    )
    model, processor = load(coarse_dir / "final")
    coarse = evaluate(model, validation.pixels(processor), validation.labels, static_gmacs(coarse_dir / "final"))
    dynamic_runs = run_all(dynamic_jobs(runs_dir, best_dirs, args.quick))
    dynamic = evaluate_dynamic(dynamic_runs, validation)
    train_seconds = sum(json.loads((p / "study_done.json").read_text())["seconds"] for p in
                        [*static_runs.values(), coarse_dir, *dynamic_runs.values()])  # fmt: skip

    payload = {
        "quick": args.quick,
        "static": static,
        "best": best_names,
        "vit16_to_coarse": coarse,
        "dynamic": dynamic,
        "summary": summarize(dynamic),
        "num_images": len(validation.labels),
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - started,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    write_atomic(out / "results.md", render_tables(payload))
    plot(payload, out / "accuracy_vs_gmacs.png")
    pictures(dynamic_runs, validation, out)
    print((out / "results.md").read_text())


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pictures(dynamic_runs: dict, validation: Validation, out: Path, count: int = 3):
    from hf_msvit.visualization import visualize

    for prefix, name in (("msvit", f"msvit_t0.25_s{SEEDS[0]}"), ("dit", f"dit_b0.8_s{SEEDS[0]}")):
        model, processor = load(dynamic_runs[name])
        for index in range(count):
            visualize(
                model,
                validation.images[index],
                output_path=out / f"{prefix}_gates_{index}.png",
                image_processor=processor,
            )


def _accuracy(result) -> str:
    return f"{result['accuracy']:.3f} ± {result['accuracy_se']:.3f}"


def _span(row, key, digits=3):
    return f"{row[key]:.{digits}f} [{row[key + '_min']:.{digits}f}-{row[key + '_max']:.{digits}f}]"


def render_tables(payload) -> str:
    static, best, n = payload["static"], payload["best"], payload["num_images"]
    names = {"vit16": "ViT/16", "vit32": "ViT/32", "pvt_b0": "PVTv2-b0"}
    lines = [
        f"Validation: {n} images of the built-in data. Accuracy ± its standard error over images; for the dynamic",
        "models mean [min-max] over 3 seeds (the same upcycled backbone, different gate/fine-tuning seeds).",
        "Compute is GMACs per image (analytic, as the models report them) and its fraction of the model's static",
        "backbone. Eval =",
        "deterministic inference (threshold 0.5); train = the sampled decisions of the last training steps.",
        f"Training time of all runs: {payload['train_seconds'] / 60:.0f} min of process time; wall clock of the whole",
        f"study: {payload['wall_seconds'] / 60:.0f} min"
        + (" (quick smoke run: not for quoting)." if payload["quick"] else "."),
        "",
        "**Learning-rate sweeps of the static baselines** (trained from scratch; the best is used below):",
        "",
        "| baseline | learning rate | accuracy | GMACs / image |",
        "|---|---|---|---|",
    ]
    for name, result in static.items():
        kind, lr = name.split("_lr")
        mark = " (best)" if best[kind] == name else ""
        lines.append(f"| {names[kind]} | {lr}{mark} | {_accuracy(result)} | {result['gmacs']:.4f} |")
    lines += ["", "**Accuracy and compute**", "",
              "| model | accuracy | GMACs / image | compute vs static | token ratio (eval) | target "
              "| token ratio (train) | compute (train) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    vit16 = static[best["vit16"]]
    for label, result in (("ViT/16 (static)", vit16), ("ViT/32 (static)", static[best["vit32"]]),
                          ("ViT/16 -> all-coarse ViT/32, fine-tuned", payload["vit16_to_coarse"])):  # fmt: skip
        fraction = result["gmacs"] / vit16["gmacs"]
        lines.append(f"| {label} | {_accuracy(result)} | {result['gmacs']:.4f} | {fraction:.2f} | - | - | - | - |")
    pvt = static[best["pvt_b0"]]
    for row in payload["summary"]:
        if row["family"] == "dit" and row["target"] == BUDGETS[0]:
            lines.append(f"| PVTv2-b0 (static) | {_accuracy(pvt)} | {pvt['gmacs']:.4f} | 1.00 | - | - | - | - |")
        if row["family"] == "msvit":
            label, target = f"MSViT target {row['target']}", f"fine {row['target']}"
        else:
            label, target = f"DiT-b0 budget {row['target']}", f"compute {row['target']}"
        train_ratio = "-" if row["train_token_ratio"] is None else f"{row['train_token_ratio']:.3f}"
        train_compute = "-" if row["train_macs_fraction"] is None else f"{row['train_macs_fraction']:.3f}"
        lines.append(
            f"| {label} | {_span(row, 'accuracy')} | {row['gmacs']:.4f} | {_span(row, 'macs_fraction')} | "
            f"{_span(row, 'token_ratio')} | {target} | {train_ratio} | {train_compute} |"
        )
    lines += [
        "",
        "**Inference threshold sweeps** (`gate_threshold`, one trained model per seed, mean over seeds):",
        "",
    ]
    for row in payload["summary"]:
        label = f"MSViT target {row['target']}" if row["family"] == "msvit" else f"DiT-b0 budget {row['target']}"
        thresholds = list(row["sweep"])
        lines += [f"| {label}: threshold | " + " | ".join(str(t) for t in thresholds) + " |",
                  "|---|" + "---|" * len(thresholds)]  # fmt: skip
        for key, digits in (("token_ratio", 3), ("gmacs", 4), ("accuracy", 3)):
            lines.append(f"| {key} | " + " | ".join(f"{row['sweep'][t][key]:.{digits}f}" for t in thresholds) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(payload, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    static, best = payload["static"], payload["best"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    vits = [("ViT/32", static[best["vit32"]]), ("ViT/16", static[best["vit16"]])]
    left.plot(
        [r["gmacs"] for _, r in vits],
        [r["accuracy"] for _, r in vits],
        "s:",
        color="tab:blue",
        label="static ViT (line between)",
    )
    coarse = payload["vit16_to_coarse"]
    left.plot(
        [coarse["gmacs"]], [coarse["accuracy"]], "D", color="tab:purple", label="ViT/16 -> all-coarse, fine-tuned"
    )
    pvt = static[best["pvt_b0"]]
    right.plot([pvt["gmacs"]], [pvt["accuracy"]], "s", color="tab:green", label="PVTv2-b0 (static)")
    colors = {0.25: "tab:orange", 0.5: "tab:red", 0.6: "tab:orange", 0.8: "tab:red"}
    for row in payload["summary"]:
        ax = left if row["family"] == "msvit" else right
        label = f"MSViT target {row['target']}" if row["family"] == "msvit" else f"DiT-b0 budget {row['target']}"
        sweep = sorted(row["sweep"].values(), key=lambda r: r["gmacs"])
        ax.plot([r["gmacs"] for r in sweep], [r["accuracy"] for r in sweep], ".--", color=colors[row["target"]],
                label=label + ": threshold sweep")  # fmt: skip
        err = [[row["accuracy"] - row["accuracy_min"]], [row["accuracy_max"] - row["accuracy"]]]
        ax.errorbar([row["gmacs"]], [row["accuracy"]], yerr=err, fmt="o", color=colors[row["target"]], capsize=3)
    for ax, title in ((left, "MSViT vs ViT"), (right, "DiT vs PVTv2")):
        ax.set_title(title)
        ax.set_xlabel("GMACs per image (mean over the validation set)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
