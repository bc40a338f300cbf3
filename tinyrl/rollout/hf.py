"""A transformers rollout engine: batched sampling with a KV cache, for CPU, tests and machines without vLLM.

The decode loop is written out (rather than calling `model.generate`) so that it can return the log-prob of each
sampled token under the distribution it was actually sampled from (after temperature, top-k, top-p), give every
completion its own random stream (the same completion whatever batch it lands in, which makes resumed runs exact),
and drop finished sequences from the batch as it goes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tinyrl.rollout.base import Completion, RolloutEngine, SamplingConfig
from tinyrl.rollout.kv_decode import StaticKVDecoder, cache_argument


class HFEngine(RolloutEngine):
    # Samples from the training model object itself, so its log-probs are the current policy's.
    shares_policy_weights = True
    environment_feedback = True  # decodes token by token in this process: the environment can write between tokens

    def __init__(self, model, tokenizer, batch_size: int = 512, fast_decode: bool = True, compact_below: float = 0.75):
        """`fast_decode`: use `StaticKVDecoder` when the architecture allows (else the model's own forward);
        `compact_below`: drop finished rows from the cache once the live share of its rows falls below this."""
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.fast_decode = fast_decode
        self.compact_below = compact_below
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        self._piece_cache: dict[int, str] = {}

    def update_weights(self, model) -> None:
        # Same process, same tensors: sampling reads the training weights directly.
        self.model = model

    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        """Copy `(hf_name, tensor)` pairs into the model this engine samples from, one at a time."""
        own = self.model.state_dict()
        for name, tensor in named_tensors:
            own[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        requests = [(i, j) for i in range(len(prompt_token_ids)) for j in range(sampling.n)]
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                out.extend(self._generate_chunk([prompt_token_ids[i] for i, _ in chunk], chunk, sampling))
        finally:
            self.model.train(was_training)
        return out

    def _piece(self, token_id: int) -> str:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id])
            self._piece_cache[token_id] = piece
        return piece

    def _decoder(self, rows: int, max_len: int):
        if self.fast_decode and StaticKVDecoder.supports(self.model):
            return StaticKVDecoder(self.model, rows, max_len)
        return ModelForwardDecoder(self.model)

    def _generate_chunk(self, prompts, requests, sampling: SamplingConfig) -> list[Completion]:
        device = next(self.model.parameters()).device
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        uniforms = None
        if sampling.temperature > 0:
            # One U(0,1) draw per decoding step from each completion's own stream, drawn up front.
            rows = []
            for i, j in requests:
                g = torch.Generator(device=device)
                seed = sampling.seed if sampling.seed is not None else torch.randint(0, 2**62, (1,)).item()
                g.manual_seed(hash((int(seed), sampling.prompt_offset + i, j)) & (2**62 - 1))
                rows.append(torch.rand(sampling.max_new_tokens, generator=g, device=device, dtype=torch.float64))
            uniforms = torch.stack(rows)

        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        # Cache row r holds completion rows[r], or None once it finished. Finished rows stay in the cache (and are
        # computed, unread) until enough have finished that dropping them pays for copying the cache.
        cache_rows: list[int | None] = list(range(batch))
        live = batch
        cache_index = torch.arange(batch, device=device)
        # A stop string can only complete on a token holding its last character; only those tokens trigger a
        # look at the recent text (a token decodes to at least one character, so this many tokens cover it).
        stop_ends = {s[-1] for s in sampling.stop if s}
        tail_tokens = max((len(s) for s in sampling.stop), default=0)

        feedback = sampling.feedback
        triggers = set(feedback.triggers) if feedback is not None else set()
        pending: list[list[int]] = [[] for _ in range(batch)]  # environment tokens still to write, per completion
        environment: list[list[int]] = [[] for _ in range(batch)]
        prompt_texts: dict[int, str] = {}

        decoder = self._decoder(batch, width + sampling.max_new_tokens)
        logits, positions = decoder.prefill(input_ids, attention_mask)
        for step in range(sampling.max_new_tokens):
            draws = uniforms[cache_index, step] if uniforms is not None else None
            chosen, chosen_logprobs = self._sample(logits.float(), sampling, draws)
            written = []  # (cache row, environment token) replacing what was sampled there
            for r, (row, tok, logprob) in enumerate(zip(cache_rows, chosen.tolist(), chosen_logprobs.tolist())):
                if row is None:
                    continue
                forced = bool(pending[row])
                if forced:
                    tok, logprob = pending[row].pop(0), 0.0
                    environment[row].append(len(tokens[row]))
                    written.append((r, tok))
                elif triggers and any(c in self._piece(tok) for c in triggers):
                    if row not in prompt_texts:
                        prompt_texts[row] = self.tokenizer.decode(prompts[row], skip_special_tokens=True)
                    text = self.tokenizer.decode(tokens[row] + [tok], skip_special_tokens=True)
                    words = feedback(prompt_texts[row], text)
                    if words:
                        pending[row] = self.tokenizer.encode(words, add_special_tokens=False)
                tokens[row].append(tok)
                logprobs[row].append(logprob)
                done = tok in self.eos_ids
                if not done and not forced and stop_ends and any(c in self._piece(tok) for c in stop_ends):
                    recent = "".join(self._piece(t) for t in tokens[row][-tail_tokens:])
                    done = any(s in recent for s in sampling.stop)
                if done:
                    finish[row] = "stop"
                    cache_rows[r] = None
                    live -= 1
            if written:
                chosen = chosen.clone()
                for r, tok in written:
                    chosen[r] = tok
            if live == 0 or step == sampling.max_new_tokens - 1:
                break
            if live <= self.compact_below * len(cache_rows):
                keep = [r for r, row in enumerate(cache_rows) if row is not None]
                index = torch.tensor(keep, device=device)
                decoder.keep_rows(index)
                cache_rows = [cache_rows[r] for r in keep]
                cache_index, positions, chosen = cache_index[index], positions[index], chosen[index]
            logits = decoder.step(chosen, positions)
            positions = positions + 1

        completions = []
        for row, (i, j) in enumerate(requests):
            text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
            completions.append(Completion(i, tokens[row], text, logprobs[row], finish[row], {"sample_index": j},
                                          environment[row]))
        return completions

    @staticmethod
    def _sample(
        logits: torch.Tensor, sampling: SamplingConfig, uniforms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row; return it with its log-prob under the (processed) sampling distribution.

        Inverse-CDF sampling: token = min{i : sum_{v<=i} p_v > u * sum_v p_v}, u ~ U(0,1) given per row in
        `uniforms`. Tokens removed by top-k/top-p have p = 0, an empty interval, and are never chosen.
        """
        if sampling.temperature == 0:
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logits.argmax(dim=-1)
            return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1)
        logits = logits / sampling.temperature
        if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= sampling.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.double().exp()
        cdf = probs.cumsum(-1)
        chosen = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # rounding can put u * total at the very end (index V): fall back to the last token that has probability.
        # A row whose chosen token has probability needs nothing (the last possible token is at or after it), so
        # the fallback, a scan of the whole vocabulary, runs only for the rare rows that need it.
        vocab = logits.shape[-1]
        suspect = (chosen >= vocab) | (probs.gather(-1, chosen.clamp(max=vocab - 1)[:, None]).squeeze(-1) == 0)
        if bool(suspect.any()):
            last_possible = (probs[suspect] > 0).cumsum(-1).argmax(-1)
            chosen = chosen.masked_scatter(suspect, torch.minimum(chosen[suspect], last_possible))
        return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1)


class ModelForwardDecoder:
    """`StaticKVDecoder`'s interface over the model's own forward and transformers' cache, for any causal LM."""

    def __init__(self, model):
        self.model = model
        self.cache_arg = cache_argument(model)
        self.cache = None
        self.attention_mask = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.attention_mask = attention_mask
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        self.cache = out[self.cache_arg]
        return out.logits[:, -1, :], positions[:, -1] + 1

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=positions[:, None],
            use_cache=True, **{self.cache_arg: self.cache},
        )
        self.cache = out[self.cache_arg]
        return out.logits[:, -1, :]

    def keep_rows(self, index: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
