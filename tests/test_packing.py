"""Sequence packing changes no number: packed and padded passes over ragged batches give the same log-probs,
entropies, values, losses and gradients on a real tiny transformer, and packed micro-batches keep the budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrl import algorithms
from tinyrl.batch import build_batch
from tinyrl.config import ConfigError
from tinyrl.models import load_critic, load_policy
from tinyrl.packing import layout_for, pack_layout, packed_lengths, packing_for, plan_micro_batches
from tinyrl.policy_ops import batched_logprobs, batched_values, token_logprobs, token_values
from tinyrl.trainer import RLTrainer

# prompt lengths and response lengths: an empty response, one-token responses, and a row (21 + 40 tokens) longer
# than the smaller budgets below
PROMPT_LENGTHS = [3, 7, 1, 21, 12, 4, 2, 9, 5]
RESPONSE_LENGTHS = [6, 0, 1, 40, 3, 9, 14, 1, 25]
BUDGETS = [24, 64, 10_000]
LAYOUTS = ["dense", "one_row"]


def _ragged_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (p,), generator=g).tolist() for p in PROMPT_LENGTHS]
    responses = [torch.randint(3, 300, (r,), generator=g).tolist() for r in RESPONSE_LENGTHS]
    n = len(prompts)
    batch = build_batch(prompts, responses, [0.0] * n, [i // 3 for i in range(n)], pad_id=0)
    shape = batch.response_mask.shape
    batch.advantages = torch.randn(shape, generator=g) * batch.response_mask
    batch.old_logprobs = -torch.rand(shape, generator=g) * 3
    batch.ref_logprobs = -torch.rand(shape, generator=g) * 3
    batch.values = torch.randn(shape, generator=g)
    batch.returns = torch.randn(shape, generator=g)
    return batch


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def models(request, tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir, attn_implementation=request.param)
    critic = load_critic(tiny_model_dir, attn_implementation=request.param)
    with torch.no_grad():  # the value head starts at zero; give it weights so values differ between tokens
        critic.score.weight.normal_(generator=torch.Generator().manual_seed(3))
    return policy, critic


@pytest.fixture(params=["installed", "columns"])
def logit_selection(request, monkeypatch):
    """The LM head of several packed rows runs on a boolean mask where transformers slices by one (5.2x), else on
    the columns any row needs (earlier 5.x, as on the GPU machine's 5.17): both paths are checked here."""
    from tinyrl import policy_ops

    if request.param == "columns":
        monkeypatch.setattr(policy_ops, "slices_logits_by_mask", lambda: False)
    return request.param


def test_padded_and_packed_logprobs_entropies_and_values_agree(models, logit_selection):
    policy, critic = models
    batch = _ragged_batch()
    mask = batch.response_mask > 0
    padded_lp, padded_ent = token_logprobs(policy, batch, temperature=0.7, with_entropy=True)
    padded_values = token_values(critic, batch)
    for budget in BUDGETS:
        for layout in LAYOUTS:
            micro, packing = plan_micro_batches(batch, range(batch.size), budget, layout)
            lp, ent, values = (torch.zeros(batch.response_mask.shape) for _ in range(3))
            for rows in micro:
                mb = batch.select(rows)
                mb_lp, mb_ent = token_logprobs(policy, mb, 0.7, with_entropy=True, packing=packing)
                lp[rows, : mb.response_width] = mb_lp.detach()
                ent[rows, : mb.response_width] = mb_ent.detach()
                values[rows, : mb.response_width] = token_values(critic, mb, packing=packing).detach()
            where = f"budget {budget}, {layout}"
            torch.testing.assert_close(lp[mask], padded_lp.detach()[mask], atol=1e-5, rtol=0, msg=where)
            torch.testing.assert_close(ent[mask], padded_ent.detach()[mask], atol=1e-5, rtol=0, msg=where)
            torch.testing.assert_close(values[mask], padded_values.detach()[mask], atol=1e-5, rtol=0, msg=where)
            assert (lp[~mask] == 0).all() and (values[~mask] == 0).all()  # no response token there
    # the batched no-gradient passes of the trainer, packed vs padded
    for layout in LAYOUTS:
        torch.testing.assert_close(
            batched_logprobs(policy, batch, 64, 0.7, torch.device("cpu"), torch.float32, layout)[mask],
            batched_logprobs(policy, batch, 64, 0.7, torch.device("cpu"), torch.float32)[mask], atol=1e-5, rtol=0,
        )
        torch.testing.assert_close(
            batched_values(critic, batch, 64, torch.device("cpu"), torch.float32, layout)[mask],
            batched_values(critic, batch, 64, torch.device("cpu"), torch.float32)[mask], atol=1e-5, rtol=0,
        )


def _accumulated_loss_and_grads(policy, critic, batch, budget, layout, agg):
    """Policy (PPO clip + KL + entropy) and value losses accumulated over micro-batches, normalised over the whole
    mini-batch as the trainer does; returns the summed losses and every parameter's gradient."""
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    normalizer = algorithms.loss_normalizer(agg, [batch.response_mask], constant=64)
    micro, packing = plan_micro_batches(batch, range(batch.size), budget, layout)
    policy_total = value_total = 0.0
    for rows in micro:
        mb = batch.select(rows)
        logprobs, entropy = token_logprobs(policy, mb, 0.7, with_entropy=True, packing=packing)
        loss, _ = algorithms.policy_loss("ppo", logprobs, mb.old_logprobs, mb.advantages, mb.response_mask,
                                         agg=agg, normalizer=normalizer)
        kl = algorithms.kl_penalty(logprobs, mb.ref_logprobs, "k3")
        loss = loss + 0.1 * algorithms.aggregate(kl, mb.response_mask, agg, normalizer=normalizer)
        loss = loss - 0.01 * algorithms.aggregate(entropy, mb.response_mask, agg, normalizer=normalizer)
        loss.backward()
        values = token_values(critic, mb, packing=packing)
        value_loss, _ = algorithms.value_loss(values, mb.values, mb.returns, mb.response_mask, clip=0.5, agg=agg,
                                              normalizer=normalizer)
        value_loss.backward()
        policy_total += loss.item()
        value_total += value_loss.item()
    grads = {f"policy.{k}": p.grad.clone() for k, p in policy.named_parameters()}
    grads.update({f"critic.{k}": p.grad.clone() for k, p in critic.named_parameters()})
    return policy_total, value_total, grads


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_padded_and_packed_losses_and_gradients_agree(models, agg, logit_selection):
    policy, critic = models
    batch = _ragged_batch(seed=1)
    padded = _accumulated_loss_and_grads(policy, critic, batch, 24, None, agg)
    assert padded[0] != 0 and padded[1] != 0
    for budget in BUDGETS:
        for layout in LAYOUTS:
            packed = _accumulated_loss_and_grads(policy, critic, batch, budget, layout, agg)
            assert packed[0] == pytest.approx(padded[0], abs=1e-5) and packed[1] == pytest.approx(padded[1], abs=1e-5)
            for name, grad in padded[2].items():
                where = f"{name}, {budget}, {layout}"
                torch.testing.assert_close(packed[2][name], grad, atol=1e-5, rtol=1e-5, msg=where)


def test_packed_micro_batches_are_real_tokens_only(tiny_model_dir):
    """Packing feeds each prompt and all but the last response token, in rows as wide as the longest sequence."""
    batch = _ragged_batch()
    lengths = packed_lengths(batch)
    assert lengths == [p + r - 1 if r else 0 for p, r in zip(PROMPT_LENGTHS, RESPONSE_LENGTHS)]
    micro, packing = plan_micro_batches(batch, range(batch.size), 10_000, "one_row")
    assert len(micro) == 1 and packing.row_tokens is None
    layout = pack_layout(batch.select(micro[0]), packing)
    assert layout.input_ids.shape == (1, sum(lengths))
    # every sequence restarts at position 0 and holds its own tokens in order
    starts = (layout.position_ids[0] == 0).nonzero().flatten().tolist()
    assert len(starts) == sum(1 for n in lengths if n)
    first = micro[0][0]
    p, r = PROMPT_LENGTHS[first], RESPONSE_LENGTHS[first]
    row = batch.input_ids[first]
    expected = row[batch.prompt_width - p : batch.prompt_width + r - 1]
    assert layout.input_ids[0, : p + r - 1].tolist() == expected.tolist()
    dense, dense_packing = plan_micro_batches(batch, range(batch.size), 10_000, "dense")
    assert dense_packing.row_tokens == max(lengths)
    dense_layout = pack_layout(batch.select(dense[0]), dense_packing)
    assert dense_layout.input_ids.shape[1] == max(lengths)
    padded_tokens = batch.input_ids.numel()
    assert dense_layout.tokens < 0.6 * padded_tokens  # this ragged batch is mostly padding when padded


def test_flash_attention_boundaries_match_what_transformers_derives_from_positions():
    """flash-attention's varlen path gets explicit sequence boundaries; they are the ones transformers itself
    derives from the restarting position_ids (flash-attn cannot run on this CPU machine)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = _ragged_batch()
    micro, packing = plan_micro_batches(batch, range(batch.size), 64, "flash")
    assert packing.flash and packing.row_tokens is None
    for rows in micro:
        layout = pack_layout(batch.select(rows), packing)
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(layout.position_ids)
        assert layout.cu_seq_lens.tolist() == cu_q.tolist() == cu_k.tolist()
        assert layout.max_length == int(max_q) == int(max_k)
        inputs = layout.model_inputs(packing)
        assert inputs["cu_seq_lens_q"] is layout.cu_seq_lens and inputs["max_length_k"] == layout.max_length


@pytest.mark.slow
def test_flex_attention_keeps_packed_sequences_apart(tiny_model_dir):
    """flex_attention (the GPU's block-sparse kernel) has no backward pass on the CPU, but its forward runs here,
    compiled (about a minute): one packed row gives the padded sdpa log-probs."""
    flex, _ = load_policy(tiny_model_dir, attn_implementation="flex_attention")
    sdpa, _ = load_policy(tiny_model_dir, attn_implementation="sdpa")
    batch = _ragged_batch()
    mask = batch.response_mask > 0
    cpu = torch.device("cpu")
    assert packing_for([flex]) == "one_row"
    packed = batched_logprobs(flex, batch, 10_000, 0.7, cpu, torch.float32, "one_row")
    padded = batched_logprobs(sdpa, batch, 10_000, 0.7, cpu, torch.float32)
    torch.testing.assert_close(packed[mask], padded[mask], atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 40)), min_size=1, max_size=24),
    budget=st.integers(1, 120),
    layout=st.sampled_from(["dense", "one_row", "flash"]),
)
def test_packed_micro_batches_cover_every_row_once_and_keep_the_budget(lengths, budget, layout):
    prompts = [[7] * p for p, _ in lengths]
    responses = [[9] * r for _, r in lengths]
    batch = build_batch(prompts, responses, [0.0] * len(lengths), list(range(len(lengths))), pad_id=0)
    fed = packed_lengths(batch)
    rows = list(range(len(lengths)))
    micro, packing = plan_micro_batches(batch, rows, budget, layout)
    assert sorted(i for m in micro for i in m) == rows
    for m in micro:
        sequences = [fed[i] for i in m if fed[i]]
        tokens = pack_layout(batch.select(m), packing).tokens
        if layout == "dense":
            assert tokens >= sum(sequences)
        else:  # one row of exactly the real tokens (one dummy token when there is nothing to predict)
            assert tokens == max(sum(sequences), 1)
        assert tokens <= budget or (len(sequences) == 1 and sequences[0] > budget), (m, sequences, tokens)


def test_packing_needs_an_attention_kernel_that_keeps_sequences_apart(tiny_model_dir):
    sdpa, _ = load_policy(tiny_model_dir, attn_implementation="sdpa")
    eager, _ = load_policy(tiny_model_dir, attn_implementation="eager")
    flex, _ = load_policy(tiny_model_dir, attn_implementation="flex_attention")  # loads here; no CPU backward
    assert packing_for([sdpa]) == "dense" and packing_for([eager, sdpa]) == "dense"
    assert packing_for([flex]) == "one_row" and packing_for([flex, sdpa]) == "dense"
    # flash-attn cannot be installed on this CPU machine: name the kernel on a real model's config instead
    sdpa.config._attn_implementation = "flash_attention_2"
    assert packing_for([sdpa]) == "flash" and packing_for([sdpa, flex]) == "one_row"
    assert layout_for("auto", [sdpa]) == "flash" and layout_for("false", [sdpa]) is None
    sdpa.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match=r"trainer.packing: attention implementation 'paged\|sdpa'"):
        packing_for([sdpa])
    assert layout_for("auto", [sdpa]) is None  # auto keeps padded micro-batches where packing cannot run
    # auto packs only where the kernel's cost follows the real tokens; true packs with dense masks too
    assert layout_for("auto", [eager]) is None and layout_for("True", [eager]) == "dense"
    assert layout_for("auto", [flex]) == "one_row" and layout_for("auto", [flex, eager]) is None


def test_a_row_without_prompt_is_refused_by_name():
    batch = build_batch([[5, 6], []], [[1, 2], [3]], [0.0, 0.0], [0, 1], pad_id=0)
    micro, packing = plan_micro_batches(batch, [0, 1], 100, "dense")
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        pack_layout(batch.select(micro[0]), packing)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.attn_implementation=flash", "model.attn_implementation: must be one of auto, sdpa"),
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation: flash_attention_2 runs on CUDA"),
        ("model.attn_implementation=flex_attention", "model.attn_implementation: flex_attention has no backward"),
        ("trainer.packing=sometimes", "trainer.packing: must be one of auto, true, false"),
    ],
)
def test_attention_choice_is_validated_before_any_model_loads(override, message):
    from tinyrl.compose import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["device=cpu", override])


# ---------------------------------------------------------------------- the trainer, packing on vs off
TASK = str(__import__("pathlib").Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _trainer_config(tiny_model_dir, run_dir, *overrides):
    from tinyrl.compose import load_config

    return load_config([
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", f"task.name={TASK}", "task=custom",
        "task.train_size=64", "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false", "rollout.n=4",
        "rollout.max_response_tokens=24", "rollout.max_prompt_tokens=64", "trainer.prompts_per_step=4",
        "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-3", "trainer.critic_lr=1e-3",
        "trainer.micro_batch_tokens=64", "logging.progress=false", "logging.plot=false", "threads=1", *overrides,
    ])


def test_trainer_update_is_the_same_with_and_without_packing(tiny_model_dir, tmp_path):
    """One optimizer step (PPO: clipped policy loss, KL and entropy terms, critic) on a ragged batch with an
    empty response, one-token responses and a row longer than the micro-batch budget. Plain SGD with lr 1 makes
    each weight's change its (clipped) gradient, so the comparison sees every gradient, unamplified by Adam."""
    batch = _ragged_batch(seed=2)
    batch.group_index = torch.arange(batch.size) // 3
    results = []
    for packing in ("false", "true"):
        cfg = _trainer_config(tiny_model_dir, tmp_path / packing, "algorithm=ppo", "algorithm.kl_in_reward=false",
                              "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01", f"trainer.packing={packing}")
        trainer = RLTrainer.from_config(cfg)
        assert trainer.packed_layout == ("dense" if packing == "true" else None)
        with torch.no_grad():
            trainer.critic.score.weight.normal_(generator=torch.Generator().manual_seed(3))
        trainer.optimizer = torch.optim.SGD(trainer.policy.parameters(), lr=1.0)
        trainer.critic_optimizer = torch.optim.SGD(trainer.critic.parameters(), lr=1.0)
        before = {f"policy.{k}": v.clone() for k, v in trainer.policy.state_dict().items()}
        before.update({f"critic.{k}": v.clone() for k, v in trainer.critic.state_dict().items()})
        stats = trainer._optimizer_step(batch, list(range(batch.size)), step=1, on_policy=False)
        trainer.close()
        after = {f"policy.{k}": v for k, v in trainer.policy.state_dict().items()}
        after.update({f"critic.{k}": v for k, v in trainer.critic.state_dict().items()})
        results.append((stats, {name: after[name] - before[name] for name in before}))
    (padded_stats, padded_steps), (packed_stats, packed_steps) = results
    for key in ("losses/policy", "policy/kl", "policy/entropy", "optim/grad_norm", "losses/value",
                "optim/critic_grad_norm"):
        assert packed_stats[key] == pytest.approx(padded_stats[key], rel=1e-5, abs=1e-6), key
    assert any(step.abs().max() > 1e-3 for step in padded_steps.values())
    for name, step in padded_steps.items():
        torch.testing.assert_close(packed_steps[name], step, atol=1e-5, rtol=1e-5, msg=name)


def test_a_whole_rl_step_is_the_same_with_and_without_packing(tiny_model_dir, tmp_path):
    """Sampling, old/ref/value passes and two optimizer steps of PPO with a reference, packing on vs off."""
    metrics = []
    for packing in ("false", "true"):
        cfg = _trainer_config(tiny_model_dir, tmp_path / f"step{packing}", "algorithm=ppo", "algorithm.kl_coef=0.1",
                              "model.gradient_checkpointing=true", f"trainer.packing={packing}")
        trainer = RLTrainer.from_config(cfg)
        try:
            metrics.append(trainer.step())
        finally:
            trainer.close()
    padded, packed = metrics
    assert padded["train/completions"] == 16 and padded["response/length_mean"] == packed["response/length_mean"]
    for key in ("losses/policy", "policy/kl", "policy/kl_in_reward", "policy/entropy", "optim/grad_norm",
                "losses/value", "optim/critic_grad_norm"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
