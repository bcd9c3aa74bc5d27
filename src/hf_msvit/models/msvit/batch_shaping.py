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
"""Generalized batch-shaping (GBaS) loss, written from the formulas of BaS (Bejnordi et al., ICLR 2020) and its
generalization in MSViT (Havtorn et al., 2023).

Batch-shaping is a Cramer-von Mises distance between the empirical CDF of a set of values and a prior CDF:

    L_BaS(x) = 1/N sum_i ( i/(N+1) - F(x_(i)) )^2,     x_(1) <= ... <= x_(N) the sorted values.

GBaS keeps one prior per position k (here: one per coarse region), each a Relaxed Bernoulli RB(mu_k, tau_k) whose mean
and temperature are learned, and ties the means together with a Gaussian hyperprior N(target, std) (itself matched by
batch-shaping over the K means). The temperatures are fixed, or learned with an optional L1 penalty that favours
peaky, nearly binary priors (as in the authors' GBaS notebook):

    L_GBaS = K * ( 1/K sum_k L_BaS(x[:, k]; RB(mu_k, tau_k)) + L_BaS(mu; N(target, std)) [+ lambda * mean_k |tau_k|] )

(the factor K makes the pull on each region's gate independent of the number of regions K).
"""

import math

import torch
from torch import nn


def relaxed_bernoulli_cdf(
    x: torch.Tensor, mean: torch.Tensor, temperature: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """CDF of the Relaxed Bernoulli (Binary Concrete) distribution: P(X <= x) = sigmoid(tau * logit(x) - logit(mu)).

    `mean` is P(X > 1/2), the mean of the Bernoulli it relaxes; as `temperature` goes to 0 the CDF tends to the
    Bernoulli's (1 - mu on (0, 1)). Values are clipped to [eps, 1 - eps] so the logits stay finite.
    """
    x = x.clamp(eps, 1.0 - eps)
    mean = mean.clamp(eps, 1.0 - eps)
    return torch.sigmoid(temperature * torch.logit(x) - torch.logit(mean))


def normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """CDF of N(mean, std^2)."""
    return 0.5 * (1.0 + torch.erf((x - mean) / (std * math.sqrt(2.0))))


def batch_shaping_loss(values: torch.Tensor, prior_cdf) -> torch.Tensor:
    """Batch-shaping loss of `values` of shape `(num_samples, num_positions)`, one distribution per column.

    `prior_cdf` maps the column-wise sorted values (same shape) to the prior CDF at those values; it may use a
    different prior per column by broadcasting over the last dimension. Returns the mean over positions of
    `1/N sum_i (i/(N+1) - F_k(x_(i),k))^2`. Gradients flow to `values` and to any parameter of `prior_cdf`.
    """
    if values.dim() != 2:
        raise ValueError(f"values must have shape (num_samples, num_positions), got {tuple(values.shape)}.")
    num_samples = values.shape[0]
    sorted_values, _ = values.sort(dim=0)
    empirical_cdf = torch.arange(1, num_samples + 1, device=values.device, dtype=values.dtype) / (num_samples + 1)
    return (empirical_cdf[:, None] - prior_cdf(sorted_values)).pow(2).mean()


class GeneralizedBatchShaping(nn.Module):
    """GBaS loss with learned per-position Relaxed-Bernoulli priors and a Gaussian hyperprior on their means.

    Args:
        num_positions: number of gated positions K (e.g. coarse regions per image).
        target_ratio: mean of the Gaussian hyperprior: the overall fraction of gates that should be on.
        hyperprior_std: its standard deviation: how far the per-position means may spread.
        temperature_l1_weight: weight of the L1 penalty on the learned temperatures (only when they are learned).
        prior_temperature: the priors' temperature (fixed), or its initial value when learned (then in (0, 1)).
        learn_temperature: learn one temperature per position (as the GBaS notebook does) instead of a fixed one.

    The learned parameters are logits: `mean = sigmoid(prior_mean_logits)`, `temperature =
    sigmoid(prior_temperature_logits)`. The owning model initializes them (means at the target).

    Whatever the temperature, a fraction `mu_k` of a Relaxed Bernoulli RB(mu_k, tau_k) lies above 1/2; the temperature
    sets how spread the values are (`logit(x)` is logistic with scale `1 / tau`). Lower temperatures ask the gate for
    more nearly binary values, which makes an inference threshold move the decisions less.
    """

    def __init__(
        self,
        num_positions: int,
        target_ratio: float,
        hyperprior_std: float,
        temperature_l1_weight: float,
        prior_temperature: float = 0.5,
        learn_temperature: bool = True,
    ):
        super().__init__()
        self.target_ratio = float(target_ratio)
        self.hyperprior_std = float(hyperprior_std)
        self.temperature_l1_weight = float(temperature_l1_weight)
        self.prior_temperature = float(prior_temperature)
        self.prior_mean_logits = nn.Parameter(torch.zeros(num_positions))
        self.prior_temperature_logits = nn.Parameter(torch.zeros(num_positions)) if learn_temperature else None

    @property
    def prior_means(self) -> torch.Tensor:
        return torch.sigmoid(self.prior_mean_logits)

    @property
    def prior_temperatures(self) -> torch.Tensor:
        if self.prior_temperature_logits is None:
            return torch.full_like(self.prior_mean_logits, self.prior_temperature)
        return torch.sigmoid(self.prior_temperature_logits)

    def forward(self, gate_values: torch.Tensor) -> torch.Tensor:
        """`gate_values`: gate outputs in [0, 1] of shape `(num_samples, num_positions)`."""
        if gate_values.dim() != 2 or gate_values.shape[1] != self.prior_mean_logits.shape[0]:
            raise ValueError(
                f"gate_values must have shape (num_samples, {self.prior_mean_logits.shape[0]}), "
                f"got {tuple(gate_values.shape)}."
            )
        gate_values = gate_values.float()
        means, temperatures = self.prior_means, self.prior_temperatures
        prior_term = batch_shaping_loss(gate_values, lambda v: relaxed_bernoulli_cdf(v, means, temperatures))
        hyperprior_term = batch_shaping_loss(
            means[:, None], lambda v: normal_cdf(v, self.target_ratio, self.hyperprior_std)
        )
        loss = prior_term + hyperprior_term
        if self.prior_temperature_logits is not None:
            loss = loss + self.temperature_l1_weight * temperatures.abs().mean()
        # Times the number of positions (the paper sums the prior term over positions; the notebook averages): the pull
        # on each region's gate then does not shrink with the number of regions, as the task loss's does not, and the
        # prior and hyperprior terms keep the notebook's balance.
        return gate_values.shape[1] * loss


def gather_across_processes(values: torch.Tensor) -> torch.Tensor:
    """Concatenates `values` of every process along dim 0, keeping the gradient of the local part.

    Used so that batch statistics (GBaS compares gate values across the batch) match single-process training. All
    processes must pass tensors of the same shape (Accelerate's default `even_batches=True` ensures it).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    if torch.distributed.get_world_size() == 1:
        return values
    try:  # functional collectives (autograd: the backward reduce-scatters the gradients); torch.distributed.nn's
        # `all_gather` is deprecated in recent torch releases
        from torch.distributed._functional_collectives import all_gather_single

        return all_gather_single(values.contiguous(), 0, torch.distributed.group.WORLD)
    except ImportError:  # older torch
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(values), dim=0)


__all__ = [
    "GeneralizedBatchShaping",
    "batch_shaping_loss",
    "gather_across_processes",
    "normal_cdf",
    "relaxed_bernoulli_cdf",
]
