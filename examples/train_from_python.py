"""Research-code use of tinyrl, two ways:

1. `tinyrl.train(config)`: the whole experiment (tiny model, distillation, GRPO, evaluation) from a composed config.
2. `RLTrainer`: your own loop over objects you built, here a Dr. GRPO variant with a per-step learning-rate print.

Run: python examples/train_from_python.py [--quick]
"""

import sys

import tinyrl
from tinyrl.trainer import RLTrainer


def whole_experiment(quick: bool) -> str:
    overrides = ["run_dir=runs/example_python", "algorithm=grpo"]
    if quick:
        overrides += ["sft.steps=100", "trainer.steps=5", "task.eval_size=100", "trainer.prompts_per_step=32",
                      "trainer.prompts_per_mini_batch=32"]
    summary = tinyrl.train(tinyrl.load_config(overrides))
    print(f"accuracy {summary['accuracy_before_rl']:.3f} -> {summary['accuracy_after_rl']:.3f}")
    return summary["run_dir"]


def own_loop(model_dir: str) -> None:
    config = tinyrl.load_config(
        [f"model.path={model_dir}", "run_dir=runs/example_own_loop", "algorithm=dr_grpo", "sft.enabled=false",
         "trainer.steps=3", "trainer.prompts_per_step=16", "trainer.prompts_per_mini_batch=16", "task.eval_size=50"]
    )
    trainer = RLTrainer.from_config(config)
    try:
        for _ in range(config.trainer.steps):
            metrics = trainer.step()
            print(f"step {trainer.step_count}: reward {metrics['reward/mean']:.3f} "
                  f"accuracy {metrics['reward/accuracy']:.3f} lr {metrics['optim/lr']:.1e}")
        print("held-out accuracy:", trainer.evaluate(trainer.step_count)["accuracy"])
    finally:
        trainer.close()


if __name__ == "__main__":  # reward workers are processes: the main guard is required
    run_dir = whole_experiment(quick="--quick" in sys.argv)
    own_loop(f"{run_dir}/sft_model")
