"""Segmentation study: static ViT and PVTv2 against MSViT and DiT at two compute targets each, on the built-in data.

    python benchmarks/segmentation_study.py           # the whole study -> benchmarks/segmentation_study/
    python benchmarks/segmentation_study.py --quick   # a smoke run (minutes; numbers meaningless)

Every model is trained by `examples/run_semantic_segmentation.py` on the built-in segmentation data (digits on crops of
photographs, 96x96, labels 0 = background and 1 + digit on the digit's strokes), in two chains that run side by side
as two processes with one thread each:

- MSViT: a static ViT/8 with Segmenter's linear decoder trained from scratch for 6 epochs (the MSViT with every
  region forced fine), then upcycled twice (new gate, target fine-region ratios 0.25 and 0.5), each gate trained for
  an epoch with the rest frozen, then everything fine-tuned jointly for 2 epochs;
- DiT: UperNet on a small PVTv2 (hidden sizes 32-128, one block per stage) trained from scratch for 10 epochs, then
  upcycled twice to UperNet on DiT (budget targets 0.8 and 0.6 of the PVTv2's cost), gates trained for half an epoch
  with the rest frozen, then everything fine-tuned jointly for an epoch.

The dynamic runs repeat with seeds 0, 1 and 2 (from the same static model). Each final model is then evaluated here on
the test split (validation mean IoU beside it), image by image: mean IoU, mean per-class accuracy,
GMACs per image (model and backbone alone) and token ratio. Since the dynamic models train a few epochs more than the
static ones, each is also evaluated with its gates forced to the static tokenization / route ("same training, static"
rows). The table, a mean-IoU-vs-GMACs plot and segmentation pictures go next to this file; a finished run is skipped
when the study is started again.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


HERE = Path(__file__).parent
ROOT = HERE.parent
OUT = HERE / "segmentation_study"
FAMILIES = ("msvit", "dit")
MSVIT_TARGETS = (0.25, 0.5)
DIT_BUDGETS = (0.8, 0.6)
# reported as mean [min-max] over the seeds
TRAINING_RATIOS = ("train_fine_ratio_gate_phase", "train_fine_ratio_joint_phase")
SPREAD_KEYS = ("mean_iou", "token_ratio", "validation_mean_iou", *TRAINING_RATIOS)
SEEDS = (0, 1, 2)  # of the dynamic runs (upcycled from the one static model of each chain, trained with seed 0)


@dataclass
class Run:
    """One trained model of the study: its folder, the example's arguments, and how to evaluate it."""

    name: str
    family: str  # vit, msvit, pvt, dit
    args: list[str]
    static_reference: str | None = None  # row name for the same model with its gates forced static
    eval_kwargs: dict = field(default_factory=dict)
    picture: bool = False  # draw segmentation pictures of this model
    seed: int = 0

    @property
    def folder(self) -> str:
        return self.name if self.family in ("vit", "pvt") else f"{self.name} s{self.seed}"


def load_example():
    """`examples/run_semantic_segmentation.py` as a module (loaded once)."""
    import importlib.util

    name = "run_semantic_segmentation"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


QUICK_STATIC = ["--backbone_max_steps", "4"]
QUICK_DYNAMIC = ["--gate_only_max_steps", "2", "--max_steps", "2"]
# In the joint phase the gates learn at the rest's learning rate (the gate-only phase's 1e-2 there scrambled DiT's
# routes: 0.55 mean IoU at budget 0.8, 3 seeds, against 0.62 for the same models on the static route).
JOINT_GATES = {"msvit": ["--joint_gate_learning_rate", "5e-4"], "dit": ["--joint_gate_learning_rate", "2e-4"]}
# MSViT's joint-phase backbone lr: at the example's 5e-4 the fine-tuned ViT lost its own accuracy (its "all fine"
# rows fell below the static ViT/8); at 1e-4 it keeps it at target 0.25, not yet at 0.5 (results.md, "all fine").
MSVIT_JOINT_LEARNING_RATE = 1e-4
# Batch 16: on this data twice the optimizer steps of batch 32 per epoch learned the digit classes in fewer epochs.
BATCH = ["--per_device_train_batch_size", "16"]


def msvit_runs(runs: Path, quick: bool) -> list[Run]:
    static = QUICK_STATIC if quick else ["--backbone_epochs", "6", "--backbone_learning_rate", "1e-3"]
    dynamic = QUICK_DYNAMIC if quick else ["--gate_only_epochs", "1", "--num_train_epochs", "2"]
    vit = Run("ViT/8 (static)", "vit", ["--model_type", "msvit", *BATCH, *static, "--backbone_only", "true"])
    vit.eval_kwargs = {"all_fine": True}
    chain = [vit]
    for seed in SEEDS[:1] if quick else SEEDS:
        for target in MSVIT_TARGETS:
            args = ["--model_name_or_path", str(runs / vit.name), "--reinit_gates", "true",
                    "--gbas_target_ratio", str(target), "--learning_rate", str(MSVIT_JOINT_LEARNING_RATE), *BATCH,
                    *dynamic, *JOINT_GATES["msvit"]]  # fmt: skip
            picture = target == MSVIT_TARGETS[0] and seed == 0
            chain.append(Run(f"MSViT target {target}", "msvit", args, f"MSViT target {target}, all fine",
                             picture=picture, seed=seed))  # fmt: skip
    return chain


def dit_runs(runs: Path, quick: bool) -> list[Run]:
    # UperNet on this small PVTv2 learns the digit classes later than the ViT does (after 6 epochs it still gave the
    # background the highest probability on most strokes), hence 10 epochs.
    static = QUICK_STATIC if quick else ["--backbone_epochs", "10", "--backbone_learning_rate", "2e-3"]
    dynamic = QUICK_DYNAMIC if quick else ["--gate_only_epochs", "0.5", "--num_train_epochs", "1"]
    pvt = Run("PVTv2 + UperNet (static)", "pvt", ["--model_type", "dit_routing", *BATCH, *static,
                                                 "--backbone_only", "true"])  # fmt: skip
    chain = [pvt]
    for seed in SEEDS[:1] if quick else SEEDS:
        for budget in DIT_BUDGETS:
            args = ["--model_name_or_path", str(runs / pvt.name), "--backbone_epochs", "0", "--budget_target",
                    str(budget), "--learning_rate", "2e-4", *BATCH, *dynamic, *JOINT_GATES["dit"]]  # fmt: skip
            picture = budget == DIT_BUDGETS[-1] and seed == 0
            chain.append(Run(f"DiT budget {budget} + UperNet", "dit", args, f"DiT budget {budget}, static route",
                             picture=picture, seed=seed))  # fmt: skip
    return chain


def train(run: Run, runs: Path, settings: dict) -> Path:
    """Runs the example once for `run` (skipped when it finished before: the study resumes)."""
    output_dir = runs / run.folder
    marker = output_dir / "study_done.json"
    if marker.exists():
        return output_dir
    argv = ["--output_dir", str(output_dir), "--seed", str(run.seed), "--canvas_size", "96",
            "--digit_copies", str(settings["copies"]), "--do_eval", "false", "--logging_steps", "50",
            "--save_strategy", "no", "--eval_strategy", "no",
            "--disable_tqdm", "true", *run.args]  # fmt: skip
    started = time.time()
    load_example().main(argv)
    marker.write_text(json.dumps({"argv": argv, "seconds": time.time() - started}))
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


def load_for_evaluation(path: Path, family: str):
    """`(model, image processor)`. A static PVTv2 UperNet is evaluated as UperNet on DiT with PVTv2's static route:
    the same logits (tested), plus the MACs."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from hf_msvit import DiTBackbone
    from hf_msvit.segmentation import DynamicUperNetForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(path)
    if family == "pvt":
        static = AutoModelForSemanticSegmentation.from_pretrained(path)
        backbone = DiTBackbone.from_pvt_v2_pretrained(static.backbone, out_features=static.backbone.out_features,
                                                      routing_mode="static")  # fmt: skip
        return DynamicUperNetForSemanticSegmentation.from_backbone(backbone, heads_from=static).eval(), processor
    if family == "dit":
        return DynamicUperNetForSemanticSegmentation.from_pretrained(path).eval(), processor
    return AutoModelForSemanticSegmentation.from_pretrained(path).eval(), processor


def forward(model, pixel_values, all_fine: bool = False):
    if all_fine:
        grid = model.config.coarse_grid
        return model(pixel_values, fine_region_mask=torch.ones(len(pixel_values), *grid, dtype=torch.bool))
    return model(pixel_values)


@torch.no_grad()
def evaluate(model, processor, dataset, num_labels: int, batch_size: int = 64, all_fine: bool = False) -> dict:
    """mIoU, accuracies, GMACs (model, backbone) and token ratio on `dataset`, image by image."""
    from hf_msvit.segmentation import confusion_matrix, segmentation_scores
    from hf_msvit.training import ComputeSpent

    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    stats, backbone = [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        images = [image.convert("RGB") for image in rows["image"]]
        batch = processor(images, segmentation_maps=[np.asarray(m) for m in rows["label"]], return_tensors="pt")
        outputs = forward(model, batch["pixel_values"], all_fine)
        confusion += confusion_matrix(outputs.logits.argmax(1), batch["labels"], num_labels, ignore_index=255)
        stats.append(ComputeSpent.from_outputs(outputs).per_image().double())
        backbone.append(outputs.get("backbone_macs", outputs["macs"]).double())
    scores = segmentation_scores(confusion.numpy())
    stats, backbone = torch.cat(stats).numpy(), torch.cat(backbone).numpy()
    digit_iou = float(np.nanmean([scores[f"iou_{index}"] for index in range(1, num_labels)]))
    return {
        "mean_iou": scores["mean_iou"], "digit_iou": digit_iou, "mean_accuracy": scores["mean_accuracy"],
        "overall_accuracy": scores["overall_accuracy"],
        "gmacs": float(stats[:, 0].mean() / 1e9), "gmacs_std": float(stats[:, 0].std() / 1e9),
        "backbone_gmacs": float(backbone.mean() / 1e9),
        "token_ratio": float(stats[:, 1].mean()), "token_ratio_std": float(stats[:, 1].std()),
        "num_images": len(dataset),
    }  # fmt: skip


def static_route(model):
    """The same trained DiT with PVTv2's staircase route (every token of stage i at column i, no other stage)."""
    import copy

    from hf_msvit import DiTBackbone
    from hf_msvit.segmentation import DynamicUperNetForSemanticSegmentation

    config = copy.deepcopy(model.backbone.config)
    config.routing_mode = "static"
    backbone = DiTBackbone(config)
    backbone.load_state_dict(model.backbone.state_dict())
    return DynamicUperNetForSemanticSegmentation.from_backbone(backbone, heads_from=model).eval()


# --------------------------------------------------------------------------------------------------------------------
# Pictures


def label_colors(num_labels: int) -> np.ndarray:
    import matplotlib

    colors = np.array([matplotlib.colormaps["tab10"](i)[:3] for i in range(num_labels - 1)])
    return np.concatenate([np.zeros((1, 3)), colors])  # background black


@torch.no_grad()
def pictures(model, processor, dataset, path: Path, title: str, count: int = 3):
    """Rows of (image, ground truth, prediction, gates) for the first `count` validation images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = label_colors(11)
    fig, axes = plt.subplots(count, 4, figsize=(10, 2.6 * count), squeeze=False)
    for row in range(count):
        item = dataset[row]
        label_map = np.asarray(item["label"])
        batch = processor(item["image"].convert("RGB"), segmentation_maps=label_map, return_tensors="pt")
        outputs = model(batch["pixel_values"])
        prediction = outputs.logits.argmax(1)[0].numpy()
        panels = [np.asarray(item["image"].convert("RGB")), colors[batch["labels"][0].numpy()], colors[prediction],
                  gate_panel(model, item["image"], batch["pixel_values"], outputs)]  # fmt: skip
        names = ["image", "ground truth", "prediction", "gates"]
        for ax, panel, name in zip(axes[row], panels, names):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(name if name != "gates" else gate_caption(outputs), fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def gate_panel(model, image, pixel_values, outputs) -> np.ndarray:
    """MSViT: the fine regions drawn on the image; DiT: its route through the grid (fraction of tokens per stage)."""
    from hf_msvit.visualization import draw_dit_routing, draw_msvit_gates

    if outputs.get("fine_region_mask") is not None:
        config = model.config
        shown = image.convert("RGB").resize((96 * 3, 96 * 3))
        probs = outputs.gate_probs[0] if outputs.get("gate_probs") is not None else None
        return np.asarray(draw_msvit_gates(shown, outputs.fine_region_mask[0], config.coarse_patch_size,
                                           config.patch_size, gate_probs=probs, scale=3))  # fmt: skip
    backbone_outputs = model.backbone(pixel_values)
    routing = draw_dit_routing(backbone_outputs.stage_keep_ratio[0].float(), backbone_outputs.downsampled[0].float())
    return np.asarray(routing)


def gate_caption(outputs) -> str:
    macs = float(outputs["macs"][0]) / 1e9
    if outputs.get("fine_region_mask") is not None:
        return f"fine regions {float(outputs.fine_region_mask.float().mean()):.2f}, {macs:.3f} GMACs"
    return f"token keep {float(outputs.token_keep_ratio[0]):.2f}, {macs:.3f} GMACs"


# --------------------------------------------------------------------------------------------------------------------
# One family (one process)


def run_family(family: str, out: Path, quick: bool, seed: int) -> None:
    torch.set_num_threads(1)
    runs = out / "runs"
    settings = {"seed": seed, "copies": 1 if quick else 2}
    chain = msvit_runs(runs, quick) if family == "msvit" else dit_runs(runs, quick)
    for run in chain:
        train(run, runs, settings)
    train_seconds = sum(json.loads((runs / run.folder / "study_done.json").read_text())["seconds"] for run in chain)
    started = time.time()
    splits = load_example().builtin_segmentation_data(96, settings["copies"])
    splits = {name: splits[name].select(range(32)) if quick else splits[name] for name in ("validation", "test")}
    rows = []
    for run in chain:
        rows += evaluate_run(run, runs, splits, out / f"{family}_segmentation.png")
    payload = {"family": family, "train_seconds": train_seconds, "eval_seconds": time.time() - started, "rows": rows}
    if family == "msvit":
        payload["digit_region_fraction"] = digit_region_fraction(splits["test"])
    write_atomic(out / f"rows_{family}.json", json.dumps(payload, indent=1))


def evaluate_run(run: Run, runs: Path, splits: dict, picture_path: Path) -> list[dict]:
    """Rows of one trained model on test (validation mean IoU beside it): as trained, and with its gates forced to
    the static tokenization / route when it has a `static_reference`."""
    from hf_msvit.data import SEGMENTATION_LABELS

    model, processor = load_for_evaluation(runs / run.folder, run.family)
    variants = [(run.name, run.family, model, run.eval_kwargs)]
    if run.static_reference:
        reference = static_route(model) if run.family == "dit" else model
        variants.append((run.static_reference, f"{run.family}_static", reference,
                         {"all_fine": True} if run.family == "msvit" else {}))  # fmt: skip
    rows = []
    for name, family, variant, kwargs in variants:
        result = evaluate(variant, processor, splits["test"], len(SEGMENTATION_LABELS), **kwargs)
        validation = evaluate(variant, processor, splits["validation"], len(SEGMENTATION_LABELS), **kwargs)
        rows.append({"name": name, "family": family, "seed": run.seed, **result,
                     "validation_mean_iou": validation["mean_iou"]})  # fmt: skip
        if family == "msvit":
            rows[-1].update(training_ratios(runs / run.folder))
        print(json.dumps(rows[-1]), flush=True)
    if run.picture:
        pictures(model, processor, splits["test"], picture_path, run.name)
    return rows


def training_ratios(folder: Path) -> dict:
    """MSViT's fine ratio of the training decisions, mean over each phase (the trainer's `train_fine_region_ratio`),
    to set beside the target: the gate-only phase's (inference's decisions) and the joint phase's (sampled)."""
    logged = json.loads((folder / "all_results.json").read_text())
    return {"train_fine_ratio_gate_phase": logged["gate_phase_train_fine_region_ratio"],
            "train_fine_ratio_joint_phase": logged["train_fine_region_ratio"]}  # fmt: skip


def digit_regions(labels: torch.Tensor, coarse_patch_size: int) -> torch.Tensor:
    """`(batch, H / c, W / c)` bool: the coarse regions of label maps `(batch, H, W)` holding a digit pixel."""
    digit = ((labels > 0) & (labels != 255)).float()
    return torch.nn.functional.max_pool2d(digit[:, None], coarse_patch_size)[:, 0] > 0


def digit_region_fraction(dataset, coarse_patch_size: int = 16) -> float:
    """Fraction of MSViT's coarse regions (16 px here) holding at least one digit pixel: how many regions a gate that
    found every digit would need fine."""
    labels = torch.tensor(np.stack([np.asarray(label) for label in dataset["label"]])).long()
    return float(digit_regions(labels, coarse_patch_size).float().mean())


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per model name: means over its seeds, `<key>_min` / `<key>_max` of mean IoU and token ratio."""
    merged = []
    for name in dict.fromkeys(row["name"] for row in rows):
        group = [row for row in rows if row["name"] == name]
        row = {"name": name, "family": group[0]["family"], "seeds": len(group), "num_images": group[0]["num_images"]}
        for key, value in group[0].items():
            if isinstance(value, float):
                values = [item[key] for item in group]
                row[key] = float(np.mean(values))
                if key in SPREAD_KEYS and len(group) > 1:
                    row[key + "_min"], row[key + "_max"] = float(min(values)), float(max(values))
        merged.append(row)
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Table and plot


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def spread(row: dict, key: str, digits: int = 3) -> str:
    if key + "_min" not in row:
        return f"{row[key]:.{digits}f}"
    return f"{row[key]:.{digits}f} [{row[key + '_min']:.{digits}f}-{row[key + '_max']:.{digits}f}]"


def render_table(payload: dict) -> str:
    lines = [
        "| model | mean IoU | digit IoU | mean accuracy | GMACs / image | backbone GMACs | token ratio "
        "| training ratio (gate / joint phase) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        ratio = "-" if math.isnan(row["token_ratio"]) else spread(row, "token_ratio", 2)
        training = "-"
        if "train_fine_ratio_gate_phase" in row:
            training = " / ".join(spread(row, key, 2) for key in TRAINING_RATIOS)
        lines.append(
            f"| {row['name']} | {spread(row, 'mean_iou')} | {row['digit_iou']:.3f} | {row['mean_accuracy']:.3f} | "
            f"{row['gmacs']:.4f} ± {row['gmacs_std']:.4f} | {row['backbone_gmacs']:.4f} | {ratio} | {training} |"
        )
    head = (
        f"Test images: {payload['rows'][0]['num_images']} (96x96); dynamic rows: mean [min-max] over seeds "
        f"{payload['seeds']}; the static models trained once (seed 0). Mean IoU over the 11 classes (background "
        "and 10 digits), digit IoU over the 10 digit classes, mean per-class accuracy; GMACs per image as mean ± "
        "standard deviation over the images (the bilinear upsampling of the logits not counted); token ratio: MSViT's "
        "fraction of regions tokenized fine, DiT's fraction of tokens computed; training ratio: MSViT's fine ratio of "
        "the training decisions, mean over each phase. Regions (16 px) with a digit pixel: "
        f"{payload['digit_region_fraction']:.3f} of the test split's. Training "
        f"{payload['train_seconds'] / 60:.0f} min of process time in two parallel one-thread chains; wall clock of "
        "this invocation (finished runs skipped) "
        f"{payload['wall_seconds'] / 60:.0f} min{' (quick smoke run: not for quoting)' if payload['quick'] else ''}."
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"vit": ("s", "tab:blue"), "msvit": ("o", "tab:orange"), "msvit_static": ("x", "tab:orange"),
              "pvt": ("s", "tab:green"), "dit": ("o", "tab:red"), "dit_static": ("x", "tab:red")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, (marker, color) in styles.items():
        chosen = sorted((r for r in rows if r["family"] == family), key=lambda r: r["gmacs"])
        if chosen:
            ax.plot([r["gmacs"] for r in chosen], [r["mean_iou"] for r in chosen], marker, color=color, label=family,
                    linestyle="-" if family in ("msvit", "dit") else "none")  # fmt: skip
            for r in chosen:
                ax.annotate(r["name"], (r["gmacs"], r["mean_iou"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    ax.set_xlabel("GMACs per image (mean over the test split)")
    ax.set_ylabel("test mean IoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per phase")
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, help="run one chain in this process (the default runs both)")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.family:
        return run_family(args.family, out, args.quick, args.seed)

    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--output", str(out), "--seed", str(args.seed), *(["--quick"] * args.quick)]
    processes = [subprocess.Popen([*command, "--family", family], env=env) for family in FAMILIES]
    if any(process.wait() != 0 for process in processes):
        raise SystemExit("a chain failed; rerun to resume")
    parts = [json.loads((out / f"rows_{family}.json").read_text()) for family in FAMILIES]
    payload = {
        "quick": args.quick,
        "wall_seconds": time.time() - started,
        "train_seconds": sum(part["train_seconds"] for part in parts),
        "split": "test",
        "seeds": list(SEEDS[:1] if args.quick else SEEDS),
        "digit_region_fraction": parts[FAMILIES.index("msvit")]["digit_region_fraction"],
        "rows": over_seeds([row for part in parts for row in part["rows"]]),
        "runs": [row for part in parts for row in part["rows"]],
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    write_atomic(out / "results.md", render_table(payload))
    plot(payload["rows"], out / "miou_vs_gmacs.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
