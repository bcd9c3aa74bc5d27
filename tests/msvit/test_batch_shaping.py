"""Behaviour of the generalized batch-shaping (GBaS) loss."""

import math

import pytest
import torch

from hf_msvit.models.msvit.batch_shaping import (
    GeneralizedBatchShaping,
    batch_shaping_loss,
    normal_cdf,
    relaxed_bernoulli_cdf,
)


def sample_relaxed_bernoulli(mean, temperature, shape, generator):
    """Binary Concrete samples: sigmoid((logit(mean) + logistic noise) / temperature)."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((math.log(mean / (1 - mean)) + torch.log(u) - torch.log1p(-u)) / temperature)


def test_relaxed_bernoulli_cdf_is_a_cdf_with_the_right_mass():
    x = torch.linspace(0.01, 0.99, 50)
    for mean, temperature in [(0.2, 0.5), (0.7, 0.1), (0.5, 1.0)]:
        cdf = relaxed_bernoulli_cdf(x, torch.tensor(mean), torch.tensor(temperature))
        assert torch.all(cdf[1:] >= cdf[:-1])
        # P(X <= 1/2) = 1 - mean for every temperature: mean is the mass of the Bernoulli it relaxes
        half = relaxed_bernoulli_cdf(torch.tensor(0.5), torch.tensor(mean), torch.tensor(temperature))
        assert float(half) == pytest.approx(1 - mean, abs=1e-6)
    # empirical check against samples
    generator = torch.Generator().manual_seed(0)
    samples = sample_relaxed_bernoulli(0.3, 0.4, (20000,), generator)
    for q in (0.1, 0.3, 0.8):
        empirical = float((samples <= q).float().mean())
        assert empirical == pytest.approx(
            float(relaxed_bernoulli_cdf(torch.tensor(q), torch.tensor(0.3), torch.tensor(0.4))), abs=0.01
        )


def test_loss_is_lower_when_values_follow_the_prior():
    generator = torch.Generator().manual_seed(0)
    mean, temperature = torch.tensor(0.3), torch.tensor(0.3)
    matching = sample_relaxed_bernoulli(0.3, 0.3, (256, 1), generator)
    shifted = sample_relaxed_bernoulli(0.8, 0.3, (256, 1), generator)
    constant = torch.full((256, 1), 0.5)

    def loss(values):
        return float(batch_shaping_loss(values, lambda v: relaxed_bernoulli_cdf(v, mean, temperature)))

    assert loss(matching) < 0.01
    assert loss(matching) < loss(shifted) / 10
    assert loss(matching) < loss(constant) / 10


def test_gradients_push_the_batch_toward_the_prior():
    # free "gate values" all starting at 0.5: the loss should make ~30% of them large (prior mean 0.3)
    logits = torch.randn(512, 1, generator=torch.Generator().manual_seed(0)).mul(0.1).requires_grad_()
    mean, temperature = torch.tensor(0.3), torch.tensor(0.2)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(300):
        loss = batch_shaping_loss(torch.sigmoid(logits), lambda v: relaxed_bernoulli_cdf(v, mean, temperature))
        first = float(loss) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    values = torch.sigmoid(logits).detach()
    assert float(loss) < first / 5
    assert float((values > 0.5).float().mean()) == pytest.approx(0.3, abs=0.05)
    assert float(((values < 0.1) | (values > 0.9)).float().mean()) > 0.6  # pushed toward binary values


def test_priors_are_learned_per_position():
    generator = torch.Generator().manual_seed(0)
    batch = 128
    # position 0 is almost always on, position 1 almost always off, position 2 half of the time
    values = torch.stack(
        [
            sample_relaxed_bernoulli(0.9, 0.2, (batch,), generator),
            sample_relaxed_bernoulli(0.1, 0.2, (batch,), generator),
            sample_relaxed_bernoulli(0.5, 0.2, (batch,), generator),
        ],
        dim=1,
    )

    def fit(hyperprior_std):
        gbas = GeneralizedBatchShaping(3, target_ratio=0.5, hyperprior_std=hyperprior_std, temperature_l1_weight=0.01)
        optimizer = torch.optim.Adam(gbas.parameters(), lr=0.05)
        for _ in range(400):
            loss = gbas(values)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return gbas.prior_means.detach()

    # a loose hyperprior lets each position learn its own rate
    means = fit(hyperprior_std=1.0)
    assert means.shape == (3,)
    assert means[0] > 0.8 and means[1] < 0.2 and 0.3 < means[2] < 0.7, means
    # a tight one keeps them close to the target: the spread is what the hyperprior std controls
    tight = fit(hyperprior_std=0.05)
    assert float(tight.max() - tight.min()) < 0.5 * float(means.max() - means.min()), tight


def test_hyperprior_pulls_the_means_to_the_target():
    gbas = GeneralizedBatchShaping(num_positions=64, target_ratio=0.25, hyperprior_std=0.1, temperature_l1_weight=0.0)
    with torch.no_grad():
        start = torch.linspace(0.3, 0.5, 64)
        gbas.prior_mean_logits.copy_(torch.log(start / (1 - start)))
    optimizer = torch.optim.Adam([gbas.prior_mean_logits], lr=0.05)
    for _ in range(200):
        means = gbas.prior_means
        loss = batch_shaping_loss(means[:, None], lambda v: normal_cdf(v, gbas.target_ratio, gbas.hyperprior_std))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(gbas.prior_means.mean()) == pytest.approx(0.25, abs=0.03)


def test_temperature_penalty_favours_peaky_priors():
    gbas = GeneralizedBatchShaping(num_positions=4, target_ratio=0.5, hyperprior_std=0.2, temperature_l1_weight=1.0)
    values = torch.rand(16, 4, generator=torch.Generator().manual_seed(0))
    gbas(values).backward()
    # gradient descent lowers the temperatures where the data does not ask for anything else
    assert gbas.prior_temperature_logits.grad.sum() > 0


def test_shape_is_checked():
    gbas = GeneralizedBatchShaping(num_positions=4, target_ratio=0.5, hyperprior_std=0.2, temperature_l1_weight=0.1)
    with pytest.raises(ValueError, match=r"\(num_samples, 4\)"):
        gbas(torch.rand(8, 5))


def _fit_free_logits(values_of, temperature, target=0.3, steps=200, seed=0):
    """GBaS alone on free logits (128 images x 9 regions) started at logit(target): the eval ratio where they end."""
    torch.manual_seed(seed)
    gbas = GeneralizedBatchShaping(9, target, 0.05, 0.0, prior_temperature=temperature, learn_temperature=False)
    start = math.log(target / (1 - target))
    with torch.no_grad():
        gbas.prior_mean_logits.fill_(start)
    logits = torch.nn.Parameter(start + 0.1 * torch.randn(128, 9))
    optimizer = torch.optim.Adam([logits, gbas.prior_mean_logits], lr=0.05)
    for _ in range(steps):
        loss = gbas(values_of(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((logits.detach() > 0).float().mean())  # eval decisions: p >= 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gbas_on_probabilities_is_a_fixed_point_at_the_target(temperature):
    """Shaping the gate probabilities (what inference thresholds) keeps the fraction above 1/2 at the target."""
    assert _fit_free_logits(torch.sigmoid, temperature) == pytest.approx(0.3, abs=0.03)


def test_gbas_on_gumbel_samples_collapses_the_eval_ratio():
    """Shaping the noisy training samples instead: the noise already has the prior's spread, so the logits shrink to
    logit(target) < 0 and inference (threshold 1/2) tokenizes almost nothing fine: why `gbas_input="probs"`."""
    from hf_msvit.models.msvit.modeling_msvit import sample_gate

    ratio = _fit_free_logits(lambda logits: sample_gate(logits, 1.0, 0.5)[0], temperature=1.0)
    assert ratio < 0.15
