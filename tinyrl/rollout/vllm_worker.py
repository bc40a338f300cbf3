"""Methods added to every vLLM worker (`worker_extension_cls`), called through `collective_rpc`.

This module is imported inside vLLM's worker processes: it must not import tinyrl's trainer stack.
"""

from __future__ import annotations

from typing import Iterable

import torch


class WeightSyncExtension:
    """Reload a worker's weights in place and refresh everything derived from them."""

    def tinyrl_reload_weights(
        self,
        weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
        weights_path: str | None = None,
    ) -> int:
        """Load new weights from `(hf_name, tensor)` pairs (same process) or a safetensors directory.

        vLLM's layerwise reload re-runs each layer's post-load processing once that layer's own weights
        arrive, but a tied LM head shares its weight with the embedding and receives none under its own
        name, so on the CPU backend its packed GEMM copy would keep the old values. Re-running the head's
        processing here refreshes it (a no-op on backends that keep no packed copy). Returns the number
        of parameters the worker holds, as a cheap liveness check for the caller.
        """
        self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
        if tied and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        return sum(1 for _ in model.parameters())
