"""LoRA training (`model.lora`) on a real tiny transformer: only the adapters train, the reference is the base model
exactly, merged weights sample what the adapted model samples, checkpoints load with PEFT and transformers, and a
run killed with SIGKILL resumes bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")  # the `lora` extra; the test extra and CI install it

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tinyrl.compose import load_config  # noqa: E402
from tinyrl.config import ConfigError  # noqa: E402
from tinyrl.lora import adapters_disabled, add_adapters, lora_scaling, merged_weights  # noqa: E402
from tinyrl.models import load_policy  # noqa: E402
from tinyrl.policy_ops import token_logprobs  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.rollout.hf import HFEngine  # noqa: E402
from tinyrl.trainer import RLTrainer  # noqa: E402

from test_resume import _env, _wait_for_step  # noqa: E402

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"]


def _overrides(tiny_model_dir, run_dir, *extra):
    return [
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=32", "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false", "rollout.n=4",
        "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64", "trainer.steps=2",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-2",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1", "algorithm=grpo",
        *LORA, *extra,
    ]


@pytest.mark.parametrize("override, key", [
    ("model.lora.rnak=4", "model.lora.rnak"),
    ("model.lora.rank=0", "model.lora.rank"),
    ("model.lora.alpha=-1", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.lora.weight_sync=adapters", "model.lora.weight_sync"),
    ("model.lora.weight_sync=adapter", "model.lora.weight_sync"),  # needs rollout.engine=vllm
    ("rollout=vllm model.lora.weight_sync=adapter rollout.sleep_level=2", "model.lora.weight_sync"),
])
def test_bad_lora_keys_fail_in_one_line_naming_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(["model.lora.enabled=true", *override.split()])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_bad_lora_key_on_the_command_line_exits_2_before_any_model_loads(tmp_path):
    import sys

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "tinyrl.train", "model.lora.enabled=true", "model.lora.rank=0",
                          f"run_dir={run}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.lora.rank" in lines[0] and "Traceback" not in out.stderr
    assert not run.exists()


def test_unknown_target_module_is_named(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    lora = load_config(["model.lora.enabled=true", "model.lora.target_modules=[no_such_proj]"]).model.lora
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        add_adapters(policy, lora)


def _trainer(tiny_model_dir, run_dir, *extra):
    return RLTrainer.from_config(load_config(_overrides(tiny_model_dir, run_dir, *extra)))


def test_a_step_changes_only_the_adapters_and_adamw_holds_only_their_state(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path / "run", "algorithm.kl_coef=0.05")
    try:
        assert trainer.reference is None  # the KL term's reference is the policy without its adapters
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        # every linear layer but the LM head is adapted (all-linear): 7 per decoder layer
        assert len(trainable) == 2 * 7 * trainer.policy.config.num_hidden_layers
        for _ in range(2):
            metrics = trainer.step()
            assert metrics.get("optim/skipped", 0.0) == 0.0
        after = trainer.policy.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= trainable, sorted(changed - trainable)
        assert any(".lora_B." in k for k in changed)  # B starts at zero and moved: the adapters do something
        held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for n, p in trainer.policy.named_parameters() if n in trainable}
        assert len(trainer.optimizer.state) == len(trainable)
        assert "policy/kl" in metrics and metrics["policy/kl"] > 0  # the adapted policy has left its base
    finally:
        trainer.close()


@pytest.mark.parametrize("extra", [["model.gradient_checkpointing=true"], ["model.dtype=bfloat16"]])
def test_adapters_train_with_activation_checkpointing_and_with_a_bf16_base(tiny_model_dir, tmp_path, extra):
    """Activation checkpointing passes gradients to adapters behind a frozen embedding; a bf16 compute dtype keeps
    the frozen base in bf16 and the adapters with their AdamW state in float32 (the GPU layout, here on the CPU)."""
    trainer = _trainer(tiny_model_dir, tmp_path / "run", *extra)
    try:
        params = dict(trainer.policy.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        metrics = trainer.step()
        assert metrics.get("optim/skipped", 0.0) == 0.0 and metrics["optim/grad_norm"] > 0
        assert any(not torch.equal(before[n], params[n]) for n in before if ".lora_B." in n)
        frozen = {p.dtype for p in params.values() if not p.requires_grad}
        assert frozen == {trainer.dtype} and {p.dtype for n, p in params.items() if n in before} == {torch.float32}
        assert {t.dtype for s in trainer.optimizer.state.values() for t in s.values() if t.dim()} == {torch.float32}
    finally:
        trainer.close()


def test_reference_with_adapters_disabled_is_the_base_model_exactly(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path / "run", "algorithm.kl_coef=0.05")
    try:
        trainer.step()
        batch = trainer._assemble(trainer._collect_groups(2)[0])
        base, _ = load_policy(tiny_model_dir)
        base.eval()
        with torch.no_grad():
            expected, _ = token_logprobs(base, batch, 1.0)
            with adapters_disabled(trainer.policy):
                reference, _ = token_logprobs(trainer.policy, batch, 1.0)
            adapted, _ = token_logprobs(trainer.policy, batch, 1.0)
        assert torch.equal(reference, expected)
        assert not torch.equal(adapted, expected)  # outside the block the adapters are back
    finally:
        trainer.close()


def _trained_adapters(tiny_model_dir, tmp_path):
    """The tiny model with adapters after two LoRA steps (a trainer's policy) and its config's `model.lora`."""
    trainer = _trainer(tiny_model_dir, tmp_path / "run")
    trainer.step()
    trainer.step()
    trainer.close()
    return trainer.policy, trainer.tokenizer, trainer.lora


def test_merged_weights_equal_peft_merge_and_sample_what_the_adapted_model_samples(tiny_model_dir, tmp_path):
    policy, tokenizer, lora = _trained_adapters(tiny_model_dir, tmp_path)
    policy.eval()
    merged = dict(merged_weights(policy.state_dict().items(), lora_scaling(lora)))

    # PEFT's own merge of the same adapters gives the same bits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           _save_adapter(policy, lora, tmp_path / "adapter"))
    reference = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for name in merged:
        assert torch.equal(merged[name], reference[name]), name

    # the transformers engine loads the merged weights into a plain model: same seed, same tokens
    plain, _ = load_policy(tiny_model_dir)
    engine = HFEngine(plain, tokenizer)
    engine.load_weights(merged_weights(policy.state_dict().items(), lora_scaling(lora)))
    prompts = [tokenizer(f"Problem {i}: say digits.\n")["input_ids"] for i in range(6)]
    sampling = SamplingConfig(max_new_tokens=12, n=4, temperature=1.0, seed=123)
    from_merged = engine.generate(prompts, sampling)
    from_adapted = HFEngine(policy, tokenizer).generate(prompts, sampling)
    assert [c.token_ids for c in from_merged] == [c.token_ids for c in from_adapted]
    base_samples = HFEngine(load_policy(tiny_model_dir)[0], tokenizer).generate(prompts, sampling)
    assert [c.token_ids for c in base_samples] != [c.token_ids for c in from_adapted]  # the adapters matter
    for a, b in zip(from_merged, from_adapted):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def _save_adapter(policy, lora, path):
    from tinyrl.lora import AdapterFiles

    AdapterFiles(lora, None, policy.state_dict()).save_pretrained(path)
    return path


def _args(tiny_model_dir, run_dir, *extra):
    import sys

    return [sys.executable, "-m", "tinyrl.train", *_overrides(
        tiny_model_dir, run_dir, "trainer.steps=4", "trainer.save_every=2", "trainer.ppo_epochs=2",
        "algorithm.kl_coef=0.05", "task.reward_workers=1", *extra)]


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_checkpoint_loads_with_peft_and_transformers_and_resumes_bit_for_bit_after_sigkill(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_args(tiny_model_dir, straight), check=True, env=_env(), capture_output=True, timeout=600)
    final = straight / "checkpoints" / "step_00000004"

    # the adapter in PEFT's format, on the base model, computes what the merged actor computes
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
    actor = AutoModelForCausalLM.from_pretrained(final / "actor").eval()
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, actor(ids).logits, atol=1e-5, rtol=0)
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in actor.state_dict().items())  # RL moved the merged weights
    assert not (final / "optimizer").exists() or any((final / "optimizer").iterdir())

    proc = subprocess.Popen(_args(tiny_model_dir, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 3)  # checkpoint at 2 exists; step 3's row must be rewound on resume
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "summary.json").exists()
    subprocess.run(_args(tiny_model_dir, killed, "resume=true"), check=True, env=_env(), capture_output=True,
                   timeout=600)
    assert _rows(killed) == _rows(straight)
    for part in ("adapter/adapter_model.safetensors", "actor/model.safetensors"):
        a = load_file(str(final / part))
        b = load_file(str(killed / "checkpoints" / "step_00000004" / part))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (part, name)
