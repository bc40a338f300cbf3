"""Multi-process training on real `torchrun` ranks (gloo, CPU): two ranks compute what one process computes.

Each torchrun launch costs seconds, so launches are few: one runs every piece check (tests/distributed_checks.py),
one each trains GRPO and PPO on 2 ranks (compared with one process on the same global batch), and one pair
kills a 2-rank run with SIGKILL and resumes it. Tolerances: float32 rounding differs between 1 and 2 ranks
(different micro-batches, different summation order), so metrics agree to 1e-5 relative, gradients (with SGD)
to 1e-6 and weights after AdamW steps to 5e-5 (AdamW magnifies rounding; measured: 4e-6 after 3 steps); the same
world size resumes bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrl.compose import load_config
from tinyrl.experiment import train

TESTS = Path(__file__).parent
TASK = str(TESTS / "learnable_task.py") + ":DigitTask"
STEPS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # a free port


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _overrides(tiny_model_dir, run_dir, *extra):
    return [
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=40", "task.eval_size=6", "task.reward_workers=0", "sft.enabled=false", "rollout.n=4",
        "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64", f"trainer.steps={STEPS}",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-3", "trainer.critic_lr=1e-3",
        "trainer.micro_batch_tokens=64", "trainer.save_every=2", "trainer.eval_every=3", "trainer.samples_every=2",
        "logging.progress=false", "logging.plot=false", "threads=1", "distributed.timeout_s=60", *extra,
    ]


def _two_ranks(tiny_model_dir, run_dir, *extra, check=True, cwd=None, **popen):
    args = [*TORCHRUN, "-m", "tinyrl.train", *_overrides(tiny_model_dir, run_dir, *extra)]
    if popen:
        return subprocess.Popen(args, env=_env(), cwd=cwd, **popen)
    done = subprocess.run(args, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _weights(run_dir, model="actor"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{STEPS:08d}" / model / "model.safetensors"))


def _assert_rows_close(got, want, rel=1e-5, abs_=1e-6):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), set(a) ^ set(b)
        for key in b:
            if b[key] is None:
                assert a[key] is None, key
            else:
                assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=abs_), (a["step"], key, a[key], b[key])


def _assert_weights_close(got, want, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- piece checks
@pytest.fixture(scope="module")
def checks(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("checks")
    out = work / "out.json"
    done = subprocess.run([*TORCHRUN, str(TESTS / "distributed_checks.py"), str(out), str(tiny_model_dir), str(work)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stderr[-4000:]
    return json.loads(out.read_text())


def _result(checks, name):
    result = checks[name]
    assert result["ok"], result.get("trace")
    return result


def test_world_matches_torchrun_and_parameters_are_sharded(checks):
    result = _result(checks, "world")
    assert result["size"] == result["env_size"] == 2 and result["sizes"] == [2, 2]
    assert result["embedding_shard"][0] < 320  # rank 0 holds half of the embedding rows, not all of them


def test_ranks_sample_different_lengths_from_one_sharded_model_without_waiting(checks):
    result = _result(checks, "gathered_sampling")
    assert result["lengths"] == [3, 12]  # rank 1 ran 9 decode steps more than rank 0
    assert result["same_tokens"] == [True, True] and result["logprob_diff"] == 0.0


def test_full_weights_are_gathered_with_hugging_face_names_once_each_and_in_the_asked_dtype(checks):
    """The tied head is the embedding's tensor: it is sent once, under the embedding's name (vLLM skips the
    alias anyway); a compute dtype is applied to each shard before the gather and changes nothing else."""
    result = _result(checks, "full_weights")
    assert result["names_equal"] and not result["has_lm_head"] and result["max_diff"] == 0.0
    assert result["bf16_dtypes"] == ["torch.bfloat16"] and result["bf16_equal"]


@pytest.mark.parametrize("case", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "kl-and-entropy",
                                  "clipped", "checkpointing", "ppo-critic", "rank1-without-signal", "packed",
                                  "packed-ppo-critic"])
def test_two_ranks_take_the_gradient_of_the_whole_mini_batch(checks, case):
    result = _result(checks, "gradients")[case]
    assert result["moved"] > 5e-4  # SGD with lr 1 moved the weights by the (clipped) gradient itself
    assert result["weight_diff"] < 1e-6 and result["critic_diff"] < 1e-6, result
    assert result["stat_keys_equal"]
    assert all(diff < 1e-5 for diff in result["stat_diff"].values()), result["stat_diff"]


def test_batch_normalised_advantages_use_every_ranks_rows(checks):
    assert _result(checks, "advantages") == {"ok": True, "reinforce_pp": 0.0, "gae": 0.0, "grpo": 0.0}


def test_sharded_optimizer_state_reloads_on_two_ranks_and_on_one(checks):
    result = _result(checks, "optimizer_checkpoint")
    assert result["same_on_two_ranks"] == [True, True]
    assert result["one_process_diff"] == 0.0  # resharded from 2 shards into one process exactly
    assert result["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"] and result["world_size"] == 2


def test_plan_counts_sharded_weights_gradients_and_optimizer_state_exactly(checks):
    result = _result(checks, "plan_state_bytes")
    assert result["measured"] == result["plan"]


def test_a_rank_that_exits_early_stops_the_other_fast_naming_rank_and_phase(checks):
    result = _result(checks, "rank_exits_early")
    assert result["seconds"] < 30  # the collective timeout of the check
    assert "rank 0 of 2 failed (its last phase: step 1, phase score)" in result["message"]
    assert "rank 1's last phase: step 1, phase score" in result["message"]


# ---------------------------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def grpo_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    # The default experiment's path: rank 0 builds the tiny model and distils it while the other rank waits.
    extra = ("algorithm=grpo", "algorithm.kl_coef=0.001", "model.path=null", "model.tiny.vocab_size=320",
             "model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
             "model.tiny.intermediate_size=128", "sft.enabled=true", "sft.steps=4", "sft.num_traces=16",
             "sft.batch_size=4")
    train(load_config(_overrides(tiny_model_dir, root / "one", *extra)))
    (root / "cwd").mkdir()
    _two_ranks(tiny_model_dir, root / "two", *extra, cwd=root / "cwd")
    return root, extra


def test_two_rank_grpo_run_equals_the_one_process_run(grpo_runs):
    root, _ = grpo_runs
    for name in ("base_model/model.safetensors", "sft_model/model.safetensors"):  # made once, by rank 0
        assert load_file(str(root / "two" / name)).keys() == load_file(str(root / "one" / name)).keys()
        _assert_weights_close(load_file(str(root / "two" / name)), load_file(str(root / "one" / name)), atol=0.0)
    assert (root / "two" / "sft_summary.json").exists()
    _assert_rows_close(_rows(root / "two"), _rows(root / "one"))
    _assert_weights_close(_weights(root / "two"), _weights(root / "one"), atol=5e-5)
    assert list((root / "cwd").iterdir()) == []  # rank 1 wrote nothing of its own (no Hydra directory or log)
    assert json.loads((root / "two" / "summary.json").read_text())["rl_steps"] == STEPS


def test_two_rank_ppo_run_with_a_critic_equals_the_one_process_run(tiny_model_dir, tmp_path):
    extra = ("algorithm=ppo",)
    train(load_config(_overrides(tiny_model_dir, tmp_path / "one", *extra)))
    _two_ranks(tiny_model_dir, tmp_path / "two", *extra)
    _assert_rows_close(_rows(tmp_path / "two"), _rows(tmp_path / "one"))
    for model in ("actor", "critic"):
        _assert_weights_close(_weights(tmp_path / "two", model), _weights(tmp_path / "one", model), atol=5e-5)


def _worker_pids(agent_pid):
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_sigkilled_two_rank_run_resumes_exactly_and_on_one_process_closely(grpo_runs, tiny_model_dir, tmp_path):
    root, extra = grpo_runs
    killed = tmp_path / "killed"
    proc = _two_ranks(tiny_model_dir, killed, *extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    metrics = killed / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(line).get("step") == 5 and "reward/mean" in json.loads(line)
                                        for line in metrics.read_text().splitlines() if line.strip())):
        assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "step 5 never appeared"
        time.sleep(0.05)
    for pid in [*_worker_pids(proc.pid), proc.pid]:  # the whole job dies at once, as when a machine goes down
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "summary.json").exists()
    on_one = tmp_path / "on_one"
    shutil.copytree(killed, on_one)

    _two_ranks(tiny_model_dir, killed, *extra, "resume=true")
    assert _rows(killed) == _rows(root / "two")  # same world size: bit for bit
    _assert_weights_close(_weights(killed), _weights(root / "two"), atol=0.0)
    assert '"step": 5' in (killed / "metrics.discarded.jsonl").read_text()

    # Another world size: the optimizer state is resharded and the steps compute the same numbers, so the run
    # continues as the 2-rank run would, up to float rounding.
    train(load_config(_overrides(tiny_model_dir, on_one, *extra, "resume=true")))
    _assert_rows_close(_rows(on_one), _rows(root / "two"))
    _assert_weights_close(_weights(on_one), _weights(root / "two"), atol=5e-5)


def test_cpu_offload_without_torchrun_and_gpus_fails_before_any_work(tiny_model_dir, tmp_path):
    from tinyrl.config import ConfigError

    with pytest.raises(ConfigError, match="distributed.cpu_offload: .* needs CUDA GPUs and a torchrun launch"):
        train(load_config(_overrides(tiny_model_dir, tmp_path / "run", "distributed.cpu_offload=true")))
    assert not (tmp_path / "run").exists()


END_OF_RANK = """
import atexit, sys, threading, time
from pathlib import Path
from tinyrl.distributed import end_rank_process

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("ran"))).start()


class Finalized:
    def __del__(self):
        (out / "finalized").write_text("ran")


kept = Finalized()
sys.stdout.write("still buffered")  # stdout is a pipe: block-buffered, and no newline
end_rank_process()
print("not reached")
"""


def test_a_finished_rank_exits_without_interpreter_finalization_after_what_exit_must_do(tmp_path, monkeypatch):
    """A rank that ends normally skips interpreter finalization (where a gloo worker thread freeing a collective's
    tensor aborts the process, see `end_rank_process`), after what a normal exit does that a run relies on:
    non-daemon threads finish, atexit handlers run, buffered output arrives, status 0."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    done = subprocess.run([sys.executable, "-c", END_OF_RANK, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "still buffered"
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    assert not (tmp_path / "finalized").exists()

    from tinyrl.distributed import end_rank_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    end_rank_process()  # outside torchrun: nothing happens, the caller goes on
