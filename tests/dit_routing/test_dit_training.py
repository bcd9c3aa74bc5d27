"""DiT training: budget loss and its cost, gate sampling and EMA, inference threshold, bfloat16, DDP safety, gradient
checkpointing."""

import itertools
import math
import os
import tempfile

import pytest
import torch
from _dit_tiny import build, pixels, tiny_config

from hf_msvit import DiTForImageClassification
from hf_msvit.models.dit_routing.layers import DiTBlockLayer
from hf_msvit.models.dit_routing.routing import RouteLedger, dit_route_macs, scale_sizes


def test_budget_loss_is_folded_into_loss_and_reaches_every_gate():
    """With `budget_decisions="sampled"` (the paper) the budget prices the Gumbel samples the forward took."""
    model = build(budget_loss_weight=0.5, budget_target=0.3, budget_decisions="sampled")
    model.train()
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(1)
    out = model(pixels(3), labels=labels)
    cross_entropy = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, cross_entropy + 0.5 * out.budget_loss)
    static_cost = dit_route_macs(model.config, 64, 64, "static")
    backbone_macs = out.macs - model.classifier.weight.numel()  # the budget is about the routed grid
    torch.testing.assert_close(out.budget_loss, (backbone_macs.mean() / static_cost - 0.3) ** 2)

    out.budget_loss.backward()
    row_grads = [gate.weight.grad for row in model.dit.row_gates for gate in row]
    column_grads = [gate.weight.grad for row in model.dit.column_gates for gate in row]
    assert all(g is not None for g in row_grads + column_grads)
    assert sum(g.abs().sum() for g in row_grads) > 0
    assert sum(g.abs().sum() for g in column_grads) > 0


def test_dynamic_training_puts_every_parameter_in_the_graph():
    """DDP with find_unused_parameters=False works in dynamic mode: every parameter gets a gradient every step."""
    model = build()
    model.train()
    out = model(pixels(2), labels=torch.tensor([0, 1]))
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_static_training_leaves_off_route_parameters_unused():
    """The DDP-unsafe situation the docs warn about: static (and full) routing never runs the gates (static also skips
    off-route stages), so DDP needs `find_unused_parameters=True` (Trainer's default unless gradient checkpointing)."""
    model = build(routing_mode="static")
    model.train()
    model(pixels(2), labels=torch.tensor([0, 1])).loss.backward()
    unused = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is None}
    assert unused == {"grid", "patch_embeddings", "row_gates", "column_gates"}, unused


def test_training_samples_gates_and_updates_ema_while_eval_is_deterministic():
    model = build()
    gate = model.dit.row_gates[0][0]
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with torch.no_grad():
        first, second = model(pixels(2)), model(pixels(2))
    torch.testing.assert_close(first.logits, second.logits, atol=0, rtol=0)
    assert all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers()), "eval mutated buffers"

    model.train()
    torch.manual_seed(0)
    model(pixels(2))
    assert gate.ema_steps.item() == 1
    torch.testing.assert_close(gate.inference_weights()[0], gate.weight.detach())  # bias-corrected first step
    torch.manual_seed(0)
    decisions = [model(pixels(2)).stage_keep_ratio for _ in range(3)]
    assert not all(torch.equal(decisions[0], d) for d in decisions[1:]), "Gumbel sampling should vary decisions"


def test_ema_weights_are_saved_and_used_at_inference(tmp_path):
    model = build()
    model.train()
    for _ in range(3):
        out = model(pixels(2), labels=torch.tensor([0, 1]))
        out.loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    p.grad = None
    model.eval()
    gate = model.dit.row_gates[1][2]
    assert not torch.allclose(gate.inference_weights()[0], gate.weight)  # EMA lags the trained weights
    with torch.no_grad():
        expected = model(pixels(2))
    model.save_pretrained(tmp_path)
    loaded = DiTForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.dit.row_gates[1][2].ema_steps.item() == 3
    with torch.no_grad():
        actual = loaded(pixels(2))
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.macs, expected.macs)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build(seed=3)
    model.train()
    batch, labels = pixels(2), torch.tensor([0, 1])
    torch.manual_seed(0)
    model(batch, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model(batch, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sparse_training", [False, True])
def test_ddp_training_step_in_dynamic_mode(sparse_training):
    """Two gloo processes, dynamic routing, each with its own images: two steps run (no reduction error, no hang). The
    dense grid needs no `find_unused_parameters`; sparse training, whose stage choice is reduced over the processes,
    runs with it."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork: the workers inherit the imported modules (spawn would re-import torch and transformers, ~10 s)
        mp.start_processes(
            _ddp_worker,
            args=(2, os.path.join(tmp, "rendezvous"), sparse_training),
            nprocs=2,
            join=True,
            start_method="fork",
        )


def _ddp_worker(rank, world_size, init_file, sparse_training=False):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = build(seed=0, sparse_training=sparse_training, gate_noise_scale=0.0)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=sparse_training)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(2):
            torch.manual_seed(10 * rank + step)
            out = ddp(pixels(2, seed=rank + step), labels=torch.tensor([0, 1]))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if not math.isfinite(out.loss.item()):
            raise RuntimeError("non-finite loss")
    finally:
        dist.destroy_process_group()


def test_bfloat16_model_counts_macs_in_float32():
    model = build(routing_mode="static").to(torch.bfloat16)
    with torch.no_grad():
        out = model(pixels(2).to(torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and out.macs.dtype == torch.float32
    assert out.macs[0].item() == dit_route_macs(model.config, 64, 64, "static") + model.classifier.weight.numel()
    model = build().to(torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(pixels(2).to(torch.bfloat16)).logits).all()
    model.train()
    out = model(pixels(2).to(torch.bfloat16), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert out.macs.dtype == torch.float32 and torch.isfinite(out.loss)


def _bias_only_gates(model, seed=0):
    """Zero gate weights and random biases: decisions that do not depend on the features (the same route in training
    and at inference, whatever the tokens computed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.dit._gates():
            gate.weight.zero_()
            gate.bias.copy_(torch.randn(2, generator=generator) * 2)


def test_deterministic_budget_prices_what_inference_computes():
    """`budget_decisions="deterministic"` (default): in training the budget prices the decisions inference takes; the
    paper's "sampled" prices the Gumbel samples of the training forward, which differ."""
    model = build(budget_target=0.5)
    _bias_only_gates(model)
    with torch.no_grad():
        eval_out = model(pixels(3))
    static = dit_route_macs(model.config, 64, 64, "static")
    head = model.classifier.weight.numel()
    expected = ((eval_out.macs - head).mean() / static - 0.5) ** 2
    model.train()
    torch.manual_seed(0)
    deterministic = model(pixels(3))
    torch.testing.assert_close(deterministic.budget_loss, expected)
    assert not torch.allclose(deterministic.macs, eval_out.macs)  # the forward itself sampled another route
    model.config.budget_decisions = "sampled"
    torch.manual_seed(0)
    sampled = model(pixels(3))
    torch.testing.assert_close(sampled.budget_loss, ((sampled.macs - head).mean() / static - 0.5) ** 2)
    assert not torch.allclose(sampled.budget_loss, expected)


def test_stage_cost_is_exact_forward_and_learns_whole_stages_off():
    """Eq. 5 with a gradient for the per-image part: its value is the exact indicator "any token computed", its
    gradient that of the fraction of tokens computed, so pushing a stage's tokens down can turn the whole stage off."""
    config = tiny_config()
    sizes = scale_sizes(config, 64, 64)
    height, width = sizes[0]
    per_image, per_token = DiTBlockLayer.macs(config, 0, height, width)
    for kept in (height * width, 3, 0):
        decisions = torch.zeros(1, height * width)
        decisions[0, :kept] = 1
        decisions.requires_grad_(True)
        ledger = RouteLedger(config, sizes, torch.zeros(1))
        ledger.record_reach(0, 0)
        ledger.record_stage(0, 0, decisions)
        expected = config.depths[0] * ((kept > 0) * per_image + kept * per_token)
        assert ledger.macs.item() == expected
        ledger.macs.sum().backward()
        gradient = config.depths[0] * (per_token + per_image / (height * width))
        torch.testing.assert_close(decisions.grad, torch.full_like(decisions, gradient))


def test_gate_threshold_moves_inference_cost_monotonically():
    model = build()
    with torch.no_grad():
        for gate in model.dit.column_gates.modules():  # a fixed scale route, so only the row gates move the cost
            if hasattr(gate, "on_static_route"):
                gate.weight.zero_()
        costs = [model(pixels(4), gate_threshold=t).macs.mean().item() for t in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)]
        default = model(pixels(4)).macs.mean().item()
        model.config.gate_threshold = 0.8
        from_config = model(pixels(4)).macs.mean().item()
    assert all(a >= b for a, b in itertools.pairwise(costs)), costs
    assert costs[0] > 1.3 * costs[3] > 1.3 * 1.3 * costs[-1], costs  # the threshold moves the cost a lot
    assert default == costs[3] and from_config == costs[5]
    with pytest.raises(ValueError, match="gate_threshold"):
        model(pixels(1), gate_threshold=1.5)


def test_ema_warm_up_follows_the_trained_gates():
    """Update t uses momentum min(m, t / (t + warmup)): the first copies the weights; a short run's EMA stays close to
    the trained weights instead of lagging at the initialization."""
    model = build(gate_ema_momentum=0.999, gate_ema_warmup_steps=10)
    gate = model.dit.row_gates[0][0]
    start = gate.weight.detach().clone()
    model.train()
    for step in range(30):
        with torch.no_grad():
            gate.weight.copy_(start + (step + 1) * 0.01)  # a gate moving steadily
        model(pixels(1))
    assert gate.ema_steps.item() == 30
    lag = (gate.weight - gate.ema_weight).abs().max().item()
    assert lag < 0.15 * (gate.weight - start).abs().max().item()  # 0.999 without warm-up would still sit near `start`
    assert gate.ema_weight.dtype == torch.float32


def test_pure_bfloat16_training_keeps_a_float32_ema_that_moves():
    model = build().to(torch.bfloat16)
    gate = model.dit.row_gates[1][1]
    assert gate.ema_weight.dtype == gate.ema_bias.dtype == torch.float32 and gate.weight.dtype == torch.bfloat16
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    snapshots = []
    for step in range(12):
        torch.manual_seed(step)
        out = model(pixels(2).to(torch.bfloat16), labels=torch.tensor([0, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append(gate.ema_weight.clone())
    assert torch.isfinite(out.loss) and all(torch.isfinite(s).all() for s in snapshots)
    assert not torch.equal(snapshots[-2], snapshots[-1])  # still moving at step 12 (0.999 would round to 1 in bf16)
    model.eval()
    with torch.no_grad():
        weight, _ = gate.inference_weights()
        assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
        assert torch.isfinite(model(pixels(2).to(torch.bfloat16)).logits).all()


def test_noise_free_training_takes_the_inference_route():
    """`gate_noise_scale=0`: training decides as inference does (p >= 0.5), whatever the random state; gradients still
    reach the gates (straight-through)."""
    model = build(gate_noise_scale=0.0)
    with torch.no_grad():
        inference = model(pixels(2))  # no EMA update yet: the trained weights decide
    model.train()
    routes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = model(pixels(2), labels=torch.tensor([0, 1]))
        routes.append((out.stage_keep_ratio, out.downsampled, out.macs))
    for keep, downsampled, macs in routes:
        torch.testing.assert_close(keep, inference.stage_keep_ratio)
        torch.testing.assert_close(downsampled, inference.downsampled)
        torch.testing.assert_close(macs, inference.macs)
    out.loss.backward()
    assert sum(gate.weight.grad.abs().sum() for gate in model.dit._gates()) > 0


def _stage_calls(model):
    """Counts the training forwards of every grid stage (a list the hooks append to)."""
    calls = []
    for row in model.dit.grid:
        for stage in row:
            stage.register_forward_hook(lambda module, args, output: calls.append(module))
    return calls


@pytest.mark.parametrize("gate_init", ["static_route", "all_open"])
def test_sparse_training_computes_only_what_the_batch_reaches_with_the_same_forward(gate_init):
    """`sparse_training=True` skips the stages no token runs and the nodes no image reaches: the same loss and
    outputs as the dense grid with fewer stage forwards. Upcycled (zero gate weights, so no gradient flows from a gate
    back into the features) the stages that ran get the dense grid's gradients exactly; with trained gates the skipped
    stages' straight-through terms are what sparse training gives up."""
    results = {}
    for sparse in (False, True):
        prob = 0.9 if gate_init == "static_route" else 0.5  # 0.5: random gates run part of the off-route stages
        model = build(
            gate_noise_scale=0.0, gate_init=gate_init, gate_init_compute_prob=prob, sparse_training=sparse
        ).train()
        calls = _stage_calls(model)
        out = model(pixels(3), labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[sparse] = (out, len(calls), grads)
    (dense, dense_calls, dense_grads), (sparse, sparse_calls, sparse_grads) = results[False], results[True]
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse.macs, dense.macs)
    assert sparse_calls < dense_calls == 16
    if gate_init == "static_route":
        assert sparse_calls == 4, "an upcycled model starts on PVTv2's route: its four stages"
    stage_grads = [name for name in sparse_grads if ".grid." in name]
    assert stage_grads, "the stages that ran are trained"
    for name in stage_grads if gate_init == "static_route" else []:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], atol=1e-5, rtol=1e-4)
    gate_grads = [name for name in sparse_grads if "_gates." in name and sparse_grads[name].abs().sum() > 0]
    assert gate_grads, "the gates still learn (budget loss, and the task through the stages that ran)"
