"""GRPO maths against a deliberately simple reference: per-sample Python loops over floats."""

import math
import statistics
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from urt.errors import UrtError
from urt.rl import (PolicyLoss, completion_mask, group_advantages, kl_penalty, policy_loss,
                    zero_variance_groups)

LOSS_CONF = Path(__file__).resolve().parents[1] / "conf" / "stage" / "loss"


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


# ---- loss variants (PolicyLoss: grpo | gspo | cispo) against per-sequence, per-token loops ----

def ref_kl(p, r, est):
    """(KL, dKL/dlogp) of one token."""
    if est == "k1":
        return p - r, 1.0
    d = r - p
    dc = min(max(d, -10.0), 10.0)
    return math.exp(dc) - dc - 1, (-(math.exp(dc) - 1) if -10 < d < 10 else 0.0)


def ref_gspo(logp, old, ref, adv, mask, beta, est, lo, hi):
    """(loss, d loss/d logp, per-sequence flags: clipping removed the gradient) of GSPO's sequence form:
    s = exp(mean log-ratio), loss = mean over sequences of −min(s·A, clip(s)·A) + β·mean KL."""
    n = len(logp)
    loss, grad, binds = 0.0, [[0.0] * len(row) for row in logp], []
    for i in range(n):
        toks = [t for t in range(len(logp[i])) if mask[i][t]]
        c = len(toks)
        s = math.exp(sum(logp[i][t] - old[i][t] for t in toks) / c)
        clipped = (s > 1 + hi and adv[i] > 0) or (s < 1 - lo and adv[i] < 0)
        binds.append(clipped)
        seq = -min(s * adv[i], min(max(s, 1 - lo), 1 + hi) * adv[i])
        for t in toks:
            kl, dkl = ref_kl(logp[i][t], ref[i][t], est)
            seq += beta * kl / c
            # d s / d logp_t = s / c: the surrogate's gradient unless the clipped branch is taken
            grad[i][t] = ((0.0 if clipped else -adv[i] * s / c) + beta * dkl / c) / n
        loss += seq / n
    return loss, grad, binds


def ref_cispo(logp, old, ref, adv, mask, beta, est, agg, lo, hi, lmax):
    """(loss, d loss/d logp, truncated-token count) of CISPO: per token −w·A·logπ + β·KL with the
    weight w = clip(π/π_old, 1−lo, 1+hi) a constant (its gradient is not taken)."""
    n = len(logp)
    counts = [sum(1 for m in row if m) for row in mask]
    loss, grad, truncated = 0.0, [[0.0] * len(row) for row in logp], 0
    for i in range(n):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            w = min(max(ratio, 1 - lo), 1 + hi)
            truncated += w != ratio
            kl, dkl = ref_kl(logp[i][t], ref[i][t], est)
            scale = 1 / (counts[i] * n) if agg == "paper" else 1 / sum(counts) if agg == "token" else 1 / (n * lmax)
            loss += (-w * adv[i] * logp[i][t] + beta * kl) * scale
            grad[i][t] = (-w * adv[i] + beta * dkl) * scale
    return loss, grad, truncated


def rollout_batch(seed, n=8, t=12):
    """float64 log-probs of a rollout: policy, reference, per-sequence advantages and masks ending
    early (row 0 full, row 1 a single token, the rest random lengths)."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3 - 0.05
    ref = logp + 0.5 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0], lengths[1] = t, 1
    mask = (torch.arange(t).expand(n, t) < lengths.unsqueeze(1)).double()
    return gen, logp, ref, adv, mask


def gspo_old_logp(gen, logp, mask, adv, scale):
    """Old log-probs (μ > 1) with per-token noise whose sequence means are set so that GSPO's clip
    removes the gradient of some sequences and not of others, some outside the range on the side
    where it does not bind."""
    targets = scale * torch.tensor([0.3, -0.3, 0.01, -0.01, -0.2, 0.2, 0.0, 0.5], dtype=torch.float64)
    adv.abs_().mul_(torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1], dtype=torch.float64))
    noise = 0.3 * torch.randn(logp.shape, generator=gen, dtype=torch.float64)
    noise = noise - ((noise * mask).sum(1) / mask.sum(1)).unsqueeze(1)
    return logp + noise - targets.unsqueeze(1)  # masked mean of logp − old = target


def logp_grad(fn, logp, *args, **kwargs):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(x, *args, **kwargs)
    loss.backward()
    return loss, metrics, x.grad


@pytest.mark.parametrize("lo,hi,scale", [(0.05, 0.08, 1.0), (3e-4, 4e-4, 0.01)])
@pytest.mark.parametrize("beta,estimator", [(0.0, "k3"), (0.04, "k3"), (0.1, "k1")])
@pytest.mark.parametrize("seed", range(3))
def test_gspo_matches_reference_values_and_gradients(lo, hi, scale, beta, estimator, seed):
    gen, logp, ref, adv, mask = rollout_batch(seed)
    old = gspo_old_logp(gen, logp, mask, adv, scale)
    loss_fn = PolicyLoss(variant="gspo", beta=beta, kl_estimator=estimator, epsilon_low=lo, epsilon_high=hi)
    loss, metrics, grad = logp_grad(loss_fn, logp, adv, mask, old_logp=old, ref_logp=ref)
    want, want_grad, binds = ref_gspo(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                      beta, estimator, lo, hi)
    assert binds == [True, True, False, False, False, False, False, False]
    assert abs(loss.item() - want) < 1e-10
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=grad.dtype), atol=1e-10, rtol=1e-9)
    assert (grad[0] == 0).all() == (beta == 0) and (grad[2] != 0).all() == (mask[2] != 0).all()
    clipped_tokens = sum(c for c, b in zip(mask.sum(1).tolist(), binds) if b)
    assert metrics["clip_fraction"].item() == pytest.approx(clipped_tokens / mask.sum().item())
    assert ("kl" in metrics) == (beta != 0)


def test_gspo_on_policy_ratio_is_one_and_gradient_is_advantage_times_mean_grad_logp():
    """One update per batch (old log-probs None, μ = 1): s = 1 and d loss/d logp_t = −A/(|o|·N)."""
    _, logp, ref, adv, mask = rollout_batch(7)
    loss, metrics, grad = logp_grad(PolicyLoss(variant="gspo", beta=0.0), logp, adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_fraction"].item() == 0
    want = -adv.unsqueeze(1) * mask / mask.sum(1, keepdim=True) / len(adv)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("aggregation", ["token", "paper", "dr_grpo"])
@pytest.mark.parametrize("lo,hi,scale", [(0.2, 0.28, 0.3), (1.0, 4.0, 1.0)])
@pytest.mark.parametrize("beta,estimator", [(0.0, "k3"), (0.04, "k3"), (0.1, "k1")])
@pytest.mark.parametrize("seed", range(2))
def test_cispo_matches_reference_values_and_gradients(aggregation, lo, hi, scale, beta, estimator, seed):
    gen, logp, ref, adv, mask = rollout_batch(seed)
    lmax = 16
    old = logp + scale * torch.randn(logp.shape, generator=gen, dtype=torch.float64)
    old[0, 0], old[0, 1] = logp[0, 0] - 2.0, logp[0, 1] + 1.0  # ratios e² > 5 and 1/e < 0.8: both bounds
    loss_fn = PolicyLoss(variant="cispo", beta=beta, kl_estimator=estimator, aggregation=aggregation,
                         epsilon_low=lo, epsilon_high=hi)
    loss, metrics, grad = logp_grad(loss_fn, logp, adv, mask, old_logp=old, ref_logp=ref,
                                    max_completion_length=lmax)
    want, want_grad, truncated = ref_cispo(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                           mask.tolist(), beta, estimator, aggregation, lo, hi, lmax)
    assert 0 < truncated < mask.sum().item()
    assert abs(loss.item() - want) < 1e-10
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=grad.dtype), atol=1e-10, rtol=1e-9)
    assert (grad[mask.bool()] != 0).all()  # no token loses its gradient, truncated or not
    assert metrics["clip_fraction"].item() == pytest.approx(truncated / mask.sum().item())
    assert ("kl" in metrics) == (beta != 0)


def test_cispo_on_policy_is_reinforce():
    """μ = 1: the weight is 1, loss = token mean of −A·logπ and its gradient −A/Σ|o| per token."""
    _, logp, _, adv, mask = rollout_batch(3)
    loss, _, grad = logp_grad(PolicyLoss(variant="cispo"), logp, adv, mask)
    assert loss.item() == pytest.approx((-(adv.unsqueeze(1) * logp) * mask).sum().item() / mask.sum().item())
    torch.testing.assert_close(grad, -adv.unsqueeze(1) * mask / mask.sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("aggregation", ["paper", "token", "dr_grpo"])
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_variant_is_policy_loss_exactly(aggregation, with_old):
    gen, logp, ref, adv, mask = rollout_batch(11)
    old = logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=torch.float64) if with_old else None
    kw = dict(old_logp=old, ref_logp=ref, max_completion_length=16)
    loss, metrics, grad = logp_grad(PolicyLoss(aggregation=aggregation, epsilon_high=0.28), logp, adv, mask, **kw)
    want, want_metrics, want_grad = logp_grad(policy_loss, logp, adv, mask, beta=0.04, kl_estimator="k3",
                                              aggregation=aggregation, eps_low=0.2, eps_high=0.28, **kw)
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    assert metrics.keys() == want_metrics.keys() == {"kl", "clip_fraction", "ratio_mean"}
    assert all(torch.equal(metrics[k], want_metrics[k]) for k in metrics)
    assert metrics["clip_fraction"].item() > 0 if with_old else metrics["clip_fraction"].item() == 0


LOSS_CONFIGS = [dict(variant="grpo", aggregation="paper"), dict(variant="grpo", aggregation="token"),
                dict(variant="grpo", aggregation="dr_grpo"), dict(variant="gspo", epsilon_low=0.05, epsilon_high=0.08),
                dict(variant="cispo", aggregation="token", epsilon_low=0.2, epsilon_high=0.28),
                dict(variant="cispo", aggregation="paper"), dict(variant="cispo", aggregation="dr_grpo")]


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: f"{c['variant']}-{c.get('aggregation', 'paper')}")
def test_micro_batches_weighted_as_token_weighted_says_give_the_batch_gradient(config):
    """The GRPO module's exact accumulation: micro-batch losses weighed by their share of completion
    tokens (token_weighted) or of sequences (otherwise) sum to the whole batch's loss and gradient."""
    gen, logp, ref, adv, mask = rollout_batch(5)
    old = logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=torch.float64)
    loss_fn = PolicyLoss(beta=0.04, **config)
    kw = dict(max_completion_length=16)
    want, _, want_grad = logp_grad(loss_fn, logp, adv, mask, old_logp=old, ref_logp=ref, **kw)
    x = logp.clone().requires_grad_(True)
    total = 0.0
    for mb in (slice(0, 3), slice(3, 5), slice(5, 8)):
        part, _ = loss_fn(x[mb], adv[mb], mask[mb], old_logp=old[mb], ref_logp=ref[mb], **kw)
        w = mask[mb].sum() / mask.sum() if loss_fn.token_weighted else (mb.stop - mb.start) / len(adv)
        (part * w).backward()
        total += float(part.detach()) * float(w)
    assert total == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(x.grad, want_grad, atol=1e-12, rtol=0)


def test_properties_and_variant_defaults():
    grpo, gspo, cispo = PolicyLoss(), PolicyLoss(variant="gspo"), PolicyLoss(variant="cispo")
    assert (grpo.beta, grpo.aggregation, grpo.epsilon_low, grpo.epsilon_high) == (0.04, "paper", 0.2, 0.2)
    assert (gspo.beta, gspo.aggregation, gspo.epsilon_low, gspo.epsilon_high) == (0.0, "paper", 3e-4, 4e-4)
    assert (cispo.beta, cispo.aggregation, cispo.epsilon_low, cispo.epsilon_high) == (0.0, "token", 1.0, 4.0)
    assert grpo.uses_reference and not gspo.uses_reference and PolicyLoss(variant="cispo", beta=0.1).uses_reference
    assert not PolicyLoss(beta=0).uses_reference
    weighted = {(c["variant"], c.get("aggregation")): PolicyLoss(**c).token_weighted for c in LOSS_CONFIGS}
    assert [k for k, v in weighted.items() if v] == [("grpo", "token"), ("cispo", "token")]
    assert cispo.token_weighted and not gspo.token_weighted and not grpo.token_weighted


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="ppo"), r"'ppo'.*grpo, gspo, cispo"),
    (dict(variant="gspo", aggregation="token"), r"'gspo'.*'token'.*supports: paper$"),
    (dict(aggregation="sum"), r"'sum'.*paper, token, dr_grpo"),
    (dict(variant="cispo", aggregation="sequence"), r"'sequence'.*token, paper, dr_grpo"),
    (dict(kl_estimator="k2"), r"'k2'.*k3, k1"),
    (dict(beta=-0.1), r"beta must be >= 0.*-0.1"),
    (dict(beta="abc"), r"beta must be a number.*'abc'"),
    (dict(epsilon_low=1.5), r"epsilon_low must lie in \[0, 1\].*1.5"),
    (dict(epsilon_high=-0.2), r"epsilon_high must be >= 0.*-0.2"),
])
def test_policy_loss_component_rejects_bad_config(kwargs, match):
    with pytest.raises(UrtError, match=match):
        PolicyLoss(**kwargs)


@pytest.mark.parametrize("variant", ["grpo", "gspo", "cispo"])
def test_policy_loss_component_call_errors(variant):
    logp, adv, mask = torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3)
    with pytest.raises(UrtError, match="ref_logp"):
        PolicyLoss(variant=variant, beta=0.04)(logp, adv, mask)
    with pytest.raises(UrtError, match="differ in shape"):
        PolicyLoss(variant=variant)(logp, adv, torch.ones(2, 2))
    if variant != "gspo":
        with pytest.raises(UrtError, match="max_completion_length"):
            PolicyLoss(variant=variant, beta=0, aggregation="dr_grpo")(logp, adv, mask)


def test_loss_configs_are_the_three_variants():
    assert sorted(p.stem for p in LOSS_CONF.glob("*.yaml")) == ["cispo", "grpo", "gspo"]


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo"])
def test_loss_config_instantiates_a_working_component(name):
    cfg = OmegaConf.load(LOSS_CONF / f"{name}.yaml")
    loss_fn = instantiate(cfg)
    assert isinstance(loss_fn, PolicyLoss) and loss_fn.variant == name
    expected = {"grpo": (0.04, "k3", "paper", 0.2, 0.2), "gspo": (0.0, "k3", "paper", 3e-4, 4e-4),
                "cispo": (0.0, "k3", "token", 1.0, 4.0)}[name]
    assert (loss_fn.beta, loss_fn.kl_estimator, loss_fn.aggregation, loss_fn.epsilon_low,
            loss_fn.epsilon_high) == expected
    gen, logp, ref, adv, mask = rollout_batch(2)
    old = (gspo_old_logp(gen, logp, mask, adv, 0.01) if name == "gspo"
           else logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=torch.float64))
    loss, metrics = loss_fn(logp, adv, mask, old_logp=old, ref_logp=ref)
    lists = (logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist())
    if name == "grpo":
        want = ref_loss(*lists, 0.04, "k3", "paper", 0.2, 0.2, None)
    elif name == "gspo":
        want = ref_gspo(*lists, 0.0, "k3", 3e-4, 4e-4)[0]
    else:
        want = ref_cispo(*lists, 0.0, "k3", "token", 1.0, 4.0, None)[0]
    assert abs(loss.item() - want) < 1e-10
    assert metrics.keys() == ({"kl", "clip_fraction", "ratio_mean"} if name == "grpo"
                              else {"clip_fraction", "ratio_mean"})
