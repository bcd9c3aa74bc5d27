"""Run by test_fsdp_cpu.py under `torchrun --nproc_per_node 2` (gloo, CPU): trains MSViT and DiT sharded with FSDP2
(`hf_msvit.distributed.shard_model`) on different data per rank and records, per rank, in OUT_DIR/rank<N>.json:
losses per step, how often each sharded module ran, guarded evaluations, a resumed run and a bf16 run. Rank 0 also
writes each model with `save_full_pretrained` to OUT_DIR/<kind>/. The test compares all of it with one process.

Usage: fsdp_worker.py OUT_DIR
"""

import datetime
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _fsdp_scenarios import (
    KINDS,
    NUM_STEPS,
    RESUME_STEP,
    build_model,
    eval_batch,
    evaluation_mode,
    make_optimizer,
    train_batch,
    train_step,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from hf_msvit.distributed import fsdp_modules, full_parameters, save_full_pretrained, shard_model


# Our models return views (e.g. reshaped gate probabilities); nothing modifies them in place, so the warning is noise.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


class CallCounter:
    """Counts, per phase, how often each FSDP-sharded module's forward ran (each call all-gathers its parameters)."""

    def __init__(self, model):
        self.names = {
            module: name or "<root>" for name, module in model.named_modules() if isinstance(module, FSDPModule)
        }
        self.counts: dict[str, Counter] = {}
        self.current = None
        for module in self.names:
            module.register_forward_pre_hook(self._count)

    def start(self, phase: str) -> None:
        self.current = self.counts.setdefault(phase, Counter(dict.fromkeys(self.names.values(), 0)))

    def _count(self, module, args):
        self.current[self.names[module]] += 1


def sharding_report(model) -> dict:
    parameters = list(model.parameters())
    return {
        "root_sharded": isinstance(model, FSDPModule),
        "all_dtensor": all(isinstance(p, DTensor) for p in parameters),
        "sharded_classes": sorted({type(m).__name__.removeprefix("FSDP") for m in fsdp_modules(model)[1:]}),
        "local_numel": sum(p.to_local().numel() for p in parameters),
        "numel": sum(p.numel() for p in parameters),
    }


def evaluate(model, kind: str, rank: int) -> dict:
    with evaluation_mode(model), full_parameters(model):
        outputs = model(pixel_values=eval_batch(kind, rank))
    return {"logits": outputs.logits.tolist(), "macs": outputs.macs.tolist()}


def save_checkpoint(model, optimizer, path: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def load_checkpoint(model, optimizer, path: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def train_and_evaluate(kind: str, rank: int, out_dir: Path) -> dict:
    """The main run: NUM_STEPS steps, a sharded checkpoint and a guarded evaluation before RESUME_STEP, a final
    guarded evaluation, then the full model written for `from_pretrained`."""
    model = shard_model(build_model(kind))
    calls = CallCounter(model)
    optimizer = make_optimizer(model)
    report = {"sharding": sharding_report(model), "steps": []}
    for step in range(NUM_STEPS):
        if step == RESUME_STEP:
            save_checkpoint(model, optimizer, out_dir / f"{kind}-checkpoint")
            calls.start("eval_mid")
            report["eval_mid"] = evaluate(model, kind, rank)
        calls.start(f"train_step{step}")
        report["steps"].append(train_step(model, optimizer, *train_batch(kind, step, rank)))
    calls.start("eval")
    report["eval"] = evaluate(model, kind, rank)
    report["calls"] = calls.counts
    save_full_pretrained(model, out_dir / kind)
    return report


def resume(kind: str, rank: int, out_dir: Path) -> list[dict]:
    """A fresh model (other init) and optimizer loaded from the sharded checkpoint, trained to the end."""
    model = shard_model(build_model(kind, seed=1))
    optimizer = make_optimizer(model)
    load_checkpoint(model, optimizer, out_dir / f"{kind}-checkpoint")
    return [train_step(model, optimizer, *train_batch(kind, step, rank)) for step in range(RESUME_STEP, NUM_STEPS)]


def bf16_run(kind: str, rank: int) -> dict:
    """Mixed precision (bf16 parameters in compute, fp32 gradient reduction): a guarded evaluation, then one step."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_model(build_model(kind), mp_policy=policy)
    try:
        evaluation = evaluate(model, kind, rank)
        step = train_step(model, make_optimizer(model), *train_batch(kind, 0, rank))
    except (RuntimeError, TypeError, ValueError) as error:  # reported to the test, which says what failed
        return {"error": f"{type(error).__name__}: {error}"}
    return {"eval": evaluation, "step": step}


def main():
    out_dir = Path(sys.argv[1])
    # A collective that one rank never joins fails after this timeout instead of hanging the test.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    report = {"rank": rank, "world_size": dist.get_world_size(), "backend": dist.get_backend()}
    for kind in KINDS:
        report[kind] = train_and_evaluate(kind, rank, out_dir)
        report[kind]["resumed_steps"] = resume(kind, rank, out_dir)
    for kind in KINDS:  # last: a failure here leaves no collective half done for the runs above
        report[kind]["bf16"] = bf16_run(kind, rank)
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
