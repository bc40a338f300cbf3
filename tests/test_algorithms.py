"""tinyrl.algorithms: estimators and losses against hand-worked values, properties, and the known traps."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tinyrl import algorithms as A

F64 = torch.float64
AGG_MODE_NAMES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
FAST = settings(max_examples=40, deadline=None)


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), atol=atol, rtol=0)


@pytest.fixture
def scratch_registries():
    """Registry entries added by a test are removed afterwards."""
    saved = [(r, dict(r)) for r in (A.ADVANTAGE_ESTIMATORS, A.POLICY_LOSSES)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


# ----------------------------------------------------------------------------------------------------------------
# Rewards and advantage estimators
# ----------------------------------------------------------------------------------------------------------------


def test_outcome_reward_sits_on_last_response_token_whatever_the_padding():
    mask = t([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    placed = A.token_rewards_from_outcome(t([1.0, 2.0, 3.0, 4.0]), mask)
    close(placed, [[0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 3, 0], [0, 0, 0, 0]])


def test_grpo_matches_hand_computed_group_statistics():
    # group a: rewards 1, 0, 1 -> mean 2/3, unbiased std sqrt(1/3); group b: one sample; group c: all equal.
    rewards = t([1.0, 0.0, 1.0, 0.5, 2.0, 2.0])
    mask = torch.ones(6, 2, dtype=torch.bool)
    adv, ret = A.compute_advantages("grpo", rewards, mask, group_index=["a", "a", "a", "b", "c", "c"])
    std = math.sqrt(1 / 3)
    per_seq = [(1 / 3) / (std + 1e-6), (-2 / 3) / (std + 1e-6), (1 / 3) / (std + 1e-6), 0.0, 0.0, 0.0]
    close(adv, t(per_seq)[:, None].expand(6, 2), atol=1e-7)
    close(ret, adv)
    unscaled, _ = A.compute_advantages("grpo", rewards, mask, group_index=t([0, 0, 0, 1, 2, 2], torch.long),
                                       norm_by_std=False)
    close(unscaled[:, 0], [1 / 3, -2 / 3, 1 / 3, 0, 0, 0])


def test_dr_grpo_removes_group_mean_only():
    adv, _ = A.compute_advantages("dr_grpo", t([1.0, 0.0, 1.0, 3.0]), torch.ones(4, 3), group_index=[0, 0, 0, 1])
    close(adv, t([1 / 3, -2 / 3, 1 / 3, 0.0])[:, None].expand(4, 3))


def test_rloo_uses_leave_one_out_mean():
    # 1 - mean(0, 1) = 0.5, 0 - mean(1, 1) = -1, single-sample group -> 0
    adv, _ = A.compute_advantages("rloo", t([1.0, 0.0, 1.0, 7.0]), torch.ones(4, 2), group_index=[0, 0, 0, 1])
    close(adv[:, 0], [0.5, -1.0, 0.5, 0.0])


def test_opo_uses_length_weighted_baseline():
    # lengths 1 and 3: b = (1*1 + 3*0) / 4 = 0.25
    mask = t([[1, 0, 0], [1, 1, 1]])
    adv, _ = A.compute_advantages("opo", t([1.0, 0.0]), mask, group_index=[0, 0])
    close(adv, [[0.75, 0, 0], [-0.25, -0.25, -0.25]])


def test_reinforce_pp_whitens_discounted_returns_over_batch_tokens():
    token_rewards = t([[0.0, -0.1, 1.0], [0.2, 0.0, 5.0]])  # the 5.0 sits on padding and must be ignored
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = A.compute_advantages("reinforce_pp", token_rewards, mask, gamma=0.5)
    returns = [0.2, 0.4, 1.0, 0.2, 0.0]  # G_t = r_t + 0.5 * G_{t+1}
    mean = sum(returns) / 5
    std = math.sqrt(sum((g - mean) ** 2 for g in returns) / 4 + 1e-8)
    w = [(g - mean) / std for g in returns]
    close(adv, [[w[0], w[1], w[2]], [w[3], w[4], 0.0]], atol=1e-7)
    close(ret, adv)


def test_reinforce_pp_baseline_removes_group_mean_then_whitens():
    mask = t([[1, 1], [1, 0], [1, 1]])
    adv, _ = A.compute_advantages("reinforce_pp_baseline", t([1.0, 0.0, 4.0]), mask, group_index=[0, 0, 1])
    # centred per sequence: 0.5, -0.5, 0 -> tokens 0.5, 0.5, -0.5, 0, 0 (mean 0.1)
    tokens = [0.5, 0.5, -0.5, 0.0, 0.0]
    mean = sum(tokens) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / 4 + 1e-8)
    w = [(x - mean) / std for x in tokens]
    # the group of one takes part in the whitening statistics but keeps a zero advantage, not -mean / std
    close(adv, [[w[0], w[1]], [w[2], 0.0], [0.0, 0.0]], atol=1e-7)


def test_gae_matches_hand_computation_and_skips_masked_positions():
    values = t([[0.5, 0.6, 0.7], [0.5, 99.0, 0.7]])
    mask = t([[1, 1, 1], [1, 0, 1]])
    adv, ret = A.compute_advantages("gae", t([1.0, 1.0]), mask, values=values, gamma=0.9, lam=0.8, whiten=False)
    # row 0: deltas 0.04, 0.03, 0.3; A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1
    a1 = 0.03 + 0.72 * 0.3
    a0 = 0.04 + 0.72 * a1
    # row 1 skips t=1: delta0 = 0.9 * 0.7 - 0.5 = 0.13, A0 = 0.13 + 0.72 * 0.3
    close(adv, [[a0, a1, 0.3], [0.13 + 0.72 * 0.3, 0.0, 0.3]])
    close(ret, [[a0 + 0.5, a1 + 0.6, 1.0], [0.13 + 0.72 * 0.3 + 0.5, 0.0, 1.0]])
    whitened, ret_w = A.compute_advantages("gae", t([1.0, 1.0]), mask, values=values, gamma=0.9, lam=0.8)
    close(ret_w, ret)
    close(whitened, A.masked_whiten(adv, mask.bool()))
    assert abs(float(A.masked_mean(whitened, mask.bool()))) < 1e-9


def test_advantages_are_zero_on_padding_and_fully_masked_rows_leave_groups_alone():
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    for name in ("grpo", "dr_grpo", "rloo", "opo", "reinforce_pp_baseline"):
        adv, _ = A.compute_advantages(name, t([1.0, 0.0, 100.0]), mask, group_index=[0, 0, 0])
        assert torch.all(adv[~mask.bool()] == 0), name
        assert torch.all(adv[2] == 0), name
    # the empty row's reward (100) must not enter the group mean: 1 - mean(1, 0) = 0.5
    adv, _ = A.compute_advantages("dr_grpo", t([1.0, 0.0, 100.0]), mask, group_index=[0, 0, 0])
    close(adv[:, 0], [0.5, -0.5, 0.0])


def test_groups_of_one_and_all_equal_groups_get_zero_advantages():
    rewards = t([0.3, 1.0, 1.0, 1.0])
    groups = [0, 1, 1, 1]
    for name in ("grpo", "dr_grpo", "rloo", "opo", "reinforce_pp_baseline"):
        adv, _ = A.compute_advantages(name, rewards, torch.ones(4, 2), group_index=groups)
        assert torch.isfinite(adv).all() and torch.all(adv == 0), name


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "opo", "reinforce_pp_baseline")
REWARD_DTYPES = (torch.float32, torch.bfloat16, F64)
NON_DYADIC = (0.1, 0.7, 1 / 3)


def _ragged_mask(lengths) -> torch.Tensor:
    lengths = torch.tensor(lengths)
    return torch.arange(max(int(lengths.max()), 1))[None, :] < lengths[:, None]


def _exact_group_advantages(name: str, rewards: torch.Tensor, lengths, groups, eps: float = 1e-6) -> torch.Tensor:
    """The estimator's textbook formula in exact rational arithmetic on the given rewards, `[B, T]` float64."""
    r = [Fraction(x) for x in rewards.double().tolist()]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if lengths[i] > 0:
            members.setdefault(g, []).append(i)
    centred = [Fraction(0)] * len(r)
    has_spread = [False] * len(r)
    for rows in members.values():
        weights = {i: (lengths[i] if name == "opo" else 1) for i in rows}
        mean = sum(weights[i] * r[i] for i in rows) / sum(weights.values())
        for i in rows:
            centred[i] = r[i] - mean
            has_spread[i] = len({r[j] for j in rows}) > 1
    per_seq = [float(c) for c in centred]
    if name == "grpo":
        for rows in members.values():
            std = math.sqrt(float(sum(centred[i] ** 2 for i in rows) / max(len(rows) - 1, 1)))
            for i in rows:
                per_seq[i] = float(centred[i]) / (std + eps)
    elif name == "rloo":
        for rows in members.values():
            n = len(rows)
            for i in rows:
                per_seq[i] = float(centred[i] * n / (n - 1)) if n > 1 else 0.0
    elif name == "reinforce_pp_baseline":
        tokens = sum(lengths)
        mean = sum(centred[i] * lengths[i] for i in range(len(r))) / tokens
        var = sum((centred[i] - mean) ** 2 * lengths[i] for i in range(len(r))) / max(tokens - 1, 1)
        per_seq = [float(centred[i] - mean) / math.sqrt(float(var) + 1e-8) if has_spread[i] else 0.0
                   for i in range(len(r))]
    mask = _ragged_mask(lengths)
    return torch.where(mask, t(per_seq)[:, None], 0.0)


@pytest.mark.parametrize("dtype", REWARD_DTYPES)
@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_groups_of_equal_non_dyadic_rewards_get_exactly_zero_advantages(name, dtype):
    """The mean of n float copies of 0.1 is not 0.1; no rounding of it may reach the advantages."""
    for reward in NON_DYADIC:
        for n in range(2, 65):
            mask = _ragged_mask([1 + (3 * i) % 7 for i in range(n)])
            adv, ret = A.compute_advantages(name, torch.full((n,), reward, dtype=dtype), mask, group_index=[0] * n)
            assert torch.all(adv == 0) and torch.all(ret == 0), (reward, n)


def test_plain_group_mean_leaks_rounding_into_grpo_advantages():
    """What the exact-zero test guards against: centring on sum / count, GRPO gives 0.7 x 8 an |A| of 0.056."""
    rewards = torch.full((8,), 0.7)
    centred = rewards - rewards.sum() / 8
    std = (centred.pow(2).sum() / 7).sqrt()
    assert float((centred / (std + 1e-6)).abs().max()) > 0.01


@pytest.mark.parametrize("dtype", REWARD_DTYPES)
@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_mixed_batch_zeroes_equal_groups_and_keeps_the_others_exact(name, dtype):
    # groups: 0.1 x 8, 0.7 x 5, 1/3 x 16, a group of one, and three groups with variance (one with an empty row)
    rewards = [0.1] * 8 + [0.7] * 5 + [1 / 3] * 16 + [0.3] + [1.0, 0.0, 0.1, 1.0] + [0.1, 0.1, 0.7] + [0.0, 1.0, 0.5]
    groups = [0] * 8 + [1] * 5 + [2] * 16 + [3] + [4] * 4 + [5] * 3 + [6] * 3
    lengths = [1 + (5 * i) % 9 for i in range(len(rewards))]
    lengths[-1] = 0
    equal = torch.tensor([g <= 3 for g in groups])
    reward_t = t(rewards).to(dtype)
    adv, _ = A.compute_advantages(name, reward_t, _ragged_mask(lengths), group_index=groups)
    assert torch.all(adv[equal] == 0)
    tol = 1e-12 if dtype == F64 else 2e-6
    expected = _exact_group_advantages(name, reward_t, lengths, groups)
    torch.testing.assert_close(adv.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_group_estimators_match_an_exact_reference_on_random_ragged_groups(name, dtype):
    gen = torch.Generator().manual_seed(7)
    scores = t([0.0, 0.1, 1 / 3, 0.5, 0.7, 1.0, 0.25, 0.9])
    for _ in range(20):
        sizes = torch.randint(1, 13, (6,), generator=gen).tolist()
        groups = [g for g, size in enumerate(sizes) for _ in range(size)]
        lengths = torch.randint(0, 9, (len(groups),), generator=gen).tolist()
        rewards = scores[torch.randint(0, len(scores), (len(groups),), generator=gen)].to(dtype)
        adv, _ = A.compute_advantages(name, rewards, _ragged_mask(lengths), group_index=groups)
        expected = _exact_group_advantages(name, rewards, lengths, groups)
        tol = 1e-12 if dtype == F64 else 2e-6
        torch.testing.assert_close(adv.double(), expected, atol=tol, rtol=tol)
        # and the plain sum / count centring, in the same precision, agrees wherever a group has variance
        if name == "dr_grpo":
            mask = _ragged_mask(lengths)
            valid = mask.any(-1)
            for g in set(groups):
                rows = (torch.tensor(groups) == g) & valid
                members = rewards[rows]
                if len(members) and members.max() > members.min():
                    plain = members - members.sum() / len(members)
                    torch.testing.assert_close(adv[rows, 0], plain, atol=tol, rtol=tol)


def test_nonfinite_rewards_raise_with_row_but_padding_garbage_is_ignored():
    with pytest.raises(ValueError, match=r"rewards .*rows \[1\]"):
        A.compute_advantages("grpo", t([1.0, math.nan]), torch.ones(2, 2), group_index=[0, 0])
    garbage = t([[0.0, 1.0, math.nan], [1.0, math.inf, -math.inf]])
    adv, _ = A.compute_advantages("dr_grpo", garbage, t([[1, 1, 0], [1, 0, 0]]), group_index=[0, 0])
    close(adv, [[0, 0, 0], [0, 0, 0]])  # both sequences score 1.0
    with pytest.raises(ValueError, match=r"values .*rows \[0\]"):
        A.compute_advantages("gae", t([1.0]), torch.ones(1, 2), values=t([[0.0, math.inf]]))


def test_estimator_input_errors_are_clear():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="needs group_index"):
        A.compute_advantages("grpo", t([1.0, 0.0]), mask)
    with pytest.raises(ValueError, match="needs values"):
        A.compute_advantages("gae", t([1.0, 0.0]), mask)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grp'.*'grpo'"):
        A.compute_advantages("grp", t([1.0, 0.0]), mask)
    with pytest.raises(ValueError, match=r"unknown advantage estimator option\(s\) \['norm_by_sdt'\]"):
        A.compute_advantages("grpo", t([1.0, 0.0]), mask, group_index=[0, 0], norm_by_sdt=False)
    with pytest.raises(ValueError, match="group_index must have B=2"):
        A.compute_advantages("grpo", t([1.0, 0.0]), mask, group_index=[0])
    with pytest.raises(ValueError, match="rewards has shape"):
        A.compute_advantages("grpo", t([1.0, 0.0, 1.0]), mask, group_index=[0, 0])
    with pytest.raises(ValueError, match="gamma"):
        A.compute_advantages("reinforce_pp", t([1.0, 0.0]), mask, gamma=1.5)
    # an option meant for another estimator is accepted and ignored, so a trainer can pass its whole config
    adv, _ = A.compute_advantages("rloo", t([1.0, 0.0]), mask, group_index=[0, 0], norm_by_std=False, whiten=True)
    close(adv[:, 0], [1.0, -1.0])


def test_custom_estimator_registers_by_name_and_gets_only_what_it_declares(scratch_registries):
    @A.register_advantage_estimator("plain_return")
    def plain_return(token_rewards, response_mask, *, scale: float = 1.0):
        adv = token_rewards.flip(-1).cumsum(-1).flip(-1) * scale * response_mask
        return adv, adv

    adv, _ = A.compute_advantages("plain_return", t([2.0]), torch.ones(1, 3), group_index=[0], scale=0.5)
    close(adv, [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="already registered"):
        A.register_advantage_estimator("grpo")(plain_return)


@FAST
@given(
    rewards=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=24),
    groups=st.lists(st.integers(0, 4), min_size=24, max_size=24),
    name=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    norm_by_std=st.booleans(),
)
def test_group_advantages_have_zero_mean_in_every_group(rewards, groups, name, norm_by_std):
    groups = groups[: len(rewards)]
    mask = torch.ones(len(rewards), 2, dtype=torch.bool)
    adv, _ = A.compute_advantages(name, t(rewards), mask, group_index=groups, norm_by_std=norm_by_std)
    assert torch.isfinite(adv).all()
    per_seq = adv[:, 0]
    for g in set(groups):
        members = per_seq[t(groups, torch.long) == g]
        assert abs(float(members.mean())) < 1e-6 * max(1.0, float(members.abs().max()))


# ----------------------------------------------------------------------------------------------------------------
# Aggregation and gradient accumulation
# ----------------------------------------------------------------------------------------------------------------

LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, math.nan], [7.0, 7.0, 7.0]])
LOSS_MASK = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 15 / 5),
    ("seq-mean-token-mean", (2.0 + 4.5) / 2),
    ("seq-mean-token-sum", (6.0 + 9.0) / 2),
    ("seq-mean-token-sum-norm", (6.0 + 9.0) / (2 * 3)),
])
def test_aggregate_hand_values_ignore_padding_and_empty_rows(mode, expected):
    close(A.aggregate(LOSS, LOSS_MASK, mode), expected)


def test_seq_mean_token_sum_norm_uses_the_given_constant_through_the_normalizer():
    norm = A.loss_normalizer("seq-mean-token-sum-norm", [LOSS_MASK], constant=5)
    close(A.aggregate(LOSS, LOSS_MASK, "seq-mean-token-sum-norm", normalizer=norm), 15.0 / (2 * 5))


@pytest.mark.parametrize("mode", AGG_MODE_NAMES)
def test_seq_mean_token_sum_norm_and_others_do_not_grow_with_sequences_per_micro_batch(mode):
    row = t([[0.5, -1.0, 2.0, 0.0]])
    row_mask = t([[1, 1, 1, 0]])
    single = A.aggregate(row, row_mask, mode)
    for copies in (2, 8):
        close(A.aggregate(row.repeat(copies, 1), row_mask.repeat(copies, 1), mode), single)
    # eight identical sequences split into 1, 2 or 8 micro-batches: the summed loss is the same
    rows, masks = row.repeat(8, 1), row_mask.repeat(8, 1)
    for parts in (1, 2, 8):
        chunks = list(zip(rows.chunk(parts), masks.chunk(parts)))
        norm = A.loss_normalizer(mode, [m for _, m in chunks])
        close(sum(A.aggregate(x, m, mode, normalizer=norm) for x, m in chunks), single)


def test_normalizer_for_another_mode_is_rejected_and_empty_batches_give_zero():
    norm = A.loss_normalizer("token-mean", [LOSS_MASK])
    with pytest.raises(ValueError, match="computed for aggregation mode 'token-mean'"):
        A.aggregate(LOSS, LOSS_MASK, "seq-mean-token-mean", normalizer=norm)
    with pytest.raises(ValueError, match="unknown aggregation mode 'mean'"):
        A.aggregate(LOSS, LOSS_MASK, "mean")
    with pytest.raises(ValueError, match="loss_mat has shape"):
        A.aggregate(LOSS[:, :2], LOSS_MASK, "token-mean")
    x = torch.full((2, 3), math.nan, dtype=F64, requires_grad=True)
    for mode in AGG_MODE_NAMES:
        loss = A.aggregate(x, torch.zeros(2, 3), mode)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.all(x.grad == 0)


def _micro_batches(rows_of, lengths):
    """Row groups, each padded to its own longest response (at least 1 token wide)."""
    out = []
    for rows in rows_of:
        width = max([lengths[r] for r in rows] + [1])
        out.append((rows, width))
    return out


@FAST
@given(
    data=st.data(),
    lengths=st.lists(st.integers(0, 9), min_size=2, max_size=8),
    mode=st.sampled_from(AGG_MODE_NAMES),
    kind=st.sampled_from(["ppo", "gspo", "cispo", "reinforce", None]),
    explicit_constant=st.booleans(),
)
def test_micro_batch_losses_sum_to_the_mini_batch_loss_and_gradient(data, lengths, mode, kind, explicit_constant):
    batch, width = len(lengths), max(lengths + [1])
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    theta = (torch.randn(batch, width, generator=gen, dtype=F64) - 2.0).requires_grad_(True)
    old = theta.detach() + 0.3 * torch.randn(batch, width, generator=gen, dtype=F64)
    adv = torch.randn(batch, width, generator=gen, dtype=F64)
    mask = torch.arange(width)[None, :] < t(lengths, torch.long)[:, None]
    order = data.draw(st.permutations(range(batch)))
    cuts = sorted(data.draw(st.sets(st.integers(1, batch - 1), max_size=batch - 1)))
    groups = [order[a:b] for a, b in zip([0] + cuts, cuts + [batch])]
    constant = 11.0 if explicit_constant else None

    def loss_of(rows, cols, normalizer):
        lp, m = theta[rows, :cols], mask[rows, :cols]
        if kind is None:
            return A.aggregate(lp * adv[rows, :cols], m, mode, normalizer=normalizer)
        return A.policy_loss(kind, lp, old[rows, :cols], adv[rows, :cols], m, agg=mode, normalizer=normalizer)[0]

    whole_norm = A.loss_normalizer(mode, [mask], constant=constant)
    whole = loss_of(list(range(batch)), width, whole_norm if explicit_constant else None)
    (whole_grad,) = torch.autograd.grad(whole, theta)

    micro = _micro_batches(groups, lengths)
    norm = A.loss_normalizer(mode, [mask[rows, :w] for rows, w in micro], constant=constant)
    summed = sum(loss_of(rows, w, norm) for rows, w in micro)
    (summed_grad,) = torch.autograd.grad(summed, theta, allow_unused=True)
    summed_grad = torch.zeros_like(theta) if summed_grad is None else summed_grad
    assert abs(float(summed.detach()) - float(whole.detach())) <= 1e-6
    torch.testing.assert_close(summed_grad, whole_grad, atol=1e-6, rtol=0)


def test_normalising_each_micro_batch_separately_would_be_wrong():
    """The trap the normalizer avoids: averaging per-micro-batch token means weights short sequences up."""
    loss = t([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0]])
    whole = A.aggregate(loss, mask, "token-mean")  # (4 + 5) / 5 = 1.8
    naive = (A.aggregate(loss[:1], mask[:1], "token-mean") + A.aggregate(loss[1:, :1], mask[1:, :1], "token-mean")) / 2
    norm = A.loss_normalizer("token-mean", [mask[:1], mask[1:, :1]])
    exact = A.aggregate(loss[:1], mask[:1], "token-mean", norm) + A.aggregate(loss[1:, :1], mask[1:, :1], "token-mean", norm)
    close(whole, 1.8)
    close(exact, 1.8)
    assert abs(float(naive) - 1.8) > 1.0


# ----------------------------------------------------------------------------------------------------------------
# Policy losses
# ----------------------------------------------------------------------------------------------------------------


def _leaf(values):
    return t(values).requires_grad_(True)


def test_ppo_clip_higher_hand_values_gradients_and_metrics():
    ratios = [1.1, 1.5, 0.5, 0.9]
    old = t([[-1.0, -2.0, -0.5, -3.0]])
    logprobs = (old + t([[math.log(r) for r in ratios]])).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = A.policy_loss("ppo", logprobs, old, adv, torch.ones(1, 4), clip_low=0.2, clip_high=0.28)
    # per token: -1.1 (inside), -1.28 (clipped high), 0.8 (clipped low), 0.9 (inside)
    close(loss, (-1.1 - 1.28 + 0.8 + 0.9) / 4)
    loss.backward()
    close(logprobs.grad, [[-1.1 / 4, 0.0, 0.0, 0.9 / 4]])
    assert metrics["clip_frac_low"] == pytest.approx(0.25) and metrics["clip_frac_high"] == pytest.approx(0.25)
    assert metrics["ratio_max"] == pytest.approx(1.5) and metrics["ratio_min"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / 4)
    assert metrics["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 4)
    assert all(isinstance(v, float) for v in metrics.values())


def test_ppo_dual_clip_bounds_the_loss_of_negative_advantages():
    old = t([[0.0, 0.0]])
    logprobs = (old + t([[math.log(5.0), math.log(5.0)]])).requires_grad_(True)
    adv = t([[-1.0, 1.0]])
    loss, metrics = A.policy_loss("ppo", logprobs, old, adv, torch.ones(1, 2), dual_clip=3.0, agg="seq-mean-token-sum")
    # A<0: max(5, 1.2) = 5, bounded by 3; A>0: max(-5, -1.2) = -1.2
    close(loss, 3.0 - 1.2)
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0]])
    assert metrics["clip_frac_dual"] == pytest.approx(0.5)


def test_gspo_uses_the_geometric_mean_sequence_ratio():
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logprobs = (old + t([[math.log(1.2), math.log(0.8)]] * 2)).requires_grad_(True)
    adv = t([[1.0, 1.0], [-1.0, -1.0]])
    s = math.sqrt(1.2 * 0.8)
    loss, metrics = A.policy_loss("gspo", logprobs, old, adv, torch.ones(2, 2), clip_low=3e-4, clip_high=4e-4,
                                  agg="seq-mean-token-mean")
    # sequence 0 (A > 0, s < 1): not clipped, loss -s; sequence 1 (A < 0, s < 1 - 3e-4): clipped, loss 1 - 3e-4
    close(loss, (-s + (1 - 3e-4)) / 2)
    loss.backward()
    # d/dlogp_t of -A * s_i averaged over |o_i| tokens and 2 sequences: -s / 2 / 2 per token of sequence 0
    close(logprobs.grad, [[-s / 4, -s / 4], [0.0, 0.0]])
    assert metrics["clip_frac_low"] == pytest.approx(0.5)


def test_cispo_keeps_a_gradient_on_clipped_tokens():
    old = t([[-1.0 - math.log(1.5), -2.0 - math.log(0.5)]])
    logprobs = _leaf([[-1.0, -2.0]])  # ratios 1.5 and 0.5
    adv = t([[1.0, -1.0]])
    loss, metrics = A.policy_loss("cispo", logprobs, old, adv, torch.ones(1, 2), clip_low=1.0, clip_high=0.28)
    # weights sg[clip(r, 0, 1.28)] = 1.28, 0.5; per token -w * A * logp = 1.28 * -1 * -1... = 1.28, -1.0
    close(loss, (1.28 - 1.0) / 2)
    loss.backward()
    close(logprobs.grad, [[-1.28 / 2, 0.5 / 2]])
    assert metrics["clip_frac_high"] == pytest.approx(0.5) and metrics["clip_frac_low"] == 0.0


def test_reinforce_is_advantage_weighted_log_likelihood():
    logprobs = _leaf([[-1.0, -2.0, -3.0]])
    loss, metrics = A.policy_loss("reinforce", logprobs, None, t([[2.0, 2.0, 0.0]]), t([[1, 1, 0]]))
    close(loss, (2.0 + 4.0) / 2)
    loss.backward()
    close(logprobs.grad, [[-1.0, -1.0, 0.0]])
    assert metrics["ratio_mean"] == 1.0 and metrics["approx_kl"] == 0.0


@FAST
@given(
    advantages=st.lists(st.floats(-10, 10, allow_nan=False), min_size=6, max_size=6),
    logprobs=st.lists(st.floats(-20, 0, allow_nan=False), min_size=6, max_size=6),
    lengths=st.tuples(st.integers(0, 3), st.integers(1, 3)),
    clips=st.tuples(st.floats(0, 1), st.floats(0, 5)),
    mode=st.sampled_from(AGG_MODE_NAMES),
    kind=st.sampled_from(["ppo", "gspo"]),
)
def test_ratio_of_one_makes_clipped_loss_the_plain_policy_gradient(advantages, logprobs, lengths, clips, mode, kind):
    mask = torch.arange(3)[None, :] < t(lengths, torch.long)[:, None]
    adv = t(advantages).view(2, 3)
    lp = t(logprobs).view(2, 3).requires_grad_(True)
    clipped, metrics = A.policy_loss(kind, lp, lp.detach().clone(), adv, mask, clip_low=clips[0],
                                     clip_high=clips[1], dual_clip=3.0, agg=mode)
    (clipped_grad,) = torch.autograd.grad(clipped, lp)
    plain, _ = A.policy_loss("reinforce", lp, None, adv, mask, agg=mode)
    (plain_grad,) = torch.autograd.grad(plain, lp)
    close(clipped, A.aggregate(-adv, mask, mode), atol=1e-9)
    close(clipped_grad, plain_grad, atol=1e-9)
    assert metrics["clip_frac_low"] == 0.0 and metrics["clip_frac_high"] == 0.0


@pytest.mark.parametrize("kind", ["ppo", "gspo", "cispo", "reinforce"])
def test_huge_logprob_gaps_and_padding_garbage_cannot_overflow_or_leak_nan(kind):
    nan, inf = math.nan, math.inf
    logprobs = _leaf([[-1.0, -1.0, nan], [-0.5, -900.0, inf]])
    old = t([[-1e4, -inf, nan], [-1e-3, 0.0, -inf]])
    adv = t([[1.0, -1.0, nan], [-2.0, 3.0, inf]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    dual = 3.0 if kind in ("ppo", "gspo") else None
    loss, metrics = A.policy_loss(kind, logprobs, old, adv, mask, dual_clip=dual)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert torch.all(logprobs.grad[:, 2] == 0)
    assert all(math.isfinite(v) for v in metrics.values())
    if kind != "gspo":
        assert metrics["ratio_max"] == pytest.approx(math.exp(A.LOG_RATIO_CLAMP))


def test_policy_loss_rejects_bad_input_by_name():
    lp, mask = t([[-1.0, -2.0]]), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"logprobs has non-finite .*rows \[0\]"):
        A.policy_loss("ppo", t([[-1.0, math.nan]]), lp, t([[1.0, 1.0]]), mask)
    with pytest.raises(ValueError, match=r"old_logprobs has NaN"):
        A.policy_loss("ppo", lp, t([[math.nan, -1.0]]), t([[1.0, 1.0]]), mask)
    with pytest.raises(ValueError, match=r"advantages has non-finite"):
        A.policy_loss("ppo", lp, lp, t([[math.inf, 1.0]]), mask)
    with pytest.raises(ValueError, match=r"unknown policy loss 'pp'.*'ppo'"):
        A.policy_loss("pp", lp, lp, lp, mask)
    with pytest.raises(ValueError, match="dual_clip applies"):
        A.policy_loss("cispo", lp, lp, lp, mask, dual_clip=3.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        A.policy_loss("ppo", lp, lp, lp, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low must be in"):
        A.policy_loss("ppo", lp, lp, lp, mask, clip_low=1.5)
    with pytest.raises(ValueError, match=r"unknown policy loss option\(s\) \['clip_ratio'\]"):
        A.policy_loss("ppo", lp, lp, lp, mask, clip_ratio=0.2)
    with pytest.raises(ValueError, match="advantages has shape"):
        A.policy_loss("ppo", lp, lp, t([1.0]), mask)
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        A.policy_loss("ppo", lp, lp, lp, t([[1.0, 0.5]]))


def test_custom_policy_loss_metrics_are_averaged_over_response_tokens(scratch_registries):
    @A.register_policy_loss("hinge")
    def hinge(logprobs, old_logprobs, advantages, response_mask, *, margin: float = 1.0):
        return torch.relu(margin - advantages * logprobs), {"active": margin - advantages * logprobs > 0}

    loss, metrics = A.policy_loss("hinge", _leaf([[-1.0, 0.5, 7.0]]), None, t([[1.0, 4.0, 1.0]]), t([[1, 1, 0]]),
                                  margin=2.0)
    close(loss, (3.0 + 0.0) / 2)
    assert metrics["active"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# Value loss
# ----------------------------------------------------------------------------------------------------------------


def test_value_loss_hand_values_with_clipping():
    values = _leaf([[1.0, 1.0, 5.0]])
    old, returns = t([[0.0, 0.0, 0.0]]), t([[0.2, 2.0, 0.0]])
    loss, metrics = A.value_loss(values, old, returns, t([[1, 1, 0]]), clip=0.5)
    # token 0: max(0.8^2, 0.3^2) = 0.64; token 1: max(1^2, (0.5 - 2)^2) = 2.25 (the clipped, flat branch)
    close(loss, (0.5 * 0.64 + 0.5 * 2.25) / 2)
    loss.backward()
    close(values.grad, [[0.8 / 2, 0.0, 0.0]])
    assert metrics["vf_clip_frac"] == pytest.approx(0.5)
    unclipped, _ = A.value_loss(values, old, returns, t([[1, 1, 0]]), clip=None)
    close(unclipped, (0.5 * 0.64 + 0.5 * 1.0) / 2)
    with pytest.raises(ValueError, match=r"returns has non-finite"):
        A.value_loss(values, old, t([[math.nan, 0.0, 0.0]]), t([[1, 1, 0]]))


def _near_threshold_value_data(clip: float, seed: int = 0):
    """float32 values, old values and returns: half the tokens within 1% of the clip boundary, half unrelated."""
    gen = torch.Generator().manual_seed(seed)
    shape = (32, 512)
    old = 0.2 * torch.randn(shape, generator=gen)
    side = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    # |V - V_old| = clip * (1 + margin), |margin| in [1e-4, 1e-2]: near the boundary, never ambiguous in float32
    margin = (torch.randint(0, 2, shape, generator=gen) * 2 - 1) * (1e-4 + 0.0099 * torch.rand(shape, generator=gen))
    near = old + side * clip * (1 + margin)
    unrelated = 0.2 * torch.randn(shape, generator=gen)
    values = torch.where(torch.rand(shape, generator=gen) < 0.5, near, unrelated)
    returns = 0.2 * torch.randn(shape, generator=gen)
    return values.float(), old.float(), returns.float()


def test_vf_clip_frac_is_a_direct_count_of_tokens_whose_clipped_term_is_larger():
    clip = 0.2
    values, old, returns = _near_threshold_value_data(clip)
    mask = torch.ones(values.shape, dtype=torch.bool)
    mask[:, -7:] = False
    _, metrics = A.value_loss(values, old, returns, mask, clip=clip)
    # the count in exact float64 arithmetic on the same float32 numbers
    v, o, r = values.double(), old.double(), returns.double()
    clipped = torch.minimum(torch.maximum(v, o - clip), o + clip)
    direct = int((((clipped - r) ** 2 > (v - r) ** 2) & mask).sum())
    tokens = int(mask.sum())
    assert 1000 < direct < tokens - 1000
    assert round(metrics["vf_clip_frac"] * tokens) == direct
    # the old form V_old + clamp(V - V_old) rounds unclipped values and over-counts on the same data
    old_form = old + (values - old).clamp(-clip, clip)
    assert int((((old_form - returns) ** 2 > (values - returns) ** 2) & mask).sum()) > direct


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_clipping_the_value_itself_leaves_loss_and_gradient_unchanged(dtype, tol):
    clip = 0.2
    values, old, returns = (x.to(dtype) for x in _near_threshold_value_data(clip, seed=1))
    mask = torch.rand(values.shape, generator=torch.Generator().manual_seed(2)) < 0.9
    for agg in AGG_MODE_NAMES:
        v = values.clone().requires_grad_(True)
        loss, _ = A.value_loss(v, old, returns, mask, clip=clip, agg=agg)
        (grad,) = torch.autograd.grad(loss, v)
        v_ref = values.double().clone().requires_grad_(True)
        o, r = old.double(), returns.double()
        clipped = o + (v_ref - o).clamp(-clip, clip)
        reference = A.aggregate(0.5 * torch.maximum((v_ref - r) ** 2, (clipped - r) ** 2), mask, agg)
        (grad_ref,) = torch.autograd.grad(reference, v_ref)
        torch.testing.assert_close(loss.double(), reference.detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(grad.double(), grad_ref, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logprobs, ref = t([[-1.0, -1.0]]), t([[-2.0, -0.5]])  # log-ratios 1 and -0.5
    close(A.kl_penalty(logprobs, ref, "k1"), [[1.0, -0.5]])
    close(A.kl_penalty(logprobs, ref, "k2"), [[0.5, 0.125]])
    close(A.kl_penalty(logprobs, ref, "k3"), [[math.exp(-1.0), math.exp(0.5) - 1.5]])
    close(A.kl_penalty(logprobs, ref, "abs"), [[1.0, 0.5]])
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*'k3'"):
        A.kl_penalty(logprobs, ref, "k4")


LOGPROB = st.one_of(st.floats(-1e6, 0), st.just(-math.inf))


@FAST
@given(logprobs=st.lists(LOGPROB, min_size=4, max_size=4), ref=st.lists(LOGPROB, min_size=4, max_size=4))
@example(logprobs=[-1.4563399612947438e-44, -math.inf, 0.0, -1e6], ref=[0.0, 0.0, -math.inf, 0.0])  # rounding
def test_k3_is_non_negative_and_finite(logprobs, ref):
    k3 = A.kl_penalty(t([logprobs]), t([ref]), "k3")
    assert torch.isfinite(k3).all() and torch.all(k3 >= 0) and torch.all(k3 <= A.KL_LOG_RATIO_CLAMP)
    for kind in ("k1", "k2", "abs"):
        assert torch.isfinite(A.kl_penalty(t([logprobs]), t([ref]), kind)).all()


def test_kl_penalty_masks_padding_and_rejects_nan_on_real_tokens():
    logprobs = _leaf([[-1.0, math.nan, math.inf]])
    kl = A.kl_penalty(logprobs, t([[-2.0, -1.0, math.nan]]), "k3", response_mask=t([[1, 0, 0]]))
    kl.sum().backward()
    close(kl, [[math.exp(-1.0), 0.0, 0.0]])
    assert torch.isfinite(logprobs.grad).all()
    with pytest.raises(ValueError, match=r"ref_logprobs has NaN .*rows \[0\]"):
        A.kl_penalty(t([[-1.0]]), t([[math.nan]]), "k1")


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_term_is_added_to_the_loss_so_descent_pulls_towards_the_reference(kind):
    """TinyZero subtracted the KL term (maximising drift); minimising kl_loss must shrink the true KL."""
    gen = torch.Generator().manual_seed(0)
    ref_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=F64), -1)

    def train(sign: float) -> float:
        theta = (torch.randn(6, generator=gen, dtype=F64) * 2).requires_grad_(True)
        for _ in range(60):
            logp_all = torch.log_softmax(theta, -1)
            tokens = torch.multinomial(logp_all.exp().detach(), 512, replacement=True, generator=gen)
            loss = A.kl_loss(logp_all[tokens][None], ref_logp[tokens][None], torch.ones(1, 512), kind, kl_coef=1.0)
            (grad,) = torch.autograd.grad(sign * loss, theta)
            theta = (theta - 0.5 * grad).detach().requires_grad_(True)
        logp_all = torch.log_softmax(theta.detach(), -1)
        return float((logp_all.exp() * (logp_all - ref_logp)).sum())

    assert train(+1.0) < 0.01
    assert train(-1.0) > 0.5  # the subtracted term drives the policy away


def test_kl_shaped_rewards_subtract_the_penalty_per_token():
    shaped = A.kl_shaped_rewards(t([1.0, 0.0]), t([[-1.0, -1.0], [-0.5, -3.0]]), t([[-2.0, -1.0], [-0.5, -1.0]]),
                                 t([[1, 1], [1, 0]]), kl_coef=0.1, kind="k1")
    close(shaped, [[-0.1, 1.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# ----------------------------------------------------------------------------------------------------------------


def _naive_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype,tol,grad_rtol", [(torch.float32, 1e-5, 0.0), (torch.bfloat16, 1e-4, 2**-7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_match_log_softmax_and_its_gradient(dtype, tol, grad_rtol, temperature):
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(3, 10, 50, generator=gen) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 9), generator=gen)
    logits = full[:, :-1]  # non-contiguous, as a trainer slices it
    weights = torch.randn(3, 9, generator=gen)
    for chunk in (4, 7, 1000):
        lp = A.logprobs_from_logits(logits, labels, chunk_size=chunk, temperature=temperature)
        ent = A.entropy_from_logits(logits, chunk_size=chunk, temperature=temperature)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        close(lp, _naive_logprobs(logits.detach(), labels, temperature), atol=tol)
        close(ent, _naive_entropy(logits.detach(), temperature), atol=tol)
        (grad_lp,) = torch.autograd.grad((lp * weights).sum(), full)
        ref = full.detach().double().requires_grad_(True)
        expected = torch.autograd.grad((_naive_logprobs(ref[:, :-1], labels, temperature) * weights).sum(), ref)[0]
        assert grad_lp.dtype == dtype
        # bf16 gradients are float32 results rounded to bf16 (relative error up to 2^-8)
        torch.testing.assert_close(grad_lp.double(), expected, atol=tol, rtol=grad_rtol)
        (grad_ent,) = torch.autograd.grad((ent * weights).sum(), full)
        expected = torch.autograd.grad((_naive_entropy(ref[:, :-1], temperature) * weights).sum(), ref)[0]
        torch.testing.assert_close(grad_ent.double(), expected, atol=tol, rtol=grad_rtol)


def test_chunked_functions_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda x: A.logprobs_from_logits(x[:, 1:], labels, 3, 1.3), (logits,))
    assert torch.autograd.gradcheck(lambda x: A.entropy_from_logits(x, 3, 0.8), (logits,))


def test_entropy_handles_minus_inf_logits():
    logits = t([[[0.0, 0.0, -math.inf, -math.inf]]]).requires_grad_(True)
    ent = A.entropy_from_logits(logits)
    ent.sum().backward()
    close(ent, [[math.log(2.0)]], atol=1e-6)
    assert torch.isfinite(logits.grad).all()


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor produced by any operator."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                self.largest = max(self.largest, x.numel())
        return out


def test_no_float32_copy_of_the_full_logits_in_forward_or_backward():
    batch, width, vocab, chunk = 4, 64, 512, 16
    logits = torch.randn(batch, width + 1, vocab).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, width))
    probe = _LargestFloat32()
    with probe:
        lp = A.logprobs_from_logits(logits[:, :-1], labels, chunk_size=chunk)
        ent = A.entropy_from_logits(logits[:, :-1], chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert probe.largest <= chunk * vocab
    naive = _LargestFloat32()
    with naive:  # the probe does see the naive version's full float32 copy
        torch.log_softmax(logits[:, :-1].float(), -1)
    assert naive.largest == batch * width * vocab


def test_logprobs_of_a_real_model_match_its_own_language_model_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = tokenizer(["Using the numbers [3, 5, 2], make 16.", "<answer>(3+5)*2</answer>"], padding=True,
                    return_tensors="pt")
    out = model(**ids, labels=ids.input_ids.masked_fill(ids.attention_mask == 0, -100))
    lp = A.logprobs_from_logits(out.logits[:, :-1], ids.input_ids[:, 1:], chunk_size=5)
    token_mask = ids.attention_mask[:, 1:]
    close(-A.aggregate(lp, token_mask, "token-mean"), out.loss.detach(), atol=1e-5)


def test_logits_input_errors_are_clear():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"token ids in \[0, 5\)"):
        A.logprobs_from_logits(logits, torch.tensor([[0, 1, 5], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        A.logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        A.entropy_from_logits(logits, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        A.entropy_from_logits(torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# DAPO helpers
# ----------------------------------------------------------------------------------------------------------------


def test_overlong_penalty_ramps_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 17])
    close(A.overlong_penalty(lengths, max_length=16, buffer=4, penalty=0.5), [0.0, 0.0, -0.25, -0.5, -0.5])
    close(A.overlong_penalty(lengths, max_length=16, buffer=0), [0.0, 0.0, 0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="buffer must be in"):
        A.overlong_penalty(lengths, max_length=16, buffer=32)


def test_groups_with_reward_variance_marks_informative_groups():
    keep = A.groups_with_reward_variance(t([1.0, 1.0, 0.0, 1.0, 0.5]), ["a", "a", "b", "b", "c"])
    assert keep.tolist() == [False, False, True, True, False]


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


def test_every_preset_loads_with_all_keys_and_valid_names():
    names = A.available_presets()
    assert {"ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "gspo"} <= set(names)
    for name in names:
        preset = A.load_preset(name)
        assert list(preset) == list(A.PRESET_KEYS), name
        assert preset["name"] == name
        assert preset["advantage"] in A.ADVANTAGE_ESTIMATORS
        assert preset["policy_loss"] in A.POLICY_LOSSES
        assert preset["loss_agg"] in A.AGG_MODES
        assert preset["kl_estimator"] in A.KL_ESTIMATORS


def test_presets_hold_the_values_their_papers_use():
    ppo, grpo, dr, dapo, gspo = (A.load_preset(n) for n in ("ppo", "grpo", "dr_grpo", "dapo", "gspo"))
    assert (ppo["advantage"], ppo["kl_estimator"], ppo["kl_in_reward"], ppo["kl_coef"]) == ("gae", "k1", True, 0.001)
    assert (grpo["loss_agg"], grpo["kl_estimator"], grpo["kl_in_reward"]) == ("seq-mean-token-mean", "k3", False)
    assert (dr["advantage"], dr["norm_by_std"], dr["loss_agg"], dr["kl_coef"]) == (
        "dr_grpo", False, "seq-mean-token-sum-norm", 0.0)
    assert (dapo["clip_low"], dapo["clip_high"], dapo["kl_coef"], dapo["dynamic_sampling"], dapo["overlong"]) == (
        0.2, 0.28, 0.0, True, "soft")
    assert (gspo["policy_loss"], gspo["clip_low"], gspo["clip_high"]) == ("gspo", 3e-4, 4e-4)


@pytest.mark.parametrize("name", ["ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "gspo", "cispo"])
def test_each_preset_drives_the_functions_end_to_end(name):
    p = A.load_preset(name)
    gen = torch.Generator().manual_seed(3)
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logprobs = (-torch.rand(4, 4, generator=gen, dtype=F64)).requires_grad_(True)
    old, ref = logprobs.detach() - 0.01, logprobs.detach() - 0.1
    rewards = t([1.0, 0.0, 0.0, 1.0])
    if p["kl_in_reward"]:
        rewards = A.kl_shaped_rewards(rewards, old, ref, mask, p["kl_coef"], p["kl_estimator"])
    values = torch.rand(4, 4, generator=gen, dtype=F64)
    adv, ret = A.compute_advantages(p["advantage"], rewards, mask, group_index=[0, 0, 1, 1], values=values,
                                    gamma=p["gamma"], lam=p["lam"], norm_by_std=p["norm_by_std"])
    norm = A.loss_normalizer(p["loss_agg"], [mask], constant=p["loss_agg_normalizer"])
    loss, _ = A.policy_loss(p["policy_loss"], logprobs, old, adv, mask, clip_low=p["clip_low"],
                            clip_high=p["clip_high"], dual_clip=p["dual_clip"], agg=p["loss_agg"], normalizer=norm)
    if p["kl_coef"] > 0 and not p["kl_in_reward"]:
        loss = loss + A.kl_loss(logprobs, ref, mask, p["kl_estimator"], p["kl_coef"], p["loss_agg"], norm)
    if p["advantage"] == "gae":
        v_loss, _ = A.value_loss(values.clone().requires_grad_(True), values, ret, mask, clip=p["value_clip"])
        assert torch.isfinite(v_loss)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().sum() > 0


def test_unknown_or_malformed_presets_are_named():
    with pytest.raises(ValueError, match=r"unknown algorithm preset 'grpo2'.*'dapo'"):
        A.load_preset("grpo2")
    with pytest.raises(ValueError, match=r"unknown algorithm preset '../grpo'"):
        A.load_preset("../grpo")
    bad = dict(A.load_preset("grpo"), loss_agg="mean")
    with pytest.raises(ValueError, match=r"mine: loss_agg='mean' is not one of"):
        A.validate_preset(bad, source="mine")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['kl_coef'\]"):
        A.validate_preset({k: v for k, v in A.load_preset("grpo").items() if k != "kl_coef"})


# ----------------------------------------------------------------------------------------------------------------
# The package's public surface
# ----------------------------------------------------------------------------------------------------------------

PUBLIC_NAMES = {
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "KL_LOG_RATIO_CLAMP", "POLICY_LOSSES",
    "PRESET_KEYS", "LossNormalizer", "aggregate", "available_presets", "compute_advantages", "entropy_from_logits",
    "groups_with_reward_variance", "importance_log_ratio", "kl_loss", "kl_penalty", "kl_shaped_rewards",
    "load_preset", "logprobs_from_logits", "loss_normalizer", "masked_mean", "masked_whiten", "overlong_penalty",
    "policy_loss", "register_advantage_estimator", "register_policy_loss", "token_rewards_from_outcome",
    "validate_preset", "value_loss",
}


def test_every_public_name_imports_from_the_package_and_names_what_it_always_named():
    assert set(A.__all__) == PUBLIC_NAMES
    namespace: dict = {}
    exec(f"from tinyrl.algorithms import {', '.join(sorted(PUBLIC_NAMES))}", namespace)
    for name in PUBLIC_NAMES:
        assert namespace[name] is getattr(A, name), name
    # functions, not the family modules that define them
    assert callable(A.value_loss) and callable(A.policy_loss) and callable(A.compute_advantages)


def test_one_registry_per_family_serves_dispatch_and_preset_validation(scratch_registries):
    @A.register_advantage_estimator("mean_only")
    def mean_only(token_rewards, response_mask, *, group_index):
        return A.compute_advantages("dr_grpo", token_rewards, response_mask, group_index=group_index)

    @A.register_policy_loss("plain")
    def plain(logprobs, old_logprobs, advantages, response_mask):
        return -advantages * logprobs, {}

    preset = dict(A.load_preset("grpo"), advantage="mean_only", policy_loss="plain")
    A.validate_preset(preset, source="custom")
    adv, _ = A.compute_advantages("mean_only", t([1.0, 0.0]), torch.ones(2, 2), group_index=[0, 0])
    close(adv[:, 0], [0.5, -0.5])
    loss, _ = A.policy_loss("plain", t([[-1.0, -1.0], [-1.0, -1.0]]), None, adv, torch.ones(2, 2))
    close(loss, 0.0)
