"""Run under torchrun by test_rollout_vllm_ranks.py: one vLLM engine per rank (vLLM's external_launcher) on gloo.

Each rank generates its own share of the prompts, checks its greedy completions against the transformers model,
loads perturbed weights and checks again, then writes what it saw to OUT_DIR/rank{R}.json.
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist

from tinyrl.models import load_policy
from tinyrl.rollout import SamplingConfig, make_engine, policy_named_tensors
from tinyrl.rollout.vllm import VLLMEngine

TEXTS = ["User: Using the numbers [3, 4, 5], make 27.", "12+5=17", "Assistant: <think>", "7*3=21", "<answer>(1+2)*3"]


def greedy_matches(model, tokenizer, engine, prompts) -> bool:
    ours = engine.generate(prompts, SamplingConfig(10, temperature=0.0))
    theirs = make_engine("hf", model, tokenizer).generate(prompts, SamplingConfig(10, temperature=0.0))
    return [c.token_ids for c in ours] == [c.token_ids for c in theirs] and all(
        max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3 for a, b in zip(ours, theirs)
    )


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tokenizer = load_policy(model_dir)
    # every rank starts from the same checkpoint directory (external_launcher expects one model for all)
    engine = VLLMEngine(model, tokenizer, model_path=model_dir, dtype="float32", enforce_eager=True,
                        kv_cache_memory_bytes=64 << 20, max_model_len=1024,
                        distributed_executor_backend="external_launcher")
    every = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    block = (len(every) + world - 1) // world  # each rank its contiguous block of the prompts, as the trainer does
    mine = every[rank * block : (rank + 1) * block]
    report = {"rank": rank, "prompts": mine, "greedy_before": greedy_matches(model, tokenizer, engine, mine)}
    sampling = SamplingConfig(10, n=2, temperature=1.0, seed=9, prompt_offset=rank * block)
    report["sampled"] = [c.token_ids for c in engine.generate(mine, sampling)]
    with torch.no_grad():  # the same update on every rank, as after a data-parallel optimizer step
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    engine.load_weights(policy_named_tensors(model))
    report["greedy_after_sync"] = greedy_matches(model, tokenizer, engine, mine)
    total = torch.ones(1)
    dist.all_reduce(total)  # the trainer's process group outlives the engine's use of it
    report["all_reduce"] = float(total)
    engine.close()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
