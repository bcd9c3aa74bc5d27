"""The accuracy-compute study, reproduced small: one command, fixed seeds, about 30 minutes on 2 CPU cores.

    python benchmarks/study.py                 # the whole study -> benchmarks/study/{results.md,results.json,*.png}
    python benchmarks/study.py --quick         # a smoke run (minutes; numbers meaningless)

Every model is trained by `examples/run_image_classification.py` (the same Trainer recipe and data as the README's
main job) on the built-in digits-on-canvas data:

- static baselines trained from scratch the same way: ViT with `fine` px patches (ViT/fine) and with `coarse` px
  patches (ViT/coarse), and PVTv2-b0;
- MSViT upcycled from the trained ViT/fine, gate trained (backbone frozen) then fine-tuned jointly, as in the paper,
  at three target fine ratios; the middle one is also evaluated with its gate threshold swept at inference;
- DiT-b0 upcycled from the trained PVTv2-b0 at two budget targets.

Each final model is then evaluated here on the validation split, image by image: accuracy (with its standard error),
GMACs per image and token ratio (mean and standard deviation over the images). The table, an accuracy-vs-GMACs plot and
gate pictures of a few validation images are written next to this file.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


HERE = Path(__file__).parent
ROOT = HERE.parent
OUT = HERE / "study"


def load_example_script():
    spec = importlib.util.spec_from_file_location("run_image_classification", ROOT / "examples" / "run_image_classification.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train(script, output_dir: Path, args: list[str], settings: dict) -> Path:
    """Runs the example script once (skipped when its output already exists: the study resumes)."""
    marker = output_dir / "study_done.json"
    if marker.exists():
        return output_dir
    argv = ["--output_dir", str(output_dir), "--seed", str(settings["seed"]),
            "--canvas_size", str(settings["canvas"]), "--digit_copies", str(settings["copies"]),
            "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "50",
            "--disable_tqdm", "true", *args]
    started = time.time()
    script.main(argv)
    marker.write_text(json.dumps({"argv": argv, "seconds": time.time() - started}))
    return output_dir


@torch.no_grad()
def evaluate(model, dataset, processor, batch_size=64, **forward_kwargs) -> dict:
    """Per-image evaluation: accuracy (and its standard error), GMACs and token ratio (mean, std)."""
    model.eval()
    correct, macs, ratios = [], [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixel_values = processor([image.convert("RGB") for image in rows["image"]], return_tensors="pt")["pixel_values"]
        out = model(pixel_values, **forward_kwargs)
        correct += (out.logits.argmax(-1) == torch.tensor(rows["label"])).tolist()
        if getattr(out, "macs", None) is not None:
            macs += out.macs.double().tolist()
        else:  # a static transformers model: its analytic cost is constant
            macs += [float("nan")] * len(rows["label"])
        if getattr(out, "fine_region_mask", None) is not None:
            ratios += out.fine_region_mask.flatten(1).float().mean(1).tolist()
        elif getattr(out, "token_keep_ratio", None) is not None:
            ratios += out.token_keep_ratio.tolist()  # DiT: fraction of tokens computed, over the stages that ran
    correct = np.array(correct, dtype=float)
    macs = np.array(macs) / 1e9
    result = {
        "accuracy": correct.mean(),
        "accuracy_se": correct.std(ddof=1) / math.sqrt(len(correct)),
        "gmacs": float(np.mean(macs)),
        "gmacs_std": float(np.std(macs)),
        "num_images": len(correct),
    }
    if ratios and not np.isnan(ratios).all():
        result["token_ratio"] = float(np.mean(ratios))
        result["token_ratio_std"] = float(np.std(ratios))
    return result


def static_vit_gmacs(model) -> float:
    """Analytic GMACs per image of a transformers ViT classifier, with MSViT's per-layer formula (one accounting)."""
    from hf_msvit.models.msvit.modeling_msvit import MSViTLayer

    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    embedding = patches * config.num_channels * config.patch_size**2 * config.hidden_size
    encoder = config.num_hidden_layers * MSViTLayer.macs(config, patches + 1)
    return (embedding + encoder + model.classifier.weight.numel()) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per phase")
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--canvas", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    out = Path(args.output)
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": args.seed, "canvas": args.canvas, "copies": 1 if args.quick else 2}
    fine, coarse = 16, 32
    vit = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--intermediate_size", "256"]
    if args.quick:
        static_steps = ["--backbone_max_steps", "4"]
        gate_steps = ["--gate_only_max_steps", "3", "--max_steps", "3"]
        eval_limit = ["--max_eval_samples", "64"]
    else:
        static_steps = ["--backbone_epochs", "10"]
        gate_steps = ["--gate_only_epochs", "3", "--num_train_epochs", "8"]
        eval_limit = []
    static_only = ["--backbone_only", "true"]
    script = load_example_script()

    # ---- static baselines ---------------------------------------------------------------------------------------
    vit_fine = train(script, runs / f"vit{fine}", [*vit, "--patch_size", str(fine), *static_steps, *static_only, *eval_limit], settings)
    vit_coarse = train(script, runs / f"vit{coarse}", [*vit, "--patch_size", str(coarse), *static_steps, *static_only, *eval_limit], settings)
    # PVTv2 from scratch does not learn at the ViTs' 2e-3 on this data (loss stays at ln 10); 3e-4 does.
    pvt = train(script, runs / "pvt_v2_b0", ["--model_type", "dit_routing", "--pvt_variant", "b0", *static_steps,
                                             "--backbone_learning_rate", "3e-4", *static_only, *eval_limit], settings)

    # ---- dynamic models upcycled from them ----------------------------------------------------------------------
    targets = [0.15, 0.3, 0.5]
    # The gate settings of the README's main job (a 64-wide gate; GBaS weight 5 with a tight hyperprior, gate lr 1e-2:
    # with the config defaults a short run's gate drifts to all-coarse). The gate reads the coarse token embeddings:
    # for a backbone this small a gate on raw 32x32 regions would cost ~7% of the ViT/16.
    gate = ["--gate_input", "embeddings", "--gate_hidden_size", "64", "--gbas_loss_weight", "5",
            "--gbas_hyperprior_std", "0.05", "--gate_learning_rate", "1e-2"]
    msvit_runs = {
        t: train(script, runs / f"msvit_target{t}", ["--model_name_or_path", str(vit_fine / "phase-backbone" / "final"),
                                                    "--coarse_patch_size", str(coarse), "--gbas_target_ratio", str(t),
                                                    *gate, *gate_steps, *eval_limit], settings)
        for t in targets
    }
    budgets = [0.8, 0.6]
    # DiT trains its whole routing grid densely (several times PVTv2's cost per step, backward included): one gate-only
    # epoch and a short joint phase keep the study near 30 minutes on 2 cores.
    dit_steps = gate_steps if args.quick else ["--gate_only_epochs", "1", "--max_steps", "30", "--learning_rate", "2e-4"]
    dit_runs = {
        b: train(script, runs / f"dit_b0_budget{b}", ["--model_name_or_path", str(pvt / "phase-backbone" / "final"),
                                                     "--budget_target", str(b), *dit_steps, *eval_limit], settings)
        for b in budgets
    }
    # training time of every run, also of runs done by an earlier (resumed) invocation
    train_seconds = sum(json.loads((path / "study_done.json").read_text())["seconds"] for path in
                        [vit_fine, vit_coarse, pvt, *msvit_runs.values(), *dit_runs.values()])

    # ---- evaluation, image by image -----------------------------------------------------------------------------
    evaluation_started = time.time()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_msvit  # noqa: F401
    from hf_msvit.data import load_digits_on_canvas

    validation = load_digits_on_canvas(canvas_size=args.canvas, copies=settings["copies"], seed=args.seed)["validation"]
    if args.quick:
        validation = validation.select(range(64))

    def load(path):
        return AutoModelForImageClassification.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)

    rows = []

    def add(name, family, path, **kwargs):
        model, processor = load(path)
        result = evaluate(model, validation, processor, **kwargs)
        if family in ("vit", "pvt"):
            result["gmacs"], result["gmacs_std"] = static_gmacs(model), 0.0
        rows.append({"name": name, "family": family, **result})
        print(json.dumps(rows[-1]), flush=True)
        return model, processor

    def static_gmacs(model):
        if model.config.model_type == "vit":
            return static_vit_gmacs(model)
        from hf_msvit import DiTConfig
        from hf_msvit.models.dit_routing.modeling_dit_routing import dit_route_macs

        fields = {k: getattr(model.config, k) for k in ("hidden_sizes", "depths", "num_attention_heads", "mlp_ratios",
                                                         "sr_ratios", "patch_sizes", "strides", "num_encoder_blocks")}
        config = DiTConfig(**fields, image_size=args.canvas)
        return (dit_route_macs(config, args.canvas, args.canvas, "static") + model.classifier.weight.numel()) / 1e9

    add(f"ViT/{fine} (static)", "vit", vit_fine / "phase-backbone" / "final")
    add(f"ViT/{coarse} (static)", "vit", vit_coarse / "phase-backbone" / "final")
    for target, path in msvit_runs.items():
        model, processor = add(f"MSViT target {target}", "msvit", path)
        if target == 0.3:
            for threshold in (0.1, 0.3, 0.7, 0.9):
                result = evaluate(model, validation, processor, gate_threshold=threshold)
                rows.append({"name": f"MSViT target 0.3, threshold {threshold}", "family": "msvit_sweep", **result})
                print(json.dumps(rows[-1]), flush=True)
            pictures(model, processor, validation, out, "msvit")
    add("PVTv2-b0 (static)", "pvt", pvt / "phase-backbone" / "final")
    for budget, path in dit_runs.items():
        model, processor = add(f"DiT-b0 budget {budget}", "dit", path)
        if budget == budgets[0]:
            pictures(model, processor, validation, out, "dit")

    payload = {"settings": settings, "quick": args.quick, "train_seconds": train_seconds,
               "total_seconds": train_seconds + (time.time() - evaluation_started), "rows": rows}
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    write_atomic(out / "results.md", render_table(payload))
    plot(rows, out / "accuracy_vs_gmacs.png")
    print((out / "results.md").read_text())


def pictures(model, processor, dataset, out, prefix, count=3):
    from hf_msvit.visualization import visualize

    for index in range(count):
        visualize(model, dataset[index]["image"], output_path=out / f"{prefix}_gates_{index}.png", image_processor=processor)


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def render_table(payload) -> str:
    lines = [
        "| model | accuracy | GMACs / image | token ratio |",
        "|---|---|---|---|",
    ]
    for row in payload["rows"]:
        ratio = f"{row['token_ratio']:.2f} ± {row['token_ratio_std']:.2f}" if "token_ratio" in row else "-"
        lines.append(
            f"| {row['name']} | {row['accuracy']:.3f} ± {row['accuracy_se']:.3f} | "
            f"{row['gmacs']:.4f} ± {row['gmacs_std']:.4f} | {ratio} |"
        )
    minutes = payload["total_seconds"] / 60
    head = (
        f"Validation images: {payload['rows'][0]['num_images']}; accuracy ± its standard error, GMACs and token ratio "
        f"(MSViT: fraction of coarse regions tokenized fine) as mean ± standard deviation over the images. "
        f"Whole study: {minutes:.0f} min{' (quick smoke run: not for quoting)' if payload['quick'] else ''}."
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"vit": ("s", "tab:blue"), "msvit": ("o", "tab:orange"), "msvit_sweep": (".", "tab:orange"),
              "pvt": ("s", "tab:green"), "dit": ("o", "tab:red")}
    for family, (marker, color) in styles.items():
        chosen = [r for r in rows if r["family"] == family]
        if not chosen:
            continue
        chosen.sort(key=lambda r: r["gmacs"])
        ax.errorbar([r["gmacs"] for r in chosen], [r["accuracy"] for r in chosen], yerr=[r["accuracy_se"] for r in chosen],
                    fmt=marker + ("--" if family == "msvit_sweep" else ""), color=color, label=family, capsize=2)
        for r in chosen:
            if family != "msvit_sweep":
                ax.annotate(r["name"].replace(" (static)", ""), (r["gmacs"], r["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    vits = sorted((r for r in rows if r["family"] == "vit"), key=lambda r: r["gmacs"])
    if len(vits) == 2:
        ax.plot([vits[0]["gmacs"], vits[1]["gmacs"]], [vits[0]["accuracy"], vits[1]["accuracy"]], ":", color="tab:blue",
                label="ViT/32 - ViT/16 line")
    ax.set_xlabel("GMACs per image (mean over the validation set)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
