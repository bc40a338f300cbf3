"""Data interop: TinyZero/veRL rows, parquet and JSONL both ways, exports driven by conf/data.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tinyrl.data import export_dataset, export_from_config, from_verl_rows, read_rows, to_verl_rows, write_rows
from tinyrl.task import get_task
from tinyrl.tasks.countdown import Countdown, solve

CD = Countdown()
DATA_YAML = Path(__file__).resolve().parents[1] / "conf" / "data.yaml"

# The layout of TinyZero's countdown parquet files (data_source, chat prompt holding the whole base template,
# ability, reward_model {style, ground_truth {target, numbers}}, extra_info {split, index}).
TINYZERO_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct(
                [
                    ("ground_truth", pa.struct([("numbers", pa.list_(pa.int64())), ("target", pa.int64())])),
                    ("style", pa.string()),
                ]
            ),
        ),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


def tinyzero_rows(problems: list[dict]) -> list[dict]:
    return [
        {
            "data_source": "countdown",
            "prompt": [{"content": f"A conversation. User: Using {p['numbers']} make {p['target']}.", "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": {"numbers": p["numbers"], "target": p["target"]}, "style": "rule"},
            "extra_info": {"index": i, "split": "train"},
        }
        for i, p in enumerate(problems)
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip_through_files(tmp_path, suffix):
    rows = CD.dataset("validation", 50, seed=4)
    verl = to_verl_rows(CD, rows, "validation")
    path = write_rows(tmp_path / "sub" / f"val{suffix}", verl)
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # no temporary file left behind
    back = read_rows(path)
    assert back == verl
    assert from_verl_rows(back) == rows


def test_verl_rows_follow_the_schema():
    rows = CD.dataset("train", 3, seed=0)
    verl = to_verl_rows(CD, rows, "train")
    for i, (row, v) in enumerate(zip(rows, verl)):
        assert set(v) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert v["data_source"] == "countdown" and v["ability"] == "math"
        assert v["prompt"] == CD.messages(row)
        assert v["reward_model"] == {"style": "rule", "ground_truth": row}
        assert v["extra_info"] == {"split": "train", "index": i}


def test_exported_parquet_reads_like_tinyzero_data(tmp_path):
    (path,) = export_dataset(CD, {"train": 20}, seed=1, out_dir=tmp_path)
    table = pq.read_table(path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert table.schema.field("prompt").type.value_type == pa.struct([("role", pa.string()), ("content", pa.string())])
    truth = table.schema.field("reward_model").type.field("ground_truth").type
    assert truth.field("numbers").type == pa.list_(pa.int64()) and truth.field("target").type == pa.int64()
    first = table.slice(0, 1).to_pylist()[0]
    assert first["reward_model"]["ground_truth"] == CD.dataset("train", 1, seed=1)[0]


def test_reads_a_tinyzero_countdown_parquet(tmp_path):
    problems = [{"numbers": [44, 19, 35], "target": 98}, {"numbers": [63, 95, 96], "target": 64}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(tinyzero_rows(problems), schema=TINYZERO_SCHEMA), path)
    rows = from_verl_rows(read_rows(path))
    assert rows == problems
    for row in rows:
        expression = solve(row["numbers"], row["target"])
        assert CD.reward(f"<answer>{expression}</answer>", row).correct


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: not valid JSON"):
        read_rows(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: expected a JSON object"):
        read_rows(path)


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        read_rows(tmp_path / "nothing.parquet")
    with pytest.raises(ValueError, match=r"rows\.csv.*\.parquet or \.jsonl"):
        write_rows(tmp_path / "rows.csv", [{"a": 1}])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="garbage.parquet: not a readable parquet file"):
        read_rows(garbage)
    with pytest.raises(ValueError, match="row 1 cannot be written as JSON"):
        write_rows(tmp_path / "x.jsonl", [{"a": 1}, {"a": object()}])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="row 1 has no 'reward_model.ground_truth'"):
        from_verl_rows([{"reward_model": {"ground_truth": {}}}, {"prompt": "hi"}])


def test_string_ground_truth_is_kept():
    assert from_verl_rows([{"reward_model": {"style": "rule", "ground_truth": "42"}}]) == [{"ground_truth": "42"}]


def test_export_writes_disjoint_deterministic_splits(tmp_path):
    sizes = {"train": 60, "validation": 10, "test": 15}
    paths = export_dataset(CD, sizes, seed=9, out_dir=tmp_path / "a", fmt="jsonl")
    assert [p.name for p in paths] == ["train.jsonl", "validation.jsonl", "test.jsonl"]
    again = export_dataset(CD, sizes, seed=9, out_dir=tmp_path / "b", fmt="jsonl")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    keys = {}
    for p in paths:
        rows = from_verl_rows(read_rows(p))
        assert len(rows) == sizes[p.stem]
        assert all(json.loads(line)["extra_info"]["split"] == p.stem for line in p.read_text().splitlines())
        keys[p.stem] = {(tuple(sorted(r["numbers"])), r["target"]) for r in rows}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert export_dataset(CD, {"test": 0}, seed=0, out_dir=tmp_path / "c") == []


def test_export_checks_arguments_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="sizes.dev is not a split"):
        export_dataset(CD, {"train": 5, "dev": 5}, seed=0, out_dir=out)
    with pytest.raises(ValueError, match="sizes.train must be an integer"):
        export_dataset(CD, {"train": -5}, seed=0, out_dir=out)
    with pytest.raises(ValueError, match="fmt"):
        export_dataset(CD, {"train": 5}, seed=0, out_dir=out, fmt="csv")
    assert not out.exists()


def packaged_config(tmp_path: Path, *overrides: str):
    with initialize_config_module(config_module="tinyrl.conf", version_base="1.3"):
        return compose(config_name="data", overrides=[f"out_dir={tmp_path}", *overrides])


def test_export_from_the_packaged_hydra_config(tmp_path):
    cfg = packaged_config(
        tmp_path, "sizes.train=30", "sizes.validation=5", "sizes.test=0", "format=jsonl", "task=countdown",
        "task.kwargs.max_numbers=3",
    )
    paths = export_from_config(cfg)
    assert [p.name for p in paths] == ["train.jsonl", "validation.jsonl"]
    rows = from_verl_rows(read_rows(paths[0]))
    assert len(rows) == 30 and all(len(r["numbers"]) == 3 for r in rows)
    assert rows == Countdown(max_numbers=3).dataset("train", 30, seed=0)
    # The whole kwargs mapping can be given at once, as the comment in conf/data.yaml shows.
    kwargs = "task.kwargs={max_numbers: 3, max_number: 20}"
    cfg = packaged_config(tmp_path / "b", "sizes.validation=0", "sizes.test=0", kwargs)
    (path,) = export_from_config(cfg)
    assert path.name == "train.parquet"
    assert all(n <= 20 for row in from_verl_rows(read_rows(path)) for n in row["numbers"])


def test_export_from_a_plain_dict_and_a_loaded_yaml(tmp_path):
    cfg = OmegaConf.load(DATA_YAML)
    assert cfg.format == "parquet" and set(cfg.sizes) == {"train", "validation", "test"}
    cfg.task = {"name": "countdown"}  # the packaged file picks its task from the task group
    cfg.out_dir = str(tmp_path / "yaml")
    cfg.sizes = {"test": 7}
    (path,) = export_from_config(cfg)
    assert len(read_rows(path)) == 7
    plain = {"task": {"name": "countdown"}, "sizes": {"train": 4}, "seed": 1, "out_dir": str(tmp_path)}
    plain["format"] = "jsonl"
    (path,) = export_from_config(plain)
    assert from_verl_rows(read_rows(path)) == CD.dataset("train", 4, seed=1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "csv"}, "format must be one of"),
        ({"seed": "zero"}, "seed must be an integer"),
        ({"sizes": {"train": 1.5}}, "sizes.train must be an integer"),
        ({"task": {"name": ""}}, "task.name"),
        ({"task": {"name": "countdown", "kwargs": [1]}}, "task.kwargs must be a mapping"),
        ({"sise": {}}, "unknown key.*sise"),
    ],
)
def test_bad_config_values_are_named(tmp_path, change, message):
    cfg = {"task": {"name": "countdown", "kwargs": {}}, "sizes": {"train": 2}, "seed": 0, "out_dir": str(tmp_path)}
    cfg["format"] = "jsonl"
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        export_from_config(cfg)
    with pytest.raises(ValueError, match="missing key.*out_dir"):
        export_from_config({k: v for k, v in cfg.items() if k != "out_dir"})
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_kwarg_in_config_is_named(tmp_path):
    cfg = packaged_config(tmp_path, "+task.kwargs.max_numbrs=3")
    with pytest.raises(TypeError, match="max_numbrs"):
        export_from_config(cfg)
    with pytest.raises(ValueError, match="unknown task"):
        export_from_config(packaged_config(tmp_path, "task.name=no_such_task"))
    assert get_task("countdown").name == "countdown"
