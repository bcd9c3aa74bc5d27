"""Training-step benchmark: what a step (forward, backward, AdamW) of a dynamic model costs against the static model it
was upcycled from, same weights, same run, timed interleaved (median over rounds).

    python benchmarks/bench_training.py --families dit     # writes benchmarks/results/training_cpu.json
    python benchmarks/bench_training.py --families msvit   # writes benchmarks/results/training_msvit_cpu.json
    python benchmarks/make_results_table.py        # renders it into benchmarks/RESULTS.md
    python benchmarks/bench_training.py --quick    # a smoke run (few rounds, not for quoting)

DiT-b0/b1 are upcycled from random HF PVTv2 of the same size (`dit_bench.build_dit_pair`), so their gates start on
PVTv2's route, as every upcycled fine-tuning does. Rows: HF PVTv2, DiT on its static route, DiT's dynamic route
computed as a dense grid (the paper's training, the default) and with `sparse_training=True` (only the stages some
token of the batch runs). A step's ratio to PVTv2's is the number the routing issue targets (<= 2x).

MSViT-S (`--families msvit`) is upcycled from a random HF ViT-S/16 with its gate set to tokenize each region fine with
probability 0.5 (target 0.5): rows HF ViT-S, MSViT in `masked_attention` mode (both tokenizations, the gate-only
phase's), `straight_through` (the selected tokens only) and `straight_through` with the gates frozen (the example's
joint phase with `--joint_gate_learning_rate 0`). Batch 32 at 96 px and 16 at 224 px by default.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_speed import build_msvit_pair, machine_description, write_results
from dit_bench import build_dit_pair


RESULTS = Path(__file__).parent / "results"
MODES = {"dit_static": {"routing_mode": "static"}, "dit_dense_grid": {}, "dit_sparse_training": {}}


def training_models(variant, image_size):
    """`{row name: model}` in train mode; every DiT copy starts from the same upcycled weights."""
    pvt, dit = build_dit_pair(variant, image_size=image_size, gate_noise_scale=0.0)
    models = {"pvt_v2": pvt}
    for name, overrides in MODES.items():
        copy = type(dit)(dit.config.__class__(**{**dit.config.to_dict(), **overrides}))
        copy.load_state_dict(dit.state_dict())
        copy.config.sparse_training = name == "dit_sparse_training"
        models[name] = copy
    return {name: model.train() for name, model in models.items()}


MSVIT_MODES = {
    "msvit_masked_attention": ("masked_attention", True),
    "msvit_straight_through": ("straight_through", True),
    "msvit_straight_through_frozen_gates": ("straight_through", False),
}


def msvit_training_models(image_size):
    """`{row name: model}` in train mode: HF ViT-S and MSViT-S copies whose gate samples half the regions fine."""
    vit, msvit = build_msvit_pair(image_size=image_size, gbas_target_ratio=0.5, gate_noise_scale=1.0)
    with torch.no_grad():
        msvit.msvit.embeddings.gate.layers[-1].weight.zero_()  # logit = bias = logit(0.5): each region fine w.p. 0.5
    models = {"vit": vit}
    for name, (mode, gates_train) in MSVIT_MODES.items():
        copy = type(msvit)(msvit.config.__class__(**{**msvit.config.to_dict(), "gate_training_mode": mode}))
        copy.load_state_dict(msvit.state_dict())
        for parameter in copy.msvit.embeddings.gate.parameters():
            parameter.requires_grad_(gates_train)
        models[name] = copy
    return {name: model.train() for name, model in models.items()}


def make_step(model, pixel_values, labels):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()

    return step


def time_group(variant, image_size, batch_size, rounds, threads) -> list[dict]:
    """Interleaved step timing of one group; `variant` "vit_s" is the MSViT group (baseline HF ViT-S), else a PVTv2
    variant (baseline HF PVTv2)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch_size,))
    models = msvit_training_models(image_size) if variant == "vit_s" else training_models(variant, image_size)
    baseline_name = "vit" if variant == "vit_s" else "pvt_v2"
    steps = {name: make_step(model, pixel_values, labels) for name, model in models.items()}
    for step in steps.values():  # warm-up (allocations, AdamW state)
        step()
    times = {name: [] for name in steps}
    for round_index in range(rounds):
        names = list(steps)[round_index % len(steps) :] + list(steps)[: round_index % len(steps)]
        for name in names:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times[baseline_name])
    rows = []
    for name, values in times.items():
        step_s = statistics.median(values)
        row = {"variant": variant, "image_size": image_size, "batch_size": batch_size, "model": name}
        row.update(step_s=step_s, rounds=len(values), baseline=baseline_name, step_ratio_vs_baseline=step_s / baseline)
        if baseline_name == "pvt_v2":
            row["step_ratio_vs_pvt_v2"] = step_s / baseline
        rows.append(row)
        print(f"    {variant} {image_size}px batch {batch_size} {name}: {step_s:.3f} s/step", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["dit"], choices=["dit", "msvit"])
    parser.add_argument("--variants", nargs="+", default=["b0", "b1"])
    parser.add_argument("--msvit-groups", nargs="+", default=["96:32", "224:16"], help="image_size:batch_size")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    rows = []
    for variant in args.variants if "dit" in args.families else []:
        rows += time_group(variant, args.image_size, args.batch_size, rounds, args.threads)
    for group in args.msvit_groups if "msvit" in args.families else []:
        image_size, batch_size = (int(value) for value in group.split(":"))
        rows += time_group("vit_s", image_size, batch_size, rounds, args.threads)
    payload = {"machine": machine_description(torch.device("cpu")), "quick": args.quick, "threads": args.threads}
    payload["rows"] = rows
    name = "training_cpu.json" if args.families == ["dit"] else f"training_{'_'.join(args.families)}_cpu.json"
    write_results(Path(args.output) if args.output else RESULTS / name, payload)


if __name__ == "__main__":
    main()
