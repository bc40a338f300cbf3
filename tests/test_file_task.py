"""Problems from files: the veRL row schema (as veRL's preprocessing writes it with `datasets`), plain columns,
splits by file or column, chat rendering through a real tokenizer, bad rows named before training, and the round
trip tinyrl -> parquet -> tinyrl."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tinyrl.data import export_dataset, read_rows, write_rows
from tinyrl.prompts import render_prompt
from tinyrl.reward_workers import RewardScorer
from tinyrl.task import get_task

WILD = str(Path(__file__).with_name("rewards_in_the_wild.py"))

RAW_GSM8K = {  # the shape of openai/gsm8k: a question and a worked answer ending in "#### <number>"
    "question": [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?" for i in range(12)],
    "answer": [f"He has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}" for i in range(12)],
}


def write_like_verl_gsm8k(out_dir: Path) -> None:
    """What veRL's GSM8K preprocessing produces, built the same way: `datasets.map` over the raw rows, then
    `to_parquet` per split (the raw dataset is made here; nothing is downloaded)."""
    import datasets

    raw = datasets.Dataset.from_dict(RAW_GSM8K).train_test_split(test_size=4, shuffle=False)
    instruction = 'Let\'s think step by step and output the final answer after "####".'

    def to_verl(split):
        def convert(example, index):
            question, answer = example.pop("question"), example.pop("answer")
            return {
                "data_source": "openai/gsm8k",
                "prompt": [{"role": "user", "content": f"{question} {instruction}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer.split("#### ")[-1]},
                "extra_info": {"split": split, "index": index, "answer": answer, "question": question},
            }
        return convert

    for split in ("train", "test"):
        raw[split].map(to_verl(split), with_indices=True).to_parquet(str(out_dir / f"{split}.parquet"))


def test_reads_a_file_written_like_verl_preprocessing(tmp_path):
    write_like_verl_gsm8k(tmp_path)
    task = get_task("file", train_file=str(tmp_path / "train.parquet"), test_file=str(tmp_path / "test.parquet"),
                    compute_score=f"{WILD}:compute_score")
    train, test = task.dataset("train", 100, 0), task.dataset("test", 100, 0)
    assert len(train) == 8 and len(test) == 4
    assert {r["extra_info"]["split"] for r in test} == {"test"}
    row = min(train, key=lambda r: r["extra_info"]["index"])
    assert row["reward_model"]["ground_truth"] == "3" and row["prompt"][0]["role"] == "user"
    assert task.messages(row) == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert task.prompt(row) == row["prompt"][0]["content"] and task.prompt(row).endswith('after "####".')
    with RewardScorer(task, workers=1, timeout=10.0) as scorer:
        rewards = scorer.score(["0 + 3 = 3\n#### 3", "#### 4", "three"], [row] * 3)
    assert [r.score for r in rewards] == [1.0, 0.1, 0.0]


def test_chat_prompts_render_through_the_tokenizer_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "reward_model": {"ground_truth": "4"}}]
    path = write_rows(tmp_path / "one.jsonl", rows)
    task = get_task("file", train_file=str(path), compute_score=f"{WILD}:compute_score", system_prompt="Be exact.",
                    instruction="Answer after ####.", chat_prefix="<think>")
    row = task.dataset("train", 1, 0)[0]
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 2 + 2? Answer after ####."}],
        tokenize=False, add_generation_prompt=True,
    )
    text = render_prompt(task, row, tokenizer, "chat")
    assert text == expected + "<think>" and "<|im_start|>system\nBe exact.<|im_end|>" in text
    assert render_prompt(task, row, tokenizer, "base") == "What is 2 + 2? Answer after ####."


def test_plain_columns_and_a_split_column(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "part": "train" if i % 4 else "test"} for i in range(20)]
    path = write_rows(tmp_path / "all.jsonl", rows)
    task = get_task("file", train_file=str(path), split_key="part", prompt_key="question", answer_key="answer",
                    compute_score=f"{WILD}:compute_score_two_args")
    train, test = task.dataset("train", 100, 3), task.dataset("test", 100, 3)
    assert len(train) == 15 and len(test) == 5 and {r["part"] for r in test} == {"test"}
    assert task.dataset("train", 5, 3) == train[:5]  # a fixed order per seed; smaller sizes are prefixes
    assert task.dataset("train", 15, 4) != train
    assert task.messages(train[0]) == [{"role": "user", "content": train[0]["question"]}]
    with pytest.raises(ValueError, match="no validation problems.*validation_file"):
        task.dataset("validation", 1, 0)


@pytest.mark.parametrize(
    "row, kwargs, message",
    [
        ({"text": "q", "reward_model": {"ground_truth": "1"}}, {}, r"row 2: no column 'prompt'; columns: reward_model, text \(set task.kwargs.prompt_key"),
        ({"prompt": "  ", "reward_model": {"ground_truth": "1"}}, {}, r"row 2: column 'prompt' is an empty string"),
        ({"prompt": [{"role": "robot", "content": "hi"}], "reward_model": {"ground_truth": "1"}}, {},
         r"row 2: column 'prompt' message 0 has role 'robot'"),
        ({"prompt": [{"role": "user", "content": 5}], "reward_model": {"ground_truth": "1"}}, {},
         r"row 2: column 'prompt' message 0 content is int"),
        ({"prompt": "q", "reward_model": {"style": "rule"}}, {},
         r"row 2: no column 'reward_model.ground_truth'; .*task.kwargs.answer_key"),
        ({"prompt": "q", "reward_model": {"ground_truth": ""}}, {}, r"row 2: column 'reward_model.ground_truth' is empty"),
        ({"prompt": "q", "reward_model": {"ground_truth": "1"}, "extra_info": {"split": "dev"}},
         {"split_key": "extra_info.split"}, r"row 2: column 'extra_info.split' is 'dev'"),
    ],
)
def test_a_bad_row_is_named_by_file_row_and_column(tmp_path, row, kwargs, message):
    good = {"prompt": "q", "reward_model": {"ground_truth": "1"}, "extra_info": {"split": "train"}}
    path = write_rows(tmp_path / "rows.jsonl", [good, good, row, good])
    with pytest.raises(ValueError, match=message) as failure:
        get_task("file", train_file=str(path), compute_score=f"{WILD}:compute_score", **kwargs)
    assert str(path) in str(failure.value)


def test_missing_files_and_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_file: no file at"):
        get_task("file", train_file=str(write_rows(tmp_path / "a.jsonl", [{"prompt": "q"}])),
                 test_file=str(tmp_path / "nope.parquet"), reward_funcs=[f"{WILD}:length_reward"])
    with pytest.raises(ValueError, match="give train_file"):
        get_task("file", compute_score=f"{WILD}:compute_score")
    with pytest.raises(ValueError, match=r"b\.jsonl: row 0: column 'data_source' is 'openai/gsm8k', which names no "
                                         r"tinyrl task .*task\.kwargs\.compute_score"):
        get_task("file", train_file=str(write_rows(tmp_path / "b.jsonl", [
            {"data_source": "openai/gsm8k", "prompt": "q", "reward_model": {"ground_truth": "1"}}])))


def test_workers_get_the_task_without_its_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "reward_model": {"ground_truth": str(i)}} for i in range(500)]
    task = get_task("file", train_file=str(write_rows(tmp_path / "many.parquet", rows)),
                    compute_score=f"{WILD}:compute_score")
    assert len(pickle.dumps(task)) < 4000
    assert len(task.dataset("train", 1000, 0)) == 500  # the task in this process keeps them


def test_round_trip_tinyrl_to_parquet_to_tinyrl(tmp_path):
    countdown = get_task("countdown", max_numbers=3, max_number=20, max_target=50)
    export_dataset(countdown, {"train": 40, "test": 10}, seed=5, out_dir=tmp_path, fmt="parquet")
    exported = read_rows(tmp_path / "train.parquet")
    assert {r["data_source"] for r in exported} == {"countdown"}
    # No scoring named: each row's data_source names the verifier (veRL's dispatch), here tinyrl's Countdown.
    task = get_task("file", train_file=str(tmp_path / "train.parquet"), test_file=str(tmp_path / "test.parquet"),
                    stop=["</answer>"], verifier_kwargs={"max_numbers": 3, "max_number": 20, "max_target": 50})
    rows = task.dataset("train", 40, 0)
    truths = sorted((tuple(r["reward_model"]["ground_truth"]["numbers"]), r["reward_model"]["ground_truth"]["target"])
                    for r in rows)
    originals = sorted((tuple(r["numbers"]), r["target"]) for r in countdown.dataset("train", 40, seed=5))
    assert truths == originals
    assert task.messages(rows[0]) == countdown.messages(rows[0]["reward_model"]["ground_truth"])
    demonstrations = [task.demonstration(r) for r in rows]
    with RewardScorer(task, workers=1, timeout=10.0) as scorer:
        rewards = scorer.score(demonstrations + ["<answer>1+1</answer>"], rows + rows[:1])
    assert all(r.correct for r in rewards[:-1]) and rewards[-1].info["reason"] in ("wrong numbers", "wrong result")
    assert rewards[0].components == {"correct": 1.0, "format": 0.0}
