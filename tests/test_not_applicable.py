"""TRL's "not applicable": when every reward function returns None for a completion, TRL 1.16's GRPOTrainer gives it
a NaN reward, leaves it out of its group's mean and std, and gives it zero advantage. tinyrl does the same; checked
against the advantages TRL's own trainer computes for the same completions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tinyrl.algorithms import compute_advantages
from tinyrl.data import write_rows
from tinyrl.reward_workers import RewardScorer
from tinyrl.task import Reward, get_task, reward_rates

WILD = str(Path(__file__).with_name("rewards_in_the_wild.py"))
FUNCS = ["length_unless_divisible", "vowels_unless_even"]
WEIGHTS = [1.0, 0.5]
GROUP = 4


def trl_step(model_dir, out_dir, prompts: list[str]) -> dict:
    """One real GRPOTrainer step (TRL 1.16, its defaults: scale_rewards="group", sum_then_normalize) with the two
    functions; TRL's own record of the step's completions, rewards per function and advantages."""
    import rewards_in_the_wild as wild
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", max_steps=1, save_strategy="no",
        per_device_train_batch_size=len(prompts) * GROUP, num_generations=GROUP, max_completion_length=12,
        learning_rate=1e-6, beta=0.0, seed=2, reward_weights=WEIGHTS, gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=[getattr(wild, name) for name in FUNCS], args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    trainer.train()
    logs = trainer._logs
    return {"prompts": list(logs["prompt"]), "completions": list(logs["completion"]),
            "rewards": {name: list(logs["rewards"][name]) for name in FUNCS},
            "advantages": torch.tensor(list(logs["advantages"]))}


def test_completions_no_function_applies_to_get_trl_1_16s_advantages(tiny_model_dir, tmp_path):
    prompts = [f"Using the numbers [{i}, 2, 3], make 10." for i in range(4)]
    trl = trl_step(tiny_model_dir, tmp_path / "trl", prompts)
    completions = trl["completions"]
    per_function = torch.tensor([trl["rewards"][name] for name in FUNCS]).T  # [16, 2], NaN where it returned None
    unscorable = per_function.isnan().all(dim=1)
    # the seed makes a batch worth comparing: unscorable completions, in groups with scorable ones
    assert 1 <= int(unscorable.sum()) and all(0 < int(g.sum()) < GROUP for g in unscorable.view(-1, GROUP) if g.any())
    assert unscorable.view(-1, GROUP).any(dim=1).sum() >= 2

    # tinyrl scores the same completions with the same functions, named by path as a user names them
    data = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    task = get_task("file", train_file=str(data), reward_funcs=[f"{WILD}:{name}" for name in FUNCS],
                    reward_weights=WEIGHTS)
    rows = [{"prompt": p} for p in trl["prompts"]]
    with RewardScorer(task, workers=1, timeout=10.0) as scorer:
        rewards = scorer.score(completions, rows)
    assert [not r.applies for r in rewards] == unscorable.tolist()
    for reward, values in zip(rewards, per_function.tolist()):
        if reward.applies:
            assert reward.score == pytest.approx(sum(w * v for w, v in zip(WEIGHTS, values) if not math.isnan(v)))
            assert "error" not in reward.info

    # the trainer's advantage step (tinyrl/trainer.py, step 7) on those scores, with TRL's epsilon (tinyrl's is 1e-6)
    scores = torch.tensor([r.score for r in rewards])
    scored = ~torch.isnan(scores)
    mask = torch.ones(len(rewards), 5)
    groups = torch.arange(len(rewards)) // GROUP
    advantages, _ = compute_advantages("grpo", torch.where(scored, scores, 0.0), mask, group_index=groups,
                                       scored=scored, eps=1e-4)
    assert torch.allclose(advantages[:, 0], trl["advantages"], atol=1e-5, rtol=1e-5)
    assert (advantages[unscorable] == 0).all() and (trl["advantages"][unscorable] == 0).all()
    # the old rule (0.0 for "does not apply", inside the group's statistics) gives other advantages
    as_zero, _ = compute_advantages("grpo", torch.where(scored, scores, 0.0), mask, group_index=groups, eps=1e-4)
    assert not torch.allclose(as_zero[:, 0], trl["advantages"], atol=1e-3)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "opo", "reinforce_pp_baseline", "reinforce_pp"])
def test_a_row_without_a_reward_is_left_out_of_every_estimators_statistics(estimator):
    scores = torch.tensor([1.0, 0.0, 3.0, 2.0, 5.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 3)
    scored = torch.tensor([True, True, False, True, True, True])
    with_gap, _ = compute_advantages(estimator, torch.where(scored, scores, torch.nan), mask, group_index=groups,
                                     scored=scored)
    kept = scored.nonzero().flatten()
    without, _ = compute_advantages(estimator, scores[kept], mask[kept], group_index=groups[kept])
    assert (with_gap[2] == 0).all()
    assert torch.allclose(with_gap[kept], without)


def test_gae_keeps_a_critics_estimate_where_no_reward_applies():
    values = torch.tensor([[0.5, 0.25, 0.75], [0.1, 0.2, 0.3]])
    scored = torch.tensor([True, False])
    advantages, returns = compute_advantages("gae", torch.tensor([1.0, math.nan]), torch.ones(2, 3),
                                             values=values, scored=scored, whiten=False)
    assert (advantages[1] == 0).all() and torch.equal(returns[1], values[1])
    assert advantages[0].abs().sum() > 0


def test_figures_leave_out_rewards_that_do_not_apply_and_report_nothing_they_cannot_speak_for():
    judged = [Reward(1.0, True, True), Reward(0.0, False, True), Reward.not_applicable("no function applied"),
              Reward(0.0, False, False, {"error": "timeout"})]
    rates = reward_rates(judged)
    assert rates["mean_reward"] == pytest.approx(1 / 3) and rates["not_applicable"] == 1.0
    assert rates["accuracy"] == pytest.approx(1 / 3)  # a failed reward counts as wrong
    assert rates["format_rate"] == pytest.approx(2 / 3) and rates["formatted_but_wrong"] == pytest.approx(1 / 3)
    silent = [Reward(0.5, None, None), Reward(0.0, None, None), Reward(0.0, False, False, {"error": "boom"})]
    rates = reward_rates(silent)
    assert rates["accuracy"] is None and rates["format_rate"] is None and rates["formatted_but_wrong"] is None
    assert rates["mean_reward"] == pytest.approx(0.5 / 3)
    assert reward_rates([Reward.not_applicable("x")])["mean_reward"] is None
