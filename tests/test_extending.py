"""Changing tinyrl from outside the library: a policy loss with a knob of its own and a rollout engine, each from a
user's file through the command line; research code's own loop over `RLTrainer.step()`, which keeps the command
line's records; and the "How to change X" examples of the README, run as they are written there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import one_step_overrides
from tinyrl import algorithms
from tinyrl.compose import load_config
from tinyrl.config import ConfigError
from tinyrl.trainer import RLTrainer

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"

# A user's loss with a knob of its own (`scale`), reporting a statistic of its own and no clip fractions.
USER_LOSS = '''
import torch

def scaled_reinforce(logprobs, old_logprobs, advantages, response_mask, *, scale):
    """l_t = -scale * A_t * log pi(a_t)"""
    return -scale * advantages * logprobs, {"scale_seen": torch.full_like(logprobs, scale)}
'''

# A user's engine: the transformers engine behind the base class, counting its generate calls in a file.
USER_ENGINE = '''
from pathlib import Path

from tinyrl.rollout import RolloutEngine
from tinyrl.rollout.hf import HFEngine

CALLS = Path(__file__).with_name("generate_calls.txt")


class CountingEngine(RolloutEngine):
    shares_policy_weights = True

    def __init__(self, model, tokenizer):
        self.inner = HFEngine(model, tokenizer, batch_size=64)

    def generate(self, prompt_token_ids, sampling):
        with CALLS.open("a") as f:
            f.write(f"{len(prompt_token_ids)} x {sampling.n}\\n")
        return self.inner.generate(prompt_token_ids, sampling)

    def update_weights(self, model):
        self.inner.update_weights(model)
'''


def _train_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "tinyrl-train"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _step_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "losses/policy" in row]


def test_a_policy_loss_with_its_own_knob_from_a_user_file_trains_through_the_command_line(tiny_model_dir, tmp_path):
    (tmp_path / "my_losses.py").write_text(USER_LOSS)
    run = tmp_path / "run"
    loss = "algorithm.policy_loss=my_losses.py:scaled_reinforce"
    result = _train_cli(*one_step_overrides(tiny_model_dir), f"run_dir={run}", "trainer.steps=2", "algorithm.kl_coef=0",
                        loss, "+algorithm.loss_kwargs.scale=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = _step_rows(run)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["policy/scale_seen"] == pytest.approx(0.5)  # the knob reached the loss
        assert "policy/clip_frac_low" not in row and "policy/clip_frac_high" not in row  # it does not clip
    assert "scale: 0.5" in (run / "config.yaml").read_text()

    # a knob the loss does not take, and a file that is not there: one line each, before any model loads
    refused = _train_cli(*one_step_overrides(tiny_model_dir), f"run_dir={tmp_path / 'bad'}", loss,
                         "+algorithm.loss_kwargs.sacle=0.5", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "algorithm.loss_kwargs.sacle: the policy loss" in refused.stderr and "scale" in refused.stderr
    missing = _train_cli(*one_step_overrides(tiny_model_dir), f"run_dir={tmp_path / 'bad'}",
                         "algorithm.policy_loss=no_such_file.py:loss", cwd=tmp_path)
    assert missing.returncode == 2 and "algorithm.policy_loss: no file at 'no_such_file.py'" in missing.stderr
    assert not (tmp_path / "bad").exists()


def test_an_engine_from_a_user_file_trains_through_the_command_line(tiny_model_dir, tmp_path):
    (tmp_path / "my_engine.py").write_text(USER_ENGINE)
    run = tmp_path / "run"
    result = _train_cli(*one_step_overrides(tiny_model_dir), f"run_dir={run}", "trainer.steps=2",
                        "rollout.engine=my_engine.py:CountingEngine", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert [row["step"] for row in _step_rows(run)] == [1, 2]
    calls = (tmp_path / "generate_calls.txt").read_text().splitlines()
    # held-out evaluation before RL, two steps of 4 prompts x 2 completions, evaluation after RL
    assert calls == ["8 x 1", "4 x 2", "4 x 2", "8 x 1"]
    not_an_engine = _train_cli(*one_step_overrides(tiny_model_dir), f"run_dir={tmp_path / 'bad'}",
                               "rollout.engine=my_engine.py:Path", cwd=tmp_path)
    assert not_an_engine.returncode == 2 and "is not a subclass of tinyrl.rollout.RolloutEngine" in not_an_engine.stderr


def _config(tiny_model_dir, run, *overrides):
    return load_config([*one_step_overrides(tiny_model_dir), f"run_dir={run}", "trainer.steps=3",
                        "trainer.samples_every=5", "logging.plot=true", *overrides])


def test_research_codes_own_loop_keeps_the_command_lines_records(tiny_model_dir, tmp_path):
    """An own loop over `step()`: a metrics row per step, the config, samples (also of the step the loop stopped
    at), curves at `close()`; a loss registered in Python logs its own statistics and only those; a used
    directory is refused as the command line refuses it."""

    @algorithms.register_policy_loss("test_own_loop_reinforce", override=True)
    def own_loss(logprobs, old_logprobs, advantages, response_mask):
        return -advantages * logprobs, {"positive_advantage": advantages > 0}

    run = tmp_path / "own"
    cfg = _config(tiny_model_dir, run, "algorithm.policy_loss=test_own_loop_reinforce", "algorithm.kl_coef=0")
    trainer = RLTrainer.from_config(cfg)
    try:
        for _ in range(2):  # stops before trainer.steps=3: the samples of step 2 are still written (by close)
            returned = trainer.step()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert set(rows[-1]) == {"step", *returned}
    assert "policy/positive_advantage" in rows[0] and not any("clip_frac" in key for key in rows[0])
    assert "test_own_loop_reinforce" in (run / "config.yaml").read_text()
    assert (run / "curves.png").stat().st_size > 0
    logged = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert logged == [2] and "## step 2" in (run / "samples.md").read_text()

    with pytest.raises(ConfigError, match=r"the directory is already used .*resume=true"):
        RLTrainer.from_config(cfg)
    with pytest.raises(ConfigError, match="already used"):  # built from your own objects: the same refusal
        RLTrainer(cfg, run, trainer.policy, trainer.tokenizer, trainer.task, trainer.train_rows, trainer.eval_rows)
    del algorithms.POLICY_LOSSES["test_own_loop_reinforce"]


def _how_to_examples() -> list[str]:
    """The Python blocks of the README's "How to change X" section."""
    text = README.read_text()
    section = text[text.index("## How to change X"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readmes_loss_and_estimator_examples_run():
    loss_example, estimator_example = _how_to_examples()[:2]
    names = {}
    exec(textwrap.dedent(loss_example), names)
    exec(textwrap.dedent(estimator_example), names)
    try:
        g = torch.Generator().manual_seed(0)
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
        logprobs = (-torch.rand(4, 4, generator=g)).requires_grad_(True)
        old = logprobs.detach() - 0.5 * torch.rand(4, 4, generator=g)
        rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
        advantages, _ = algorithms.compute_advantages("sign_vs_others", rewards, mask, group_index=[0, 0, 1, 1])
        assert advantages[:, 0].tolist() == [1.0, -1.0, -1.0, 1.0]
        assert advantages[1, 2] == 0 and advantages[3, 1:].abs().sum() == 0  # nothing outside the mask
        loss, stats = algorithms.policy_loss("capped_ratio_reinforce", logprobs, old, advantages, mask,
                                             max_weight=1.2)
        loss.backward()
        assert torch.isfinite(loss) and logprobs.grad.abs().sum() > 0
        assert 0 < stats["capped"] < 1 and "clip_frac_low" not in stats
    finally:
        algorithms.POLICY_LOSSES.pop("capped_ratio_reinforce", None)
        algorithms.ADVANTAGE_ESTIMATORS.pop("sign_vs_others", None)
