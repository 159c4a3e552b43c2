"""Advantage estimators (fasttune/advantages.py) against their published formulas, written out here
element by element: GRPO and RLOO as TRL's GRPOTrainer / RLOOTrainer compute them, REINFORCE++ and
REINFORCE++-baseline as OpenRLHF's experience maker (compute_reward, get_cumulative_returns, the
whitening over all action tokens). Fixed rewards, plus groups of equal rewards and a group of one."""

import math
import re

import pytest
import torch

from fasttune.advantages import compute_advantages
from fasttune.config import ConfigError, GRPOConfig, parse_config


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):  # unbiased, as torch.std and TRL's nanstd
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def groups(r, G):
    return [r[i : i + G] for i in range(0, len(r), G)]


def grpo_formula(r, G, scale):
    out = []
    for g in groups(r, G):
        for x in g:
            a = x - mean(g)
            if scale == "group":
                a /= std(g) + 1e-4
            elif scale == "batch":
                a /= std(r) + 1e-4
            out.append(a)
    return out


def rloo_formula(r, G, scale):
    out = []
    for g in groups(r, G):
        for i, x in enumerate(g):
            a = x - sum(y for j, y in enumerate(g) if j != i) / (G - 1)
            out.append(a / (std(g) + 1e-4) if scale == "group" else a)
    if scale == "batch":  # RLOOTrainer's normalize_advantages
        m, s = mean(out), std(out)
        out = [(a - m) / (s + 1e-4) for a in out]
    return out


def reinforce_pp_formula(r, mask, sample, ref, beta, G=None, whiten_std=True):
    """OpenRLHF: (baseline) r - group mean; token reward -β(log π_old - log π_ref), + r at the last
    action token; return to go (γ = 1); (x - mean) / sqrt(var) over all action tokens."""
    if G is not None:
        r = [x - mean(g) for g in groups(r, G) for x in g]
    N, T = len(mask), len(mask[0])
    returns = [[0.0] * T for _ in range(N)]
    for i in range(N):
        last = max((t for t in range(T) if mask[i][t]), default=None)
        acc = 0.0
        for t in reversed(range(T)):
            if not mask[i][t]:
                continue
            rew = -beta * (sample[i][t] - ref[i][t]) + (r[i] if t == last else 0.0)
            acc += rew
            returns[i][t] = acc
    vals = [returns[i][t] for i in range(N) for t in range(T) if mask[i][t]]
    m = mean(vals)
    var = sum((v - m) ** 2 for v in vals) / len(vals)
    k = 1 / math.sqrt(max(var, 1e-8)) if whiten_std else 1.0
    return [[(returns[i][t] - m) * k if mask[i][t] else 0.0 for t in range(T)] for i in range(N)]


REWARDS = [1.0, 0.0, 2.0, 0.5, 5.0, 5.0, 5.0, 5.0, -1.0, 3.0, 0.25, 0.0]  # 3 groups of 4; the second all equal


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator,formula", [("grpo", grpo_formula), ("rloo", rloo_formula)])
def test_group_estimators(estimator, formula, scale):
    r = torch.tensor(REWARDS)
    got = compute_advantages(estimator, r, 4, scale)
    want = torch.tensor(formula(REWARDS, 4, scale))
    assert got.shape == (12,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if scale != "batch":
        assert torch.equal(got[4:8], torch.zeros(4))  # a group of equal rewards: no signal


def test_rloo_is_grpo_scaled_by_g_over_g_minus_1():
    """The leave-one-out baseline is the group mean's advantage times G / (G - 1) (Kool et al. 2019)."""
    r = torch.randn(20)
    for G in (2, 4, 5):
        torch.testing.assert_close(compute_advantages("rloo", r, G, "none"),
                                   compute_advantages("grpo", r, G, "none") * G / (G - 1))


def random_batch(N, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, T, generator=g) < 0.8
    mask[:, 0] = True
    mask[1, 2:] = False  # a short completion
    mask[2, 1:3] = False  # a hole (tool tokens): the return skips it
    sample = -torch.rand(N, T, generator=g) * 3
    ref = sample + torch.randn(N, T, generator=g) * 0.3
    return mask, sample, ref


@pytest.mark.parametrize("estimator", ["reinforce++", "reinforce++_baseline"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_reinforce_pp(estimator, beta, scale):
    N, T, G = 8, 6, 4
    mask, sample, ref = random_batch(N, T, seed=3)
    r = [1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # the second group all equal
    got = compute_advantages(estimator, torch.tensor(r), G, scale, mask=mask, sample_logps=sample, ref_logps=ref,
                             beta=beta)
    want = reinforce_pp_formula(r, mask.tolist(), sample.tolist(), ref.tolist(), beta,
                                G if estimator == "reinforce++_baseline" else None, whiten_std=scale != "none")
    assert got.shape == (N, T)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    m = mask.float()
    assert abs(float((got * m).sum() / m.sum())) < 1e-5  # whitened: mean 0 over the batch's tokens
    if scale != "none":
        assert float(((got * m) ** 2).sum() / m.sum()) == pytest.approx(1.0, abs=1e-4)


def test_reinforce_pp_group_of_one_and_equal_rewards():
    """reinforce++ needs no group: num_generations = 1 works. Equal rewards everywhere (β = 0) give
    advantage 0, not NaN; a completion with no trained token gets 0."""
    N, T = 3, 5
    mask, sample, ref = random_batch(N, T, seed=4)
    mask[0] = False
    got = compute_advantages("reinforce++", torch.tensor([2.0, 0.0, 1.0]), 1, mask=mask, sample_logps=sample,
                             ref_logps=ref, beta=0.1)
    want = reinforce_pp_formula([2.0, 0.0, 1.0], mask.tolist(), sample.tolist(), ref.tolist(), 0.1)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], torch.zeros(T))
    same = compute_advantages("reinforce++", torch.full((N,), 0.7), 1, mask=mask)
    assert torch.equal(same, torch.zeros(N, T))
    base = compute_advantages("reinforce++_baseline", torch.tensor([1.0, 1.0, 3.0, 3.0]), 2,
                              mask=torch.ones(4, 2, dtype=torch.bool))
    assert torch.equal(base, torch.zeros(4, 2))  # every group equal: nothing to learn


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++_baseline"])
def test_group_estimators_refuse_a_group_of_one(estimator):
    with pytest.raises(ValueError, match="groups of at least 2"):
        compute_advantages(estimator, torch.tensor([1.0, 2.0]), 1, mask=torch.ones(2, 3, dtype=torch.bool))
    text = f'[grpo]\nadvantage = "{estimator}"\nnum_generations = 1\n'
    with pytest.raises(ConfigError, match=r"run.toml:3: \[grpo\] num_generations = 1 with grpo.advantage = "
                                          rf"'{re.escape(estimator)}'.*needs grpo.num_generations >= 2"):
        parse_config({"grpo": {"advantage": estimator, "num_generations": 1}}, GRPOConfig, text, "run.toml")
    parse_config({"grpo": {"advantage": "reinforce++", "num_generations": 1}}, GRPOConfig)  # needs no group
