"""GRPO maths against a deliberately simple reference: per-sample Python loops over floats."""

import math
import statistics

import pytest
import torch

from urt.errors import UrtError
from urt.rl import completion_mask, group_advantages, kl_penalty, policy_loss, zero_variance_groups


def ref_advantages(rewards, g, mode):
    out = []
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    centred_all = [r - statistics.fmean(grp) for grp in groups for r in grp]
    batch_std = statistics.stdev(centred_all)
    for grp in groups:
        mean = statistics.fmean(grp)
        std = statistics.stdev(grp)
        for r in grp:
            if mode == "paper":
                out.append((r - mean) / (std + 1e-4))
            elif mode == "none":
                out.append(r - mean)
            else:
                out.append((r - mean) / (batch_std + 1e-4))
    return out


def ref_loss(logp, old, ref, adv, mask, beta, est, agg, lo, hi, lmax):
    n = len(logp)
    seq_sums, seq_counts = [], []
    for i in range(n):
        s, c = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - lo), 1 + hi) * adv[i])
            if est == "k3":
                d = min(max(ref[i][t] - logp[i][t], -10.0), 10.0)
                kl = math.exp(d) - d - 1
            else:
                kl = logp[i][t] - ref[i][t]
            s += -surrogate + beta * kl
            c += 1
        seq_sums.append(s)
        seq_counts.append(c)
    if agg == "paper":
        return sum(s / max(c, 1) for s, c in zip(seq_sums, seq_counts)) / n
    if agg == "token":
        return sum(seq_sums) / max(sum(seq_counts), 1)
    return sum(seq_sums) / (n * lmax)


@pytest.mark.parametrize("mode", ["paper", "none", "batch"])
@pytest.mark.parametrize("seed", range(5))
def test_advantages_match_reference(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    g = 8
    rewards = torch.randint(0, 3, (4 * g,), generator=gen).double() + torch.rand(4 * g, generator=gen, dtype=torch.float64)
    got = group_advantages(rewards, g, mode)
    want = torch.tensor(ref_advantages(rewards.tolist(), g, mode), dtype=got.dtype)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_paper_advantages_on_a_known_group():
    # rewards 2,0,0,0: mean 0.5, unbiased std 1.0 → (1.5/1.0001, −0.5/1.0001 ×3)
    adv = group_advantages(torch.tensor([2.0, 0.0, 0.0, 0.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]) / 1.0001)


def test_zero_variance_groups_and_their_advantage():
    r = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    assert zero_variance_groups(r, 3).tolist() == [True, False, True]
    assert group_advantages(r, 3)[[0, 1, 2, 6, 7, 8]].abs().max() == 0


def test_completion_mask_includes_first_eos_only():
    eos = 9
    ids = torch.tensor([[1, 2, 9, 3, 9], [1, 1, 1, 1, 1], [9, 4, 4, 4, 4]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert completion_mask(ids, [4, 9]).tolist()[2] == [1, 0, 0, 0, 0]


@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_kl_estimators(estimator):
    logp = torch.tensor([-1.0, -2.0, -30.0])
    ref = torch.tensor([-1.5, -2.0, -1.0])
    got = kl_penalty(logp, ref, estimator)
    if estimator == "k3":
        d = [min(max(r - p, -10), 10) for p, r in zip(logp.tolist(), ref.tolist())]
        want = [math.exp(x) - x - 1 for x in d]  # third token: d clamped to 10
    else:
        want = [p - r for p, r in zip(logp.tolist(), ref.tolist())]
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize("aggregation", ["paper", "token", "dr_grpo"])
@pytest.mark.parametrize("estimator", ["k3", "k1"])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_matches_reference(aggregation, estimator, with_old, seed):
    gen = torch.Generator().manual_seed(seed)
    n, t, lmax = 8, 12, 16
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    old = (logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)) if with_old else logp.clone()
    ref = logp + 0.5 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t).expand(n, t) < lengths.unsqueeze(1)).double()
    beta, lo, hi = 0.04, 0.2, 0.28
    loss, metrics = policy_loss(
        logp, adv, mask, old_logp=old if with_old else None, ref_logp=ref, beta=beta,
        kl_estimator=estimator, aggregation=aggregation, eps_low=lo, eps_high=hi, max_completion_length=lmax,
    )
    want = ref_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                    beta, estimator, aggregation, lo, hi, lmax)
    assert abs(loss.item() - want) < 1e-6
    if not with_old:
        assert metrics["clip_fraction"].item() == 0


def test_paper_gradient_is_advantage_times_grad_logp():
    """With one update per batch, d loss / d logp_t = −A/|o| + β·dKL/dlogp_t (paper aggregation)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.3, -1.0, -2.0]])
    adv = torch.tensor([0.7, -1.3])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    beta = 0.04
    loss, _ = policy_loss(logp, adv, mask, ref_logp=ref, beta=beta)
    loss.backward()
    d = (ref - logp).detach()
    dkl = -(torch.exp(d) - 1)  # d/dlogp of exp(ref−logp) − (ref−logp) − 1
    counts = mask.sum(1, keepdim=True)
    want = (-adv.unsqueeze(1) + beta * dkl) * mask / counts / 2
    torch.testing.assert_close(logp.grad, want)


def test_errors_name_the_problem():
    with pytest.raises(UrtError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(UrtError, match="advantage mode"):
        group_advantages(torch.zeros(4), 2, "bogus")
    with pytest.raises(UrtError, match="ref_logp"):
        policy_loss(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(UrtError, match="max_completion_length"):
        policy_loss(torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2), beta=0, aggregation="dr_grpo")
    # beta = 0 needs no reference model at all
    loss, metrics = policy_loss(torch.zeros(2, 2), torch.ones(2), torch.ones(2, 2), beta=0)
    assert "kl" not in metrics and loss.item() == pytest.approx(-1.0)
