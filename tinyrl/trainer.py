"""The RL loop: sample, score, estimate advantages, update, sync weights, evaluate, checkpoint.

`RLTrainer.step()` is one RL step, written top to bottom in the order of DESIGN.md ("One training step");
`RLTrainer.fit()` runs steps with checkpoints. A whole experiment (run directory, distillation, evaluation, RL,
summary) is `tinyrl.experiment.train(config)`.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyrl import algorithms
from tinyrl.batch import RolloutBatch, build_batch, split_by_tokens
from tinyrl.checkpoint import capture_rng, restore_rng, save_checkpoint
from tinyrl.config import TrainConfig, to_config, uses_critic, uses_reference
from tinyrl.devices import resolve_device, resolve_dtype
from tinyrl.eval_checkpoint import evaluate_policy
from tinyrl.evaluate import eval_metrics
from tinyrl.metrics import MetricsWriter, Progress, write_samples
from tinyrl.monitor import NonFiniteGuard, PhaseTimer, call_with_timeout
from tinyrl.policy_ops import autocast_for, batched_logprobs, batched_values, token_logprobs, token_values
from tinyrl.prompts import encode_prompts
from tinyrl.rollout import SamplingConfig, make_engine
from tinyrl.rundir import default_run_dir
from tinyrl.sampler import PromptSampler
from tinyrl.task import RewardScorer, get_task

log = logging.getLogger("tinyrl")

MEMORY_KNOBS = (
    "trainer.micro_batch_tokens",
    "model.gradient_checkpointing",
    "rollout.batch_size",
    "rollout.gpu_memory_utilization",
    "rollout.max_response_tokens",
    "trainer.prompts_per_step",
)


def step_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of one generation round: a pure function of (seed, step, round), so resumes are exact."""
    return int(np.random.default_rng([seed, step, round_, 7]).integers(0, 2**62))


class RLTrainer:
    """One RL run over a loaded policy. Build it with `RLTrainer.from_config` or from your own objects."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        policy,
        tokenizer,
        task,
        train_rows: list[dict],
        eval_rows: list[dict],
        reference=None,
        critic=None,
        engine=None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.policy, self.tokenizer, self.task = policy, tokenizer, task
        self.reference, self.critic = reference, critic
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        if uses_reference(cfg.algorithm) and reference is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model")
        if uses_critic(cfg.algorithm) and critic is None:
            raise ValueError(f"algorithm.advantage={cfg.algorithm.advantage!r} needs a critic model")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        template, max_prompt = cfg.model.template, cfg.rollout.max_prompt_tokens
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.train_prompts = encode_prompts(task, train_rows, tokenizer, template, max_prompt, "training")
        self.eval_prompts = encode_prompts(task, eval_rows, tokenizer, template, max_prompt, "evaluation")
        self.engine = engine or make_engine(cfg.rollout.engine, policy, tokenizer, batch_size=cfg.rollout.batch_size)
        self.sampler = PromptSampler(len(train_rows), cfg.seed)

        t = cfg.trainer
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        warmup = max(1, t.warmup_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        if critic is not None:
            self.critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=t.critic_lr, weight_decay=t.weight_decay)
        self.guard = NonFiniteGuard(t.max_bad_steps)
        self.timer = PhaseTimer(memory_knobs=MEMORY_KNOBS)
        self.step_count = 0
        self.extra_state: dict[str, Any] = {}
        self.metrics = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb)
        self.scorer = RewardScorer(task, workers=cfg.task.reward_workers, timeout=cfg.task.reward_timeout_s)

    @classmethod
    def from_config(
        cls,
        config,
        *,
        run_dir: str | Path | None = None,
        policy=None,
        tokenizer=None,
        start_path: str | Path | None = None,
        critic_path: str | Path | None = None,
        task=None,
        train_rows: list[dict] | None = None,
        eval_rows: list[dict] | None = None,
    ) -> "RLTrainer":
        """Build the trainer a config describes: task and splits, policy (unless given), reference, critic.

        `start_path` (default `model.path`) is where the policy, the frozen reference and a fresh critic start.
        """
        from tinyrl.models import enable_activation_checkpointing, load_critic, load_policy

        cfg = config if isinstance(config, TrainConfig) else to_config(config)
        device = resolve_device(cfg.device)
        task = task or get_task(cfg.task.name, **cfg.task.kwargs)
        if train_rows is None:
            train_rows = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
        if eval_rows is None:
            eval_rows = task.dataset(cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed)
        start_path = start_path or cfg.model.path
        if start_path is None:
            raise ValueError("model.path: RLTrainer.from_config needs a model path (or pass policy= and start_path=)")
        if policy is None:
            policy, tokenizer = load_policy(start_path, device=device)
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        reference = critic = None
        if uses_reference(cfg.algorithm):
            reference, _ = load_policy(start_path, device=device)
            reference.requires_grad_(False).eval()
        if uses_critic(cfg.algorithm):
            critic = load_critic(critic_path or cfg.model.critic_path or start_path, device=device)
            if cfg.model.gradient_checkpointing:
                enable_activation_checkpointing(critic)
        return cls(cfg, run_dir or default_run_dir(cfg), policy, tokenizer, task, train_rows, eval_rows, reference, critic)

    def close(self) -> None:
        """Stop the reward workers and flush the metrics sinks."""
        self.scorer.close()
        self.metrics.close()

    # ------------------------------------------------------------------ one RL step
    def step(self) -> dict[str, float]:
        cfg, a, step = self.cfg, self.cfg.algorithm, self.step_count + 1
        metrics: dict[str, float] = {}

        # 1-4. sample prompts, generate n completions each, score them (DAPO dynamic sampling may add rounds)
        groups, scored = self._collect_groups(step)
        self._rollout_metrics(scored, metrics)
        if cfg.trainer.samples_every and step % cfg.trainer.samples_every == 0:
            self._write_samples(step, scored)
        if not groups:
            log.warning("step %d: every group had equal rewards; no update", step)
            metrics["train/groups_used"] = 0.0
            self.step_count = step
            return {**metrics, **self.timer.metrics()}

        # 5. assemble the batch
        with self.timer.phase("assemble", step):
            batch = self._assemble(groups)
        metrics["train/groups_used"] = float(len(groups))

        # 6. forward passes without gradient
        t = cfg.trainer
        on_policy = t.ppo_epochs == 1 and t.prompts_per_mini_batch >= len(groups)
        temperature = cfg.rollout.temperature
        with self.timer.phase("old_logprobs", step):
            if not on_policy:
                if self._rollout_logprobs_are_exact():
                    batch.old_logprobs = batch.rollout_logprobs
                else:
                    batch.old_logprobs = batched_logprobs(
                        self.policy, batch, t.micro_batch_tokens, temperature, self.device, self.dtype
                    )
        if self.reference is not None:
            with self.timer.phase("ref_logprobs", step):
                batch.ref_logprobs = batched_logprobs(
                    self.reference, batch, t.micro_batch_tokens, temperature, self.device, self.dtype
                )
        if self.critic is not None:
            with self.timer.phase("values", step):
                batch.values = batched_values(self.critic, batch, t.micro_batch_tokens, self.device, self.dtype)

        # 7. advantages
        with self.timer.phase("advantages", step):
            rewards = batch.scores
            if a.kl_in_reward and batch.ref_logprobs is not None:
                # token-level rewards: -beta * KL(pi_old || pi_ref) on every token, the outcome on the last one
                sampler_logprobs = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
                rewards = algorithms.kl_shaped_rewards(
                    batch.scores, sampler_logprobs, batch.ref_logprobs, batch.response_mask, a.kl_coef, a.kl_estimator
                )
                kl = algorithms.kl_penalty(
                    sampler_logprobs, batch.ref_logprobs, a.kl_estimator, response_mask=batch.response_mask
                )
                metrics["policy/kl_in_reward"] = float(algorithms.masked_mean(kl, batch.response_mask))
            batch.advantages, batch.returns = algorithms.compute_advantages(
                a.advantage,
                rewards,
                batch.response_mask,
                group_index=batch.group_index,
                values=batch.values,
                gamma=a.gamma,
                lam=a.lam,
                norm_by_std=a.norm_by_std,
            )

        # 8. update
        with self.timer.phase("update", step):
            metrics.update(self._update(batch, step, on_policy))

        # 9. push the new weights to the rollout engine
        with self.timer.phase("sync", step):
            call_with_timeout(self.engine.update_weights, cfg.rollout.timeout_s, "rollout weight sync", self.policy)

        self.step_count = step
        metrics["optim/lr"] = self.schedule.get_last_lr()[0]
        return {**metrics, **self.timer.metrics()}

    def _collect_groups(self, step: int):
        """Generate and score until `prompts_per_step` usable groups exist (one round unless dynamic sampling)."""
        cfg, a = self.cfg, self.cfg.algorithm
        rounds = a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1
        groups, scored = [], []
        for round_ in range(rounds):
            need = cfg.trainer.prompts_per_step - len(groups)
            if need <= 0:
                break
            indices = self.sampler.take(need)
            with self.timer.phase("generate", step):
                completions = self._generate([self.train_prompts[i] for i in indices], step_seed(cfg.seed, step, round_))
            with self.timer.phase("score", step):
                rows = [self.train_rows[indices[c.prompt_index]] for c in completions]
                rewards = self.scorer.score([c.text for c in completions], rows)
            n = cfg.rollout.n
            for g, index in enumerate(indices):
                members = list(zip(completions[g * n : (g + 1) * n], rewards[g * n : (g + 1) * n]))
                scored.extend((index, c, r) for c, r in members)
                shaped = [self._shaped_score(c, r) for c, r in members]
                if a.dynamic_sampling and max(shaped) - min(shaped) < 1e-9:
                    continue
                groups.append((index, members, shaped))
        return groups[: cfg.trainer.prompts_per_step], scored

    def _generate(self, prompts, seed: int):
        r = self.cfg.rollout
        sampling = SamplingConfig(
            max_new_tokens=r.max_response_tokens,
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop=tuple(getattr(self.task, "stop", ())),
            seed=seed,
        )
        return call_with_timeout(self.engine.generate, r.timeout_s, "rollout generation", prompts, sampling)

    def _shaped_score(self, completion, reward) -> float:
        """The reward after DAPO's soft overlong punishment (if on): a linear penalty in the last buffer tokens."""
        a, limit = self.cfg.algorithm, self.cfg.rollout.max_response_tokens
        score = float(reward.score)
        if a.overlong == "soft" and a.overlong_buffer > 0:
            excess = len(completion.token_ids) - (limit - a.overlong_buffer)
            if excess > 0:
                score -= a.overlong_penalty * min(1.0, excess / a.overlong_buffer)
        return score

    def _assemble(self, groups) -> RolloutBatch:
        prompt_ids, response_ids, scores, group_index, rollout_logprobs, truncated = [], [], [], [], [], []
        for g, (index, members, shaped) in enumerate(groups):
            for (completion, _), score in zip(members, shaped):
                prompt_ids.append(self.train_prompts[index])
                response_ids.append(completion.token_ids)
                scores.append(score)
                group_index.append(g)
                rollout_logprobs.append(completion.logprobs or [0.0] * len(completion.token_ids))
                truncated.append(completion.finish_reason == "length")
        batch = build_batch(prompt_ids, response_ids, scores, group_index, self.pad_id, rollout_logprobs)
        if self.cfg.algorithm.overlong == "mask":
            # DAPO overlong filtering: truncated completions carry no learning signal
            batch.response_mask[torch.tensor(truncated, dtype=torch.bool)] = 0.0
        return batch

    def _update(self, batch: RolloutBatch, step: int, on_policy: bool) -> dict[str, float]:
        """`ppo_epochs` passes over mini-batches of whole groups; one optimizer step per mini-batch."""
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.trainer
        groups = batch.group_index.unique().tolist()
        per_mini = t.prompts_per_mini_batch
        order_rng = np.random.default_rng([cfg.seed, step, 3])
        sums: dict[str, list[float]] = {}
        self.policy.train()
        for epoch in range(t.ppo_epochs):
            shuffled = order_rng.permutation(groups).tolist() if t.ppo_epochs > 1 or len(groups) > per_mini else groups
            for start in range(0, len(shuffled), per_mini):
                chosen = set(shuffled[start : start + per_mini])
                rows = [i for i in range(batch.size) if int(batch.group_index[i]) in chosen]
                stats = self._optimizer_step(batch, rows, step, on_policy)
                for key, value in stats.items():
                    sums.setdefault(key, []).append(value)
        self.policy.eval()
        return {key: float(np.mean(values)) for key, values in sums.items()}

    def _optimizer_step(self, batch: RolloutBatch, rows: list[int], step: int, on_policy: bool) -> dict[str, float]:
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.trainer
        # The divisor covers every row of the mini-batch, including rows skipped below.
        normalizer = algorithms.loss_normalizer(a.loss_agg, [batch.response_mask[rows]], constant=self._agg_constant())
        totals: dict[str, float] = {}
        if self._loss_vanishes_without_advantage():
            # Rows whose advantages are all zero (e.g. GRPO groups with equal rewards) add exactly nothing to
            # the loss or its gradient; skipping their forward/backward passes changes no number.
            signal = (batch.advantages[rows].abs() * batch.response_mask[rows]).sum(-1) > 0
            rows = [r for r, keep in zip(rows, signal.tolist()) if keep]
            totals["train/rows_with_signal"] = float(signal.float().mean())
            if not rows:
                return {**totals, "optim/skipped": 1.0}
        micro = split_by_tokens(batch, rows, t.micro_batch_tokens)
        want_entropy = True
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for m in micro:
            mb = batch.select(m).to(self.device)
            weight = len(m) / len(rows)  # share of the mini-batch, to average per-micro-batch metrics
            with autocast_for(self.device, self.dtype):
                logprobs, entropy = token_logprobs(self.policy, mb, cfg.rollout.temperature, with_entropy=want_entropy)
                if not torch.isfinite(logprobs.detach()[mb.response_mask > 0]).all():
                    loss_total = float("nan")  # the guard below skips this update (and stops a diverged run)
                    break
                old = logprobs.detach() if on_policy else mb.old_logprobs
                loss, pm = algorithms.policy_loss(
                    a.policy_loss,
                    logprobs,
                    old,
                    mb.advantages,
                    mb.response_mask,
                    clip_low=a.clip_low,
                    clip_high=a.clip_high,
                    dual_clip=a.dual_clip,
                    agg=a.loss_agg,
                    normalizer=normalizer,
                )
                totals["losses/policy"] = totals.get("losses/policy", 0.0) + loss.item()
                if mb.ref_logprobs is not None:
                    kl = algorithms.kl_penalty(logprobs, mb.ref_logprobs, a.kl_estimator)
                    kl_term = algorithms.aggregate(kl, mb.response_mask, a.loss_agg, normalizer=normalizer)
                    if not a.kl_in_reward:
                        loss = loss + a.kl_coef * kl_term
                    totals["policy/kl"] = totals.get("policy/kl", 0.0) + kl_term.item()
                if entropy is not None:
                    entropy_term = algorithms.aggregate(entropy, mb.response_mask, a.loss_agg, normalizer=normalizer)
                    if a.entropy_coef:
                        loss = loss - a.entropy_coef * entropy_term
                    totals["policy/entropy"] = totals.get("policy/entropy", 0.0) + entropy_term.item()
            loss.backward()
            loss_total += loss.item()
            for key in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean"):
                if key in pm:
                    totals[f"policy/{key}"] = totals.get(f"policy/{key}", 0.0) + weight * float(pm[key])
            if "ratio_max" in pm:
                totals["policy/ratio_max"] = max(totals.get("policy/ratio_max", 0.0), float(pm["ratio_max"]))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.max_grad_norm)
        if self.guard.check(step, loss_total, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            totals["optim/skipped"] = 1.0
        else:
            self.optimizer.step()
            self.schedule.step()
        totals["optim/grad_norm"] = float(grad_norm)
        if self.critic is not None:
            totals.update(self._critic_step(batch, rows, micro, normalizer))
        return totals

    def _critic_step(self, batch, rows, micro, normalizer) -> dict[str, float]:
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.trainer
        self.critic.train()
        self.critic_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in micro:
            mb = batch.select(m).to(self.device)
            with autocast_for(self.device, self.dtype):
                values = token_values(self.critic, mb)
                loss, _ = algorithms.value_loss(
                    values, mb.values, mb.returns, mb.response_mask, clip=a.value_clip, agg=a.loss_agg,
                    normalizer=normalizer,
                )
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), t.max_grad_norm)
        if np.isfinite(total) and torch.isfinite(grad_norm):
            self.critic_optimizer.step()
        self.critic.eval()
        return {"losses/value": total, "optim/critic_grad_norm": float(grad_norm)}

    def _rollout_logprobs_are_exact(self) -> bool:
        """The sampler's log-probs are pi_old itself when it ran these very weights in this process and sampled
        from the whole temperature-scaled distribution (no top-k/top-p renormalisation)."""
        r = self.cfg.rollout
        return getattr(self.engine, "shares_policy_weights", False) and r.top_k == 0 and r.top_p == 1.0 and r.temperature > 0

    def _loss_vanishes_without_advantage(self) -> bool:
        """True when every loss term is proportional to the advantage (no KL loss term, no entropy bonus)."""
        a = self.cfg.algorithm
        return self.critic is None and a.entropy_coef == 0 and (a.kl_coef == 0 or a.kl_in_reward)

    def _agg_constant(self) -> float:
        a = self.cfg.algorithm
        return float(a.loss_agg_normalizer or self.cfg.rollout.max_response_tokens)

    # ------------------------------------------------------------------ metrics and samples
    def _rollout_metrics(self, scored, metrics: dict) -> None:
        rewards = [r for _, _, r in scored]
        lengths = [len(c.token_ids) for _, c, _ in scored]
        metrics["reward/mean"] = float(np.mean([r.score for r in rewards]))
        metrics["reward/accuracy"] = float(np.mean([r.correct for r in rewards]))
        metrics["reward/format_rate"] = float(np.mean([r.formatted for r in rewards]))
        metrics["reward/formatted_but_wrong"] = float(np.mean([r.formatted and not r.correct for r in rewards]))
        metrics["reward/errors"] = float(sum("error" in r.info for r in rewards))
        metrics["response/length_mean"] = float(np.mean(lengths))
        metrics["response/length_max"] = float(np.max(lengths))
        metrics["response/clip_rate"] = float(np.mean([c.finish_reason == "length" for _, c, _ in scored]))
        metrics["train/completions"] = float(len(scored))

    def _write_samples(self, step: int, scored) -> None:
        """Example completions of this step, with reward-hacking signals computed over all of them."""
        prompts = [self.tokenizer.decode(self.train_prompts[i]) for i, _, _ in scored]
        write_samples(
            self.run_dir, step, prompts, [c.text for _, c, _ in scored], [r for _, _, r in scored],
            response_lengths=[len(c.token_ids) for _, c, _ in scored],
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict:
        """Greedy accuracy (and pass@k when `trainer.eval_pass_k` > 0) on the held-out problems."""
        cfg = self.cfg
        return evaluate_policy(
            self.engine, self.scorer, self.task, self.tokenizer, self.eval_rows, self.eval_prompts,
            max_new_tokens=cfg.rollout.max_response_tokens, pass_k=cfg.trainer.eval_pass_k,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=cfg.seed,
            timeout_s=cfg.rollout.timeout_s, run_dir=self.run_dir, step=step,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {
            "step": self.step_count,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": capture_rng(),
            "metrics_offset": self.metrics.offset(),
            "extra": self.extra_state,
        }
        if self.critic is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        self.guard.load_state_dict(state["guard"])
        restore_rng(state["rng"])
        self.extra_state = state.get("extra", {})
        if self.critic is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def save(self) -> Path:
        models = {"actor": self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return save_checkpoint(
            self.run_dir, self.step_count, models, self.tokenizer, self.state_dict(), keep_last=self.cfg.trainer.keep_last
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Run RL steps up to `trainer.steps`, checkpointing on schedule and on SIGTERM/SIGINT."""
        t = self.cfg.trainer
        stop_requested = {"signal": None}

        def request_stop(signum, frame):
            stop_requested["signal"] = signum

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        progress = Progress(t.steps, start_step=self.step_count, enabled=self.cfg.logging.progress) if t.steps else None
        try:
            while self.step_count < t.steps:
                metrics = self.step()
                step = self.step_count
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    with self.timer.phase("evaluate", step):
                        metrics.update(eval_metrics(self.evaluate(step)))
                metrics["reward/worker_restarts"] = float(self.scorer.stats.get("worker_restarts", 0))
                self.metrics.write(step, metrics)
                if progress is not None:
                    progress.update(step, {"reward": metrics.get("reward/mean", 0.0), "acc": metrics.get("reward/accuracy", 0.0)})
                if (t.save_every and step % t.save_every == 0) or stop_requested["signal"] is not None:
                    self.save()
                if stop_requested["signal"] is not None:
                    raise KeyboardInterrupt(f"stopped by signal {stop_requested['signal']} at step {step}; checkpoint saved")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
