"""The accuracy-compute study on the built-in data: one command, fixed seeds, about six hours on 2 CPU cores.

    python benchmarks/study.py             # everything -> benchmarks/study/{results.md,results.json,*.png}
    python benchmarks/study.py --quick     # a smoke run (minutes; numbers meaningless)

Every model is trained by `examples/run_image_classification.py` (the Trainer recipe users run) on the built-in
digits-on-photo data (96 px canvases; train / validation / test split by source digit, 2,876 / 358 / 360 images).
Every choice (the learning rate of each sweep) is made on validation; every number reported is on test.

1. Static baselines from scratch with a learning-rate sweep each (best by validation accuracy): ViT/16, ViT/32 (same
   width and depth) and PVTv2-b0.
2. Fair baselines (equal training): the best ViT/16 and ViT/32 fine-tuned for as many epochs as MSViT trains after
   upcycling, at the joint phase's learning rate (ViT/16 with each of MSViT's seeds); PVTv2-b0 for as many steps as
   DiT's phases; and the ViT/16 turned into the ViT/32 that computes what MSViT computes with every region coarse,
   fine-tuned as long.
3. MSViT upcycled from the best ViT/16 with the example's defaults and nothing but the target
   (`--model_name_or_path <vit16> --gbas_target_ratio t`, the path users take) at targets 0.25, 0.5 and 0.75, 3 seeds
   each; the README's main job (a fresh ViT/16, then MSViT) with 3 seeds, and the sweep that chose its phase 0
   (size, learning rate and length, 3 seeds each, on validation); and recipes beside the defaults: the
   paper's (GBaS on the sampled decisions, learned prior temperatures with the notebook's L1, no calibration, no
   level term) at 0.5, 3 seeds; the former defaults (noise-free decisions in the joint phase too, calibrated) at every
   target; sampled decisions in the gate-only phase too (one seed per target); the joint phase with the full Gumbel
   noise (3 seeds per target); and the cheaper joint phase (the selected tokens only, gates frozen, their level set to
   the target when frozen) at every target.
   An upcycled gate's GBaS weight is 0.3 by default; the former default, 1, has its own rows ("GBaS weight 1"), and
   the other recipes were measured at 1 (their labels say so). Its logit penalty is 0.01 by default; the rows measured
   before it say "no logit penalty" (the former default without it: its own rows). The gate-only and joint phases
   warm up over their first tenth by default; the rows measured before say "no warmup" (the former default: its own
   rows; it and the defaults also with 2 more seeds, on validation only: the choice between them). Also the joint
   phase at lr 2.5e-4. The main job (the study's ViT/16 from scratch for 15 epochs at 5e-4, every phase warming up,
   GBaS weight 0.3) has rows beside it with phase 0 at 2.5e-4, the joint phase at 2.5e-4, label smoothing, and on the
   former small ViT/16 (width 96, 3 layers):
   as it was, cut at the threshold, with the warmup in phase 0 only, without any, with GBaS weight 1, with the former
   8-epoch phase 0.
   Every model also evaluated with `gate_threshold` swept, with its level calibration switched off, and on two
   other distributions (blank canvases; scikit-learn's two photographs cut into 96 px tiles). Each seed spread is
   shown beside the spreads of the same models on resamples of the test split's digits.
4. DiT-b0 upcycled from PVTv2-b0 with the package's recipe at budgets 0.6 and 0.8 (3 seeds each), its row-gate
   threshold swept in steps of 0.05. The DiT runs are `dit_study.py`'s (same arguments, shared run folders), as is
   the paper's DiT recipe (3 seeds at 0.8).

Training runs go two at a time, one torch thread each (on 2 cores that is faster than one run on two threads). Every
run writes a marker when done, so an interrupted study resumes where it stopped.
"""

import argparse
import itertools
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
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from hf_msvit.data import load_digits_on_canvas
from hf_msvit.training import ImageTransform, collate_fn


HERE = Path(__file__).parent
ROOT = HERE.parent
SCRIPT = ROOT / "examples" / "run_image_classification.py"
VIT = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4", "--intermediate_size", "256"]
SWEEPS = {
    "vit16": [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
    "vit32": [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3],
    "pvt_b0": [3e-4, 6e-4, 1.2e-3],
}
TARGETS, BUDGETS, SEEDS = [0.25, 0.5, 0.75], [0.6, 0.8], [0, 1, 2]
# Every recipe but the defaults names the GBaS weight it was measured at: 1, the upcycling default until GBaS 0.3 (the
# "GBaS weight 1" rows) beat it on validation at every target.
FORMER_GBAS = ["--gbas_loss_weight", "1"]
MSVIT_RECIPES = {
    "": [],  # the example's defaults
    "gbas1_": FORMER_GBAS,
    "paper_": ["--config_overrides", "gbas_input=samples,gbas_learn_prior_temperature=true,gbas_prior_temperature=0.5,"
               "gbas_temperature_l1_weight=0.1,gate_level_calibration=false,gate_noise_scale=1,gate_level_loss_weight=0",
               *FORMER_GBAS],
}  # fmt: skip
# The former defaults: noise-free decisions in the joint phase too, calibrated (the level term was unbounded then).
MSVIT_RECIPES["noisefree_"] = [*FORMER_GBAS, "--config_overrides", "gate_level_calibration=true",
                               "--joint_gate_noise_scale", "0"]  # fmt: skip
# Sampled decisions in the gate-only phase too (one seed: at 0.5 that gate learned nothing, see docs/msvit.md).
MSVIT_RECIPES["sampled_"] = [*FORMER_GBAS, "--config_overrides", "gate_noise_scale=1"]
# The joint phase with the paper's full Gumbel noise (the default samples with half of it).
MSVIT_RECIPES["noise1_"] = [*FORMER_GBAS, "--joint_gate_noise_scale", "1"]


def without_logit_penalty(args: list[str]) -> list[str]:
    """`args` with the upcycled gate's logit penalty switched off (merged into a `--config_overrides` given)."""
    if "--config_overrides" not in args:
        return [*args, "--config_overrides", "gate_logit_loss_weight=0"]
    index = args.index("--config_overrides") + 1
    return [*args[:index], args[index] + ",gate_logit_loss_weight=0", *args[index + 1 :]]


# Every recipe beside the defaults was measured before the logit penalty (0.01 for upcycled gates) became the default:
# their rows say "no logit penalty"; "nologitpen_" is the former default itself.
PRE_LOGIT_PENALTY = [name for name in MSVIT_RECIPES if name] + ["nologitpen_"]
MSVIT_RECIPES = {name: without_logit_penalty(args) if name else args
                 for name, args in {**MSVIT_RECIPES, "nologitpen_": []}.items()}  # fmt: skip
# The cheaper joint phase: the selected tokens only, gates frozen (their level set to the target when frozen).
MSVIT_RECIPES["selected_"] = ["--joint_gate_training_mode", "straight_through", "--joint_gate_learning_rate", "0"]
# The joint phase at half the learning rate (ViT/16's best from scratch): the seeds spread less, lower on validation.
MSVIT_RECIPES["jlr2.5e-4_"] = ["--learning_rate", "0.00025"]
# Every recipe beside the defaults was measured without the warmup of the gate-only and joint phases (a tenth of each
# by default since "The upcycled recipe's choice"): their rows say "no warmup"; "nowarmup_" is the former default.
NO_PHASE_WARMUP = ["--warmup_steps", "0"]
PRE_WARMUP = [name for name in MSVIT_RECIPES if name]
MSVIT_RECIPES = {name: [*args, *NO_PHASE_WARMUP] if name else args
                 for name, args in {**MSVIT_RECIPES, "nowarmup_": []}.items()}  # fmt: skip
# Every recipe beside the defaults was measured with the joint phase's samples cut at the threshold, the default until
# the target cut (`LEVEL_CHOICE`): their rows say "cut at the threshold"; "thrlevel_" is the former default itself.
THRESHOLD_CUT = ["--joint_gate_sampling_level", "threshold"]
PRE_TARGET_CUT = [name for name in MSVIT_RECIPES if name]
MSVIT_RECIPES = {name: [*args, *THRESHOLD_CUT] if name else args
                 for name, args in {**MSVIT_RECIPES, "thrlevel_": []}.items()}  # fmt: skip
ONE_SEED = ("sampled_",)
MSVIT_RECIPE_TARGETS = dict.fromkeys(MSVIT_RECIPES, TARGETS) | {"paper_": [0.5]}
MSVIT_RECIPE_SEEDS = {("noisefree_", 0.75): [0], **{(recipe, t): [0] for recipe in ONE_SEED for t in TARGETS}}
MSVIT_PHASE_EPOCHS = 2 + 10  # the example's gate-only and joint epochs, for the fair baselines
DIT_STEPS = {"sparse": 90 + 180}  # gate-only and joint steps of dit_study.py's recipe
JOINT_LEARNING_RATE = 5e-4  # the example's default joint-phase learning rate
MSVIT_THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
DIT_THRESHOLDS = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
DIT_RUNS = HERE / "dit_study" / "runs"
COMMON = ["--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true"]


def run(output_dir: Path, args: list[str]) -> Path:
    """One run of the example script in its own process (one thread); skipped when its marker exists."""
    marker = output_dir / "study_done.json"
    if marker.exists() and same_paths(json.loads(marker.read_text()).get("args", args)) != same_paths(args):
        raise RuntimeError(f"{output_dir} was trained with other arguments than this study asks for: delete it.")
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


def same_paths(args: list[str]) -> list[tuple[str, str]]:
    """`args` as sorted `(flag, value)` pairs, every existing path made absolute: the same arguments in another order
    or spelling compare equal."""
    values = [str(Path(arg).resolve()) if "/" in arg and Path(arg).exists() else arg for arg in args]
    return sorted(zip(values[::2], values[1::2]))


NOT_RUN: list[str] = []
FINISHED_ONLY = False  # --finished-only: evaluate the runs that finished, list the others as not run


def run_all(jobs: dict[str, tuple[Path, list[str]]]) -> dict[str, Path]:
    if FINISHED_ONLY:
        NOT_RUN.extend(name for name, (path, _) in jobs.items() if not (path / "study_done.json").exists())
        jobs = {name: job for name, job in jobs.items() if name not in NOT_RUN}
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
    jobs = {
        f"{kind}_lr{lr}": (
            runs / f"{kind}_lr{lr}",
            [*args, "--backbone_only", "true", "--backbone_learning_rate", str(lr)],
        )
        for kind, args in kinds.items()
        for lr in SWEEPS[kind]
    }
    if not quick:  # PVTv2-b0 at 6e-4 is the backbone dit_study.py upcycles: one run folder for both studies
        jobs["pvt_b0_lr0.0006"] = (DIT_RUNS / "pvt_b0", jobs["pvt_b0_lr0.0006"][1])
    return jobs


def msvit_jobs(runs: Path, vit16: Path, quick: bool) -> dict:
    """MSViT from the ViT/16 checkpoint: the example's defaults and the paper's recipe, every target and seed."""
    length = ["--gate_only_max_steps", "3", "--max_steps", "3"] if quick else []
    jobs = {}
    for recipe, extra in MSVIT_RECIPES.items():
        for target in MSVIT_RECIPE_TARGETS[recipe]:
            for seed in [s for s in SEEDS if s in MSVIT_RECIPE_SEEDS.get((recipe, target), SEEDS)]:
                args = ["--model_name_or_path", str(vit16), "--gbas_target_ratio", str(target), "--seed", str(seed)]
                name = f"msvit_{recipe}t{target}_s{seed}"
                jobs[name] = (runs / name, [*args, *extra, *length])
    return jobs


# The main job beside its defaults. Its phase 0 had no warmup until the "no warmup" rows (the former main job) lost
# to it on validation; "warmup in phase 0 only" is the main job before the later phases warmed up too. GBaS weight 1
# was the fresh run's default until the 15-epoch phase 0, where 0.3 and 1 were compared again; 8 epochs the former
# phase 0. Every recipe but the first three ran without any warmup, all of them cut the samples at the threshold.
NO_WARMUP = ["--backbone_warmup_steps", "0"]
FRESH_RECIPES = {
    "fresh_thrlevel_": [],
    "fresh_phase0warmup_": NO_PHASE_WARMUP,
    "fresh_nowarmup_": [*NO_WARMUP, *NO_PHASE_WARMUP],
    "fresh_gbas1_": ["--gbas_loss_weight", "1", *NO_WARMUP, *NO_PHASE_WARMUP],
    "fresh_e8_gbas1_": ["--backbone_epochs", "8", "--gbas_loss_weight", "1", *NO_WARMUP, *NO_PHASE_WARMUP],
    "fresh_e8_gbas0.3_": ["--backbone_epochs", "8", "--gbas_loss_weight", "0.3", *NO_WARMUP, *NO_PHASE_WARMUP],
}
FRESH_RECIPES = {name: [*args, *THRESHOLD_CUT] for name, args in FRESH_RECIPES.items()}
PRE_TARGET_CUT_FRESH = tuple(FRESH_RECIPES)
# Every recipe above ran on the former main job's small ViT/16 (phase 0 at lr 1e-3): their rows say so, "fresh_vit96_"
# is the former main job itself. The main job now trains the study's ViT/16 (`VIT`), the better on validation.
SMALL_VIT = ["--hidden_size", "96", "--num_hidden_layers", "3", "--num_attention_heads", "3",
             "--intermediate_size", "192"]  # fmt: skip
FRESH_RECIPES = {name: [*args, *SMALL_VIT, "--backbone_learning_rate", "0.001"]
                 for name, args in {**FRESH_RECIPES, "fresh_vit96_": []}.items()}  # fmt: skip
SMALL_VIT_FRESH = tuple(FRESH_RECIPES)
# The study's ViT/16 in the main job, phase 0 at 2.5e-4 (that ViT's best without warmup): the first wider main job.
FRESH_RECIPES["fresh_lr2.5e-4_"] = ["--backbone_learning_rate", "0.00025"]
# The joint phase at half the learning rate, as "jlr2.5e-4_" from the checkpoint (a row, not a candidate default: from
# the checkpoint it scored lower on validation).
FRESH_RECIPES["fresh_jlr2.5e-4_"] = ["--learning_rate", "0.00025"]
# Label smoothing (DeiT's 0.1) in every phase, once the Trainer kept the gate loss with it (it had dropped it: the
# gates went all fine). Rule fixed before its runs finished: the default only if the main job's mean validation
# accuracy rises by more than a point (every other path would need re-measuring).
FRESH_RECIPES["fresh_ls_"] = ["--label_smoothing_factor", "0.1"]
# A random resized crop (scale 0.8-1, `--augment`) in every phase, against the seeds' spread of a from-scratch ViT.
# Rule fixed before its runs finished: the fresh default if the main job's mean validation accuracy is at most half a
# point under the default's and its seeds spread less on validation (max - min).
FRESH_RECIPES["fresh_aug_"] = ["--augment", "true"]
# Distillation from the ViT/16 phase 0 trained, in the joint phase (DynamicViT's KL weight 0.5, temperature 1), against
# the per-seed gap between an MSViT and its own backbone. Rule fixed before its runs finished: the fresh default if
# the main job's mean validation accuracy is at most half a point under the default's and its MSViTs disagree with
# their own backbones on fewer validation images (mean over seeds) than the default's do.
FRESH_RECIPES["fresh_kd0.5_"] = ["--joint_distillation_weight", "0.5"]


def main_job_jobs(runs: Path, quick: bool) -> dict:
    """The README's main job (a fresh ViT/16 trained, then upcycled, all at the example's defaults), per seed."""
    length = ["--backbone_max_steps", "3", "--gate_only_max_steps", "3", "--max_steps", "3"] if quick else []
    jobs = {f"main_s{seed}": (runs / f"main_s{seed}", ["--seed", str(seed), *length]) for seed in SEEDS}
    for prefix, extra in FRESH_RECIPES.items():
        for seed in SEEDS:
            jobs[f"{prefix}s{seed}"] = (runs / f"{prefix}s{seed}", ["--seed", str(seed), *extra, *length])
    return jobs


# The main job's phase 0 (its fresh ViT/16) as (size, learning rate, epochs, warmup fraction), 3 seeds each: the
# example's defaults are the best mean validation accuracy, a longer phase 0 only if it gains more than half a point
# (it costs every run of the main job minutes). Sizes as width x layers: the former small ViT, the study's.
VIT_SIZES = {"96x3": SMALL_VIT, "128x4": VIT}
MAIN_BACKBONE_RECIPES = [("96x3", 2.5e-4, 8, 0), ("96x3", 5e-4, 8, 0), ("96x3", 1e-3, 8, 0), ("96x3", 2e-3, 8, 0),
                         ("96x3", 1e-3, 15, 0), ("96x3", 1e-3, 25, 0), ("96x3", 1e-3, 15, 0.1),
                         *(("128x4", lr, 15, 0.1) for lr in (1.25e-4, 2.5e-4, 5e-4, 1e-3)),
                         ("128x4", 5e-4, 25, 0.1)]  # fmt: skip


def main_backbone_name(size: str, lr: float, epochs: int, warmup: float, seed: int) -> str:
    return (f"mainvit{'' if size == '96x3' else size}_lr{lr}" + (f"_e{epochs}" if epochs != 8 else "")
            + (f"_w{warmup}" if warmup else "") + f"_s{seed}")  # fmt: skip


def main_backbone_jobs(runs: Path, quick: bool) -> dict:
    """Phase 0 of the main job alone (`--backbone_only`) for each of `MAIN_BACKBONE_RECIPES`, per seed."""
    jobs = {}
    for size, lr, epochs, warmup in MAIN_BACKBONE_RECIPES:
        length = ["--backbone_max_steps", "3"] if quick else ["--backbone_epochs", str(epochs)]
        for seed in SEEDS:
            name = main_backbone_name(size, lr, epochs, warmup, seed)
            args = [*VIT_SIZES[size], "--backbone_only", "true", "--backbone_learning_rate", str(lr), "--seed",
                    str(seed), *length]  # fmt: skip
            jobs[name] = (runs / name, [*args, *(NO_WARMUP if not warmup else [])])
    return jobs


# The upcycled recipe's choice between no warmup (the former default) and a warmup in each phase, which 3 seeds could
# not separate on validation: both with 2 more seeds, validation only (rule fixed before these seeds ran: the lower
# mean over targets of the seed standard deviation wins, unless its mean accuracy is more than 1 point under the
# other's).
CHOICE_RECIPES = {"thrlevel_": "warmup in each phase (chosen)", "nowarmup_": "no warmup (the default before)"}
CHOICE_SEEDS = [3, 4]


def choice_jobs(runs: Path, vit16: Path, quick: bool) -> dict:
    if quick:
        return {}
    jobs = {}
    for recipe, target, seed in [(r, t, s) for r in CHOICE_RECIPES for t in TARGETS for s in CHOICE_SEEDS]:
        args = ["--model_name_or_path", str(vit16), "--gbas_target_ratio", str(target), "--seed", str(seed)]
        jobs[f"msvit_{recipe}t{target}_s{seed}"] = (runs / f"msvit_{recipe}t{target}_s{seed}",
                                                    [*args, *MSVIT_RECIPES[recipe]])  # fmt: skip
    return jobs


def recipe_choice(choice_runs: dict, dynamic_runs: dict, validation: "Split") -> list[dict]:
    """Validation accuracy of `CHOICE_RECIPES` over every seed (`SEEDS` + `CHOICE_SEEDS`), per target and overall;
    nothing in a quick run (no extra seeds)."""
    if not choice_runs:
        return []
    runs = {**dynamic_runs, **choice_runs}
    rows = []
    for recipe, label in CHOICE_RECIPES.items():
        per_target = {t: [correct_per_image(runs[f"msvit_{recipe}t{t}_s{s}"], validation).mean()
                          for s in [*SEEDS, *CHOICE_SEEDS]] for t in TARGETS}  # fmt: skip
        rows.append({"recipe": label, "seeds": len(SEEDS) + len(CHOICE_SEEDS),
                     "accuracy": {t: [float(a) for a in values] for t, values in per_target.items()},
                     "mean": float(np.mean(list(per_target.values()))),
                     "mean_std": float(np.mean([np.std(values) for values in per_target.values()]))})  # fmt: skip
    return steadiest_within_a_point(rows, "mean_std")


def steadiest_within_a_point(rows: list[dict], std_key: str) -> list[dict]:
    """Marks `chosen` the row of lowest `std_key` among those whose `mean` is within 1 point of the best mean."""
    best = max(row["mean"] for row in rows)
    chosen = min((row for row in rows if row["mean"] >= best - 0.01), key=lambda row: row[std_key])
    for row in rows:
        row["chosen"] = row is chosen
    return rows


# The main job's recipe: phase 0 at 5e-4 (the default, the best mean validation accuracy over 3 seeds), at 2.5e-4, or
# label smoothing, each with 2 more seeds on validation. The rule is the upcycled recipe's (above), set after the
# first 3 seeds' test rows had been seen (the two others met issue #18 on test, the default did not): the lowest
# seed standard deviation among the recipes whose mean accuracy is within 1 point of the best mean.
MAIN_CHOICE = {"main_": "phase 0 at 5e-4 (the example's default)", "fresh_lr2.5e-4_": "phase 0 at 2.5e-4",
               "fresh_ls_": "label smoothing 0.1"}  # fmt: skip


def main_choice_jobs(runs: Path, quick: bool) -> dict:
    if quick:
        return {}
    return {f"{prefix}s{seed}": (runs / f"{prefix}s{seed}", ["--seed", str(seed), *FRESH_RECIPES.get(prefix, [])])
            for prefix in MAIN_CHOICE for seed in CHOICE_SEEDS}  # fmt: skip


def main_job_choice(choice_runs: dict, dynamic_runs: dict, validation: "Split") -> list[dict]:
    """Validation accuracy of `MAIN_CHOICE` over every seed (`SEEDS` + `CHOICE_SEEDS`), the recipe the rule takes;
    nothing in a quick run."""
    if not choice_runs:
        return []
    runs, seeds = {**dynamic_runs, **choice_runs}, [*SEEDS, *CHOICE_SEEDS]
    rows = []
    for prefix, label in MAIN_CHOICE.items():
        accuracy = [float(correct_per_image(runs[f"{prefix}s{seed}"], validation).mean()) for seed in seeds]
        rows.append({"recipe": label, "prefix": prefix, "seeds": len(accuracy), "accuracy": accuracy,
                     "mean": float(np.mean(accuracy)), "std": float(np.std(accuracy))})  # fmt: skip
    return steadiest_within_a_point(rows, "std")


# Where the joint phase's sampled decisions are cut: at the threshold (the former default: the noise pulled the main
# job's training ratio 0.055 above its 0.25 target) or at each batch's target fraction (now the default). Rule fixed
# before the target cut's runs were evaluated: the target cut is taken unless its mean validation accuracy, from the
# checkpoint (3 targets x 3 seeds) or in the main job (3 seeds), is more than 1 point under the threshold cut's.
# (upcycled recipe, main job); the main job was then the small ViT's.
LEVEL_CHOICE = {"target": ("", "fresh_vit96_"), "threshold": ("thrlevel_", "fresh_thrlevel_")}
MAIN_JOB_TARGET = 0.25


def sampling_level_choice(dynamic: dict) -> list[dict]:
    """Per `LEVEL_CHOICE`: mean validation accuracy from the checkpoint and in the main job, the largest distance of a
    training ratio from its target, and the cut the rule chooses; nothing when a run is missing (quick runs)."""
    runs = {level: ([(dynamic.get(f"msvit_{recipe}t{t}_s{s}"), t) for t in TARGETS for s in SEEDS],
                    [(dynamic.get(f"{fresh}s{s}"), MAIN_JOB_TARGET) for s in SEEDS])
            for level, (recipe, fresh) in LEVEL_CHOICE.items()}  # fmt: skip
    if any(result is None for pair in runs.values() for group in pair for result, _ in group):
        return []
    rows = {}
    for level, groups in runs.items():
        rows[level] = {"level": level, "seeds": len(SEEDS),
                       **{f"validation_{path}": float(np.mean([r["validation_accuracy"] for r, _ in group]))
                          for path, group in zip(("checkpoint", "main_job"), groups)},
                       **{f"train_drift_{path}": max(abs(r["train_token_ratio"] - t) for r, t in group)
                          for path, group in zip(("checkpoint", "main_job"), groups)}}  # fmt: skip
    target, threshold = rows["target"], rows["threshold"]
    keep = all(target[f"validation_{p}"] >= threshold[f"validation_{p}"] - 0.01 for p in ("checkpoint", "main_job"))
    for level, row in rows.items():
        row["chosen"] = (level == "target") == keep
    return list(rows.values())


def main_backbone_sweep(runs: dict, splits: dict) -> list[dict]:
    """Per (size, lr, epochs, warmup) of `main_backbone_jobs`: validation and test accuracy, mean [min, max] over
    seeds, and the minutes a run took."""
    results = evaluate_static({name: path / "phase-backbone" / "final" for name, path in runs.items()}, splits)
    sweep = []
    for size, lr, epochs, warmup in MAIN_BACKBONE_RECIPES:
        names = [main_backbone_name(size, lr, epochs, warmup, seed) for seed in SEEDS]
        seeds = [results[name] for name in names]
        row = {"size": size, "learning_rate": lr, "epochs": epochs, "warmup": warmup, "seeds": len(seeds),
               "minutes": train_seconds([runs[name] for name in names]) / 60 / len(names)}  # fmt: skip
        for key in ("validation_accuracy", "accuracy"):
            values = [result[key] for result in seeds]
            row[key], row[f"{key}_min"], row[f"{key}_max"] = float(np.mean(values)), min(values), max(values)
        if len(names) > 1:
            paths = [runs[name] / "phase-backbone" / "final" for name in names]
            row["disagreement"] = disagreement(np.stack([correct_per_image(p, splits["test"]) for p in paths]))
        sweep.append(row)
    return sweep


def dit_jobs(runs: Path, pvt: Path, quick: bool) -> dict:
    """dit_study.py's runs (its folders, but for a quick run): the package's recipe at both budgets, the paper's at
    0.8."""
    import dit_study

    if not quick and pvt != DIT_RUNS / "pvt_b0" / "phase-backbone" / "final":
        raise RuntimeError(f"The best PVTv2-b0 is {pvt}, not the one dit_study.py's runs start from: re-run them.")
    selected = {}
    for name, job in dit_study.jobs(runs / "dit" if quick else DIT_RUNS, quick, pvt).items():
        if name.startswith("sparse_b") or name.startswith("paper_b0.8"):
            selected[name] = job
    return selected


def all_coarse_vit(vit16):
    """The ViT/32 that computes what MSViT computes with every region coarse, from a ViT/16 (exact: a coarse token is
    the 16 px embedding of the region averaged 2x2, i.e. a 32 px kernel made of the 16 px kernel's pixels repeated 2x2
    over 4; coarse positions are the 2x2 means of the fine ones)."""
    from transformers import ViTConfig, ViTForImageClassification

    coarse = ViTForImageClassification(ViTConfig(**{**vit16.config.to_dict(), "patch_size": 32}))
    state = vit16.state_dict()
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
    return coarse


def fine_tune_static(source: Path, output_dir: Path, length: dict, quick: bool, convert=None, seed: int = 0) -> Path:
    """A fair baseline: the static checkpoint `source` (optionally `convert`ed) trained further with the Trainer, at
    the joint phase's learning rate, for `length` (`num_train_epochs` or `max_steps`). Returns `output_dir`."""
    marker = output_dir / "study_done.json"
    if marker.exists():
        return output_dir
    started = time.time()
    torch.set_num_threads(1)
    model = AutoModelForImageClassification.from_pretrained(source)
    model = convert(model) if convert else model
    processor = AutoImageProcessor.from_pretrained(source)
    train = load_digits_on_canvas(copies=1 if quick else 2)["train"].with_transform(ImageTransform(processor))
    args = TrainingArguments(
        output_dir=str(output_dir), **({"max_steps": 3} if quick else length), learning_rate=JOINT_LEARNING_RATE,
        weight_decay=0.05, per_device_train_batch_size=32, save_strategy="no", report_to="none", use_cpu=True,
        remove_unused_columns=False, logging_steps=50, disable_tqdm=True, seed=seed,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train, data_collator=collate_fn).train()
    model.save_pretrained(output_dir / "final")
    processor.save_pretrained(output_dir / "final")
    marker.write_text(json.dumps({"seconds": time.time() - started}))
    return output_dir


def fair_jobs(runs: Path, best_dirs: dict, quick: bool) -> dict:
    """`{name: (label, family, source checkpoint, length, convert, folder, seed)}` of the equal-training baselines.
    ViT/16's has every seed of the MSViT rows (seed 0 in the folder without a suffix): how far fine-tuning alone
    spreads."""
    final = {kind: path / "phase-backbone" / "final" for kind, path in best_dirs.items()}
    epochs, steps = {"num_train_epochs": MSVIT_PHASE_EPOCHS}, DIT_STEPS["sparse"]
    jobs = {
        "vit16_fair": (f"ViT/16, + {MSVIT_PHASE_EPOCHS} epochs (MSViT's training)", "msvit", final["vit16"], epochs,
                       None, runs / "vit16_fair"),
        "vit32_fair": (f"ViT/32, + {MSVIT_PHASE_EPOCHS} epochs", "msvit", final["vit32"], epochs, None,
                       runs / "vit32_fair"),
        "vit16_to_coarse": (f"ViT/16 -> all-coarse ViT/32, + {MSVIT_PHASE_EPOCHS} epochs", "msvit", final["vit16"],
                            epochs, all_coarse_vit, runs / "vit16_to_coarse"),
        # the folder dit_study.py trains the same baseline in
        "pvt_b0_fair": (f"PVTv2-b0, + {steps} steps (DiT's training)", "dit", final["pvt_b0"], {"max_steps": steps},
                        None, runs / "pvt_b0_fair" if quick else DIT_RUNS / f"pvt_b0_plus{steps}"),
    }  # fmt: skip
    jobs = {name: (*job, 0) for name, job in jobs.items()}
    for seed in SEEDS[1:]:
        jobs[f"vit16_fair_s{seed}"] = (*jobs["vit16_fair"][:5], runs / f"vit16_fair_s{seed}", seed)
    return jobs


class Split:
    """One split of the built-in data (or a variant of it), preprocessed once per image-processor setting."""

    def __init__(self, name: str, quick: bool, images=None, labels=None, **data_kwargs):
        self.sources = None  # the source digit of each image (a digit is drawn at several positions)
        if images is None:
            split = load_digits_on_canvas(copies=1 if quick else 2, **data_kwargs)[name]
            split = split.select(range(64)) if quick else split
            images, labels, self.sources = split["image"], split["label"], np.array(split["source_index"])
        self.name = name
        self.images = [image.convert("RGB") for image in images]
        self.labels = torch.tensor(labels) if labels is not None else None
        self._cache = {}

    def pixels(self, processor) -> torch.Tensor:
        key = processor.to_json_string()
        if key not in self._cache:
            self._cache[key] = processor(self.images, return_tensors="pt")["pixel_values"]
        return self._cache[key]


def photo_tiles(size: int = 96) -> "Split":
    """scikit-learn's two photographs cut into `size` px tiles (unlabelled): a distribution no model trained on."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    tiles = []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        for top in range(0, image.height - size + 1, size):
            for left in range(0, image.width - size + 1, size):
                tiles.append(image.crop((left, top, left + size, top + size)))
    return Split("photo_tiles", False, images=tiles)


@torch.no_grad()
def evaluate(model, pixel_values, labels, static_gmacs: float, batch_size: int = 128, **forward_kwargs) -> dict:
    """Accuracy (and its standard error), GMACs per image and token ratio (mean, std over images). Per-image compute is
    read with `ComputeSpent`, the same reading Trainer's metrics use; static models cost `static_gmacs` each."""
    from hf_msvit.training import ComputeSpent

    model.eval()
    correct, gmacs, ratios = [], [], []
    for start in range(0, len(pixel_values), batch_size):
        outputs = model(pixel_values[start : start + batch_size], **forward_kwargs)
        if labels is not None:
            correct += (outputs.logits.argmax(-1) == labels[start : start + batch_size]).tolist()
        spent = ComputeSpent.from_outputs(outputs)
        if spent is not None:
            gmacs += (spent.macs.double() / 1e9).tolist()
            ratios += spent.token_ratio.tolist()
    correct = np.array(correct, dtype=float)
    gmacs = np.array(gmacs) if gmacs else np.full(len(pixel_values), static_gmacs)
    result = {
        "gmacs": float(gmacs.mean()),
        "gmacs_std": float(gmacs.std()),
        "macs_fraction": float(gmacs.mean() / static_gmacs),
    }
    if len(correct):
        result.update(accuracy=float(correct.mean()), accuracy_se=float(correct.std(ddof=1) / math.sqrt(len(correct))))
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


def evaluate_static(runs: dict, splits: dict) -> dict:
    """`{run name: test metrics + validation accuracy}` of static checkpoints (`{name: checkpoint folder}`)."""
    results = {}
    for name, path in runs.items():
        model, processor = load(path)
        gmacs = static_gmacs(path)
        results[name] = evaluate(model, splits["test"].pixels(processor), splits["test"].labels, gmacs)
        validation = evaluate(model, splits["validation"].pixels(processor), splits["validation"].labels, gmacs)
        results[name]["validation_accuracy"] = validation["accuracy"]
        print(name, json.dumps(results[name]), flush=True)
    return results


def best_of_sweeps(static: dict, runs: dict) -> tuple[dict, dict]:
    """The best learning rate of each sweep (by VALIDATION accuracy): `({kind: run dir}, {kind: run name})`."""
    best_dirs, best_names = {}, {}
    for kind in SWEEPS:
        candidates = [n for n in static if n.startswith(kind + "_lr")]
        name = max(candidates, key=lambda n: static[n]["validation_accuracy"])
        best_dirs[kind], best_names[kind] = runs[name], name
    return best_dirs, best_names


def level_diagnostics(model, processor, splits: dict) -> dict:
    """MSViT's level: the logit offset calibration subtracts, the test ratio and accuracy with calibration off, and the
    fine ratio (calibrated / not) on distributions it was not trained on."""
    gate = model.msvit.embeddings.gate
    static = model.static_macs() / 1e9
    result = {"logit_offset": float(gate.logit_offset)}
    for calibrated in (True, False):
        gate.calibration = calibrated
        suffix = "" if calibrated else "_uncalibrated"
        if not calibrated:
            test = evaluate(model, splits["test"].pixels(processor), splits["test"].labels, static)
            result.update(accuracy_uncalibrated=test["accuracy"], token_ratio_uncalibrated=test["token_ratio"])
        for name in ("blank", "photo_tiles"):
            result[f"{name}_token_ratio{suffix}"] = evaluate(model, splits[name].pixels(processor), None, static)[
                "token_ratio"
            ]
    gate.calibration = model.config.gate_level_calibration
    return result


def evaluate_dynamic(runs: dict, splits: dict) -> dict:
    """Every dynamic run on test at its default operating point and along its threshold sweep (validation accuracy
    beside it); MSViT runs with their level diagnostics."""
    results = {}
    for name, run_dir in runs.items():
        cache = run_dir / "study_eval.json"  # an evaluation of this run's final model (resuming the study)
        if cache.exists() and cache.stat().st_mtime > (run_dir / "study_done.json").stat().st_mtime:
            cached = json.loads(cache.read_text())
            results[name] = {**cached, "sweep": {float(t): point for t, point in cached["sweep"].items()}}
            continue
        model, processor = load(run_dir)
        pixels, labels, static = splits["test"].pixels(processor), splits["test"].labels, model.static_macs() / 1e9
        thresholds = DIT_THRESHOLDS if name.startswith(("sparse", "paper")) else MSVIT_THRESHOLDS
        sweep = {t: evaluate(model, pixels, labels, static, gate_threshold=t) for t in thresholds}
        validation = evaluate(model, splits["validation"].pixels(processor), splits["validation"].labels, static)
        results[name] = {"eval": sweep[0.5], "sweep": sweep, "validation_accuracy": validation["accuracy"],
                         **train_ratios(run_dir)}  # fmt: skip
        if not name.startswith(("sparse", "paper")):
            results[name].update(level_diagnostics(model, processor, splits))
        write_atomic(cache, json.dumps(results[name]))
        print(name, json.dumps(results[name]["eval"]), flush=True)
    for name, run_dir in runs.items():  # cheap (the gate alone), so not cached: MSViT's gate logits on test
        if not name.startswith(("sparse", "paper")):
            results[name].update(gate_logit_range(*load(run_dir), splits["test"]))
    return results


def correct_per_image(run_dir: Path, split: Split) -> np.ndarray:
    """Whether the model in `run_dir` (at its default operating point) classifies each image of `split` right."""
    model, processor = load(run_dir)
    with torch.no_grad():
        logits = torch.cat([model(batch).logits for batch in split.pixels(processor).split(128)])
    return (logits.argmax(-1) == split.labels).numpy()


def disagreement(correct: np.ndarray) -> float:
    """The share of images on which two models disagree (one right, one wrong), mean over pairs; `correct` is
    `(models, images)`."""
    return float(np.mean([np.mean(a != b) for a, b in itertools.combinations(correct, 2)]))


def resampled_spreads(dynamic_runs: dict, baselines: list[dict], fair_dirs: list[Path], split: Split) -> list[dict]:
    """How much of a seed spread the test split's sampling alone makes: per MSViT group of 3+ seeds (and the ViT/16
    fine-tuned with every seed, and the main job's own phase-0 ViT/16s), the spread (max - min accuracy over seeds)
    on 2,000 resamples of the test split's source digits with replacement (both positions of a digit go together):
    its 5/50/95% quantiles and the share of resamples within 2 points; and the share of test images on which two seeds
    disagree (one right, one wrong; mean over pairs), what a spread is made of."""
    groups = {label: [dynamic_runs[n] for n in dynamic_runs if n.startswith(prefix)]
              for (family, prefix), (label, _) in GROUPS.items() if family == "msvit"}  # fmt: skip
    fair = [path / "final" for path in fair_dirs if path.name.startswith("vit16_fair")]
    groups[next(row["label"] for row in baselines if row["name"] == "vit16_fair")] = fair
    for row in [row for row in baselines if "prefix" in row]:  # the backbones the main job's seeds start from
        groups[row["label"]] = [path / "phase-backbone" / "final" for name, path in dynamic_runs.items()
                                if name.startswith(row["prefix"])]  # fmt: skip
    digits = np.unique(split.sources)
    rows_of_digit = [np.flatnonzero(split.sources == digit) for digit in digits]
    draws = np.random.default_rng(0).integers(0, len(digits), size=(2000, len(digits)))
    rows = []
    for label, runs in groups.items():
        if len(runs) < 3:
            continue
        correct = np.stack([correct_per_image(path, split) for path in runs])  # (seeds, images)
        per_digit = np.stack([correct[:, index].sum(1) for index in rows_of_digit], 1)  # (seeds, digits)
        counts = np.array([len(index) for index in rows_of_digit])
        accuracy = per_digit[:, draws].sum(-1) / counts[draws].sum(-1)  # (seeds, resamples)
        spread = accuracy.max(0) - accuracy.min(0)
        observed = correct.mean(1)
        rows.append({"label": label, "seeds": len(runs), "spread": float(observed.max() - observed.min()),
                     **{f"spread_q{q}": float(np.quantile(spread, q / 100)) for q in (5, 50, 95)},
                     "share_within_2_points": float((spread <= 0.02 + 1e-9).mean()),
                     "disagreement": disagreement(correct)})  # fmt: skip
    return rows


def gate_logit_range(model, processor, split: Split) -> dict:
    """The 1% and 99% quantiles of the gate's logits over the regions of `split`: a drifted gate shows here."""
    with torch.no_grad():
        logits = model.msvit.embeddings.gate_logits(split.pixels(processor)).flatten()
    low, high = torch.quantile(logits, torch.tensor([0.01, 0.99])).tolist()
    return {"logit_q01": low, "logit_q99": high}


GROUPS = {  # summary row: (family, name prefix, label, target label)
    **{("msvit", f"msvit_t{t}_"): (f"MSViT target {t} (example defaults)", f"fine {t}") for t in TARGETS},
    ("msvit", "msvit_paper_t0.5_"): ("MSViT target 0.5, the paper's recipe", "fine 0.5"),
    **{
        ("msvit", f"msvit_selected_t{t}_"): (f"MSViT target {t}, joint: selected tokens, gates frozen", f"fine {t}")
        for t in TARGETS
    },
    **{
        ("msvit", f"msvit_noisefree_t{t}_"): (f"MSViT target {t}, former defaults (GBaS 1)", f"fine {t}")
        for t in TARGETS
    },
    **{
        ("msvit", f"msvit_sampled_t{t}_"): (f"MSViT target {t}, GBaS 1, sampled gate-only phase", f"fine {t}")
        for t in TARGETS
    },
    **{("msvit", f"msvit_noise1_t{t}_"): (f"MSViT target {t}, GBaS 1, joint noise 1", f"fine {t}") for t in TARGETS},
    **{
        ("msvit", f"msvit_gbas1_t{t}_"): (f"MSViT target {t}, GBaS weight 1 (the default before 0.3)", f"fine {t}")
        for t in TARGETS
    },
    **{("msvit", f"msvit_nologitpen_t{t}_"): (f"MSViT target {t}, as the defaults", f"fine {t}") for t in TARGETS},
    **{("msvit", f"msvit_jlr2.5e-4_t{t}_"): (f"MSViT target {t}, joint lr 2.5e-4", f"fine {t}") for t in TARGETS},
    **{("msvit", f"msvit_nowarmup_t{t}_"): (f"MSViT target {t}, no warmup (the default before)", f"fine {t}")
       for t in TARGETS},
    **{("msvit", f"msvit_thrlevel_t{t}_"): (f"MSViT target {t}, the former default", f"fine {t}") for t in TARGETS},
    ("msvit", "main_"): ("The main job (fresh ViT/16, then MSViT at the example's defaults)", "fine 0.25"),
    ("msvit", "fresh_vit96_"): ("The main job", "fine 0.25"),
    ("msvit", "fresh_thrlevel_"): ("The main job", "fine 0.25"),
    ("msvit", "fresh_ls_"): ("The main job, label smoothing 0.1", "fine 0.25"),
    ("msvit", "fresh_aug_"): ("The main job, augmented (random resized crop)", "fine 0.25"),
    ("msvit", "fresh_kd0.5_"): ("The main job, distilled from its phase-0 ViT/16 (weight 0.5)", "fine 0.25"),
    ("msvit", "fresh_lr2.5e-4_"): ("The main job, phase 0 at lr 2.5e-4", "fine 0.25"),
    ("msvit", "fresh_jlr2.5e-4_"): ("The main job, joint lr 2.5e-4", "fine 0.25"),
    ("msvit", "fresh_phase0warmup_"): ("The main job, warmup in phase 0 only", "fine 0.25"),
    ("msvit", "fresh_nowarmup_"): ("The main job, no warmup (the default before)", "fine 0.25"),
    ("msvit", "fresh_gbas1_"): ("The main job with GBaS weight 1, no warmup", "fine 0.25"),
    ("msvit", "fresh_e8_gbas1_"): ("The main job, phase 0 of 8 epochs, GBaS weight 1, no warmup", "fine 0.25"),
    ("msvit", "fresh_e8_gbas0.3_"): ("The main job, phase 0 of 8 epochs, GBaS weight 0.3, no warmup", "fine 0.25"),
    **{("dit", f"sparse_b{b}_"): (f"DiT-b0 budget {b}", f"compute {b}") for b in BUDGETS},
    ("dit", "paper_b0.8_"): ("DiT-b0 budget 0.8, the paper's recipe", "compute 0.8"),
}
PRE_LOGIT_PENALTY_PREFIXES = tuple(f"msvit_{recipe}t" for recipe in PRE_LOGIT_PENALTY)
PRE_WARMUP_PREFIXES = tuple(f"msvit_{recipe}t" for recipe in PRE_WARMUP)
PRE_TARGET_CUT_PREFIXES = (*(f"msvit_{recipe}t" for recipe in [*PRE_TARGET_CUT, "thrlevel_"]), *PRE_TARGET_CUT_FRESH)
GROUPS = {key: (label + (", no logit penalty" if key[1].startswith(PRE_LOGIT_PENALTY_PREFIXES) else "")
                + (", no warmup" if key[1].startswith(PRE_WARMUP_PREFIXES) else "")
                + (", cut at the threshold" if key[1].startswith(PRE_TARGET_CUT_PREFIXES) else "")
                + (", small ViT/16 (width 96, 3 layers)" if key[1].startswith(SMALL_VIT_FRESH) else ""), target)
          for key, (label, target) in GROUPS.items()}  # fmt: skip
SPREAD_KEYS = ("accuracy", "token_ratio", "macs_fraction", "gmacs")
LEVEL_KEYS = ("logit_offset", "accuracy_uncalibrated", "token_ratio_uncalibrated", "blank_token_ratio",
              "blank_token_ratio_uncalibrated", "photo_tiles_token_ratio", "photo_tiles_token_ratio_uncalibrated",
              "train_token_ratio", "train_macs_fraction", "validation_accuracy", "logit_q01", "logit_q99")  # fmt: skip


def summarize(dynamic: dict) -> list[dict]:
    """Mean and [min, max] over seeds per group of runs."""
    rows = []
    for (family, prefix), (label, target_label) in GROUPS.items():
        runs = [r for n, r in dynamic.items() if n.startswith(prefix)]
        if not runs:
            continue
        target = float(target_label.split()[-1])  # "fine 0.25", "compute 0.8"
        label += f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        row = {"family": family, "target": target, "seeds": len(runs), "label": label, "target_label": target_label}
        for key, values in [(k, [r["eval"][k] for r in runs]) for k in SPREAD_KEYS] + [
            (k, [r[k] for r in runs if r.get(k) is not None]) for k in LEVEL_KEYS
        ]:
            if values:
                row[key], row[key + "_min"], row[key + "_max"] = float(np.mean(values)), min(values), max(values)
            elif key in ("train_token_ratio", "train_macs_fraction"):
                row[key] = None
        sweeps = [r["sweep"] for r in runs]
        row["sweep"] = {
            t: {k: float(np.mean([s[t][k] for s in sweeps])) for k in ("accuracy", "gmacs", "token_ratio")}
            for t in sweeps[0]
        }
        rows.append(row)
    return rows


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per phase")
    parser.add_argument("--output", default=str(HERE / "study"))
    parser.add_argument("--finished-only", action="store_true", help="evaluate only the runs that finished")
    return parser.parse_args()


def main():
    args = parse_arguments()
    global FINISHED_ONLY
    FINISHED_ONLY = args.finished_only
    started = time.time()
    out = Path(args.output)
    runs_dir = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    global SEEDS
    if args.quick:
        SEEDS = [0]
    splits = evaluation_splits(args.quick)
    static_runs = run_all(static_jobs(runs_dir, args.quick))
    static = evaluate_static({n: p / "phase-backbone" / "final" for n, p in static_runs.items()}, splits)
    best_dirs, best_names = best_of_sweeps(static, static_runs)
    baselines, fair_dirs = fair_baselines(runs_dir, best_dirs, splits, args.quick)
    vit16 = best_dirs["vit16"] / "phase-backbone" / "final"
    pvt = best_dirs["pvt_b0"] / "phase-backbone" / "final"
    dynamic_jobs = {**msvit_jobs(runs_dir, vit16, args.quick), **main_job_jobs(runs_dir, args.quick)}
    dynamic_runs = run_all({**dynamic_jobs, **dit_jobs(runs_dir, pvt, args.quick)})
    dynamic = evaluate_dynamic(dynamic_runs, splits)
    choices = msvit_choices(runs_dir, vit16, dynamic_runs, baselines, fair_dirs, splits, args.quick)
    choices["sampling_level_choice"] = sampling_level_choice(dynamic)
    choices["main_job_seeds"] = main_job_seeds(dynamic, choices.pop("main_job_backbones"), dynamic_runs, splits)
    payload = {
        "quick": args.quick,
        "split": "test",
        "static": static,
        "best": best_names,
        "baselines": baselines,
        "dynamic": dynamic,
        "summary": summarize(dynamic),
        **choices,
        "num_images": len(splits["test"].labels),
        "not_run": NOT_RUN,
        "train_seconds": train_seconds([*static_runs.values(), *fair_dirs, *dynamic_runs.values()]),
        "wall_seconds": time.time() - started,
    }
    write_outputs(payload, out, dynamic_runs, splits["test"])


def msvit_choices(runs_dir: Path, vit16: Path, dynamic_runs: dict, baselines: list[dict], fair_dirs: list[Path],
                  splits: dict, quick: bool) -> dict:
    """What the MSViT defaults were chosen by, beside the rows: the main job's phase-0 sweep (its backbones appended
    to `baselines`), the upcycled recipe's choice on validation, and each seed spread against test resamples."""
    main_sweep = main_backbone_sweep(run_all(main_backbone_jobs(runs_dir, quick)), splits)
    choice = recipe_choice(run_all(choice_jobs(runs_dir, vit16, quick)), dynamic_runs, splits["validation"])
    main_choice = main_job_choice(run_all(main_choice_jobs(runs_dir, quick)), dynamic_runs, splits["validation"])
    backbones = main_job_backbones(dynamic_runs, splits)
    baselines.extend(own_backbone_rows(backbones))
    spreads = resampled_spreads(dynamic_runs, baselines, fair_dirs, splits["test"])
    return {"main_backbone_sweep": main_sweep, "resampled_spreads": spreads, "recipe_choice": choice,
            "main_job_choice": main_choice, "main_job_backbones": backbones}  # fmt: skip


def write_outputs(payload: dict, out: Path, dynamic_runs: dict, test: Split):
    """results.json, results.md, the accuracy-vs-GMACs plot and the gate pictures, into `out`."""
    write_atomic(out / "results.json", json.dumps(payload, indent=1))
    write_atomic(out / "results.md", render_tables(payload))
    plot(payload, out / "accuracy_vs_gmacs.png")
    pictures(dynamic_runs, test, out)
    print((out / "results.md").read_text())


def evaluation_splits(quick: bool) -> dict:
    """Validation (choices), test (reported numbers), and two distributions no model trained on (ratios only)."""
    splits = {name: Split(name, quick) for name in ("validation", "test")}
    splits["blank"] = Split("test", quick, background="blank")
    splits["photo_tiles"] = photo_tiles()
    return splits


def train_seconds(run_dirs: list[Path]) -> float:
    return sum(json.loads((path / "study_done.json").read_text())["seconds"] for path in run_dirs)


# The main job's recipes on the study's ViT/16 (each trains its own phase 0, but "fresh_jlr2.5e-4_", which differs
# from the main job only after it), and those whose phase-0 ViT/16s are a baseline row of their own.
MAIN_JOB_PAIRS = ("main_", "fresh_lr2.5e-4_", "fresh_jlr2.5e-4_", "fresh_ls_", "fresh_aug_", "fresh_kd0.5_")
OWN_BACKBONE_ROWS = {"main_": "The main job's own ViT/16 (phase 0)",
                     "fresh_aug_": "The main job, augmented: its own ViT/16 (phase 0)"}  # fmt: skip


def main_job_backbones(dynamic_runs: dict, splits: dict) -> dict:
    """`{run name: test metrics + validation accuracy}` of the static ViT/16 each main-job run trained in its phase 0
    (`MAIN_JOB_PAIRS`)."""
    main = {name: path for name, path in dynamic_runs.items() if name.startswith(MAIN_JOB_PAIRS)}
    return evaluate_static({name: path / "phase-backbone" / "final" for name, path in main.items()}, splits)


def own_backbone_rows(backbones: dict) -> list[dict]:
    """Per `OWN_BACKBONE_ROWS` prefix with runs: a baseline row (mean over its seeds)."""
    rows = []
    for prefix, label in OWN_BACKBONE_ROWS.items():
        results = {name: result for name, result in backbones.items() if name.startswith(prefix)}
        if results:
            row = seed_mean_row(f"{prefix}backbones", label, results)
            rows.append({**row, "family": "msvit", "macs_fraction": 1.0, "prefix": prefix})
    return rows


def main_job_seeds(dynamic: dict, backbones: dict, dynamic_runs: dict, splits: dict) -> list[dict]:
    """Per main-job recipe (`MAIN_JOB_PAIRS`), per seed: the MSViT's and its own phase-0 ViT/16's accuracy on
    validation and test, and the share of images of each split the two disagree on (one right, one wrong); the largest
    shortfall of an MSViT under its backbone and the MSViTs' spread, both on test. `jlr` recipes share the main job's
    phase 0: their backbones are the main job's, seed for seed."""
    rows = []
    for prefix in MAIN_JOB_PAIRS:
        seeds = []
        for seed in SEEDS:
            name, backbone_name = f"{prefix}s{seed}", f"{'main_' if 'jlr' in prefix else prefix}s{seed}"
            msvit, backbone = dynamic.get(name), backbones.get(backbone_name)
            if msvit is None or backbone is None:
                continue
            pair = [dynamic_runs[name], dynamic_runs[backbone_name] / "phase-backbone" / "final"]
            seeds.append({"seed": seed, "msvit_validation": msvit["validation_accuracy"],
                          "msvit_test": msvit["eval"]["accuracy"], "backbone_validation":
                          backbone["validation_accuracy"], "backbone_test": backbone["accuracy"],
                          **{f"disagreement_{split}": disagreement(np.stack([correct_per_image(path, splits[split])
                                                                             for path in pair]))
                             for split in ("validation", "test")}})  # fmt: skip
        if len(seeds) < 2:
            continue
        tests = [seed["msvit_test"] for seed in seeds]
        rows.append({"label": GROUPS[("msvit", prefix)][0], "seeds": seeds,
                     "largest_shortfall": max(s["backbone_test"] - s["msvit_test"] for s in seeds),
                     "spread": max(tests) - min(tests),
                     **{f"mean_{key}": float(np.mean([s[key] for s in seeds]))
                        for key in ("msvit_validation", "disagreement_validation")}})  # fmt: skip
    return rows


def fair_baselines(runs_dir: Path, best_dirs: dict, splits: dict, quick: bool) -> tuple[list[dict], list[Path]]:
    """Trains (two at a time) and evaluates the equal-training baselines: `(rows, run folders)`, one row per label
    (a label trained with several seeds: their mean, as `seed_mean_row`)."""
    jobs = fair_jobs(runs_dir, best_dirs, quick)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(fine_tune_static, source, folder, length, quick, convert, seed)
                   for name, (_, _, source, length, convert, folder, seed) in jobs.items()}  # fmt: skip
        dirs = {name: future.result() for name, future in futures.items()}
    results = evaluate_static({name: path / "final" for name, path in dirs.items()}, splits)
    reference = {"msvit": "vit16", "dit": "pvt_b0"}
    rows = []
    for label in dict.fromkeys(label for label, *_rest in jobs.values()):
        names = [name for name, (other, *_rest) in jobs.items() if other == label]
        family = jobs[names[0]][1]
        static = static_gmacs(best_dirs[reference[family]] / "phase-backbone" / "final")
        row = seed_mean_row(names[0], label, {name: results[name] for name in names}) if len(names) > 1 else {
            "name": names[0], "label": label, **results[names[0]]}  # fmt: skip
        rows.append({**row, "family": family, "macs_fraction": results[names[0]]["gmacs"] / static})
    return rows, list(dirs.values())


def seed_mean_row(name: str, label: str, results: dict) -> dict:
    """A baseline row over seeds: the mean of each number, accuracy's min, max and per-seed values."""
    row = {"name": name, "label": label}
    for key in ("accuracy", "accuracy_se", "gmacs", "validation_accuracy"):
        row[key] = float(np.mean([result[key] for result in results.values()]))
    row["accuracy_min"], row["accuracy_max"] = (f([r["accuracy"] for r in results.values()]) for f in (min, max))
    row["per_seed"] = {name: result["accuracy"] for name, result in results.items()}
    return {**row, "seeds": len(results)}


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pictures(dynamic_runs: dict, split: Split, out: Path, count: int = 3):
    from hf_msvit.visualization import visualize

    for prefix, name in (("msvit", f"msvit_t0.25_s{SEEDS[0]}"), ("dit", f"sparse_b0.8_s{SEEDS[0]}")):
        model, processor = load(dynamic_runs[name])
        for index in range(count):
            visualize(model, split.images[index], output_path=out / f"{prefix}_gates_{index}.png",
                      image_processor=processor)  # fmt: skip


def render_tables(payload) -> str:
    """results.md: the tables README shows (one renderer, benchmarks/readme_tables.py), and the lr sweeps."""
    from readme_tables import render_msvit_level, render_msvit_seeds, render_study, render_study_thresholds

    names = {"vit16": "ViT/16", "vit32": "ViT/32", "pvt_b0": "PVTv2-b0"}
    lines = [
        "Accuracy ± its standard error over images; dynamic models: mean [min-max] over seeds. Compute: GMACs per",
        "image (analytic, as the models report them) and its fraction of the static backbone. Eval = deterministic",
        "inference (threshold 0.5); train = the sampled decisions of the last training steps. Choices on validation,",
        f"numbers on test. Training: {payload['train_seconds'] / 60:.0f} min of process time; wall clock "
        f"{payload['wall_seconds'] / 60:.0f} min" + (" (quick smoke run)." if payload["quick"] else "."),
        "", *render_study(payload), "", "**Learning-rate sweeps** (chosen by validation accuracy):", "",
        "| baseline | learning rate | validation accuracy | test accuracy | GMACs / image |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for name, result in payload["static"].items():
        kind, lr = name.split("_lr")
        mark = " (best)" if payload["best"][kind] == name else ""
        lines.append(f"| {names[kind]} | {lr}{mark} | {result['validation_accuracy']:.3f} | "
                     f"{result['accuracy']:.3f} ± {result['accuracy_se']:.3f} | {result['gmacs']:.4f} |")  # fmt: skip
    lines += ["", *render_main_backbone_sweep(payload.get("main_backbone_sweep", []))]
    lines += ["", *render_main_job_seeds(payload.get("main_job_seeds", []))]
    lines += ["", *render_main_job_choice(payload.get("main_job_choice", []))]
    lines += ["", *render_resampled_spreads(payload.get("resampled_spreads", []))]
    lines += ["", *render_recipe_choice(payload.get("recipe_choice", []))]
    lines += ["", *render_sampling_level_choice(payload.get("sampling_level_choice", []))]
    lines += ["", "**MSViT's level**", "", *render_msvit_level(payload), "", "**Threshold sweeps**", "",
              *render_study_thresholds(payload), "", "**MSViT per seed**", "",
              *render_msvit_seeds(payload)]  # fmt: skip
    return "\n".join(lines) + "\n"


def chosen_backbone_recipe(sweep: list[dict]) -> dict:
    """The phase-0 row the example's defaults follow: the best mean validation accuracy, unless rows with fewer epochs
    come within half a point of it (then the best of the shortest of those)."""
    best = max(sweep, key=lambda row: row["validation_accuracy"])
    close = [row for row in sweep if row["validation_accuracy"] >= best["validation_accuracy"] - 0.005]
    shortest = min(row["epochs"] for row in close)
    return max((row for row in close if row["epochs"] == shortest), key=lambda row: row["validation_accuracy"])


def render_main_backbone_sweep(sweep: list[dict]) -> list[str]:
    """The main job's phase-0 recipes (`main_backbone_sweep`), the best mean validation accuracy marked."""
    lines = ["**The main job's phase 0** (its fresh ViT/16; mean [min-max] over seeds; the example's defaults are the "
             "best mean on validation, a longer phase 0 only if more than half a point better):", "",
             "| ViT (width x layers) | learning rate | epochs | warmup | seeds | validation accuracy | test accuracy "
             "| test images two seeds disagree on | minutes per run (one thread, two runs at a time) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    best = chosen_backbone_recipe(sweep) if sweep else None
    for row in sweep:
        cells = [f"{row[k]:.3f} [{row[k + '_min']:.3f}-{row[k + '_max']:.3f}]"
                 for k in ("validation_accuracy", "accuracy")]
        lr = f"{row['learning_rate']:g}" + (" (chosen)" if row is best else "")
        warmup = f"{row['warmup']:.0%} of the steps" if row.get("warmup") else "none"
        disagree = f"{row['disagreement']:.1%}" if "disagreement" in row else "-"
        lines.append(f"| {row.get('size', '96x3')} | {lr} | {row['epochs']} | {warmup} | {row['seeds']} | "
                     f"{cells[0]} | {cells[1]} | {disagree} | {row['minutes']:.1f} |")  # fmt: skip
    return lines


def render_main_job_seeds(rows: list[dict]) -> list[str]:
    """`main_job_seeds`: each main-job MSViT beside the ViT/16 its phase 0 trained, seed by seed."""
    if not rows:
        return []
    lines = ["**The main job, seed by seed** (accuracy, validation / test, of each seed's MSViT and of the static",
             "ViT/16 its own phase 0 trained, and the share of images the two disagree on, one right and one wrong;",
             "issue #18 asks each seed's MSViT within 2 points of its backbone and the MSViTs within 2 points of each",
             "other, on test):", "",
             "| recipe | seed | MSViT | its phase-0 ViT/16 | MSViT - ViT/16 (test, points) "
             "| images they disagree on, validation / test |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        for seed in row["seeds"]:
            pair = [f"{seed[f'{model}_validation']:.3f} / {seed[f'{model}_test']:.3f}"
                    for model in ("msvit", "backbone")]  # fmt: skip
            gap = 100 * (seed["msvit_test"] - seed["backbone_test"])
            disagree = " / ".join(f"{seed[f'disagreement_{split}']:.1%}" for split in ("validation", "test"))
            lines.append(f"| {row['label']} | {seed['seed']} | {pair[0]} | {pair[1]} | {gap:+.1f} | {disagree} |")
        lines.append(f"| {row['label']}: mean; largest shortfall / the MSViTs' spread | - | "
                     f"{row['mean_msvit_validation']:.3f} / - | - | {100 * row['largest_shortfall']:.1f} / "
                     f"{100 * row['spread']:.1f} | {row['mean_disagreement_validation']:.1%} / - |")  # fmt: skip
    return lines


def render_main_job_choice(rows: list[dict]) -> list[str]:
    """`main_job_choice`: the main job's candidate recipes on validation over every seed, the one the rule takes."""
    if not rows:
        return []
    lines = [f"**The main job's recipe** (validation, {rows[0]['seeds']} seeds; the lowest seed standard deviation",
             "among the recipes whose mean accuracy is within 1 point of the best mean):", "",
             "| recipe | accuracy per seed | mean | std | chosen |", "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        seeds = " / ".join(f"{value:.3f}" for value in row["accuracy"])
        lines.append(f"| {row['recipe']} | {seeds} | {row['mean']:.3f} | {100 * row['std']:.1f} points | "
                     f"{'yes' if row['chosen'] else '-'} |")  # fmt: skip
    return lines


def render_resampled_spreads(rows: list[dict]) -> list[str]:
    """`resampled_spreads`: each seed spread beside the spread of the same models on resamples of the test split."""
    lines = ["**Seed spreads and the test split's sampling** (max - min accuracy over seeds, in points; the same",
             "models on 2,000 resamples of the test split's 180 source digits with replacement; the last column, the",
             "share of test images on which two seeds disagree, one right and one wrong, mean over pairs):", "",
             "| models | seeds | spread on test | resampled: 5% / 50% / 95% | resamples within 2 points "
             "| images two seeds disagree on |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        quantiles = " / ".join(f"{100 * row[f'spread_q{q}']:.1f}" for q in (5, 50, 95))
        lines.append(f"| {row['label']} | {row['seeds']} | {100 * row['spread']:.1f} | {quantiles} | "
                     f"{row['share_within_2_points']:.0%} | {row['disagreement']:.1%} |")  # fmt: skip
    return lines


def render_recipe_choice(rows: list[dict]) -> list[str]:
    """`recipe_choice`: validation accuracy per target over every seed, the rule's two numbers, the recipe chosen."""
    if not rows:
        return []
    targets = " | ".join(f"target {t}: mean [min-max]" for t in TARGETS)
    lines = [f"**The upcycled recipe's choice** (validation, {rows[0]['seeds']} seeds; the lower mean standard",
             "deviation over seeds wins unless its mean accuracy is more than 1 point under the other's):", "",
             f"| recipe | {targets} | mean | mean std | chosen |", "|---|" + "---|" * (len(TARGETS) + 3)]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{np.mean(v):.3f} [{min(v):.3f}-{max(v):.3f}]" for v in row["accuracy"].values())
        chosen = "yes" if row["chosen"] else "-"
        spread = f"{100 * row['mean_std']:.1f} points"
        lines.append(f"| {row['recipe']} | {cells} | {row['mean']:.3f} | {spread} | {chosen} |")
    return lines


def render_sampling_level_choice(rows: list[dict]) -> list[str]:
    """`sampling_level_choice`: where the joint phase's samples are cut, the rule's numbers, the cut chosen."""
    if not rows:
        return []
    lines = [f"**Where the joint phase's samples are cut** (validation, {rows[0]['seeds']} seeds; the target cut is",
             "taken unless its mean accuracy, from the checkpoint or in the main job, is more than 1 point under the",
             "threshold cut's; drift: the largest distance of a run's training ratio from its target):", "",
             "| cut | from the checkpoint (3 targets) | main job (its small ViT, as then) "
             "| drift, checkpoint / main job | chosen |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['level']} | {row['validation_checkpoint']:.3f} | {row['validation_main_job']:.3f} | "
                     f"{row['train_drift_checkpoint']:.3f} / {row['train_drift_main_job']:.3f} | "
                     f"{'yes' if row['chosen'] else '-'} |")  # fmt: skip
    return lines


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
    markers = {"msvit": ("D", left), "dit": ("D", right)}
    for row in payload["baselines"]:
        marker, ax = markers[row["family"]]
        ax.plot([row["gmacs"]], [row["accuracy"]], marker, fillstyle="none", label=row["label"])
    pvt = static[best["pvt_b0"]]
    right.plot([pvt["gmacs"]], [pvt["accuracy"]], "s", color="tab:green", label="PVTv2-b0 (static)")
    for index, row in enumerate(payload["summary"]):
        ax, color = (left if row["family"] == "msvit" else right), f"C{index}"
        sweep = sorted(row["sweep"].values(), key=lambda r: r["gmacs"])
        ax.plot([r["gmacs"] for r in sweep], [r["accuracy"] for r in sweep], ".--", color=color,
                label=row["label"] + ": threshold sweep")  # fmt: skip
        err = [[row["accuracy"] - row["accuracy_min"]], [row["accuracy_max"] - row["accuracy"]]]
        ax.errorbar([row["gmacs"]], [row["accuracy"]], yerr=err, fmt="o", color=color, capsize=3)
    for ax, title in ((left, "MSViT vs ViT"), (right, "DiT vs PVTv2")):
        ax.set_title(title)
        ax.set_xlabel("GMACs per image (mean over the test split)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
