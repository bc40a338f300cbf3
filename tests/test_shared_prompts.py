"""Running each distinct prompt once (`share_prompts`) changes no number: on a real tiny transformer, log-probs,
entropies and gradients equal the full padded pass, the prompt pass really sees one row per distinct prompt, and a
trainer step computes the same loss and gradients as without it."""

from __future__ import annotations

import pytest
import torch

from conftest import LEARNABLE_TASK
from tinyrl.batch import build_batch
from tinyrl.compose import load_config
from tinyrl.models import load_policy
from tinyrl.policy_ops import batched_logprobs, token_logprobs
from tinyrl.trainer import RLTrainer

# four groups of three completions (prompts of different lengths, so left padding differs between groups), one
# prompt alone, and ragged responses including an empty one and one-token ones
PROMPT_LENGTHS = [5, 1, 12, 3, 8]
GROUP_SIZES = [3, 3, 3, 3, 1]
RESPONSE_LENGTHS = [6, 0, 1, 17, 3, 9, 14, 1, 25, 4, 4, 11, 7]


def _grouped_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 300, (p,), generator=g).tolist() for p in PROMPT_LENGTHS]
    rows = [(i, prompts[i]) for i, size in enumerate(GROUP_SIZES) for _ in range(size)]
    responses = [torch.randint(3, 300, (r,), generator=g).tolist() for r in RESPONSE_LENGTHS]
    batch = build_batch([p for _, p in rows], responses, [0.0] * len(rows), [i for i, _ in rows], pad_id=0)
    batch.advantages = torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask
    return batch


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def policy(request, tiny_model_dir):
    model, _ = load_policy(tiny_model_dir, attn_implementation=request.param)
    return model


def _forward_batch_sizes(model, run):
    sizes = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return result, sizes


def _embedded_tokens(model, run):
    """`run()`'s result and the number of tokens the model embeds in each forward pass (its own or tinyrl's)."""
    counts = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda module, args, out: counts.append(args[0].numel()))
    try:
        result = run()
    finally:
        handle.remove()
    return result, counts


def _loss_and_grads(model, batch, share: bool):
    model.zero_grad(set_to_none=True)
    (logprobs, entropy), sizes = _embedded_tokens(
        model, lambda: token_logprobs(model, batch, 0.7, with_entropy=True, share_prompts=share))
    mask = batch.response_mask
    loss = -(logprobs * batch.advantages).sum() / mask.sum() + 0.1 * (entropy * mask).sum() / mask.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logprobs.detach() * mask, entropy.detach() * mask, grads, sizes


def test_sharing_prompts_gives_the_same_logprobs_entropies_and_gradients(policy):
    batch = _grouped_batch()
    policy.train()
    full_lp, full_ent, full_grads, full_calls = _loss_and_grads(policy, batch, share=False)
    lp, ent, grads, calls = _loss_and_grads(policy, batch, share=True)
    assert full_calls == [batch.input_ids.numel()]  # every row padded to the longest prompt and response
    # each distinct prompt once, then every response's real tokens but its last (nothing after it is predicted)
    assert calls == [sum(PROMPT_LENGTHS) + sum(max(r - 1, 0) for r in RESPONSE_LENGTHS)]
    torch.testing.assert_close(lp, full_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent, atol=2e-5, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    policy.eval()


def test_a_batch_without_repeated_prompts_takes_one_plain_pass(policy):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (p,), generator=g).tolist() for p in (4, 9, 2)]
    batch = build_batch(prompts, [[5, 6], [7], [8, 9, 10]], [0.0] * 3, [0, 1, 2], pad_id=0)
    shared, calls = _forward_batch_sizes(policy, lambda: token_logprobs(policy, batch, 1.0, share_prompts=True))
    assert calls == [3]
    torch.testing.assert_close(shared[0], token_logprobs(policy, batch, 1.0)[0])


def test_batched_logprobs_with_shared_prompts_match_across_micro_batches(policy):
    batch = _grouped_batch(seed=2)
    with torch.no_grad():
        expected = batched_logprobs(policy, batch, 10_000, 1.0, torch.device("cpu"), torch.float32)
    for budget in (40, 10_000):  # groups cut across micro-batches, and one micro-batch
        got = batched_logprobs(policy, batch, budget, 1.0, torch.device("cpu"), torch.float32, share_prompts=True)
        torch.testing.assert_close(got * batch.response_mask, expected * batch.response_mask, atol=2e-5, rtol=1e-5)


def test_a_trainer_step_computes_the_same_update_as_without_sharing(tiny_model_dir, tmp_path):
    cfg = load_config([
        f"model.path={tiny_model_dir}", "task=custom", f"task.name={LEARNABLE_TASK}", "task.train_size=32",
        "task.eval_size=4", "task.reward_workers=0", "sft.enabled=false", "algorithm=grpo", "algorithm.kl_coef=0",
        "rollout.n=4", "rollout.max_response_tokens=8", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
        "trainer.micro_batch_tokens=64", "trainer.samples_every=0", "logging.progress=false", "logging.plot=false",
        "threads=1",
    ])
    gradients, losses, defaults = [], [], []
    for share in (True, False):
        trainer = RLTrainer.from_config(cfg, run_dir=tmp_path / str(share))
        defaults.append(trainer.share_prompts)
        trainer.share_prompts = share
        clip = trainer._clip_gradients  # runs after the last backward pass, before the optimizer step
        seen = {}

        def record(model, clip=clip, seen=seen):
            seen.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
            return clip(model)

        trainer._clip_gradients = record
        try:
            metrics = trainer.step()
        finally:
            trainer.close()
        gradients.append(seen)
        losses.append(metrics["losses/policy"])
    assert defaults == [True, True]  # one process, padded layout: the trainer shares prompts by default
    assert gradients[0] and gradients[0].keys() == gradients[1].keys()
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, grad in gradients[1].items():
        torch.testing.assert_close(gradients[0][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_sliding_window_model_takes_the_plain_pass(tiny_model_dir):
    """A sliding-window cache keeps only the window of a prompt, so gathering it would not give the full pass's
    numbers: such models (and any without full attention in every layer) are not shared."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = load_policy(tiny_model_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    batch = _grouped_batch()
    shared, calls = _forward_batch_sizes(model, lambda: token_logprobs(model, batch, 1.0, share_prompts=True))
    assert calls == [batch.size]
    torch.testing.assert_close(shared[0], token_logprobs(model, batch, 1.0)[0])


def test_two_identical_runs_with_shared_prompts_end_with_identical_weights(tiny_model_dir, tmp_path):
    """Run-to-run reproducibility (what exact resume rests on) with two threads, the default's: the gradients that
    the shared prompt's gather sends back must be summed in the same order every time."""
    overrides = [
        f"model.path={tiny_model_dir}", "task=custom", f"task.name={LEARNABLE_TASK}", "task.train_size=128",
        "task.eval_size=4", "task.reward_workers=0", "sft.enabled=false", "algorithm=grpo", "algorithm.kl_coef=0",
        "rollout.n=8", "rollout.max_response_tokens=24", "trainer.prompts_per_step=32",
        "trainer.prompts_per_mini_batch=32", "trainer.lr=1e-3", "trainer.samples_every=0", "logging.progress=false",
        "logging.plot=false",
    ]
    weights = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for run in range(2):
            trainer = RLTrainer.from_config(load_config(overrides), run_dir=tmp_path / str(run))
            assert trainer.share_prompts
            try:
                for _ in range(3):
                    trainer.step()
            finally:
                trainer.close()
            weights.append(torch.cat([p.detach().flatten() for p in trainer.policy.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(weights[0], weights[1]), (weights[0] - weights[1]).abs().max()
