"""What only a GPU can show about a tinyrl run, checked through the trainer's own code paths, in one command.

    python benchmarks/check_gpu.py            # everything this machine allows: one GPU ~6-8 minutes, more with 2 GPUs
    python benchmarks/check_gpu.py --cpu      # the same cases on a tiny model on the CPU (CI runs this)
    python benchmarks/check_gpu.py --cases master-weights vllm-colocated

It builds a Qwen2.5-3B-shaped model with random weights (3.09B parameters, tied embeddings, saved in bfloat16 like
the published checkpoint; nothing is downloaded) and runs GRPO steps with `RLTrainer` on a task whose reward is
the share of even token ids (so a random model gets varied rewards and every step updates). Each case runs in a
process of its own and prints PASS, FAIL or SKIP with its figures:

- master-weights (transformers engine): a bf16 checkpoint gives float32 trainable parameters, one step at lr 1e-6
  changes most of them; a second step gives the update's MFU (6 x parameters x tokens over the measured bf16
  matmul peak), generation tokens/s, and the measured peak memory against `tinyrl-plan`'s.
- vllm-colocated: vLLM in the training process with CUDA graphs and sleep mode, three steps, so three weight
  syncs through `RLTrainer.step` (the trainer's timeout thread, the engine's own thread and streams), sleeping at
  level 1, 2 and 1. After each sync the engine samples and the trainer scores the same tokens: vLLM's log-probs
  must be close to the new weights' and much closer than to the weights before the step (a stale or half-loaded
  engine would match those). Also the memory a sleeping engine frees and what it keeps.
- server (2 GPUs): the server layout, the server on GPU 0 and the trainer on GPU 1, weights over NCCL, two
  syncs, each checked like the above. On the CPU the same case runs with `weight_sync=disk`.
- torchrun-colocated (2 GPUs): two torchrun ranks with one vLLM engine each, two syncs, checked on every rank.
- vllm-tp2 (2 GPUs): one training process, its vLLM engine split over two GPUs (`rollout.tensor_parallel_size=2`;
  the weights reach the workers in other processes as files), two syncs, checked.
- cpu-offload-clip (torchrun, 1+ GPUs): `distributed.cpu_offload=true` with gradient clipping engaged.
- lora-vllm: LoRA (`model.lora`, rank 16) with vLLM colocated and adapter-only sync (`weight_sync=adapter`, a
  LoRARequest per version; vLLM's LoRA kernels), bf16 compute over float32 adapters: two steps, each checked like
  vllm-colocated; the frozen base must not change, the adapters must.

The exit status is 0 only if every case this machine can run passed. Without vLLM the vLLM cases are skipped,
and said so. Needs `pip install "tinyrl[vllm]"` for the vLLM cases; about 30 GB of free disk space for the model
and the run directories (`--work-dir`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CASES = ("master-weights", "vllm-colocated", "server", "torchrun-colocated", "vllm-tp2", "cpu-offload-clip",
         "lora-vllm")
TORCHRUN_CASES = ("torchrun-colocated", "cpu-offload-clip")
VLLM_CASES = ("vllm-colocated", "server", "torchrun-colocated", "vllm-tp2", "lora-vllm")

QWEN3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6)
TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512)
TEXTS = [f"User: Using the numbers [{a}, {b}, 3], make {a * b + 3}.\nAssistant: <think>{a}*{b}={a * b}</think>"
         for a in range(1, 30) for b in range(1, 12)]


class TokenTask:
    """The reward is the share of even token ids in the completion: a random model gets varied rewards, so every
    GRPO group has an advantage and every step updates (whatever the tokenizer makes of the ids)."""

    name = "token-parity"
    stop = ()

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        offset = 0 if split == "train" else 100_000
        return [{"id": offset + i} for i in range(size)]

    def prompt(self, row: dict) -> str:
        a, b = row["id"] % 29 + 1, row["id"] % 11 + 1
        return f"User: Using the numbers [{a}, {b}, 3], make {a * b + 3}.\nAssistant:"

    def reward(self, completion: str, row: dict, completion_ids=None):
        from tinyrl.task import Reward

        ids = list(completion_ids or [])
        share = sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))
        return Reward(score=share, correct=share > 0.5, formatted=True)


# ---------------------------------------------------------------------------------------------- shared pieces
def build_model(out: Path, cpu: bool) -> None:
    """The check's model: Qwen2.5-3B's shape (or a tiny one), tied embeddings, random weights, saved in bf16."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tinyrl.models import END_OF_TEXT, IM_END, train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    shape = TINY if cpu else QWEN3B
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
                         dtype="bfloat16")
    device = "cpu" if cpu else "cuda"
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[eos, tokenizer.convert_tokens_to_ids(IM_END)],
                                               pad_token_id=eos)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def overrides(args, name: str, *extra: str) -> list[str]:
    """The check's run: GRPO on TokenTask, gradient checkpointing on a GPU; sizes per mode."""
    gpu = not args.cpu
    sizes = (["rollout.n=8", "rollout.max_response_tokens=256", "trainer.prompts_per_step=16",
              "trainer.prompts_per_mini_batch=8", "trainer.micro_batch_tokens=16384",
              "model.gradient_checkpointing=true", "rollout.timeout_s=900"] if gpu else
             ["rollout.n=4", "rollout.max_response_tokens=12", "trainer.prompts_per_step=4",
              "trainer.prompts_per_mini_batch=2", "trainer.micro_batch_tokens=256", "device=cpu", "threads=1"])
    return [
        f"model.path={args.model}", f"run_dir={Path(args.work_dir) / name}", "task=custom",
        f"task.name={HERE}:TokenTask", "task.train_size=64", "task.eval_size=4", "task.reward_workers=0",
        "sft.enabled=false", "algorithm=grpo", "algorithm.kl_coef=0", "rollout.max_prompt_tokens=64",
        "trainer.samples_every=0", "trainer.warmup_steps=0", "logging.progress=false", "logging.plot=false",
        *sizes, *extra,
    ]


def trainer_for(args, name: str, *extra: str, world=None):
    from tinyrl.compose import load_config
    from tinyrl.trainer import RLTrainer

    cfg = load_config(overrides(args, name, *extra))
    return RLTrainer.from_config(cfg, task=TokenTask(), world=world), cfg


def local(param):
    """This rank's tensor of a parameter (its FSDP shard under torchrun)."""
    return param.to_local() if hasattr(param, "to_local") else param


def snapshot(model) -> list:
    return [local(p).detach().to("cpu", copy=True) for p in model.parameters()]


def changed_share(model, before: list) -> float:
    changed = sum(int((local(p).detach().cpu() != b).sum()) for p, b in zip(model.parameters(), before))
    return changed / max(1, sum(b.numel() for b in before))


def swap_in(model, saved: list) -> list:
    """Put `saved` values into the parameters in place; return what they held."""
    import torch

    held = snapshot(model)
    with torch.no_grad():
        for p, value in zip(model.parameters(), saved):
            local(p).copy_(value)
    return held


def agreement(trainer, before: list, seed: int) -> dict:
    """The engine samples (after the latest sync) and the trainer scores those tokens with the new weights and with
    `before`, the weights before the step: mean and max |log-prob difference| against vLLM's own log-probs."""
    import torch

    from tinyrl.batch import build_batch
    from tinyrl.policy_ops import batched_logprobs
    from tinyrl.rollout import SamplingConfig

    prompts = trainer.train_prompts[:8]
    sampling = SamplingConfig(max_new_tokens=trainer.cfg.rollout.max_response_tokens, n=1, temperature=1.0, seed=seed)
    completions = trainer.engine.generate(prompts, sampling)
    batch = build_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                        [0.0] * len(completions), list(range(len(completions))), trainer.pad_id,
                        [c.logprobs for c in completions])
    mask = batch.response_mask > 0

    def scored() -> torch.Tensor:
        with trainer.world.gathered(trainer.policy):
            return batched_logprobs(trainer.policy, batch, trainer.cfg.trainer.micro_batch_tokens, 1.0,
                                    trainer.device, trainer.dtype)

    new = scored()
    after = swap_in(trainer.policy, before)
    try:
        old = scored()
    finally:
        swap_in(trainer.policy, after)
    sampler = batch.rollout_logprobs
    d_new, d_old = (new - sampler).abs()[mask], (old - sampler).abs()[mask]
    return {"mean_new": float(d_new.mean()), "max_new": float(d_new.max()), "mean_old": float(d_old.mean()),
            "tokens": int(mask.sum())}


def agreement_ok(a: dict, cpu: bool) -> bool:
    """Close to the new weights, and much closer to them than to the old ones."""
    tolerance = 1e-3 if cpu else 0.1  # float32 on the CPU; bf16 kernels of vLLM and of the trainer on a GPU
    return a["mean_new"] <= tolerance and a["mean_new"] <= 0.5 * a["mean_old"]


def rates(metrics: dict, trainer, peak_flops: float | None) -> dict:
    """Generation tokens/s and the update's tokens/s and MFU of one step's metrics."""
    from tinyrl.models import count_parameters

    completions = metrics["train/completions"] / trainer.world.size
    response = completions * metrics["response/length_mean"]
    prompt = completions * sum(len(p) for p in trainer.train_prompts) / len(trainer.train_prompts)
    out = {"generate_tokens_per_s": response / metrics["time/generate"],
           "update_tokens_per_s": (prompt + response) / metrics["time/update"]}
    if peak_flops:
        params = count_parameters(trainer.policy)
        out["update_mfu"] = 6 * params * out["update_tokens_per_s"] / peak_flops
    return out


def matmul_peak_flops() -> float | None:
    """Best bf16 FLOP/s of an 8192-square matmul on this GPU (None on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 8192**3 / best


def free_gib() -> float:
    import torch

    return torch.cuda.mem_get_info()[0] / 2**30


# ---------------------------------------------------------------------------------------------- the cases
def case_master_weights(args) -> dict:
    import torch

    from tinyrl.compose import load_config
    from tinyrl.plan import GIB, memory_plan

    peak_flops = matmul_peak_flops()
    trainer, cfg = trainer_for(args, "master-weights", "trainer.lr=1e-6")
    try:
        dtypes = sorted({str(p.dtype) for p in trainer.policy.parameters()})
        before = snapshot(trainer.policy)
        first = trainer.step()
        share = changed_share(trainer.policy, before)
        second = trainer.step()
        figures = {"trainable_dtypes": dtypes, "changed_share_lr_1e-6": share, **rates(second, trainer, peak_flops)}
        ok = dtypes == ["torch.float32"] and share > 0.5 and "optim/skipped" not in first
        if not args.cpu:
            planned = memory_plan(load_config(overrides(args, "plan", "trainer.lr=1e-6")), 1,
                                  torch.cuda.get_device_properties(0).total_memory / GIB)
            measured = max(first["memory/peak_gib"], second["memory/peak_gib"])
            figures.update(peak_gib=measured, plan_peak_gib=planned.peak / GIB, plan_peak_phase=planned.peak_phase)
            ok = ok and measured <= planned.peak / GIB
        return {"ok": ok, **figures}
    finally:
        trainer.close()


def case_vllm_colocated(args) -> dict:
    gpu = not args.cpu
    extra = ["rollout=vllm", "rollout.layout=colocated", "rollout.sleep_level=1",
             "rollout.gpu_memory_utilization=0.3", f"trainer.lr={1e-4 if gpu else 1e-3}"]
    extra += ["rollout.enforce_eager=false"] if gpu else ["rollout.kv_cache_memory_bytes=67108864"]
    peak_flops = matmul_peak_flops()
    trainer, _ = trainer_for(args, "vllm-colocated", *extra)
    syncs = []
    try:
        for k, level in enumerate((1, 2, 1) if gpu else (1, 1), start=1):
            trainer.engine.sleep_level = level  # the same engine sleeps at level 1, then 2, then 1 again
            before = snapshot(trainer.policy)
            metrics = trainer.step()  # generate, sleep, update, wake and load the new weights
            sync = {"sleep_level": level, "sync_s": metrics["time/sync"], **agreement(trainer, before, seed=k),
                    **rates(metrics, trainer, peak_flops)}
            if gpu and level == 1:
                awake = free_gib()
                trainer.engine.sleep()  # (the next generate wakes it)
                sync.update(freed_asleep_gib=free_gib() - awake)
            sync["ok"] = agreement_ok(sync, args.cpu)
            syncs.append(sync)
    finally:
        trainer.close()
    return {"ok": all(s["ok"] for s in syncs), "syncs": syncs}


def case_lora_vllm(args) -> dict:
    gpu = not args.cpu
    extra = ["rollout=vllm", "rollout.layout=colocated", "rollout.sleep_level=1", "rollout.gpu_memory_utilization=0.3",
             "model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32", "model.lora.weight_sync=adapter",
             f"trainer.lr={1e-3 if gpu else 1e-2}"]  # LoRA's lr: about 10x full training's
    extra += ["rollout.enforce_eager=false"] if gpu else ["rollout.kv_cache_memory_bytes=67108864"]
    trainer, _ = trainer_for(args, "lora-vllm", *extra)
    syncs = []
    try:
        names = [name for name, _ in trainer.policy.named_parameters()]
        adapter = [".lora_" in name for name in names]
        dtypes = sorted({str(p.dtype) for p, a in zip(trainer.policy.parameters(), adapter) if a})
        for k in (1, 2):
            before = snapshot(trainer.policy)
            metrics = trainer.step()  # generate, update the adapters, send them to vLLM as a new LoRA version
            after = snapshot(trainer.policy)
            moved = [bool((b != a).any()) for b, a in zip(before, after)]
            sync = {"sync_s": metrics["time/sync"], **agreement(trainer, before, seed=k),
                    "base_changed": sum(m for m, a in zip(moved, adapter) if not a),
                    "adapters_changed": sum(m for m, a in zip(moved, adapter) if a)}
            sync["ok"] = (agreement_ok(sync, args.cpu) and sync["base_changed"] == 0
                          and sync["adapters_changed"] > 0)
            syncs.append(sync)
    finally:
        trainer.close()
    ok = all(s["ok"] for s in syncs) and dtypes == ["torch.float32"]
    return {"ok": ok, "adapter_dtypes": dtypes, "adapters": sum(adapter), "syncs": syncs}


def case_server(args) -> dict:
    gpu = not args.cpu
    extra = ["rollout=vllm", "rollout.layout=server", f"trainer.lr={1e-4 if gpu else 1e-3}"]
    if gpu:
        extra += ["rollout.weight_sync=nccl", "rollout.server_devices='0'", "device=cuda:1",
                  "rollout.gpu_memory_utilization=0.5", "rollout.enforce_eager=true"]
    else:
        extra += ["rollout.weight_sync=disk", "rollout.kv_cache_memory_bytes=67108864"]
    trainer, _ = trainer_for(args, "server", *extra)
    syncs = []
    try:
        for k in (1, 2):  # two syncs, each from a new thread of the trainer's timeout wrapper
            before = snapshot(trainer.policy)
            metrics = trainer.step()
            sync = {"sync_s": metrics["time/sync"], **agreement(trainer, before, seed=k)}
            sync["ok"] = agreement_ok(sync, args.cpu)
            syncs.append(sync)
    finally:
        trainer.close()
    return {"ok": all(s["ok"] for s in syncs), "weight_sync": "nccl" if gpu else "disk", "syncs": syncs}


def case_vllm_tp2(args) -> dict:
    extra = ["rollout=vllm", "rollout.layout=colocated", "rollout.tensor_parallel_size=2", "trainer.lr=1e-4",
             "rollout.gpu_memory_utilization=0.3", "rollout.enforce_eager=true"]
    trainer, _ = trainer_for(args, "vllm-tp2", *extra)
    syncs = []
    try:
        for k in (1, 2):
            before = snapshot(trainer.policy)
            metrics = trainer.step()
            sync = {"sync_s": metrics["time/sync"], **agreement(trainer, before, seed=k)}
            sync["ok"] = agreement_ok(sync, args.cpu)
            syncs.append(sync)
    finally:
        trainer.close()
    return {"ok": all(s["ok"] for s in syncs), "syncs": syncs}


def rank_torchrun_colocated(args) -> dict:
    from tinyrl.distributed import init_world

    gpu = not args.cpu
    world = init_world("auto" if gpu else "cpu", 600)
    extra = ["rollout=vllm", "rollout.layout=colocated", f"trainer.lr={1e-4 if gpu else 1e-3}",
             "distributed.timeout_s=600"]
    extra += ["rollout.gpu_memory_utilization=0.3", "rollout.enforce_eager=true", "rollout.sleep_level=1"] if gpu \
        else ["rollout.kv_cache_memory_bytes=67108864"]
    trainer, _ = trainer_for(args, "torchrun-colocated", *extra, world=world)
    syncs = []
    try:
        for k in (1, 2):
            before = snapshot(trainer.policy)
            metrics = trainer.step()
            sync = {"rank": world.rank, "sync_s": metrics["time/sync"], **agreement(trainer, before, seed=k)}
            sync["ok"] = agreement_ok(sync, args.cpu)
            syncs.append(sync)
    finally:
        trainer.close()
    every = [s for part in world.all_gather(syncs) for s in part]
    return {"ok": all(s["ok"] for s in every), "ranks": world.size, "syncs": every}


def rank_cpu_offload_clip(args) -> dict:
    from tinyrl.distributed import init_world

    world = init_world("auto", 600)
    max_norm = 1e-3
    trainer, _ = trainer_for(args, "cpu-offload-clip", "distributed.cpu_offload=true",
                             f"trainer.max_grad_norm={max_norm}", "trainer.lr=1e-6", "distributed.timeout_s=600",
                             world=world)
    try:
        before = snapshot(trainer.policy)
        metrics = trainer.step()
        share = world.sum(changed_share(trainer.policy, before)) / world.size
    finally:
        trainer.close()
    norm = metrics.get("optim/grad_norm", float("nan"))
    return {"ok": math.isfinite(norm) and norm > max_norm and share > 0.5, "ranks": world.size, "grad_norm": norm,
            "max_grad_norm": max_norm, "changed_share_lr_1e-6": share, "step_s": sum(
                v for k, v in metrics.items() if k.startswith("time/"))}


CASE_FUNCTIONS = {"master-weights": case_master_weights, "vllm-colocated": case_vllm_colocated,
                  "server": case_server, "torchrun-colocated": rank_torchrun_colocated, "vllm-tp2": case_vllm_tp2,
                  "cpu-offload-clip": rank_cpu_offload_clip, "lora-vllm": case_lora_vllm}


# ---------------------------------------------------------------------------------------------- orchestration
def skip_reason(case: str, cpu: bool, gpus: int, has_vllm: bool) -> str | None:
    if case in VLLM_CASES and not has_vllm:
        return "vLLM is not installed (pip install 'tinyrl[vllm]')"
    if cpu:
        return {"cpu-offload-clip": "GPU only: the trainer refuses CPU offload on a CPU",
                "vllm-tp2": "GPU only: tensor parallelism over 2 GPUs"}.get(case)
    if gpus < 1:
        return "no CUDA GPU (run with --cpu for the CPU version)"
    if case in ("server", "torchrun-colocated", "vllm-tp2") and gpus < 2:
        return f"needs 2 GPUs, this machine has {gpus}"
    return None


def _child_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _common_args(args) -> list[str]:
    return ["--model", str(args.model), "--work-dir", str(args.work_dir)] + (["--cpu"] if args.cpu else [])


def run_case(case: str, args, gpus: int) -> tuple[dict | None, str]:
    """Run one case in its own process(es); its result, and the tail of its output when it failed to report."""
    out = Path(args.work_dir) / f"{case}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(HERE), "--run-case", case, "--out", str(out), *_common_args(args)]
    if case in TORCHRUN_CASES:
        ranks = 2 if (args.cpu or gpus >= 2) else 1
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   *command[1:]]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=args.case_timeout_s)
    if out.exists():
        return json.loads(out.read_text()), ""
    return None, (done.stdout + done.stderr)[-3000:]


def describe(result: dict) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, list):
            return "[" + "; ".join(describe(v) if isinstance(v, dict) else fmt(v) for v in value) + "]"
        return str(value)

    return ", ".join(f"{k}={fmt(v)}" for k, v in result.items() if k not in ("ok", "error"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="a tiny model on the CPU (what CI runs)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--work-dir", help="model and run directories (default: a temporary directory)")
    parser.add_argument("--case-timeout-s", type=float, default=600.0)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run-case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_case:  # inside a case's own process (or a torchrun rank)
        try:
            result = CASE_FUNCTIONS[args.run_case](args)
        except Exception as err:
            import traceback

            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result, default=str))
        if args.run_case in TORCHRUN_CASES:
            from tinyrl.distributed import shutdown_world

            shutdown_world()
        return 0

    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    has_vllm = importlib.util.find_spec("vllm") is not None
    own_dir = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="tinyrl-check-gpu-")
    args.model = str(Path(args.work_dir) / "model")
    started = time.perf_counter()
    failures = 0
    try:
        if not (args.cpu or gpus):
            print("no CUDA GPU: nothing to check here; `--cpu` runs the same cases on a tiny model", flush=True)
        runnable = [c for c in args.cases if skip_reason(c, args.cpu, gpus, has_vllm) is None]
        if runnable:
            t = time.perf_counter()
            build = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); "
                                    f"import check_gpu; from pathlib import Path; "
                                    f"check_gpu.build_model(Path({args.model!r}), {args.cpu})"],
                                   env=_child_env(), capture_output=True, text=True, timeout=args.case_timeout_s)
            if build.returncode != 0:
                print(f"FAIL building the model: {build.stderr[-3000:]}", flush=True)
                return 1
            print(f"built the {'tiny' if args.cpu else 'Qwen2.5-3B-shaped'} model (bf16, tied embeddings) "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        for case in args.cases:
            reason = skip_reason(case, args.cpu, gpus, has_vllm)
            if reason is not None:
                print(f"SKIP {case}: {reason}", flush=True)
                continue
            t = time.perf_counter()
            try:
                result, tail = run_case(case, args, gpus)
            except subprocess.TimeoutExpired:
                result, tail = None, f"no result within {args.case_timeout_s:g} s"
            seconds = time.perf_counter() - t
            if result is None:
                failures += 1
                print(f"FAIL {case} ({seconds:.0f} s): the case reported nothing:\n{tail}", flush=True)
            elif result["ok"]:
                print(f"PASS {case} ({seconds:.0f} s): {describe(result)}", flush=True)
            else:
                failures += 1
                detail = result.get("trace") or describe(result)
                print(f"FAIL {case} ({seconds:.0f} s): {result.get('error', '')} {detail}", flush=True)
        print(f"{failures} failed; {time.perf_counter() - started:.0f} s in all", flush=True)
    finally:
        if own_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
