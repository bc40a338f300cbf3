"""Rollout/training mismatch metrics and truncated importance sampling, against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from tinyrl import algorithms


def _batch():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, 0.0, 0.0], [-2.0, -0.1, -0.7, -0.2]])
    rollout = torch.tensor([[-1.1, -1.0, -0.5, 9.0], [-0.3, -1.25, 5.0, 0.0], [-2.5, -0.1, -0.6, -0.2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    return old, rollout, mask


def test_mismatch_metrics_follow_their_formulas():
    old, rollout, mask = _batch()
    m = algorithms.rollout_mismatch_metrics(old, rollout, mask)
    diffs = [(o - r) for o_row, r_row, k_row in zip(old.tolist(), rollout.tolist(), mask.tolist())
             for o, r, k in zip(o_row, r_row, k_row) if k]
    ratios = [math.exp(d) for d in diffs]
    assert m["mismatch_kl"] == pytest.approx(sum(r - 1 - d for r, d in zip(ratios, diffs)) / len(diffs))
    assert m["mismatch_k1"] == pytest.approx(sum(-d for d in diffs) / len(diffs))
    assert m["is_ratio_min"] == pytest.approx(min(ratios)) and m["is_ratio_max"] == pytest.approx(max(ratios))
    assert m["is_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert m["logprob_diff_max"] == pytest.approx(max(abs(d) for d in diffs))
    # equal log-probs: no mismatch at all; padding never counts
    same = algorithms.rollout_mismatch_metrics(old, old.clone().masked_fill(mask == 0, float("nan")), mask)
    assert same["mismatch_kl"] == 0.0 and same["is_ratio_min"] == same["is_ratio_max"] == 1.0


def test_token_tis_caps_each_ratio():
    old, rollout, mask = _batch()
    w, m = algorithms.rollout_correction_weights(old, rollout, mask, rollout_is="token", rollout_is_threshold=1.5)
    expected = torch.exp(old - rollout).clamp(max=1.5) * mask
    assert torch.allclose(w, expected)
    assert not w.requires_grad
    assert m["is_truncated_frac"] == pytest.approx(1 / 9)  # only exp(0.5) exceeds 1.5


def test_sequence_rejection_zeroes_outlier_sequences():
    old, rollout, mask = _batch()
    # sequence log-ratios: 0.1 + -1.0 + 0 = -0.9;  0 + 0.05 = 0.05;  0.5 + 0 - 0.1 + 0 = 0.4
    w, m = algorithms.rollout_correction_weights(old, rollout, mask, rollout_is=None, rollout_rs="sequence",
                                                 rollout_rs_threshold=math.exp(0.45))
    assert torch.equal(w, mask * torch.tensor([[0.0], [1.0], [1.0]]))
    assert m["rs_masked_frac"] == pytest.approx(1 / 3)
    w, _ = algorithms.rollout_correction_weights(old, rollout, mask, rollout_is=None, rollout_rs="sequence",
                                                 rollout_rs_threshold=math.exp(0.3), rollout_rs_threshold_lower=0.1)
    assert torch.equal(w, mask * torch.tensor([[1.0], [1.0], [0.0]]))
    with pytest.raises(ValueError, match="rollout_rs"):
        algorithms.rollout_correction_weights(old, rollout, mask, rollout_rs="geometric")


def test_tis_changes_the_loss_exactly_as_its_formula_says():
    """loss = sum_t w_t * l_t / tokens with w_t = min(pi_old / pi_rollout, C), l_t the PPO-clip token loss."""
    torch.manual_seed(0)
    old, rollout, mask = _batch()
    logprobs = (old + 0.1 * torch.randn(old.shape)).requires_grad_()
    advantages = torch.randn(3, 1).expand(3, 4).clone()
    weights, _ = algorithms.rollout_correction_weights(old, rollout, mask, rollout_is_threshold=2.0)
    loss, _ = algorithms.policy_loss("ppo", logprobs, old, advantages, mask, token_weights=weights)
    ratio = torch.exp(logprobs - old)
    token_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    expected = (torch.exp(old - rollout).clamp(max=2.0) * token_loss * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    # the gradient is the weighted one too; weights of one give back the plain loss
    loss.backward()
    grad = logprobs.grad.clone()
    logprobs.grad = None
    expected.backward()
    assert torch.allclose(grad, logprobs.grad)
    plain, _ = algorithms.policy_loss("ppo", logprobs, old, advantages, mask)
    ones, _ = algorithms.policy_loss("ppo", logprobs, old, advantages, mask, token_weights=torch.ones(3, 4))
    assert torch.equal(plain, ones)


def test_token_weights_must_fit_the_batch():
    old, _, mask = _batch()
    with pytest.raises(ValueError, match="token_weights"):
        algorithms.policy_loss("ppo", old.clone(), old, torch.zeros(3, 4), mask, token_weights=torch.ones(3, 3))
