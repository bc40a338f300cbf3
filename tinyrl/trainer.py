"""The RL loop: sample, score, estimate advantages, update, sync weights, evaluate, checkpoint.

`RLTrainer.step()` is one RL step, written top to bottom in the order of DESIGN.md ("One training step"), and
its records (a `metrics.jsonl` row, samples, a scheduled held-out evaluation); `RLTrainer.fit()` runs steps with
checkpoints and stop signals; `close()` ends the records (`curves.png`). The loss of each micro-batch is
`algorithms.rl_objective`; the trainer meets the other ranks only at named `World` methods. With
`trainer.max_staleness` = k >= 1 the engine samples the batches of the next k steps while a step updates
(`sampling_schedule` says which policy samples which batch; `SampledBatch` is one of them, kept in checkpoints). A whole experiment
(run directory, distillation, evaluation, RL, summary) is `tinyrl.experiment.train(config)`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tinyrl import algorithms
from tinyrl.batch import RolloutBatch, build_batch
from tinyrl.checkpoint import capture_rng
from tinyrl.config import ConfigError, TrainConfig, to_config, uses_critic, uses_reference
from tinyrl.console import Progress, held_out_line
from tinyrl.devices import resolve_attn_implementation, resolve_dtype
from tinyrl.distributed import OPTIMIZER_DIR, World, init_world
from tinyrl.evaluate import eval_metrics, evaluate_on_ranks
from tinyrl.monitor import NonFiniteGuard, PhaseTimer, call_with_timeout, stop_requests
from tinyrl.packing import layout_for, plan_micro_batches
from tinyrl.policy_ops import autocast_for, batched_logprobs, batched_values, token_logprobs, token_values
from tinyrl.preflight import STALENESS_UNDER_TORCHRUN
from tinyrl.prompts import encode_prompts
from tinyrl.records import RunRecords, start_run_dir
from tinyrl.reward_report import RewardErrorLog, completion_metrics
from tinyrl.reward_workers import scorer_from_config
from tinyrl.rollout import Completion, PendingGeneration, RolloutEngine, SamplingConfig, engine_options, make_engine
from tinyrl.rundir import default_run_dir, resuming
from tinyrl.sampler import PromptSampler
from tinyrl.task import complete_task, get_task

log = logging.getLogger("tinyrl")

MEMORY_KNOBS = (
    "trainer.micro_batch_tokens",
    "model.gradient_checkpointing",
    "rollout.batch_size",
    "rollout.gpu_memory_utilization",
    "rollout.max_response_tokens",
    "trainer.prompts_per_step",
    "distributed.cpu_offload",
    "more GPUs (torchrun --nproc_per_node)",
)


def step_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of one generation round: a pure function of (seed, step, round), so resumes are exact."""
    return int(np.random.default_rng([seed, step, round_, 7]).integers(0, 2**62))


class Group(NamedTuple):
    """One prompt's completions: `index` of the training row, `members` (completion, reward) pairs, their
    `shaped` scores, and `id`, the group's position among the step's groups on all ranks together (the order
    one process would have them in)."""

    index: int
    members: list
    shaped: list[float]
    id: int


@dataclass
class SampledBatch:
    """A step's prompts, sampled ahead of the update that trains on them (`trainer.max_staleness` >= 1): `step`
    trains on it; `version` is the policy that sampled it (the number of updates applied before its submit)."""

    step: int
    version: int
    indices: list[int]
    generation: PendingGeneration

    def state(self, timeout_s: float) -> dict:
        """What a checkpoint keeps of it: the completions (waited for) and who sampled them."""
        completions = self.generation.result(timeout_s)
        return {"step": self.step, "version": self.version, "indices": self.indices,
                "completions": [asdict(c) for c in completions]}

    @classmethod
    def from_state(cls, state: dict) -> "SampledBatch":
        completions = [Completion(**c) for c in state["completions"]]
        return cls(state["step"], state["version"], state["indices"], PendingGeneration.finished(completions))


def sampling_schedule(step: int, max_staleness: int) -> int:
    """The policy version that samples step `step`'s batch: max(0, step - 1 - k). Synchronous (k = 0): the policy
    of the previous update; with k >= 1 the engine runs k batches ahead, so steps 1..k+1 are sampled by the initial
    policy and every later batch is exactly k updates stale when trained on (one-step-off for k = 1)."""
    return max(0, step - 1 - max_staleness)


class RLTrainer:
    """One RL run over a loaded policy. Build it with `RLTrainer.from_config` or from your own objects.

    Under torchrun every rank builds one; `world` (default: `init_world`) says which rank this is. Each rank
    samples its own share of the step's prompts; the step then computes what one process would compute on
    all of them (see tinyrl/distributed.py for how ranks stay in step).
    """

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
        world: World | None = None,
        *,
        fresh_run: bool | None = None,
        base_path: str | Path | None = None,
    ):
        """`fresh_run` (default: unless `cfg.resume`): `run_dir` must be missing or empty, as `tinyrl-train`
        requires, and the trainer writes the config there; False when the caller prepared the directory (a
        resumed run, `tinyrl.experiment.train`). `base_path`: where the policy was loaded from, named in a LoRA
        adapter's config (`model.lora`)."""
        self.cfg = cfg
        self.world = world or init_world(cfg.device, cfg.distributed.timeout_s)
        self.run_dir = Path(run_dir)
        fresh = fresh_run if fresh_run is not None else not resuming(cfg.resume)
        self.records = RunRecords(self.run_dir, cfg, self.world, lambda i: tokenizer.decode(self.train_prompts[i]),
                                  fresh=fresh)
        self.metrics = self.records.metrics  # metrics.jsonl (rank 0)
        self.device = self.world.device
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        # with LoRA the reference is the policy with its adapters disabled (`_reference_pass`): no second copy
        self.lora = cfg.model.lora if cfg.model.lora.enabled else None
        self.base_path = str(base_path) if base_path is not None else None
        if uses_reference(cfg.algorithm) and reference is None and self.lora is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model")
        if uses_critic(cfg.algorithm) and critic is None:
            raise ValueError(f"algorithm.advantage={cfg.algorithm.advantage!r} needs a critic model")
        self.world.check_cpu_offload(cfg.distributed.cpu_offload)
        from tinyrl.models import float32_master_weights  # trained models hold float32, whatever their checkpoint

        policy, critic = float32_master_weights(policy), float32_master_weights(critic)
        # built before sharding: a vLLM engine starts from the full weights (under torchrun each rank starts its
        # own, vLLM's external_launcher); the transformers engine samples from the policy module itself, which
        # `shard` changes in place
        self.engine = engine or self._start_engine(policy, tokenizer)
        if not isinstance(self.engine, RolloutEngine):
            raise TypeError(f"engine: {type(self.engine).__name__} is not a tinyrl.rollout.RolloutEngine (subclass it)")
        if getattr(task, "feedback", None) is not None and not self.engine.environment_feedback:
            raise ValueError(f"the task writes into its completions (feedback), which {type(self.engine).__name__} "
                             f"cannot do; use an engine with environment_feedback (rollout.engine=hf)")
        if self.lora is not None:
            from tinyrl.lora import add_adapters, has_adapters

            # after the engine started from the base weights, which fresh adapters (B = 0) leave unchanged
            if not has_adapters(policy):
                policy = add_adapters(policy, self.lora, self.dtype, base_path=self.base_path)
        shard_options = {"compute_dtype": self.dtype, "cpu_offload": cfg.distributed.cpu_offload}
        self.policy, self.reference, self.critic = (
            self.world.shard(model, **shard_options) for model in (policy, reference, critic)
        )
        task = complete_task(task)
        self.tokenizer, self.task = tokenizer, task
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        template, max_prompt = cfg.model.template, cfg.rollout.max_prompt_tokens
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.train_prompts = encode_prompts(task, train_rows, tokenizer, template, max_prompt, "training")
        self.eval_prompts = encode_prompts(task, eval_rows, tokenizer, template, max_prompt, "evaluation")
        self.sampler = PromptSampler(len(train_rows), cfg.seed)

        t = cfg.trainer
        # the micro-batch layout of the log-prob, value and update passes (None: padded)
        models = [m for m in (self.policy, self.reference, self.critic) if m is not None]
        self.packed_layout = layout_for(t.packing, models)
        # padded passes run each group's prompt once; not under FSDP (every forward call is a collective there,
        # and ranks must make the same number of them) nor with activation checkpointing (it turns the cache off)
        self.share_prompts = not (self.packed_layout or self.world.sharded or cfg.model.gradient_checkpointing)
        # only what trains: with LoRA the adapters, so AdamW holds no state for the frozen base
        trained = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=t.lr, weight_decay=t.weight_decay)
        warmup = max(1, t.warmup_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        if self.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=t.critic_lr, weight_decay=t.weight_decay)
        self.guard = NonFiniteGuard(t.max_bad_steps)
        self.timer = PhaseTimer(memory_knobs=MEMORY_KNOBS, on_phase=self.world.mark)
        self.step_count = 0
        self.extra_state: dict[str, Any] = {}
        self.last_evaluation: dict | None = None  # the held-out evaluation of the latest step, if it had one
        self.reward_errors = RewardErrorLog(self.records.own_file("reward_errors.jsonl"))  # each rank keeps its own
        self.scorer = scorer_from_config(task, cfg.task, on_errors=self.reward_errors)
        # trainer.max_staleness >= 1: batches submitted to the engine ahead of the step that trains on them
        self.pending: deque[SampledBatch] = deque()
        self.engine_start_version = 0  # the policy version the engine started from (a resumed run's step)
        if t.max_staleness and self.world.sharded:
            raise ValueError(STALENESS_UNDER_TORCHRUN)
        if t.max_staleness and not self.engine.overlaps_generation and self.world.is_main:
            log.warning("trainer.max_staleness=%d: %s samples in the training process and cannot overlap the "
                        "update, so this trains on stale batches for no gain in speed (use rollout.layout=server)",
                        t.max_staleness, type(self.engine).__name__)

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
        world: World | None = None,
        fresh_run: bool | None = None,
    ) -> "RLTrainer":
        """Build the trainer a config describes: task and splits, policy (unless given), reference, critic.

        `start_path` (default `model.path`) is where the policy, the frozen reference and a fresh critic start;
        `fresh_run` as in `RLTrainer`.
        """
        from tinyrl.models import enable_activation_checkpointing, load_critic, load_policy

        cfg = config if isinstance(config, TrainConfig) else to_config(config)
        world = world or init_world(cfg.device, cfg.distributed.timeout_s)
        run_dir = Path(run_dir or default_run_dir(cfg))
        if fresh_run if fresh_run is not None else not resuming(cfg.resume):
            start_run_dir(run_dir, cfg, world)  # a used directory is refused before any model loads
        device = world.load_device
        attention = resolve_attn_implementation(cfg.model.attn_implementation, world.device)
        # The frozen reference is stored in the compute dtype (half the memory of float32 on GPU).
        reference_dtype = resolve_dtype(cfg.model.dtype, world.device)
        reference_dtype = None if reference_dtype == torch.float32 else reference_dtype
        task = task or get_task(cfg.task.name, **cfg.task.kwargs)
        if train_rows is None:
            train_rows = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
        if eval_rows is None:
            eval_rows = task.dataset(cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed)
        start_path = start_path or cfg.model.path
        if start_path is None:
            raise ValueError("model.path: RLTrainer.from_config needs a model path (or pass policy= and start_path=)")
        if policy is None:
            policy, tokenizer = load_policy(start_path, device=device, attn_implementation=attention)
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        reference = critic = None
        if uses_reference(cfg.algorithm) and not cfg.model.lora.enabled:  # LoRA: the policy without its adapters
            reference, _ = load_policy(
                start_path, device=device, dtype=reference_dtype, attn_implementation=attention
            )
            reference.requires_grad_(False).eval()
        if uses_critic(cfg.algorithm):
            critic = load_critic(
                critic_path or cfg.model.critic_path or start_path, device=device, attn_implementation=attention
            )
            if cfg.model.gradient_checkpointing:
                enable_activation_checkpointing(critic)
        return cls(cfg, run_dir, policy, tokenizer, task, train_rows, eval_rows, reference, critic, world=world,
                   fresh_run=False, base_path=start_path)

    def _start_engine(self, policy, tokenizer):
        """The rollout engine of `cfg.rollout`, started from the full (not yet sharded) policy. Under torchrun
        every rank's vLLM engine must start from one checkpoint directory: rank 0 writes it into the run
        directory (shared by all nodes, as for `sft_model/`) and removes it once every engine has loaded it."""
        cfg = self.cfg
        options = engine_options(cfg.rollout, dtype=str(self.dtype).removeprefix("torch."), seed=cfg.seed,
                                 device=str(self.device), per_rank=self.world.sharded)
        if self.lora is not None and self.lora.weight_sync == "adapter":
            options["max_lora_rank"] = self.lora.rank  # vLLM with LoRA support: the trainer sends adapters only
        if options.get("distributed_executor_backend") != "external_launcher":
            return make_engine(cfg.rollout.engine, policy, tokenizer, **options)

        def write(start: Path) -> None:
            policy.save_pretrained(start)
            tokenizer.save_pretrained(start)

        with self.world.written_by_main(self.run_dir / ".vllm_start_model", write,
                                        "writing the vLLM start weights on rank 0",
                                        "starting a vLLM engine on every rank") as start:
            return make_engine(cfg.rollout.engine, policy, tokenizer, model_path=start, **options)

    def close(self) -> None:
        """Stop the reward workers and the rollout engine, and end the run's records (`RunRecords.close`: the
        latest samples, `curves.png`)."""
        self.scorer.close()
        self.engine.close()
        self.records.close()

    # ------------------------------------------------------------------ one RL step
    def step(self) -> dict[str, float]:
        """One RL step; returns its metrics, which are also its row in `metrics.jsonl` (see `_record`)."""
        cfg, a, step = self.cfg, self.cfg.algorithm, self.step_count + 1
        metrics: dict[str, float] = {}

        # 1-4. sample prompts, generate n completions each, score them (DAPO dynamic sampling may add rounds); with
        # trainer.max_staleness = k >= 1 the engine sampled this batch earlier and is sampling the next k meanwhile
        staleness = 0
        if cfg.trainer.max_staleness:
            groups, scored, sampled = self._collect_sampled_groups(step)
            staleness = self.step_count - sampled.version
            metrics.update({"async/staleness": float(staleness), "async/sampler_version": float(sampled.version),
                            "time/engine_idle": sampled.generation.engine_idle_s})
        else:
            groups, scored = self._collect_groups(step)
        num_groups = int(self.world.sum(len(groups)))  # on every rank together
        outcomes = self.world.concat([(reward, len(c.token_ids), c.finish_reason) for _, c, reward in scored])
        limit = cfg.task.reward_error_limit
        self.reward_errors.check([r for r, _, _ in outcomes], limit, step, "task.reward_error_limit")
        metrics.update(completion_metrics(outcomes))
        self.records.samples(step, scored)
        if num_groups == 0:
            if self.world.is_main:
                log.warning("step %d: every group had equal rewards; no update", step)
            metrics["train/groups_used"] = 0.0
            self.step_count = step
            return self._record(step, {**metrics, **self._timings()})

        # an engine that can (a colocated vLLM engine with rollout.sleep_level) frees its memory until step 9
        self.engine.sleep()

        # 5. assemble the batch (a rank whose groups all fell to dynamic sampling keeps in step on a masked row)
        with self.timer.phase("assemble", step):
            batch = self._assemble(groups) if groups else self._idle_batch()
        metrics["train/groups_used"] = float(num_groups)

        # 6. forward passes without gradient
        t = cfg.trainer
        on_policy = t.ppo_epochs == 1 and t.prompts_per_mini_batch >= num_groups
        temperature = cfg.rollout.temperature
        # a stale batch's KL-shaped reward needs pi_old, not the older sampler's log-probs
        needs_old = not on_policy or (staleness > 0 and a.kl_in_reward and self.reference is not None)
        with self.timer.phase("old_logprobs", step):
            if needs_old:
                if staleness == 0 and self._rollout_logprobs_are_exact():
                    batch.old_logprobs = batch.rollout_logprobs
                else:
                    with self.world.gathered(self.policy):
                        batch.old_logprobs = batched_logprobs(
                            self.policy, batch, t.micro_batch_tokens, temperature, self.device, self.dtype,
                            self.packed_layout, self.share_prompts,
                        )
        if self.reference is not None or (self.lora is not None and uses_reference(a)):
            with self.timer.phase("ref_logprobs", step), self._reference_pass() as reference:
                batch.ref_logprobs = batched_logprobs(
                    reference, batch, t.micro_batch_tokens, temperature, self.device, self.dtype,
                    self.packed_layout, self.share_prompts,
                )
        if self.critic is not None:
            with self.timer.phase("values", step), self.world.gathered(self.critic):
                batch.values = batched_values(
                    self.critic, batch, t.micro_batch_tokens, self.device, self.dtype, self.packed_layout
                )

        # 7. advantages (a reward that does not apply is NaN: left out of the statistics, zero advantage)
        with self.timer.phase("advantages", step):
            applies = ~torch.isnan(batch.scores)
            rewards = torch.where(applies, batch.scores, 0.0)
            if a.kl_in_reward and batch.ref_logprobs is not None:
                # token-level rewards: -beta * KL(pi_old || pi_ref) on every token, the outcome on the last one
                sampler_logprobs = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
                rewards = algorithms.kl_shaped_rewards(
                    rewards, sampler_logprobs, batch.ref_logprobs, batch.response_mask, a.kl_coef, a.kl_estimator
                )
                kl = algorithms.kl_penalty(
                    sampler_logprobs, batch.ref_logprobs, a.kl_estimator, response_mask=batch.response_mask
                )
                mask = batch.response_mask > 0
                metrics["policy/kl_in_reward"] = self.world.mean(float(kl[mask].sum()), float(mask.sum()))
            batch.advantages, batch.returns = self._advantages(rewards, batch, applies)

        # 8. update
        with self.timer.phase("update", step):
            metrics.update(self._update(batch, step, on_policy, num_groups))

        # 9. push the new weights to the rollout engine
        with self.timer.phase("sync", step):
            self._sync_weights(step)

        self.step_count = step
        metrics["optim/lr"] = self.schedule.get_last_lr()[0]
        return self._record(step, {**metrics, **self._timings()})

    def _record(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The step's records: the held-out evaluation when `trainer.eval_every` schedules one (its figures join
        the row), then the step's row of `metrics.jsonl`. Returns the row."""
        t = self.cfg.trainer
        self.last_evaluation = None
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            with self.timer.phase("evaluate", step):
                self.last_evaluation = self.evaluate(step)
            metrics.update(eval_metrics(self.last_evaluation))
        metrics["reward/worker_restarts"] = self.world.sum(self.scorer.stats.get("worker_restarts", 0))
        self.metrics.write(step, metrics)
        return metrics

    def _collect_groups(self, step: int) -> tuple[list[Group], list]:
        """Generate and score until this rank has its share of `prompts_per_step` usable groups (one round
        unless dynamic sampling).

        All ranks draw from one prompt order: each round takes as many prompts as all ranks still need and
        gives each rank a contiguous block, sampled with seeds of the block's place in the round; so the
        ranks together generate, score and keep exactly what one process would.
        """
        cfg, a = self.cfg, self.cfg.algorithm
        rounds = a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1
        target = len(self.world.share(cfg.trainer.prompts_per_step))
        found: list[tuple[int, list, list[float]]] = []
        kept_per_round: list[int] = []
        scored = []
        self.reward_errors.where = f"step {step}"
        with self.world.gathered(*self._sampling_models()):
            for round_ in range(rounds):
                need = target - len(found)
                total, offset = self.world.claim(need)
                if total == 0:
                    break
                indices = self.sampler.take(total)[offset : offset + need]
                kept = 0
                if indices:
                    with self.timer.phase("generate", step):
                        prompts = [self.train_prompts[i] for i in indices]
                        completions = self._generate(prompts, step_seed(cfg.seed, step, round_), offset)
                    kept = self._score_groups(step, indices, completions, found, scored)
                kept_per_round.append(kept)
        # A group's id is its place among all ranks' kept groups, round by round, rank block by rank block.
        ids = self.world.positions(kept_per_round)
        return [Group(index, members, shaped, id_) for (index, members, shaped), id_ in zip(found, ids)], scored

    @contextlib.contextmanager
    def _reference_pass(self):
        """The reference policy for a no-gradient pass: the frozen copy, or with LoRA the policy itself with its
        adapters disabled (its base model, exactly)."""
        if self.lora is None:
            with self.world.gathered(self.reference):
                yield self.reference
            return
        from tinyrl.lora import adapters_disabled

        with self.world.gathered(self.policy), adapters_disabled(self.policy):
            yield self.policy

    def _score_groups(self, step: int, indices: list[int], completions: list, found: list, scored: list) -> int:
        """Score one round's completions; add every (index, completion, reward) to `scored` and the groups kept
        (all of them, or those whose rewards differ under dynamic sampling) to `found`. Returns how many were kept."""
        a, n = self.cfg.algorithm, self.cfg.rollout.n
        with self.timer.phase("score", step):
            rows = [self.train_rows[indices[c.prompt_index]] for c in completions]
            rewards = self.scorer.score([c.text for c in completions], rows, [c.token_ids for c in completions])
        shaped = self._shaped_scores(completions, rewards)
        if a.dynamic_sampling:  # DAPO keeps only the groups whose rewards differ
            group_of = [i // n for i in range(len(shaped))]
            varied = algorithms.groups_with_reward_variance(torch.tensor(shaped, dtype=torch.float64),
                                                            group_of).tolist()
        kept = 0
        for g, index in enumerate(indices):
            members = list(zip(completions[g * n : (g + 1) * n], rewards[g * n : (g + 1) * n]))
            scored.extend((index, c, r) for c, r in members)
            if a.dynamic_sampling and not varied[g * n]:
                continue
            found.append((index, members, shaped[g * n : (g + 1) * n]))
            kept += 1
        return kept

    def _collect_sampled_groups(self, step: int) -> tuple[list[Group], list, SampledBatch]:
        """`trainer.max_staleness` = k >= 1 (one process): keep the batches of steps `step`..`step + k` submitted
        to the engine, the new ones sampled by the current policy (`sampling_schedule`), then wait for this
        step's batch and score it. Generations and weight loads reach the engine in order, so which policy samples
        which batch does not depend on timing."""
        cfg = self.cfg
        self.reward_errors.where = f"step {step}"
        with self.timer.phase("generate", step), self.world.gathered(*self._sampling_models()):
            while len(self.pending) <= cfg.trainer.max_staleness and step + len(self.pending) <= cfg.trainer.steps:
                ahead = step + len(self.pending)
                indices = self.sampler.take(cfg.trainer.prompts_per_step)
                generation = self.engine.submit([self.train_prompts[i] for i in indices],
                                                self._sampling(step_seed(cfg.seed, ahead, 0)))
                self.pending.append(SampledBatch(ahead, self.step_count, indices, generation))
        sampled = self.pending.popleft()
        if sampled.step != step or sampled.version != sampling_schedule(step, cfg.trainer.max_staleness):
            raise RuntimeError(f"step {step} found the batch of step {sampled.step} sampled by policy "
                               f"{sampled.version}; the sampling schedule is broken")
        with self.timer.phase("wait_for_engine", step):
            completions = sampled.generation.result(cfg.rollout.timeout_s)
        loads = sampled.generation.weight_loads
        if loads is not None and self.engine_start_version + loads != sampled.version:
            raise RuntimeError(f"step {step}: the engine sampled with policy {self.engine_start_version + loads}, "
                               f"the schedule says {sampled.version}; weight loads and generations were reordered")
        found: list = []
        scored: list = []
        kept = self._score_groups(step, sampled.indices, completions, found, scored)
        groups = [Group(index, members, shaped, id_) for (index, members, shaped), id_ in zip(found, range(kept))]
        return groups, scored, sampled

    def _sampling_models(self) -> list:
        """The models the rollout engine runs itself: the policy, when the engine samples from it directly."""
        return [self.policy] if self.engine.shares_policy_weights else []

    def _generate(self, prompts, seed: int, prompt_offset: int = 0):
        sampling = self._sampling(seed, prompt_offset)
        return call_with_timeout(self.engine.generate, self.cfg.rollout.timeout_s, "rollout generation", prompts,
                                 sampling)

    def _sampling(self, seed: int, prompt_offset: int = 0) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(
            max_new_tokens=r.max_response_tokens,
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            stop=tuple(getattr(self.task, "stop", ())),
            seed=seed,
            prompt_offset=prompt_offset,
            feedback=getattr(self.task, "feedback", None),
        )

    def _sync_weights(self, step: int) -> None:
        """Make the engine sample from the updated policy: nothing to copy when it samples from the policy itself,
        else the full weights in the compute dtype as `(hf_name, tensor)` pairs, gathered one tensor at a time
        (after the device's queued updates finish: `World.full_weights`). If that load fails the
        engine is rebuilt from the current weights once, else the run stops here (the phase timer adds the step
        and phase to the message)."""
        timeout = self.cfg.rollout.timeout_s
        if self.engine.shares_policy_weights:
            call_with_timeout(self.engine.update_weights, timeout, "rollout weight sync", self.policy)
            return
        if self.lora is not None and self.lora.weight_sync == "adapter":
            from tinyrl.lora import AdapterFiles

            # every rank gathers the adapters (a collective per tensor, in step; the frozen base never changes,
            # so the engine keeps the base it started from) and its engine serves them as adapter version `step`
            adapter = AdapterFiles(self.lora, self.base_path,
                                   dict(self.world.full_weights(self.policy, only=lambda name: ".lora_" in name)))
            call_with_timeout(self.engine.load_adapter, timeout, "rollout adapter sync", step, adapter)
            return
        try:
            call_with_timeout(self.engine.load_weights, timeout, "rollout weight sync", self._engine_weights())
        except Exception as err:
            # after a timeout the load may still be running: rebuilding under it is unsafe
            if isinstance(err, TimeoutError) or not self.engine.can_rebuild:
                raise RuntimeError(f"rollout weight sync failed ({err}); the engine may hold stale or half-loaded "
                                   "weights, so the run stops here (resume from the last checkpoint)") from err
            log.warning("step %d: rollout weight sync failed (%s); rebuilding the engine from the current weights",
                        step, err)
            try:
                call_with_timeout(self.engine.rebuild, timeout, "rollout engine rebuild", self._engine_weights())
            except Exception as again:
                raise RuntimeError(f"rollout weight sync failed ({err}) and rebuilding the engine failed too "
                                   f"({type(again).__name__}: {again}); the run stops here (resume from the last "
                                   "checkpoint)") from again

    def _engine_weights(self):
        """The full weights a rollout engine loads, `(hf_name, tensor)` in the compute dtype, one at a time; with
        LoRA the merged W + (alpha/r) B A, merged in float32 before the cast (`tinyrl.lora.merged_weights`)."""
        if self.lora is None:
            return self.world.full_weights(self.policy, dtype=self.dtype)
        from tinyrl.lora import lora_scaling, merged_weights

        return merged_weights(self.world.full_weights(self.policy), lora_scaling(self.lora), dtype=self.dtype)

    def _shaped_scores(self, completions, rewards) -> list[float]:
        """The rewards' scores, with DAPO's soft overlong punishment when `algorithm.overlong=soft`
        (`algorithms.overlong_penalty`, in float64)."""
        a, limit = self.cfg.algorithm, self.cfg.rollout.max_response_tokens
        scores = [float(r.score) for r in rewards]
        if a.overlong != "soft" or a.overlong_buffer == 0:
            return scores
        # a buffer longer than a response may be starts its ramp below length 0: lengths count from there
        below = max(0, a.overlong_buffer - limit)
        lengths = torch.tensor([len(c.token_ids) + below for c in completions], dtype=torch.float64)
        penalties = algorithms.overlong_penalty(lengths, limit + below, a.overlong_buffer, a.overlong_penalty)
        return [score + penalty for score, penalty in zip(scores, penalties.tolist())]

    def _assemble(self, groups: list[Group]) -> RolloutBatch:
        prompt_ids, response_ids, scores, group_index, rollout_logprobs, truncated, written = [], [], [], [], [], [], []
        for group in groups:
            for (completion, _), score in zip(group.members, group.shaped):
                prompt_ids.append(self.train_prompts[group.index])
                response_ids.append(completion.token_ids)
                scores.append(score)
                group_index.append(group.id)
                rollout_logprobs.append(completion.logprobs or [0.0] * len(completion.token_ids))
                truncated.append(completion.finish_reason == "length")
                written.append(completion.environment_positions)
        batch = build_batch(prompt_ids, response_ids, scores, group_index, self.pad_id, rollout_logprobs, written)
        if self.cfg.algorithm.overlong == "mask":
            # DAPO overlong filtering: truncated completions carry no learning signal
            batch.response_mask[torch.tensor(truncated, dtype=torch.bool)] = 0.0
        return batch

    def _idle_batch(self) -> RolloutBatch:
        """One row of one pad token each side and nothing in the loss (group -1 is in no mini-batch): what a
        rank with no rows of its own computes on, so that it runs the passes the other ranks run."""
        batch = build_batch([[self.pad_id]], [[self.pad_id]], [0.0], [-1], self.pad_id, [[0.0]])
        batch.response_mask.zero_()
        return batch

    def _advantages(self, rewards: torch.Tensor, batch: RolloutBatch,
                    scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and returns of this rank's rows, estimated over the rows of all ranks together, so that
        estimators normalising over the batch (GAE's whitening, REINFORCE++) give what one process would.
        `scored` (default: every row) is False for rows whose reward does not apply."""
        a = self.cfg.algorithm

        def estimate(rewards, response_mask, group_index, values, scored):
            return algorithms.compute_advantages(a.advantage, rewards, response_mask, group_index=group_index,
                                                 values=values, gamma=a.gamma, lam=a.lam, norm_by_std=a.norm_by_std,
                                                 scored=scored)

        return self.world.over_all_rows(estimate, rewards, batch.response_mask, batch.group_index, batch.values,
                                        scored)

    def _update(self, batch: RolloutBatch, step: int, on_policy: bool, num_groups: int) -> dict[str, float]:
        """`ppo_epochs` passes over mini-batches of whole groups; one optimizer step per mini-batch.

        Mini-batches are drawn from the ids of all ranks' groups; each rank trains on its rows among them.
        """
        cfg, t = self.cfg, self.cfg.trainer
        per_mini = t.prompts_per_mini_batch
        order_rng = np.random.default_rng([cfg.seed, step, 3])
        group_ids = list(range(num_groups))
        sums: dict[str, list[float]] = {}
        self.policy.train()
        for epoch in range(t.ppo_epochs):
            shuffled = (
                order_rng.permutation(num_groups).tolist() if t.ppo_epochs > 1 or num_groups > per_mini else group_ids
            )
            for start in range(0, len(shuffled), per_mini):
                chosen = set(shuffled[start : start + per_mini])
                rows = [i for i in range(batch.size) if int(batch.group_index[i]) in chosen]
                stats = self._optimizer_step(batch, rows, step, on_policy)
                for key, value in stats.items():
                    sums.setdefault(key, []).append(value)
        self.policy.eval()
        return {key: float(np.mean(values)) for key, values in sums.items()}

    def _optimizer_step(self, batch: RolloutBatch, rows: list[int], step: int, on_policy: bool) -> dict[str, float]:
        """One optimizer step on this rank's `rows` of a mini-batch (all ranks call it for the same mini-batch):
        the objective of each micro-batch (`algorithms.rl_objective`), backward, one update.

        The loss is normalised over the whole mini-batch on all ranks (`World.whole_batch`), so the micro-batches'
        gradients add up to the whole mini-batch's. Every rank runs the same number of forward/backward passes
        (`World.lockstep`: each one is a collective under FSDP); a rank out of micro-batches runs zero-weight
        passes on a one-token row.
        """
        cfg, a, t, world = self.cfg, self.cfg.algorithm, self.cfg.trainer, self.world
        # The divisor covers every row of the mini-batch, including rows skipped below.
        local = algorithms.loss_normalizer(a.loss_agg, [batch.response_mask[rows]], constant=self._agg_constant())
        normalizer = world.whole_batch(local)
        totals: dict[str, float] = {}  # already the same on every rank
        if self._loss_vanishes_without_advantage():
            # Rows whose advantages are all zero (e.g. GRPO groups with equal rewards) add exactly nothing to
            # the loss or its gradient; skipping their forward/backward passes changes no number.
            signal = (batch.advantages[rows].abs() * batch.response_mask[rows]).sum(-1) > 0
            totals["train/rows_with_signal"] = world.mean(float(signal.sum()), len(rows))  # over every rank's rows
            rows = [r for r, keep in zip(rows, signal.tolist()) if keep]
            if totals["train/rows_with_signal"] == 0:
                return {**totals, "optim/skipped": 1.0}
        micro, packing = plan_micro_batches(batch, rows, t.micro_batch_tokens, self.packed_layout)
        tokens = max(world.sum(float(batch.response_mask[rows].sum())), 1.0)
        figures = algorithms.StepMetrics()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, diverged = 0.0, False
        for micro_rows in world.lockstep(micro):
            if micro_rows is None or diverged:
                self._idle_pass(self.policy)
                continue
            mb = batch.select(micro_rows).to(self.device)
            with autocast_for(self.device, self.dtype):
                logprobs, entropy = token_logprobs(
                    self.policy, mb, cfg.rollout.temperature, with_entropy=True, packing=packing,
                    share_prompts=self.share_prompts,
                )
                if not torch.isfinite(logprobs.detach()[mb.response_mask > 0]).all():
                    # The guard below skips this update (and stops a diverged run); the backward still runs
                    # so that this rank's passes stay in step with the other ranks'.
                    loss_total, diverged = float("nan"), True
                    loss = logprobs.sum() * 0.0
                else:
                    loss, measured = algorithms.rl_objective(
                        a, logprobs, None if on_policy else mb.old_logprobs, mb.advantages, mb.response_mask,
                        normalizer, ref_logprobs=mb.ref_logprobs, entropy=entropy, rollout_logprobs=mb.rollout_logprobs,
                    )
            loss.backward()
            if diverged:
                continue
            loss_total += loss.item() / world.size
            figures.add(measured, token_share=float(mb.response_mask.sum()) / tokens, ranks=world.size)
        grad_norm = self._clip_gradients(self.policy)
        loss_total = world.sum(loss_total)
        if self.guard.check(step, loss_total, grad_norm):
            totals["optim/skipped"] = 1.0
        else:
            self.optimizer.step()
            self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients before the critic's and the next rollout
        totals["optim/grad_norm"] = grad_norm
        if self.critic is not None:
            totals.update(self._critic_step(batch, micro, normalizer, packing))
        return {**totals, **world.reduce_metrics(figures.sums, figures.maxima, figures.minima)}

    def _critic_step(self, batch, micro, normalizer, packing=None) -> dict[str, float]:
        a, world = self.cfg.algorithm, self.world
        self.critic.train()
        self.critic_optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro_rows in world.lockstep(micro):
            if micro_rows is None:
                self._idle_pass(self.critic, critic=True)
                continue
            mb = batch.select(micro_rows).to(self.device)
            with autocast_for(self.device, self.dtype):
                values = token_values(self.critic, mb, packing=packing)
                loss, _ = algorithms.value_loss(
                    values, mb.values, mb.returns, mb.response_mask, clip=a.value_clip, agg=a.loss_agg,
                    normalizer=normalizer,
                )
            loss.backward()
            total += loss.item() / world.size
        grad_norm = self._clip_gradients(self.critic)
        total = world.sum(total)
        if math.isfinite(total) and math.isfinite(grad_norm):
            self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.critic.eval()
        return {"losses/value": total, "optim/critic_grad_norm": grad_norm}

    def _idle_pass(self, model, critic: bool = False) -> None:
        """A forward/backward pass that changes no gradient, for a rank with no micro-batch left to train on."""
        mb = self._idle_batch().to(self.device)
        with autocast_for(self.device, self.dtype):
            out = token_values(model, mb) if critic else token_logprobs(model, mb, self.cfg.rollout.temperature)[0]
        (out.sum() * 0.0).backward()

    def _clip_gradients(self, model) -> float:
        """Clip to `trainer.max_grad_norm`; return the norm of the whole (all ranks') gradient before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.trainer.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _timings(self) -> dict[str, float]:
        """This step's phase times and (on GPU) peak memory, the largest over ranks (the others wait for it)."""
        figures = self.timer.metrics()
        if self.device.type == "cuda":
            figures["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return self.world.reduce_metrics({}, figures)

    def _rollout_logprobs_are_exact(self) -> bool:
        """The sampler's log-probs are pi_old itself when it ran these very weights in this process and sampled
        from the whole temperature-scaled distribution (no top-k/top-p renormalisation)."""
        r = self.cfg.rollout
        return self.engine.shares_policy_weights and r.top_k == 0 and r.top_p == 1.0 and r.temperature > 0

    def _loss_vanishes_without_advantage(self) -> bool:
        """True when every loss term is proportional to the advantage (no KL loss term, no entropy bonus)."""
        a = self.cfg.algorithm
        return self.critic is None and a.entropy_coef == 0 and (a.kl_coef == 0 or a.kl_in_reward)

    def _agg_constant(self) -> float:
        a = self.cfg.algorithm
        return float(a.loss_agg_normalizer or self.cfg.rollout.max_response_tokens)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict:
        """Greedy accuracy (and pass@k when `trainer.eval_pass_k` > 0) on the held-out problems, split over the
        ranks (`evaluate.evaluate_on_ranks`); rank 0 writes `eval/step_*.json`."""
        cfg, r = self.cfg, self.cfg.rollout
        self.reward_errors.where = f"evaluation at step {step}"
        with self.world.gathered(*self._sampling_models()):
            return evaluate_on_ranks(
                self.world, self.engine, self.scorer, self.task, self.tokenizer, self.eval_rows, self.eval_prompts,
                run_dir=self.run_dir, step=step, pass_k=cfg.trainer.eval_pass_k, max_new_tokens=r.max_response_tokens,
                temperature=r.temperature, top_p=r.top_p, seed=cfg.seed, timeout_s=r.timeout_s,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint holds besides the weights and the optimizer state (collective: every rank calls it)."""
        return {
            "step": self.step_count,
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": capture_rng(),
            "rng_by_rank": self.world.rng_states(),
            "world_size": self.world.size,
            "metrics_offset": self.metrics.offset(),
            "extra": self.extra_state,
            # batches sampled for later steps (trainer.max_staleness), waited for: a resumed run trains on them
            "pending": [sampled.state(self.cfg.rollout.timeout_s) for sampled in self.pending],
            "max_staleness": self.cfg.trainer.max_staleness,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        self.guard.load_state_dict(state["guard"])
        self.world.restore_rng_states(state.get("rng_by_rank"), state["rng"])
        self.extra_state = state.get("extra", {})
        pending, k = state.get("pending", []), state.get("max_staleness", 0)
        if pending and k != self.cfg.trainer.max_staleness:
            raise ConfigError(f"trainer.max_staleness: the checkpoint holds {len(pending)} batch(es) sampled ahead with "
                             f"max_staleness={k}; resume with trainer.max_staleness={k}")
        self.pending = deque(SampledBatch.from_state(sampled) for sampled in pending)
        self.engine_start_version = self.step_count  # the engine was started from this checkpoint's weights
        if "optimizer" in state:  # checkpoints written before optimizer state moved to optimizer/
            self.optimizer.load_state_dict(state["optimizer"])
            if self.critic is not None:
                self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def resume(self, checkpoint_dir: str | Path, state: dict) -> None:
        """Continue from a checkpoint: `state` (its trainer_state.pt) and every optimizer's state.

        The same world size resumes exactly. Another world size resumes too (the optimizer state is resharded
        on load, and a step computes the same numbers on any number of ranks), equal up to float rounding.
        """
        saved = state.get("world_size", 1)
        if saved != self.world.size and self.world.is_main:
            log.warning("resuming a checkpoint of %d ranks on %d: the run continues equal up to float rounding, "
                        "not bit for bit", saved, self.world.size)
        self.load_state_dict(state)
        if self.lora is not None:
            from tinyrl.lora import ADAPTER_DIR, load_adapter_weights

            # the policy was loaded from its start (base) weights; the adapters come from the checkpoint, exactly
            load_adapter_weights(self.policy, Path(checkpoint_dir) / ADAPTER_DIR)
            self._sync_weights(self.step_count)
        if (Path(checkpoint_dir) / OPTIMIZER_DIR).is_dir():
            self.world.load_optimizers(checkpoint_dir, self._optimizers())

    def _optimizers(self) -> dict:
        optimizers = {"actor": (self.policy, self.optimizer)}
        if self.critic is not None:
            optimizers["critic"] = (self.critic, self.critic_optimizer)
        return optimizers

    def save(self) -> Path:
        """Write a checkpoint of this step (collective: every rank calls it)."""
        models = {"actor": self.policy}
        if self.critic is not None:
            models["critic"] = self.critic
        return self.world.save_checkpoint(
            self.run_dir, self.step_count, models, self._optimizers(), self.tokenizer, self.state_dict(),
            keep_last=self.cfg.trainer.keep_last, export=self._lora_export if self.lora is not None else None,
        )

    def _lora_export(self, name: str, model, weights: dict) -> dict | None:
        """With LoRA the checkpoint's `actor/` is the merged model (what vLLM and `tinyrl-eval` load) and `adapter/`
        the adapter in PEFT's format (what a resume and `PeftModel.from_pretrained` load)."""
        if name != "actor":
            return None
        from tinyrl.lora import ADAPTER_DIR, AdapterFiles, MergedModel

        return {"actor": MergedModel(model, self.lora, weights),
                ADAPTER_DIR: AdapterFiles(self.lora, self.base_path, weights)}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Run RL steps up to `trainer.steps`, checkpointing on schedule and on SIGTERM/SIGINT."""
        t = self.cfg.trainer
        progress = None
        if t.steps > self.step_count:
            progress = Progress(t.steps, start_step=self.step_count, label="RL step",
                                enabled=self.cfg.logging.progress and self.world.is_main)
        try:
            with stop_requests() as stop, self.world.reporting_failures():
                while self.step_count < t.steps:
                    metrics = self.step()
                    step = self.step_count
                    if progress is not None:
                        shown = {"train reward": metrics.get("reward/mean"), "train acc": metrics.get("reward/accuracy"),
                                 # max_staleness >= 1: whether the overlap hides generation, and which side waits
                                 "waited for engine s": metrics.get("time/wait_for_engine"),
                                 "engine idle s": metrics.get("time/engine_idle")}
                        progress.update(step, {k: v for k, v in shown.items() if v is not None})
                        if self.last_evaluation is not None:
                            progress.note(held_out_line(f"at RL step {step}", self.last_evaluation))
                    # every rank stops at the same step, whichever received the signal
                    stopping = self.world.any(stop["signal"] is not None)
                    if (t.save_every and step % t.save_every == 0) or stopping:
                        self.save()
                    if stopping:
                        received = stop["signal"] or "sent to another rank"
                        raise KeyboardInterrupt(f"stopped by signal {received} at step {step}; checkpoint saved")
        finally:
            if progress is not None:
                progress.close()
