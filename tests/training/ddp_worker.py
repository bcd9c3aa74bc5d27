"""Run by test_ddp_cpu.py under torchrun / accelerate launch: the unchanged example script, instrumented from outside.

Records, per rank, which samples each phase's training batches held, and the final weights, in `<report_dir>`:
`rank<N>.json` and `rank<N>.safetensors`. Usage: ddp_worker.py REPORT_DIR [script arguments...]
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_msvit.phases import PhaseRunner

from example_script import load_script


def main():
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    script = load_script()
    seen, models = {}, []
    current = {"phase": None}
    original_collate, original_run = script.collate_fn, PhaseRunner.run

    def recording_collate(examples):
        seen.setdefault(current["phase"], []).extend(int(e["source_index"]) for e in examples)
        return original_collate(examples)

    def recording_run(self, name, model, *args, **kwargs):
        current["phase"] = name
        models.append(model)
        return original_run(self, name, model, *args, **kwargs)

    class RecordingTrainer(script.DynamicComputeTrainer):
        def get_train_dataloader(self):  # record training batches only (evaluation batches are padded per rank)
            self.data_collator = recording_collate
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = original_collate

    script.DynamicComputeTrainer = RecordingTrainer
    PhaseRunner.run = recording_run
    metrics = script.main(argv)

    model = models[-1]
    rank = int(os.environ.get("RANK", "0"))
    distributed = torch.distributed.is_initialized()
    report = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "backend": torch.distributed.get_backend() if distributed else None,
        "seen": seen,
        "gbas_gather_across_processes": getattr(model.config, "gbas_gather_across_processes", None),
        "eval_accuracy": metrics.get("eval_accuracy"),
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, report_dir / f"rank{rank}.safetensors")
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
