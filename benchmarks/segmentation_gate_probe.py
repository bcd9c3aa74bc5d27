"""How strongly GBaS should pull a segmentation gate: the gate-only phase at three GBaS weights, on validation.

    python benchmarks/segmentation_gate_probe.py   # -> segmentation_gate_probe/results.json (10 min, 2 cores)

MSViT upcycled from the segmentation study's static ViT/8 (`benchmarks/segmentation_study/runs/ViT/8 (static)`, run
`segmentation_study.py` first) with a new gate at fine-ratio targets 0.25 and 0.5, seeds 1 and 2, the study's settings
otherwise; only the gate-only phase is scored (its checkpoint `phase-gate/final`), on the validation split where the
example's default was chosen. Per run: gated mean IoU, the eval fine ratio, the training decisions' fine ratio, how
many of the regions holding digit pixels the gate tokenizes fine, and how well its probability ranks them (AUC: the
chance that a digit region scores above a background one). GBaS shapes every region's gate towards the same prior
whatever the region holds, at a pull per region that does not shrink with the number of regions, while a region's
share of the pixel loss does; the weight sets which of the two orders the gates.
"""

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import segmentation_study as study
import torch


OUT = study.HERE / "segmentation_gate_probe"
VIT8 = study.OUT / "runs" / "ViT" / "8 (static)"
GBAS_WEIGHTS = (1.0, 0.3, 0.1)
TARGETS = (0.25, 0.5)
SEEDS = (1, 2)


def probe_runs() -> list[study.Run]:
    runs = []
    for weight in GBAS_WEIGHTS:
        for target in TARGETS:
            args = ["--model_name_or_path", str(VIT8), "--reinit_gates", "true", "--gbas_target_ratio", str(target),
                    "--gbas_loss_weight", str(weight), "--learning_rate", str(study.MSVIT_JOINT_LEARNING_RATE),
                    *study.BATCH, "--gate_only_epochs", "1", "--max_steps", "1"]  # fmt: skip
            runs += [study.Run(f"gbas {weight} target {target}", "msvit", args, seed=seed) for seed in SEEDS]
    return runs


def train(run: study.Run) -> Path:
    torch.set_num_threads(1)
    return study.train(run, OUT / "runs", {"seed": run.seed, "copies": 2})


@torch.no_grad()
def gate_scores(model, processor, dataset) -> dict:
    """Fine ratio given a digit region, and the AUC of the gate probability for digit regions against the others."""
    probs, fine, digit = [], [], []
    for start in range(0, len(dataset), 64):
        rows = dataset[start : start + 64]
        images = [image.convert("RGB") for image in rows["image"]]
        batch = processor(images, segmentation_maps=[np.asarray(m) for m in rows["label"]], return_tensors="pt")
        outputs = model(batch["pixel_values"])
        digit.append(study.digit_regions(batch["labels"], model.config.coarse_patch_size).flatten())
        probs.append(outputs.gate_probs.flatten())
        fine.append(outputs.fine_region_mask.flatten())
    probs, fine, digit = torch.cat(probs), torch.cat(fine).float(), torch.cat(digit)
    above = (probs[digit][:, None] > probs[~digit][None, :]).float().mean()
    return {"fine_given_digit_region": float(fine[digit].mean()), "digit_region_auc": float(above)}


def score(run: study.Run, dataset) -> dict:
    folder = OUT / "runs" / run.folder
    model, processor = study.load_for_evaluation(folder / "phase-gate" / "final", "msvit")
    result = study.evaluate(model, processor, dataset, 11)
    logged = json.loads((folder / "all_results.json").read_text())
    return {"name": run.name, "seed": run.seed, "validation_mean_iou": result["mean_iou"],
            "eval_fine_ratio": result["token_ratio"],
            "train_fine_ratio": logged["gate_phase_train_fine_region_ratio"],
            **gate_scores(model, processor, dataset)}  # fmt: skip


def main():
    if not (VIT8 / "config.json").exists():
        raise SystemExit(f"{VIT8} is missing: run benchmarks/segmentation_study.py first.")
    runs = probe_runs()
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(train, runs))
    dataset = study.load_example().builtin_segmentation_data(96, 2)["validation"]
    rows = [score(run, dataset) for run in runs]
    payload = {"split": "validation", "seeds": list(SEEDS), "static": str(VIT8.relative_to(study.HERE)),
               "runs": rows, "rows": study.over_seeds([{**row, "family": "msvit", "num_images": len(dataset)}
                                                      for row in rows])}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    study.write_atomic(OUT / "results.json", json.dumps(payload, indent=1))
    for row in payload["rows"]:
        print({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})


if __name__ == "__main__":
    sys.exit(main())
