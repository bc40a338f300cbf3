"""Problems from parquet or JSONL files, scored by TRL reward functions, a veRL compute_score, or a task's verifier.

Rows are used as they are in the file. The default column names follow the veRL row schema::

    {"data_source": "openai/gsm8k",
     "prompt": [{"role": "user", "content": "..."}],            # chat messages, or a plain string
     "reward_model": {"style": "rule", "ground_truth": "72"},
     "extra_info": {"split": "train", "index": 0, ...}}

and plain columns are named in the arguments (``prompt_key="question", answer_key="answer"``); a dotted key reads
inside a struct column (``reward_model.ground_truth``, ``extra_info.split``). Splits come from one file each
(``train_file``, ``validation_file``, ``test_file``) or from a column of one file (``split_key``). Every row is
checked when the task is built, so a bad row is reported (file, row, column) before any model loads: its prompt, its
ground truth (for veRL and tinyrl scoring), and every column a TRL reward function cannot be called without (by its
signature). Rows count from 0, as pandas and `datasets` number them. Errors are `tinyrl.task.TaskError`: one line.

Exactly one way of scoring:

- ``reward_funcs`` (+ ``reward_weights``): TRL reward functions (see `tinyrl.reward_adapters.TRLRewards`);
  ``correct_from`` names the one whose value (>= ``correct_score``) says an answer is right, ``formatted_from`` the
  one whose value (> 0) says it is in the expected format; accuracy and the format rate are not reported without;
- ``compute_score`` (+ ``reward_kwargs``): a veRL ``compute_score`` (see `VerlComputeScore`);
- ``verifier`` (+ ``verifier_kwargs``): a tinyrl task by name, whose ``reward(completion, ground_truth)`` scores the
  row's ground truth (a dict, as written by ``tinyrl-data``, or ``{"ground_truth": value}``); the default when no
  other way is given is the task named by each row's ``data_source``, veRL's dispatch, when one exists.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from tinyrl.reward_adapters import TRLRewards, VerlComputeScore
from tinyrl.task import SPLITS, Reward, TaskError, TaskFileNotFound, available_tasks, get_task, register_task

__all__ = ["FileTask", "read_split_files", "get_path"]

log = logging.getLogger("tinyrl")
_MISSING = object()  # a column that is not there
_REQUIRED = object()  # get_path without a default
_ROLES = ("system", "user", "assistant")


def get_path(row: Mapping, key: str, default: Any = _REQUIRED) -> Any:
    """``row[key]``, where a dotted key reads inside nested mappings (``reward_model.ground_truth``)."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is _REQUIRED:
                raise KeyError(key)
            return default
        value = value[part]
    return value


def _check_prompt(value: Any) -> str | None:
    """Why ``value`` is not a prompt (a non-empty string, or chat messages with roles and text), or None."""
    if isinstance(value, str):
        return None if value.strip() else "is an empty string"
    if not isinstance(value, (list, tuple)) or not value:
        return f"is {type(value).__name__}, not a string or a list of chat messages"
    for j, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return f"message {j} is not a {{'role', 'content'}} mapping: {message!r:.80}"
        if message["role"] not in _ROLES:
            return f"message {j} has role {message['role']!r}; expected one of {', '.join(_ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {j} content is {type(message['content']).__name__}, not text"
    return None


def read_split_files(files: Mapping[str, str | None], split_key: str | None) -> dict[str, list[tuple[str, int, dict]]]:
    """``{split: [(file, row number, row), ...]}`` from one file per split, or from one file split by a column."""
    from tinyrl.data import read_rows

    out: dict[str, list[tuple[str, int, dict]]] = {}
    for split, path in files.items():
        if path is None:
            continue
        try:
            rows = read_rows(path)
        except TaskError as err:
            err.key = err.key or f"kwargs.{split}_file"
            raise
        if split_key is None:
            out.setdefault(split, []).extend((str(path), i, row) for i, row in enumerate(rows))
            continue
        for i, row in enumerate(rows):
            value = get_path(row, split_key, None)
            if value not in SPLITS:
                raise TaskError(f"{path}: row {i}: column {split_key!r} is {value!r}; expected one of "
                                f"{', '.join(SPLITS)}", key="kwargs.split_key")
            out.setdefault(value, []).append((str(path), i, row))
    return out


def _verifier_key(key: str | None) -> str:
    """The file task's setting behind a verifier task's: its name is `verifier`, its arguments `verifier_kwargs`."""
    return f"kwargs.verifier_{key}" if key and key.startswith("kwargs.") else "kwargs.verifier"


@register_task("file")
class FileTask:
    """Problems from parquet/JSONL files (veRL schema or plain columns), scored by TRL or veRL reward code.

    Arguments: the files (``train_file``, ``validation_file``, ``test_file``, or one file and ``split_key``), the
    columns (``prompt_key``, ``answer_key``, ``data_source_key``, ``extra_info_key``), prompt additions
    (``instruction``, ``system_prompt``), one way of scoring (``reward_funcs``/``reward_weights``,
    ``compute_score``/``reward_kwargs``, ``verifier``/``verifier_kwargs``), ``correct_score`` (the score that
    counts as correct), ``correct_from``/``formatted_from`` (which TRL function says an answer is right / in
    format), and the generation settings ``stop`` and ``chat_prefix``.
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        split_key: str | None = None,
        prompt_key: str = "prompt",
        answer_key: str | None = "reward_model.ground_truth",
        data_source_key: str = "data_source",
        extra_info_key: str = "extra_info",
        instruction: str = "",
        system_prompt: str | None = None,
        reward_funcs: Sequence[Any] | None = None,
        reward_weights: Sequence[float] | None = None,
        compute_score: Any = None,
        reward_kwargs: Mapping | None = None,
        verifier: str | None = None,
        verifier_kwargs: Mapping | None = None,
        correct_score: float = 1.0,
        correct_from: str | None = None,
        formatted_from: str | None = None,
        stop: Sequence[str] = (),
        chat_prefix: str = "",
        name: str = "file",
    ):
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        if all(v is None for v in files.values()):
            raise TaskError("file task: give train_file (and test_file or validation_file, or split_key)",
                            key="kwargs.train_file")
        for split, path in files.items():
            if path is not None and not Path(path).is_file():
                raise TaskFileNotFound(f"file task: {split}_file: no file at {path!r}", key=f"kwargs.{split}_file")
        if split_key is not None and sum(v is not None for v in files.values()) != 1:
            raise TaskError("file task: split_key splits one file; give exactly one of train_file, validation_file, "
                            "test_file with it", key="kwargs.split_key")
        if (correct_from or formatted_from) and not reward_funcs:
            raise TaskError("file task: correct_from and formatted_from name TRL reward functions; give them with "
                            "reward_funcs", key="kwargs.correct_from" if correct_from else "kwargs.formatted_from")
        self.files = {k: str(Path(v).resolve()) if v is not None else None for k, v in files.items()}
        self.split_key = split_key
        self.prompt_key, self.answer_key = prompt_key, answer_key
        self.data_source_key, self.extra_info_key = data_source_key, extra_info_key
        self.instruction, self.system_prompt = instruction, system_prompt
        self.stop, self.chat_prefix, self.name = tuple(stop), chat_prefix, name
        self._splits = read_split_files(self.files, split_key)
        self._file_keys = {path: f"kwargs.{split}_file" for split, path in self.files.items() if path is not None}
        self._scorer = self._build_scorer(
            reward_funcs, reward_weights, compute_score, reward_kwargs, verifier, verifier_kwargs, correct_score,
            correct_from, formatted_from,
        )
        self._check_rows()
        if isinstance(self._scorer, TRLRewards) and correct_from is None:
            log.info("file task: accuracy is not reported: TRL reward functions do not say whether an answer is "
                     "right; name the one that does with task.kwargs.correct_from=NAME (one of %s)",
                     ", ".join(self._scorer.names))

    # -- scoring ------------------------------------------------------------------------------------------------

    def _build_scorer(self, reward_funcs, reward_weights, compute_score, reward_kwargs, verifier, verifier_kwargs,
                      correct_score, correct_from=None, formatted_from=None):
        given = [k for k, v in (("reward_funcs", reward_funcs), ("compute_score", compute_score),
                                ("verifier", verifier)) if v]
        if type(self)._score is not FileTask._score:  # a subclass scores the rows itself
            if given:
                raise TaskError(f"task {self.name!r} scores answers itself; it takes no {', '.join(given)}",
                                key=f"kwargs.{given[0]}")
            return None
        if len(given) > 1:
            raise TaskError(f"file task: give one way of scoring, not {' and '.join(given)}", key=f"kwargs.{given[1]}")
        if reward_weights is not None and not reward_funcs:
            raise TaskError("file task: reward_weights needs reward_funcs", key="kwargs.reward_weights")
        if reward_kwargs and not compute_score:
            raise TaskError("file task: reward_kwargs needs compute_score", key="kwargs.reward_kwargs")
        if reward_funcs:
            return TRLRewards(reward_funcs, reward_weights, correct_score, where="task.kwargs.reward_funcs",
                              correct_from=correct_from, formatted_from=formatted_from, key="kwargs.reward_funcs")
        if compute_score:
            return VerlComputeScore(compute_score, reward_kwargs, correct_score, where="task.kwargs.compute_score",
                                    key="kwargs.compute_score")
        if verifier:
            try:
                return {None: get_task(verifier, **dict(verifier_kwargs or {}))}
            except TaskError as err:
                err.key = _verifier_key(err.key)
                raise
        scorers: dict[str | None, Any] = {}
        for rows in self._splits.values():
            for path, i, row in rows:
                source = str(get_path(row, self.data_source_key, ""))
                if source in scorers:
                    continue
                try:
                    scorers[source] = get_task(source, **dict(verifier_kwargs or {}))
                except TaskError as err:
                    if err.key != "name":
                        err.key = _verifier_key(err.key)
                        raise
                    raise TaskError(
                        f"{path}: row {i}: column {self.data_source_key!r} is {source!r}, which names no tinyrl "
                        f"task to score with (tasks: {', '.join(available_tasks())}); give the reward code as "
                        f"task.kwargs.compute_score, task.kwargs.reward_funcs or task.kwargs.verifier", key=None,
                    ) from None
        return scorers

    def prepare_worker(self) -> None:
        """Load the reward functions in a worker process before the first sample (errors show at start-up)."""
        if hasattr(self._scorer, "prepare"):
            self._scorer.prepare()

    def reward(self, completion: str, row: dict, completion_ids: Sequence[int] | None = None) -> Reward:
        return self._score(completion, row, completion_ids)

    def _score(self, completion: str, row: dict, completion_ids: Sequence[int] | None) -> Reward:
        scorer = self._scorer
        if isinstance(scorer, TRLRewards):
            return scorer(completion, row, row.get(self.prompt_key), self.prompt_key, completion_ids)
        truth = get_path(row, self.answer_key) if self.answer_key else None
        if isinstance(scorer, VerlComputeScore):
            source = get_path(row, self.data_source_key, self.name)
            return scorer(completion, source, truth, get_path(row, self.extra_info_key, None))
        task = scorer.get(None) or scorer[str(get_path(row, self.data_source_key, ""))]
        return task.reward(completion, dict(truth) if isinstance(truth, Mapping) else {"ground_truth": truth})

    def answer(self, row: dict) -> Any:
        """The row's ground truth (``answer_key``)."""
        return get_path(row, self.answer_key)

    # -- problems -----------------------------------------------------------------------------------------------

    def _check_rows(self) -> None:
        needs_answer = self.answer_key is not None and not isinstance(self._scorer, TRLRewards)
        if isinstance(self._scorer, VerlComputeScore):  # by its signature: a scorer without ground_truth needs none
            needs_answer = needs_answer and "ground_truth" in self._scorer.arguments
        needed = self._scorer.needed_columns() if isinstance(self._scorer, TRLRewards) else {}
        for function, columns in needed.items():
            passed_otherwise = sorted(set(columns) & {self.prompt_key, "prompt", "completion"})
            if passed_otherwise:
                raise TaskError(f"reward function {function!r} takes {passed_otherwise[0]!r} without a default, and "
                                "no such argument is passed: the prompt comes as 'prompts', the completion as "
                                "'completions'", key="kwargs.reward_funcs")
        for rows in self._splits.values():
            for path, i, row in rows:
                where, key = f"{path}: row {i}", self._file_keys.get(path)
                if self.prompt_key not in row:
                    raise TaskError(f"{where}: no column {self.prompt_key!r}; columns: {', '.join(sorted(row))} (set "
                                    "task.kwargs.prompt_key to the column that holds the prompt)", key=key)
                problem = _check_prompt(row[self.prompt_key])
                if problem:
                    raise TaskError(f"{where}: column {self.prompt_key!r} {problem}", key=key)
                for function, columns in needed.items():
                    for column in columns:
                        if column not in row:
                            raise TaskError(
                                f"{where}: no column {column!r}, which reward function {function!r} takes (it has "
                                f"no default); columns: {', '.join(sorted(row))}", key=key)
                if needs_answer:
                    truth = get_path(row, self.answer_key, _MISSING)
                    if truth is _MISSING:
                        raise TaskError(f"{where}: no column {self.answer_key!r}; columns: {', '.join(sorted(row))} "
                                        "(set task.kwargs.answer_key to the column that holds the ground truth)",
                                        key=key)
                    problem = self._check_answer(truth)
                    if problem:
                        raise TaskError(f"{where}: column {self.answer_key!r} {problem}", key=key)

    def _check_answer(self, truth: Any) -> str | None:
        """Why a ground truth cannot be scored against, or None (subclasses check more)."""
        if truth is None or (isinstance(truth, str) and not truth.strip()):
            return f"is {'null' if truth is None else 'empty'}; every row needs a ground truth to score answers against"
        return None

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        """Up to ``size`` rows of ``split`` in an order fixed by ``seed`` (all of them when the file has fewer)."""
        if split not in SPLITS:
            raise ValueError(f"file task: split must be one of {SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"file task: size must be an integer >= 0, got {size!r}")
        rows = self._splits.get(split)
        if not rows:
            how = f"column {self.split_key!r} has no {split!r} rows" if self.split_key else f"no {split}_file given"
            raise TaskError(f"file task: no {split} problems ({how}); set task.kwargs.{split}_file or "
                            "task.eval_split", key=f"kwargs.{split}_file")
        order = list(range(len(rows)))
        random.Random(f"file|{split}|{seed}").shuffle(order)
        if size > len(rows):
            log.warning("file task: asked for %d %s problems, the files hold %d; using all of them",
                        size, split, len(rows))
        return [rows[i][2] for i in order[:size]]

    # -- prompts ------------------------------------------------------------------------------------------------

    def messages(self, row: dict) -> list[dict]:
        """Chat form: the row's messages (or its text as one user message), with ``system_prompt`` and
        ``instruction`` added."""
        value = row[self.prompt_key]
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else [dict(m) for m in value]
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.instruction:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"] or [len(messages) - 1]
            messages[users[-1]]["content"] = f"{messages[users[-1]]['content']} {self.instruction}"
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def prompt(self, row: dict) -> str:
        """Base-model form: the prompt text as it is in the file (messages' contents joined by blank lines)."""
        value = row[self.prompt_key]
        text = value if isinstance(value, str) else "\n\n".join(m["content"] for m in value)
        return f"{text} {self.instruction}" if self.instruction else text

    def demonstration(self, row: dict) -> str | None:
        """The verifier task's teacher completion for the row's ground truth, when it has one."""
        if not isinstance(self._scorer, dict):
            return None
        task = self._scorer.get(None) or self._scorer.get(str(get_path(row, self.data_source_key, "")))
        teacher = getattr(task, "demonstration", None)
        truth = get_path(row, self.answer_key, None) if self.answer_key else None
        if teacher is None or not isinstance(truth, Mapping):
            return None
        return teacher(dict(truth))

    # -- worker processes ---------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_splits"] = {}  # workers score rows they are sent; they need no copy of the files
        return state
