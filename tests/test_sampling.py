"""Next-token sampling: exactly the nucleus / top-k survive, temperature 0 is argmax, seeds reproduce, and
draws follow the distribution they should."""

from __future__ import annotations

import math

import pytest
import torch

from ssmlm.errors import ConfigError
from ssmlm.sampling import Sampling, draw, keep_top_k, keep_top_p

# a known distribution over 6 tokens, deliberately not sorted by index
P = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.15, 0.05])
LOGITS = P.log()[None]


def nucleus_by_hand(probs: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches p (the specification)."""
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p,expected", [(0.39, {1}), (0.64, {1, 3}), (0.66, {1, 3, 4}), (0.79, {1, 3, 4}),
                                        (0.81, {1, 3, 4, 0}), (1.0, set(range(6)))])
def test_top_p_keeps_exactly_the_nucleus_renormalised(p, expected):
    probs = Sampling(temperature=1.0, top_p=p).probs(LOGITS)[0]
    assert set(torch.nonzero(probs).flatten().tolist()) == expected
    kept = sorted(expected)
    torch.testing.assert_close(probs[kept], P[kept] / P[kept].sum())


def test_top_p_matches_the_specification_on_random_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=generator) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = keep_top_p(logits, p).isfinite()
        for row in range(logits.shape[0]):
            probs = torch.softmax(logits[row].double(), -1).tolist()
            assert set(torch.nonzero(kept[row]).flatten().tolist()) == nucleus_by_hand(probs, p)


def test_top_k_keeps_exactly_k_of_the_largest():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 50, generator=generator)
    for k in (1, 5, 49):
        probs = Sampling(temperature=1.0, top_k=k).probs(logits)
        assert ((probs > 0).sum(-1) == k).all()
        top = logits.topk(k, dim=-1).indices
        assert (probs.gather(-1, top) > 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(32))
    ties = torch.zeros(3, 10)  # all equal: still exactly k survive
    assert (keep_top_k(ties, 4).isfinite().sum(-1) == 4).all()


def test_top_k_then_top_p_combine():
    # top-2 leaves {1: 0.4, 3: 0.25} -> renormalised 0.615 / 0.385; top_p=0.6 then keeps token 1 alone
    probs = Sampling(temperature=1.0, top_k=2, top_p=0.6).probs(LOGITS)[0]
    assert torch.nonzero(probs).flatten().tolist() == [1]
    probs = Sampling(temperature=1.0, top_k=3, top_p=0.99).probs(LOGITS)[0]
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 3, 4}


def test_temperature_zero_and_near_zero_are_argmax():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(256, 30, generator=generator)
    assert torch.equal(Sampling(temperature=0).__call__(logits, generator), logits.argmax(-1))
    assert torch.equal(Sampling(temperature=1e-4, top_p=0.9)(logits, generator), logits.argmax(-1))


def test_a_seed_reproduces_the_draws_and_another_seed_does_not():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    sampler = Sampling(temperature=1.0, top_p=0.95)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([sampler(logits, generator) for _ in range(20)])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9% quantiles of the chi-square distribution, by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 5: 20.52}


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (2.0, 1.0, 0), (0.5, 1.0, 0), (1.0, 0.8, 0),
                                                     (1.0, 1.0, 3), (0.7, 0.9, 4)])
def test_many_draws_follow_the_target_distribution(temperature, top_p, top_k):
    """Frequencies of 40k draws from a known distribution pass a chi-square test against the distribution
    the settings define; filtered-out tokens are never drawn."""
    scaled = torch.softmax(P.log() / temperature, -1)
    ranked = sorted(range(6), key=lambda i: -scaled[i].item())
    allowed = set(ranked[:top_k]) if top_k else set(range(6))
    within = torch.tensor([scaled[i].item() if i in allowed else 0.0 for i in range(6)])
    allowed = nucleus_by_hand((within / within.sum()).tolist(), top_p)
    target = torch.tensor([within[i].item() if i in allowed else 0.0 for i in range(6)])
    target /= target.sum()

    n = 40_000
    sampler = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sampler(LOGITS.expand(n, -1), torch.Generator().manual_seed(4))
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[target == 0].sum() == 0
    kept = target > 0
    assert chi_square(counts[kept], target[kept].double()) < CHI2_999[int(kept.sum()) - 1]


def test_draw_never_picks_a_zero_probability_token():
    probs = torch.zeros(10_000, 5)
    probs[:, 2] = 1e-30
    probs[:, 4] = 1.0
    assert (draw(probs, torch.Generator().manual_seed(5)) == 4).all()


@pytest.mark.parametrize("kwargs,key", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                        ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
                                        ({"temperature": math.nan}, "temperature")])
def test_bad_settings_are_config_errors_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        Sampling(**kwargs)
