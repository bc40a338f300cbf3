"""Checks of tinyrl.distributed and the trainer's data parallelism on real ranks, run by
`torchrun --nproc_per_node=2 tests/distributed_checks.py OUT.json MODEL_DIR WORK_DIR` (see test_distributed.py).

One launch runs them all, since every torchrun start costs seconds: each check compares the 2-rank result
with one process computing the same thing on all the data, and rank 0 writes what it measured to OUT.json.
The last check makes rank 1 exit in the middle of a step and records how rank 0 fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from tinyrl.batch import build_batch
from tinyrl.compose import load_config
from tinyrl.distributed import DistributedError, World, check_sharded, init_world
from tinyrl.models import build_tiny_model
from tinyrl.plan import memory_plan
from tinyrl.rollout import SamplingConfig
from tinyrl.rollout.hf import HFEngine
from tinyrl.trainer import RLTrainer

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
TIMEOUT_S = 30.0
results: dict = {}


def config(model_dir, run_dir, *overrides):
    return load_config([
        f"model.path={model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}", "task.train_size=16",
        "task.eval_size=4", "task.reward_workers=0", "rollout.n=2", "rollout.max_response_tokens=6",
        "rollout.max_prompt_tokens=64", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
        "trainer.micro_batch_tokens=24", "trainer.max_grad_norm=1e9", "logging.progress=false", "device=cpu",
        f"distributed.timeout_s={TIMEOUT_S}", *overrides,
    ])


def with_sgd(trainer: RLTrainer) -> RLTrainer:
    """SGD with lr 1: an update moves each weight by exactly minus its gradient (AdamW would hide a scale)."""
    trainer.optimizer = torch.optim.SGD(trainer.policy.parameters(), lr=1.0)
    trainer.schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    if trainer.critic is not None:
        trainer.critic_optimizer = torch.optim.SGD(trainer.critic.parameters(), lr=1.0)
    return trainer


def global_batch(seed: int, with_values: bool):
    """8 ragged rows in 4 groups; groups 0 and 2 have no advantage (skipped rows), like flat GRPO groups."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 200, (1 + i % 3,), generator=g).tolist() for i in range(8)]
    responses = [torch.randint(5, 200, (2 + (3 * i) % 5,), generator=g).tolist() for i in range(8)]
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    batch = build_batch(prompts, responses, [0.0] * 8, groups, pad_id=0, rollout_logprobs=[[0.0] * len(r) for r in responses])
    advantages = torch.randn(8, batch.response_width, generator=g)
    advantages[[0, 1, 4, 5]] = 0.0
    batch.advantages = advantages * batch.response_mask
    if with_values:
        batch.values = torch.randn(8, batch.response_width, generator=g) * batch.response_mask
        batch.returns = torch.randn(8, batch.response_width, generator=g) * batch.response_mask
    return batch, prompts, responses, groups


def local_batch(batch, prompts, responses, groups, rows):
    part = build_batch([prompts[i] for i in rows], [responses[i] for i in rows], [0.0] * len(rows),
                       [groups[i] for i in rows], pad_id=0, rollout_logprobs=[[0.0] * len(responses[i]) for i in rows])
    for name in ("advantages", "values", "returns"):
        value = getattr(batch, name)
        if value is not None:
            setattr(part, name, value[rows, : part.response_width].clone())
    return part


def full(world, model) -> dict:
    return {name: tensor.clone() for name, tensor in world.full_weights(model)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check(name):
    def run(fn):
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except Exception as err:  # recorded for the test to report, then the next check runs
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        return fn
    return run


def main(out_path: str, model_dir: str, work: str) -> None:
    torch.set_num_threads(1)
    world = init_world("cpu", TIMEOUT_S)
    one = World(device="cpu")  # one process, for the results N ranks must reproduce
    work = Path(work)
    tied_dir = work / "tied"
    if world.is_main:
        texts = [f"Problem {i}: say digits.\n12345 67890" for i in range(200)]
        build_tiny_model(tied_dir, texts, vocab_size=300, hidden_size=64, num_heads=2, num_kv_heads=1,
                         intermediate_size=128, num_layers=2, seed=0, tie_word_embeddings=True)
    world.barrier("building the tied model")

    @check("world")
    def _():
        trainer = RLTrainer.from_config(config(model_dir, work / "w", "algorithm=grpo", "algorithm.kl_coef=0.001"),
                                        world=world)
        check_sharded(trainer.policy, 2)
        check_sharded(trainer.reference, 2)
        local = {n: tuple(p.to_local().shape) for n, p in trainer.policy.named_parameters()}
        return {"rank": world.rank, "size": world.size, "env_size": int(os.environ["WORLD_SIZE"]),
                "embedding_shard": local["model.embed_tokens.weight"], "sizes": world.all_gather(world.size)}

    @check("gathered_sampling")
    def _():
        # Ranks decode different numbers of tokens through one sharded model: inside `gathered` no
        # collective runs, so nothing waits; the tokens equal the unsharded model's.
        from tinyrl.models import load_policy

        sharded, tok = load_policy(tied_dir)
        plain, _ = load_policy(tied_dir)
        world.shard(sharded)
        sampling = SamplingConfig(max_new_tokens=3 + 9 * world.rank, n=2, temperature=1.0, seed=5, prompt_offset=4)
        prompts = [[5, 6, 7], [8, 9]]
        started = time.perf_counter()
        with world.gathered(sharded):
            got = HFEngine(sharded, tok).generate(prompts, sampling)
        seconds = time.perf_counter() - started
        want = HFEngine(plain, tok).generate(prompts, sampling)
        lengths = world.all_gather(max(len(c.token_ids) for c in got))
        same = [c.token_ids for c in got] == [c.token_ids for c in want]
        logprob_diff = max(abs(x - y) for c, d in zip(got, want) for x, y in zip(c.logprobs, d.logprobs))
        check_sharded(sharded, 2)  # resharded on exit
        return {"same_tokens": world.all_gather(same), "logprob_diff": logprob_diff, "lengths": lengths,
                "seconds": seconds}

    @check("full_weights")
    def _():
        from tinyrl.models import load_policy

        sharded, _ = load_policy(tied_dir)
        plain, _ = load_policy(tied_dir)
        world.shard(sharded)
        pairs = list(world.full_weights(sharded))
        want = plain.state_dict()
        half = list(world.full_weights(sharded, dtype=torch.bfloat16))  # cast per shard, before the gather
        return {"names_equal": [n for n, _ in pairs] == [n for n in want if n != "lm_head.weight"],
                "has_lm_head": "lm_head.weight" in dict(pairs),
                "max_diff": max(float((t - want[n]).abs().max()) for n, t in pairs),
                "bf16_dtypes": sorted({str(t.dtype) for _, t in half}),
                "bf16_equal": all(torch.equal(t, want[n].to(torch.bfloat16)) for n, t in half)}

    @check("gradients")
    def _():
        # One optimizer step with SGD on ragged rows split unevenly over the ranks (rank 1 has one group, so
        # fewer micro-batches: it runs zero-weight passes), against one process on all 8 rows. The weight change
        # is the gradient, so a loss normalisation off by any factor shows.
        cases = {
            "token-mean": ("algorithm=grpo", "algorithm.kl_coef=0", "algorithm.loss_agg=token-mean"),
            "seq-mean-token-mean": ("algorithm=grpo", "algorithm.kl_coef=0"),
            "seq-mean-token-sum-norm": ("algorithm=dr_grpo", "algorithm.kl_coef=0"),
            "kl-and-entropy": ("algorithm=grpo", "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01"),
            "clipped": ("algorithm=grpo", "algorithm.kl_coef=0", "trainer.max_grad_norm=0.01"),
            "checkpointing": ("algorithm=grpo", "algorithm.kl_coef=0", "model.gradient_checkpointing=true"),
            "ppo-critic": ("algorithm=ppo",),
            "rank1-without-signal": ("algorithm=grpo", "algorithm.kl_coef=0"),
            "packed": ("algorithm=grpo", "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01",
                       "trainer.packing=true"),
            "packed-ppo-critic": ("algorithm=ppo", "trainer.packing=true"),
        }
        from tinyrl.models import load_policy

        start = load_policy(model_dir)[0].state_dict()
        out = {}
        for name, overrides in cases.items():
            batch, prompts, responses, groups = global_batch(seed=len(out), with_values=name.endswith("ppo-critic"))
            mine = [0, 1, 2, 3, 4, 5] if world.rank == 0 else [6, 7]
            if name == "rank1-without-signal":
                mine = [0, 1, 2, 3, 6, 7] if world.rank == 0 else [4, 5]  # rank 1: only a group without advantage
            cfg = config(model_dir, work / f"g-{name}", *overrides)
            ranks = with_sgd(RLTrainer.from_config(cfg, world=world))
            alone = with_sgd(RLTrainer.from_config(cfg, run_dir=work / f"g1-{name}-{world.rank}", world=one))
            part = local_batch(batch, prompts, responses, groups, mine)
            for trainer, b in ((ranks, part), (alone, batch)):
                if trainer.reference is not None:
                    with trainer.world.gathered(trainer.reference):
                        from tinyrl.policy_ops import batched_logprobs

                        b.ref_logprobs = batched_logprobs(trainer.reference, b, 10_000, 1.0, trainer.device, trainer.dtype)
            stats_ranks = ranks._optimizer_step(part, list(range(part.size)), step=1, on_policy=True)
            stats_alone = alone._optimizer_step(batch, list(range(8)), step=1, on_policy=True)
            diff = max_diff(full(world, ranks.policy), full(one, alone.policy))
            critic_diff = max_diff(full(world, ranks.critic), full(one, alone.critic)) if ranks.critic is not None else 0.0
            moved = max_diff(full(one, alone.policy), start)
            stat_diff = {k: abs(stats_ranks[k] - stats_alone[k]) for k in stats_alone if not math.isnan(stats_alone[k])}
            out[name] = {"weight_diff": diff, "critic_diff": critic_diff, "moved": moved, "stat_diff": stat_diff,
                         "stat_keys_equal": sorted(stats_ranks) == sorted(stats_alone)}
            ranks.close(), alone.close()
        return out

    @check("advantages")
    def _():
        # Estimators that normalise over the batch (GAE whitening, REINFORCE++) see all ranks' rows.
        out = {}
        for estimator in ("reinforce_pp", "gae", "grpo"):
            overrides = ("algorithm=ppo",) if estimator == "gae" else (f"algorithm.advantage={estimator}", "algorithm.kl_coef=0")
            cfg = config(model_dir, work / f"a-{estimator}", *overrides)
            ranks = RLTrainer.from_config(cfg, world=world)
            alone = RLTrainer.from_config(cfg, run_dir=work / f"a1-{estimator}-{world.rank}", world=one)
            batch, prompts, responses, groups = global_batch(seed=7, with_values=True)
            batch.scores = torch.arange(8, dtype=torch.float32) % 3
            mine = [0, 1, 2, 3, 4, 5] if world.rank == 0 else [6, 7]
            part = local_batch(batch, prompts, responses, groups, mine)
            part.scores = batch.scores[mine]
            got, _ = ranks._advantages(part.scores, part)
            want, _ = alone._advantages(batch.scores, batch)
            out[estimator] = float((got - want[mine, : part.response_width]).abs().max())
            ranks.close(), alone.close()
        return out

    @check("optimizer_checkpoint")
    def _():
        # AdamW state saved as each rank's shard, loaded back on 2 ranks, and on one process (resharded).
        cfg = config(model_dir, work / "ck", "algorithm=grpo", "algorithm.kl_coef=0")
        trainer = RLTrainer.from_config(cfg, world=world)
        batch, prompts, responses, groups = global_batch(seed=3, with_values=False)
        mine = [0, 1, 2, 3, 4, 5] if world.rank == 0 else [6, 7]
        part = local_batch(batch, prompts, responses, groups, mine)
        trainer._optimizer_step(part, list(range(part.size)), step=1, on_policy=True)
        trainer.step_count = 1
        path = trainer.save()
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        again = RLTrainer.from_config(cfg, run_dir=work / "ck-again", world=world)
        again.resume(path, state)
        before = trainer.optimizer.state_dict()["state"]
        after = again.optimizer.state_dict()["state"]
        same = all(torch.equal(before[k][m].to_local(), after[k][m].to_local())
                   for k in before for m in ("exp_avg", "exp_avg_sq"))
        steps_same = all(float(before[k]["step"]) == float(after[k]["step"]) for k in before)
        # on one process: the full moments equal the gathered shards
        names = [n for n, _ in trainer.policy.named_parameters()]
        full_moments = {n: before[i]["exp_avg"].full_tensor() for i, n in enumerate(names)}
        single_diff = None
        if world.is_main:
            alone = RLTrainer.from_config(cfg, run_dir=work / "ck-one", world=one)
            alone.resume(path, state)
            single = alone.optimizer.state_dict()["state"]
            single_diff = max(float((single[i]["exp_avg"] - full_moments[n]).abs().max()) for i, n in enumerate(names))
            alone.close()
        files = sorted(p.name for p in (path / "optimizer").iterdir())
        trainer.close(), again.close()
        return {"same_on_two_ranks": world.all_gather(same and steps_same), "one_process_diff": single_diff,
                "files": files, "world_size": state["world_size"]}

    @check("plan_state_bytes")
    def _():
        # Rank 0's real shard sizes of weights, gradients and AdamW state equal the plan for 2 ranks.
        cfg = config(model_dir, work / "plan", "algorithm=grpo", "algorithm.kl_coef=0")
        trainer = RLTrainer.from_config(cfg, world=world)
        batch, prompts, responses, groups = global_batch(seed=4, with_values=False)
        part = local_batch(batch, prompts, responses, groups, [0, 1, 2, 3] if world.rank == 0 else [4, 5, 6, 7])
        trainer._optimizer_step(part, list(range(part.size)), step=1, on_policy=True)
        trainer._idle_pass(trainer.policy)  # gradients exist again (freed after each step)

        def storage_bytes(tensors):
            seen = {}
            for t in tensors:
                local = t.to_local() if hasattr(t, "to_local") else t
                storage = local.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            return sum(seen.values())

        params = storage_bytes(p for p in trainer.policy.parameters())
        grads = storage_bytes(p.grad for p in trainer.policy.parameters())
        moments = sum(
            (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
            for s in trainer.optimizer.state.values() for t in s.values()
        )
        plan = memory_plan(cfg, world_size=2, gpu_gb=1.0, device="cpu").components
        trainer.close()
        return {"measured": [params, grads, moments],
                "plan": [plan["policy weights (float32)"], plan["policy gradients (float32)"],
                         plan["policy AdamW moments (float32)"]]}

    @check("rank_exits_early")
    def _():
        # Rank 1 dies while scoring step 1 (as a crashed reward function or a lost machine would); rank 0 must
        # stop within the collective timeout, saying which rank and phase.
        cfg = config(model_dir, work / "exit", "algorithm=grpo", "algorithm.kl_coef=0")
        trainer = RLTrainer.from_config(cfg, world=world)
        world.barrier("starting the early-exit check")
        if world.rank == 1:
            trainer.scorer.score = lambda *args, **kwargs: os._exit(0)
        started = time.perf_counter()
        try:
            with world.reporting_failures():
                trainer.step()
        except DistributedError as err:
            return {"message": str(err), "seconds": time.perf_counter() - started}
        raise AssertionError("rank 0 finished a step although rank 1 had exited")

    if world.is_main:
        Path(out_path).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:4])
