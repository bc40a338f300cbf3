"""The transformers engine's inverse-CDF sampler against the plain formula: the same tokens and log-probs, including
rows whose draw lands past the last token with probability (the rounding fallback)."""

from __future__ import annotations

import torch

from tinyrl.rollout.base import SamplingConfig
from tinyrl.rollout.hf import HFEngine


def _reference(logits, sampling, uniforms):
    """token = min{i : cdf_i > u * total}, clamped to the last token with p > 0, over the processed distribution."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:], float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (probs.cumsum(-1) - probs) >= sampling.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.double().exp()
    cdf = probs.cumsum(-1)
    chosen = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    chosen = torch.minimum(chosen, (probs > 0).cumsum(-1).argmax(-1))
    return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1)


def test_the_sampler_equals_the_formula_with_and_without_the_fallback():
    g = torch.Generator().manual_seed(0)
    fallbacks = 0
    for trial in range(120):
        vocab = (5, 50, 1000)[trial % 3]
        logits = torch.randn(16, vocab, generator=g) * float(torch.rand(1, generator=g) * 10)
        uniforms = torch.rand(16, generator=g, dtype=torch.float64)
        uniforms[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # u = 1 lands past the last token
        sampling = SamplingConfig(max_new_tokens=1, temperature=(1.0, 0.7)[trial % 2], top_k=(0, 3)[trial % 2],
                                  top_p=(1.0, 0.5, 0.9)[trial % 3])
        expected = _reference(logits, sampling, uniforms)
        got = HFEngine._sample(logits, sampling, uniforms)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        probs = torch.softmax(logits / sampling.temperature, -1).double()
        fallbacks += int((torch.searchsorted(probs.cumsum(-1), (uniforms * probs.sum(-1))[:, None], right=True)
                          >= vocab).sum())
    assert fallbacks > 0  # some draws did land past the end and took the fallback
