# Copyright 2026 The hf_msvit Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Fully sharded data parallel training (PyTorch FSDP2, `fully_shard`) of MSViT and DiT.

- `shard_model`: `fully_shard` on every layer named by the model's `_no_split_modules`, then on the root (what
  Accelerate's FSDP2 `TRANSFORMER_BASED_WRAP` does with those classes).
- `full_parameters`: a context for forward passes without backward (evaluation, prediction) whose routing may differ
  between processes. FSDP2 all-gathers a layer's parameters each time the layer is called, so every process must call
  the same layers the same number of times; dynamic routing at inference breaks that (DiT skips what no image of the
  local batch reaches, MSViT runs each layer once per length bucket). Inside the context every sharded module is
  gathered once up front, nothing is gathered or freed during the forward passes, and all is resharded at exit.
- `save_full_pretrained`: gathers the full state dict and writes a `from_pretrained` folder on rank 0.

Training needs no guard: a training forward calls every sharded layer exactly once on every process (DiT runs its
whole grid densely and multiplies by the gate values; MSViT runs its encoder on one padded batch). See
docs/distributed.md for launch commands and what was tested.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard


def sharded_layer_classes(model: nn.Module) -> set[str]:
    """Class names that `shard_model` wraps one by one: the model's `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} defines no `_no_split_modules`, so there is no layer class to shard by; call "
            "`torch.distributed.fsdp.fully_shard` on the layers you choose, then on the model."
        )
    return names


def shard_model(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Shards `model` in place with FSDP2: `fully_shard` on every module whose class is in `_no_split_modules`
    (innermost first), then on the root, which takes every remaining parameter (gates, norms, heads).

    `fully_shard_kwargs` go to every `fully_shard` call (`mesh`, `reshard_after_forward`, `mp_policy`,
    `offload_policy`). Needs an initialized process group. Returns `model`, whose parameters are now DTensors.
    """
    if not dist.is_initialized():
        raise ValueError(
            "shard_model needs an initialized process group: launch with torchrun and call "
            "torch.distributed.init_process_group() first."
        )
    names = sharded_layer_classes(model)
    layers = [module for module in model.modules() if module is not model and type(module).__name__ in names]
    if not layers:
        raise ValueError(f"None of {sorted(names)} occurs in {type(model).__name__}; nothing to shard by layer.")
    for layer in reversed(layers):  # an inner layer must be sharded before a layer that contains it
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The FSDP2-sharded modules of `model` (the root first, when `model` itself is sharded)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: nn.Module, reshard_after_forward: bool = True):
    """Runs its body with every FSDP2 parameter of `model` gathered and without gradients, so that forward passes
    issue no collective at all and may route differently on each process (evaluation of dynamic models).

    Every process must enter and leave the context together (it gathers each sharded module once, in the same order
    on all processes). Memory: the full parameters, as DDP holds them. On exit the parameters are resharded and the
    sharded layers get `reshard_after_forward` back (the value given to `fully_shard`; the root keeps its parameters
    after forward, FSDP2's own choice for it). Not for backward passes: use it between optimizer steps. A model that is
    not sharded runs unchanged (under `torch.no_grad()`).
    """
    modules = fsdp_modules(model)
    root = model if isinstance(model, FSDPModule) else None
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        for module in modules:
            module.unshard()
        with torch.no_grad():
            yield model
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward and module is not root, recurse=False)
        if root is not None and hasattr(root, "reset_iter_state"):  # in recent torch releases
            # Forget the module order these passes recorded: FSDP2 prefetches the next backward's all-gathers by the
            # order of the last forwards, which must be the training forward's.
            root.reset_iter_state()


def save_full_pretrained(model: nn.Module, save_directory: str | os.PathLike, **save_pretrained_kwargs) -> None:
    """Writes an FSDP2-sharded model as an ordinary `from_pretrained` folder.

    Call on every process: the full state dict is gathered to the CPU of rank 0 (`get_model_state_dict` with
    `full_state_dict=True, cpu_offload=True`), rank 0 saves it with `save_pretrained`, and all processes wait for it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)
    if dist.get_rank() == 0:
        # Saved through an empty instance of the model's own class: the sharded model's class is one FSDP2 derived
        # from it, and `save_pretrained` would copy that class's source file (torch's) as the remote code.
        with torch.device("meta"):
            unsharded = unsharded_class(model)(model.config)
        unsharded.save_pretrained(save_directory, state_dict=state_dict, **save_pretrained_kwargs)
    dist.barrier()


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The class `model` had before `fully_shard` (which swaps in a subclass of it and `FSDPModule`)."""
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


__all__ = [
    "fsdp_modules",
    "full_parameters",
    "save_full_pretrained",
    "shard_model",
    "sharded_layer_classes",
    "unsharded_class",
]
