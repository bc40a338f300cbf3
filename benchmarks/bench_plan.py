"""The memory plan (`tinyrl.plan.memory_plan`) against peaks measured with the PyTorch profiler on this CPU.

    .venv/bin/python benchmarks/bench_plan.py       # prints a markdown table

A Qwen2-shaped model whose activations dominate (hidden 128, 4 layers, intermediate 512, vocab 2048), float32:
one trainer update of one micro-batch of 16 rows x (32 prompt + 96 response) tokens, with and without gradient
checkpointing, and transformers-engine sampling of 64 prompts of 32 tokens. The state rows are compared
byte for byte; the peaks as measured / planned.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY_TEXTS  # noqa: E402  (the test suite's tiny corpus)

from tinyrl.batch import build_batch  # noqa: E402
from tinyrl.compose import load_config  # noqa: E402
from tinyrl.models import build_tiny_model  # noqa: E402
from tinyrl.plan import measured_peak_bytes, memory_plan  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.trainer import RLTrainer  # noqa: E402

PROMPT, RESPONSE, ROWS = 32, 96, 16
TASK = str(Path(__file__).resolve().parents[1] / "tests" / "learnable_task.py") + ":DigitTask"
MIB = 2**20


def config(model_dir, run_dir, *extra):
    return load_config([
        f"model.path={model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}", "task.train_size=8",
        "task.eval_size=2", "task.reward_workers=0", "algorithm=grpo", "algorithm.kl_coef=0", "device=cpu",
        f"rollout.max_prompt_tokens={PROMPT}", f"trainer.micro_batch_tokens={ROWS * (PROMPT + RESPONSE)}",
        "logging.progress=false", "threads=1", *extra,
    ])


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_plan-"))
    model = build_tiny_model(root / "model", TINY_TEXTS, vocab_size=2048, hidden_size=128, num_heads=4,
                             num_kv_heads=2, intermediate_size=512, num_layers=4, seed=0)
    print("| measurement | planned MiB | measured MiB | measured / planned |")
    print("| --- | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for checkpointing in (False, True):
        cfg = config(model, root / f"u{checkpointing}", f"rollout.max_response_tokens={RESPONSE}",
                     f"model.gradient_checkpointing={str(checkpointing).lower()}")
        trainer = RLTrainer.from_config(cfg)
        batch = build_batch([torch.randint(3, 300, (PROMPT,), generator=g).tolist() for _ in range(ROWS)],
                            [torch.randint(3, 300, (RESPONSE,), generator=g).tolist() for _ in range(ROWS)],
                            [0.0] * ROWS, [i // 4 for i in range(ROWS)], pad_id=0)
        batch.advantages = torch.randn(ROWS, RESPONSE, generator=g)
        trainer.policy.train()
        measured = measured_peak_bytes(lambda: trainer._optimizer_step(batch, list(range(ROWS)), 1, True))
        plan = memory_plan(cfg, 1, 1.0, device="cpu")
        weights = sum(p.numel() * 4 for p in trainer.policy.parameters())
        moments = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values())
        trainer.close()
        if not checkpointing:
            print(f"| weights (exact) | {plan.components['policy weights (float32)'] / MIB:.3f} | {weights / MIB:.3f} | "
                  f"{weights / plan.components['policy weights (float32)']:.3f} |")
            print(f"| AdamW moments (exact) | {plan.components['policy AdamW moments (float32)'] / MIB:.3f} | "
                  f"{moments / MIB:.3f} | {moments / plan.components['policy AdamW moments (float32)']:.3f} |")
        label = "update, gradient checkpointing" if checkpointing else "update, no checkpointing"
        planned = max(plan.phases["update"], plan.phases["optimizer step"])  # one _optimizer_step runs both
        print(f"| {label} | {planned / MIB:.1f} | {measured / MIB:.1f} | {measured / planned:.2f} |")
    for sampled in (24, 96):
        cfg = config(model, root / f"s{sampled}", f"rollout.max_response_tokens={sampled}", "rollout.n=1",
                     "algorithm.advantage=reinforce_pp", "rollout.batch_size=64", "trainer.prompts_per_step=64",
                     "trainer.prompts_per_mini_batch=64")
        trainer = RLTrainer.from_config(cfg)
        prompts = [torch.randint(3, 300, (PROMPT,), generator=g).tolist() for _ in range(64)]
        sampling = SamplingConfig(max_new_tokens=sampled, temperature=1.0, seed=0)
        measured = measured_peak_bytes(lambda: trainer.engine.generate(prompts, sampling))
        trainer.close()
        plan = memory_plan(cfg, 1, 1.0, device="cpu")
        weights = plan.components["policy weights (float32)"]
        planned = plan.phases["generation"] - weights - plan.components["policy AdamW moments (float32)"]
        print(f"| sampling 64 x {sampled} tokens (above the weights) | {planned / MIB:.1f} | "
              f"{(measured - weights) / MIB:.1f} | {(measured - weights) / planned:.2f} |")


if __name__ == "__main__":
    main()
