"""Run by test_ddp_cpu.py under `torchrun --nproc_per_node 2`: the unchanged example script, instrumented from outside.

Records, per rank, which samples each phase's training batches held and a hash of the final weights, in <report_dir>/rank<N>.json.
Usage: ddp_worker.py REPORT_DIR [script arguments...]
"""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch


SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run_image_classification.py"


def main():
    report_dir, argv = sys.argv[1], sys.argv[2:]
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)

    seen = {}
    current = {"phase": None}
    models = []
    original_collate, original_run_phase = script.collate_fn, script.run_phase

    def recording_collate(examples):
        seen.setdefault(current["phase"], []).extend(int(e["source_index"]) for e in examples)
        return original_collate(examples)

    def recording_run_phase(name, model, *args, **kwargs):
        current["phase"] = name
        models.append(model)
        return original_run_phase(name, model, *args, **kwargs)

    class RecordingTrainer(script.DynamicComputeTrainer):
        def get_train_dataloader(self):  # record training batches only (evaluation batches are padded per rank)
            self.data_collator = recording_collate
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = original_collate

    script.DynamicComputeTrainer = RecordingTrainer
    script.run_phase = recording_run_phase
    metrics = script.main(argv)

    model = models[-1]
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "seen": seen,
        "weights_sha256": digest.hexdigest(),
        "gbas_gather_across_processes": getattr(model.config, "gbas_gather_across_processes", None),
        "eval_accuracy": metrics.get("eval_accuracy"),
    }
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
