"""Configs that cannot work fail at start: one line naming the key, exit status 2, before torch loads where the
config alone is wrong, and nothing left behind (no run directory, no Hydra log file). Entry points agree."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyrl.compose import compose, config_from_dict, load_config
from tinyrl.config import ConfigError, packaged_options
from tinyrl.data import export_from_config, from_verl_rows, read_rows
from tinyrl.experiment import train
from tinyrl.preflight import preflight
from tinyrl.task import get_task

BIN = Path(sys.executable).parent


def _cli(program, args, cwd, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([str(BIN / program), *args], cwd=cwd, env={k: v for k, v in environment.items() if v},
                          capture_output=True, text=True, timeout=300)


def _one_line_refusal(result, *expected):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.prompts_per_mini_batch=3", "trainer.prompts_per_mini_batch: must divide trainer.prompts_per_step"),
        ("+trainer.stpes=3", "trainer.stpes: unknown key (did you mean trainer.steps?)"),
        ("trainer.stpes=3", "trainer.stpes: unknown key (did you mean trainer.steps?)"),
        ("trainer.lr=fast", "trainer.lr: Value 'fast'"),
        ("model.path=./no/such/model", "model.path: no model directory at './no/such/model'"),
        ("algorithm=nope", "choose from"),
        ("task.train_size=20000", "task.train_size: Countdown.dataset: asked for 20000 train problems but only"),
    ],
)
def test_a_bad_config_is_one_line_with_status_2_and_leaves_nothing(tmp_path, override, expected):
    result = _cli("tinyrl-train", [override, f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert _one_line_refusal(result, expected).startswith("tinyrl-train: ")
    assert list(tmp_path.iterdir()) == []  # no run directory, no cli.log


REPO = Path(__file__).resolve().parents[1]
WILD = str(Path(__file__).with_name("rewards_in_the_wild.py"))
DIGITS = str(Path(__file__).with_name("learnable_task.py"))  # DigitTask takes no arguments


def _data_files(folder: Path) -> dict[str, Path]:
    """Data files, each wrong in one way, next to a good one."""
    from tinyrl.data import write_rows

    folder.mkdir()
    good = [{"prompt": f"What is {i} + {i}?", "reward_model": {"ground_truth": str(2 * i)}} for i in range(20)]
    null_truth = [dict(r) for r in good]
    null_truth[17] = {"prompt": "What is 17 + 17?", "reward_model": {"ground_truth": None}}
    (folder / "broken.jsonl").write_text('{"prompt": "q", "reward_model": {"ground_truth": "1"}}\n{"prompt": \n')
    return {
        "good": write_rows(folder / "good.jsonl", good),
        "null_truth": write_rows(folder / "null_truth.jsonl", null_truth),
        "broken": folder / "broken.jsonl",
        "question": write_rows(folder / "question.jsonl", [{"question": "q", "answer": "1"}] * 3),
        "unknown_source": write_rows(folder / "unknown_source.jsonl",
                                     [{"data_source": "lighteval/MATH", **r} for r in good]),
    }


BAD_TASKS = {  # case: (overrides given the data files, what the one line says)
    "missing data file": (lambda d: ["task=file", f"task.kwargs.train_file={d['good'].parent / 'nope.jsonl'}",
                                     f"task.kwargs.compute_score={WILD}:compute_score"],
                          "task.kwargs.train_file: file task: train_file: no file at"),
    "a line that is not JSON": (lambda d: ["task=file", f"task.kwargs.train_file={d['broken']}",
                                           f"task.kwargs.compute_score={WILD}:compute_score"],
                                "task.kwargs.train_file: {broken}: line 2: not valid JSON"),
    "a null ground truth": (lambda d: ["task=file", f"task.kwargs.train_file={d['null_truth']}",
                                       f"task.kwargs.compute_score={WILD}:compute_score"],
                            "task.kwargs.train_file: {null_truth}: row 17: column 'reward_model.ground_truth' is "
                            "null; every row needs a ground truth"),
    "no prompt column": (lambda d: ["task=file", f"task.kwargs.train_file={d['question']}",
                                    f"task.kwargs.compute_score={WILD}:compute_score_two_args"],
                         "{question}: row 0: no column 'prompt'; columns: answer, question (set "
                         "task.kwargs.prompt_key"),
    "an unknown data_source": (lambda d: ["task=file", f"task.kwargs.train_file={d['unknown_source']}"],
                               "{unknown_source}: row 0: column 'data_source' is 'lighteval/MATH', which names no "
                               "tinyrl task"),
    "a column a reward needs": (lambda d: ["task=file", f"task.kwargs.train_file={d['good']}",
                                           f"task.kwargs.reward_funcs=[{WILD}:needs_missing_column]"],
                                "{good}: row 0: no column 'answer_text', which reward function "
                                "'needs_missing_column' takes"),
    "a misspelled task class": (lambda d: ["task=custom", f"task.name={REPO}/examples/custom_task.py:SortLeters"],
                                "task.name: task spec '{repo}/examples/custom_task.py:SortLeters': "
                                "{repo}/examples/custom_task.py has no attribute 'SortLeters' (did you mean "
                                "SortLetters?)"),
    "a missing task file": (lambda d: ["task=custom", "task.name=my_tasks/no_such_task.py:MyTask"],
                            "task.name: task spec: file not found: my_tasks/no_such_task.py"),
    "an unknown task argument": (lambda d: ["task=custom", f"task.name={REPO}/examples/custom_task.py:SortLetters",
                                            "+task.kwargs.max_leters=3"],
                                 "task.kwargs.max_leters: task '{repo}/examples/custom_task.py:SortLetters' got "
                                 "unknown argument(s) max_leters (did you mean max_letters?); it accepts: "),
    "an argument to a task that takes none": (lambda d: ["task=custom", f"task.name={DIGITS}:DigitTask",
                                                         "+task.kwargs.size=3"],
                                              "got unknown argument(s) size; it takes no arguments"),
    "a value the task refuses": (lambda d: ["task.kwargs.max_numbers=9"],
                                 "task.kwargs.max_numbers: Countdown: max_numbers must be an integer in [3, 6], got 9"),
    "a misspelled argument without +": (lambda d: ["task.kwargs.min_numbrs=2"],
                                        "task.kwargs.min_numbrs: task 'countdown' got unknown argument(s) min_numbrs "
                                        "(did you mean min_numbers?)"),
    "an unknown task name": (lambda d: ["task.name=countdwn"],
                             "task.name: unknown task 'countdwn' (did you mean countdown?); available tasks: "),
}


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_a_bad_task_or_data_file_is_one_line_with_status_2_before_any_model_loads(tmp_path, case):
    files = _data_files(tmp_path / "data")
    overrides, expected = BAD_TASKS[case]
    expected = expected.format(repo=REPO, **files)
    result = _cli("tinyrl-train", [*overrides(files), f"run_dir={tmp_path / 'run'}"], tmp_path)
    line = _one_line_refusal(result, expected)
    assert line.startswith("tinyrl-train: task"), line
    assert result.stdout == ""  # nothing started: no phase line, no model built or loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run directory


def test_config_errors_are_reported_before_torch_loads(tmp_path):
    probe = (
        "import sys\n"
        "from tinyrl.cli import train_main\n"
        "try:\n"
        "    train_main(['trainer.prompts_per_mini_batch=3', 'rollout.top_p=2'])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stdout + result.stderr


def test_every_key_outside_the_schema_is_refused_except_in_open_mappings():
    with pytest.raises(ConfigError, match=r"trainer\.stpes: unknown key \(did you mean trainer\.steps\?\)"):
        load_config(["+trainer.stpes=3"])
    with pytest.raises(ConfigError, match=r"^colour: unknown key"):
        load_config(["+colour=blue"])
    with pytest.raises(ConfigError, match=r"trainer\.stpes: unknown key"):
        config_from_dict({"trainer": {"stpes": 3}})
    assert load_config(["+task.kwargs.anything=1"]).task.kwargs["anything"] == 1  # the task's own arguments
    assert load_config(["logging.wandb={project: tinyrl, mode: offline, tags: [a]}"]).logging.wandb == {
        "project": "tinyrl", "mode": "offline", "tags": ["a"]}


def test_a_group_estimator_needs_groups():
    with pytest.raises(ConfigError, match=r"rollout\.n: must be >= 2 with the group estimator"):
        load_config(["rollout.n=1"])
    with pytest.raises(ConfigError, match=r"rollout\.n: must be >= 2 with the group estimator .*'rloo'"):
        load_config(["algorithm=rloo", "rollout.n=1"])
    assert load_config(["algorithm=ppo", "rollout.n=1"]).rollout.n == 1  # GAE needs no group
    assert load_config(["algorithm=reinforce_pp", "rollout.n=1"]).rollout.n == 1  # batch-whitened


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_optional_package_is_named_with_its_install_command(tmp_path):
    # the README's wandb form, on the command line
    result = _cli("tinyrl-train", ["logging.wandb={project: tinyrl, mode: offline}", f"run_dir={tmp_path / 'r'}"],
                  tmp_path)
    _one_line_refusal(result, "logging.wandb needs the module 'wandb'", "pip install 'tinyrl[wandb]'")
    assert list(tmp_path.iterdir()) == []


def test_the_vllm_engine_is_checked_before_anything_loads(tmp_path):
    cfg = load_config(["rollout.engine=vllm", f"run_dir={tmp_path / 'run'}"])
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"rollout\.engine=vllm needs the module 'vllm'.*'tinyrl\[vllm\]'"):
            train(cfg)
        assert not (tmp_path / "run").exists()
    else:
        preflight(cfg)  # importable: nothing to refuse


def test_an_uncached_hub_model_offline_fails_at_once_saying_what_to_pass(tmp_path):
    result = _cli("tinyrl-train", ["experiment=countdown_grpo_qwen3b", f"run_dir={tmp_path / 'r'}"], tmp_path,
                  HF_HUB_OFFLINE="1")
    _one_line_refusal(result, "model.path: 'Qwen/Qwen2.5-3B' is not in the local Hugging Face cache",
                      "HF_HUB_OFFLINE=1", "model.path=/path/to/a/local")
    assert "retry" not in result.stdout.lower() + result.stderr.lower()
    # no HF_HUB_OFFLINE, but the hub cannot be reached (a closed local port stands in for a machine offline)
    result = _cli("tinyrl-train", ["experiment=countdown_grpo_qwen3b", f"run_dir={tmp_path / 'r'}"], tmp_path,
                  HF_HUB_OFFLINE="", TRANSFORMERS_OFFLINE="", HF_ENDPOINT="http://127.0.0.1:9")
    _one_line_refusal(result, "127.0.0.1 cannot be reached", "model.path=")
    assert list(tmp_path.iterdir()) == []


def test_a_3b_model_on_a_machine_without_a_gpu_is_refused_before_loading(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = tmp_path / "qwen3b_shape"  # Qwen2.5-3B's config.json without its weights: nothing to load
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36, "vocab_size": 151936,
        "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 11008, "tie_word_embeddings": True,
    }))
    cfg = load_config(["experiment=countdown_grpo_qwen3b", f"model.path={model}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"about 3\.1B parameters and this machine has no GPU.*device=cpu"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    preflight(load_config(["experiment=countdown_grpo_qwen3b", f"model.path={model}", "device=cpu"]))  # insisted


def test_a_plain_dict_gets_the_command_lines_defaults():
    from_dict = config_from_dict({"trainer": {"steps": 5}, "task": {"kwargs": {"max_target": 40}}})
    assert from_dict == load_config(["trainer.steps=5", "task.kwargs.max_target=40"])
    assert from_dict.sft.enabled and from_dict.trainer.lr == pytest.approx(5e-5)  # the tiny_cpu experiment
    assert from_dict.rollout.max_response_tokens == 96 and from_dict.task.kwargs["max_number"] == 20


def test_data_help_lists_what_works_and_the_default_is_the_training_task(tmp_path):
    help_text = _cli("tinyrl-data", ["--help"], tmp_path).stdout
    assert f"task=NAME, one of: {packaged_options('task')}" in help_text and "countdown_tiny, custom" in help_text
    assert "algorithm" not in help_text and "experiment" not in help_text
    assert list(tmp_path.iterdir()) == []
    cfg = compose("data", [f"out_dir={tmp_path / 'd'}", "sizes.train=20", "sizes.validation=0", "sizes.test=0"])
    (path,) = export_from_config(cfg)
    training = load_config([])
    task = get_task(training.task.name, **training.task.kwargs)
    assert from_verl_rows(read_rows(path)) == task.dataset("train", 20, training.task.data_seed)


def test_data_export_writes_no_log_file(tmp_path):
    result = _cli("tinyrl-data", [f"out_dir={tmp_path / 'd'}", "sizes.train=5", "sizes.validation=0",
                                  "sizes.test=0", "task=countdown"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
