"""Why upcycled MSViT seeds collapsed from a checkpoint: the gate-only phase at two gate learning rates.

    python benchmarks/msvit_probe.py     # -> benchmarks/msvit_probe/results.json (about 10 min on 2 cores)

MSViT upcycled from the study's best ViT/16 (`benchmarks/study/runs/vit16_lr0.00025`, run `study.py` first) at target
0.25, seed 0, with the example's defaults but no joint phase (`--num_train_epochs 0`): what the gate-only phase alone
leaves, at the former checkpoint default gate lr 1e-3 and at 1e-2 (the fresh-run default, now used for every
upcycling). Accuracy on validation (where the choice was made) and test, with the fine ratios.
"""

import json

from study import HERE, run_all, write_atomic


OUT = HERE / "msvit_probe"
VIT16 = HERE / "study" / "runs" / "vit16_lr0.00025" / "phase-backbone" / "final"
GATE_LEARNING_RATES = ["1e-3", "1e-2"]


def jobs() -> dict:
    base = ["--model_name_or_path", str(VIT16), "--gbas_target_ratio", "0.25", "--seed", "0"]
    base += ["--num_train_epochs", "0"]
    return {f"gate_only_lr{lr}": (OUT / "runs" / f"gate_only_lr{lr}", [*base, "--gate_learning_rate", lr])
            for lr in GATE_LEARNING_RATES}  # fmt: skip


def main():
    results = {}
    for name, path in run_all(jobs()).items():
        metrics = json.loads((path / "all_results.json").read_text())
        keys = ("eval_accuracy", "eval_fine_region_ratio", "test_accuracy", "test_fine_region_ratio",
                "train_fine_region_ratio")  # fmt: skip
        results[name] = {key: metrics[key] for key in keys}
    write_atomic(OUT / "results.json", json.dumps({"vit16": str(VIT16.relative_to(HERE)), "runs": results}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
