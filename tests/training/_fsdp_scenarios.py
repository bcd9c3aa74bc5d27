"""Models, data and the training loop shared by fsdp_worker.py (2 processes, FSDP2) and test_fsdp_cpu.py (the
single-process reference on the global batch). Not a test module.

Each step's global batch is split between the ranks, rank 0 first (the order in which GBaS gathers gate values), and
the ranks' images differ on purpose: rank 0 sees low-contrast images, rank 1 high-contrast ones in training, so their
routes and token counts differ; for evaluation rank 0 gets one image repeated (one route, one MSViT length bucket) and
rank 1 different images (several routes and buckets).
"""

import contextlib
from unittest import mock

import torch

from hf_msvit import DiTConfig, DiTForImageClassification, MSViTConfig, MSViTForImageClassification


WORLD_SIZE = 2
PER_RANK_BATCH = 4
NUM_STEPS = 4
RESUME_STEP = 2  # the sharded checkpoint is written before this step
LEARNING_RATE = 0.05
KINDS = ("msvit", "dit_routing")
IMAGE_SIZE = {"msvit": 32, "dit_routing": 64}
NUM_LABELS = 5


# Larger random weights than the default 0.02 put the gate logits far from their decision thresholds (at 0.02 a tiny
# MSViT gate's logits lie within 1e-4 of 0), so that rounding differences between one and two processes cannot flip a
# decision.
INITIALIZER_RANGE = 0.2


def build_model(kind: str, seed: int = 0):
    """A tiny MSViT (GBaS gathered across processes) or DiT (dynamic routing), in training mode."""
    torch.manual_seed(seed)
    if kind == "msvit":
        config = MSViTConfig(
            image_size=32,
            patch_size=8,
            coarse_patch_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            gate_hidden_size=16,
            num_labels=NUM_LABELS,
            gbas_gather_across_processes=True,
            gbas_loss_weight=1.0,  # a gentle pull: the tiny gates keep routing the two ranks' images differently
            # One encoder group in training (each layer called once per forward); evaluation switches to "bucket".
            token_batching="pad",
            bucket_overhead_tokens=0,  # one bucket per distinct length in evaluation
            initializer_range=INITIALIZER_RANGE,
        )
        return MSViTForImageClassification(config).train()
    config = DiTConfig(
        image_size=64,
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 2, 3, 4],
        depths=[1, 2, 1, 1],
        sr_ratios=[4, 2, 1, 1],
        mlp_ratios=[2, 2, 2, 2],
        num_labels=NUM_LABELS,
        routing_mode="dynamic",
        gate_init_compute_prob=0.5,  # a random model already skips stages and edges, differently per image
        # The budget loss is a per-process batch mean (a square of a mean): under data parallelism it is not the
        # loss of the global batch, so the equivalence with one process is shown on the task loss.
        budget_loss_weight=0.0,
        initializer_range=INITIALIZER_RANGE,
    )
    return DiTForImageClassification(config).train()


@contextlib.contextmanager
def evaluation_mode(model):
    """Evaluation mode with MSViT's default length buckets (layer calls then differ per rank), training mode after."""
    training_batching = getattr(model.config, "token_batching", None)
    if training_batching is not None:
        model.config.token_batching = "bucket"
    model.eval()
    try:
        yield model
    finally:
        if training_batching is not None:
            model.config.token_batching = training_batching
        model.train()


def train_batch(kind: str, step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global training batch of `step` (`rank=None`) or one rank's part of it."""
    generator = torch.Generator().manual_seed(1000 * step + KINDS.index(kind))
    size = IMAGE_SIZE[kind]
    num_images = WORLD_SIZE * PER_RANK_BATCH
    contrast = torch.linspace(0.2, 4.0, num_images)[:, None, None, None]
    pixel_values = torch.randn(num_images, 3, size, size, generator=generator) * contrast
    labels = torch.randint(0, NUM_LABELS, (num_images,), generator=generator)
    return _rank_part(pixel_values, rank), _rank_part(labels, rank)


def eval_batch(kind: str, rank: int) -> torch.Tensor:
    """Rank 0: one image four times; rank 1: four different images."""
    generator = torch.Generator().manual_seed(7 + rank)
    size = IMAGE_SIZE[kind]
    if rank == 0:
        return torch.randn(1, 3, size, size, generator=generator).expand(PER_RANK_BATCH, -1, -1, -1).contiguous()
    contrast = torch.tensor([0.2, 1.0, 3.0, 8.0])[:, None, None, None]
    return torch.randn(PER_RANK_BATCH, 3, size, size, generator=generator) * contrast


def _rank_part(tensor: torch.Tensor, rank: int | None) -> torch.Tensor:
    return tensor if rank is None else tensor[rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH]


def _noise_free_gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    soft = (logits / tau).softmax(dim)
    if not hard:
        return soft
    hard_values = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard_values - soft.detach() + soft


@contextlib.contextmanager
def noise_free_gates():
    """Training-time gate noise set to zero: MSViT's logistic noise (from `torch.rand_like`) and DiT's Gumbel samples
    (in `gumbel_softmax`). A run that splits the batch over two processes then samples the same decisions as one
    process on the global batch. `test_noise_free_gates_make_training_deterministic` checks that this still holds."""
    with (
        mock.patch("torch.rand_like", lambda tensor, **kwargs: torch.full_like(tensor, 0.5, **kwargs)),
        mock.patch("torch.nn.functional.gumbel_softmax", _noise_free_gumbel_softmax),
    ):
        yield


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)


def train_step(model, optimizer, pixel_values, labels) -> dict:
    """One optimizer step without gate noise; returns the step's losses and the MACs its images cost."""
    with noise_free_gates():
        outputs = model(pixel_values=pixel_values, labels=labels)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    gate_loss = getattr(outputs, "gate_loss", None)
    return {
        "loss": outputs.loss.item(),
        "gate_loss": None if gate_loss is None else gate_loss.item(),
        "macs": outputs.macs.sum().item(),
    }
