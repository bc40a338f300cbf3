"""Reward code written for TRL or veRL, used unchanged as tinyrl rewards.

- `TRLRewards`: reward functions in TRL's GRPOTrainer convention (TRL 1.16). Each is called with keyword
  arguments ``prompts``, ``completions``, ``completion_ids``, one list per dataset column (every column but the
  prompt), ``trainer_state`` (None here: there is no TRL trainer), ``log_extra`` and ``log_metric``; it returns one
  float per completion or None for "does not apply". Conversational rows (the prompt is a list of messages) get
  completions as ``[{"role": "assistant", "content": text}]``, plain rows as text, as in TRL. Several functions
  combine like TRL's ``reward_weights``: score = sum_i w_i * r_i over the functions that returned a value; when
  every function returns None the completion is not applicable (`Reward.not_applicable`: NaN, left out of its
  group's statistics, zero advantage, as TRL 1.16's GRPOTrainer does). TRL functions say nothing about
  correctness or format, so accuracy comes only from the function named ``correct_from`` and the format rate only
  from the one named ``formatted_from``; without them neither is reported.
- `VerlComputeScore`: veRL's ``compute_score(data_source, solution_str, ground_truth, extra_info=None)``, returning
  a number or a dict with a ``score`` key whose other numeric keys are logged (an ``acc`` key is the accuracy).

Functions are named by import path (``"trl.rewards:think_format_reward"``, ``"trl.rewards.accuracy_reward"``) or
by file (``"my_rewards.py:compute_score"``, like veRL's ``custom_reward_function.path``/``name``); a spec may be a
dict ``{"path": ..., "kwargs": {...}}``, which calls the named factory once with ``kwargs`` to build the function
(TRL's ``get_soft_overlong_punishment(...)`` and friends). Both adapters score one completion per call, so each
sample runs in a reward worker under its time, CPU and memory limits; errors propagate to the worker, which
records them. A function a spec names is loaded again in each worker process, not pickled.

Standard library only: worker processes import this module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from tinyrl.task import Reward, TaskError, load_object

__all__ = ["TRLRewards", "VerlComputeScore", "function_name", "TRL_ARGUMENTS"]

# What TRL's GRPOTrainer passes every reward function itself; any other argument is a dataset column.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def function_name(fn: Any) -> str:
    """The name TRL logs a reward function under: its ``__name__``, else its class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _resolve(spec: Any, where: str, key: str | None) -> Callable[..., Any]:
    """A callable from a spec: a callable itself, ``"module:attr"`` / ``"file.py:attr"``, or ``{path, kwargs}``."""
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"path", "kwargs"})
        if unknown or "path" not in spec:
            raise TaskError(f"{where}: a reward function given as a mapping needs 'path' (and optional 'kwargs'), "
                            f"got keys {sorted(spec)}", key=key)
        factory = load_object(spec["path"], where, key)
        kwargs = dict(spec.get("kwargs") or {})
        if not callable(factory):
            raise TaskError(f"{where}: {spec['path']!r} is {type(factory).__name__}, not callable", key=key)
        fn = factory(**kwargs)
    else:
        fn = load_object(spec, where, key)
    if not callable(fn):
        raise TaskError(f"{where}: {spec!r} is {type(fn).__name__}, not a function", key=key)
    return fn


def required_arguments(fn: Callable[..., Any]) -> list[str]:
    """The arguments ``fn`` cannot be called without (no default, not ``*args``/``**kwargs``); [] if unknown."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _number(value: Any, what: str) -> float:
    """A finite float from a reward function's result; anything else is an error naming ``what``."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} returned {type(value).__name__} {value!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} returned {number!r}, not a finite number")
    return number


def _setting(value: Any, name: str) -> float:
    """A number from the task's settings (``task.kwargs.<name>``), else a TaskError naming it."""
    try:
        return _number(value, name)
    except (TypeError, ValueError) as exc:
        raise TaskError(str(exc), key=f"kwargs.{name.split('[')[0]}") from None


class _Functions:
    """Reward functions named by spec, resolved where they run (the parent checks them, each worker loads them)."""

    def __init__(self, specs: Sequence[Any], where: str, key: str | None = None):
        if isinstance(specs, (str, Mapping)) or callable(specs):
            specs = [specs]
        self.specs = list(specs)
        self.where, self.key = where, key
        if not self.specs:
            raise TaskError(f"{where}: give at least one reward function", key=key)
        self._fns: list[Callable[..., Any]] | None = None
        self.load()  # fail now, in the parent, with a message naming the spec

    def load(self) -> list[Callable[..., Any]]:
        if self._fns is None:
            self._fns = [_resolve(s, f"{self.where}[{i}]", self.key) for i, s in enumerate(self.specs)]
        return self._fns

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not any(callable(s) for s in self.specs):
            state["_fns"] = None  # named by spec: each process loads its own (file modules, closures)
        return state


class TRLRewards:
    """TRL reward functions as one tinyrl reward: ``score = sum_i w_i * r_i`` over functions that returned a value.

    ``correct``: the function named ``correct_from`` gave at least ``correct_score`` (None when no function is
    named, or it returned None). ``formatted``: the function named ``formatted_from`` gave more than 0 (None
    likewise). When every function returns None the reward is `Reward.not_applicable`. Each function's unweighted
    value is a component named like TRL's ``rewards/<name>`` (plus any ``log_metric`` values).
    """

    def __init__(self, funcs: Sequence[Any], weights: Sequence[float] | None = None, correct_score: float = 1.0,
                 where: str = "reward_funcs", correct_from: str | None = None, formatted_from: str | None = None,
                 key: str | None = None):
        self.functions = _Functions(funcs, where, key)
        n = len(self.functions.specs)
        if weights is None:
            weights = [1.0] * n
        weights = list(weights)
        if len(weights) != n:
            raise TaskError(f"reward_weights: {len(weights)} weight(s) for {n} reward function(s)",
                            key="kwargs.reward_weights")
        self.weights = [_setting(w, f"reward_weights[{i}]") for i, w in enumerate(weights)]
        self.correct_score = _setting(correct_score, "correct_score")
        self.names = self._unique_names([function_name(fn) for fn in self.functions.load()])
        for setting, name in (("correct_from", correct_from), ("formatted_from", formatted_from)):
            if name is not None and name not in self.names:
                raise TaskError(f"{name!r} is not one of the reward functions ({', '.join(self.names)}); name the "
                                f"one whose value says whether an answer is "
                                f"{'right' if setting == 'correct_from' else 'in the expected format'}",
                                key=f"kwargs.{setting}")
        self.correct_from, self.formatted_from = correct_from, formatted_from

    def needed_columns(self) -> dict[str, list[str]]:
        """``{function name: [dataset columns it cannot be called without]}``, from each function's signature."""
        out = {}
        for fn, name in zip(self.functions.load(), self.names):
            columns = [a for a in required_arguments(fn) if a not in TRL_ARGUMENTS]
            if columns:
                out[name] = columns
        return out

    @staticmethod
    def _unique_names(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for name in names:
            seen[name] = seen.get(name, 0) + 1
            out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
        return out

    def prepare(self) -> None:
        self.functions.load()

    def __call__(self, completion: str, row: Mapping, prompt: Any, prompt_key: str,
                 completion_ids: Sequence[int] | None) -> Reward:
        conversational = _is_conversation(prompt)
        completion_arg = [{"role": "assistant", "content": completion}] if conversational else completion
        columns = {k: [v] for k, v in row.items() if k not in (prompt_key, "prompt", "completion", "completion_ids")}
        metrics: dict[str, float] = {}
        extra: dict[str, Any] = {}

        def log_metric(name: str, value: float) -> None:
            metrics[str(name)] = _number(value, f"log_metric({name!r})")

        def log_extra(column: str, values: list) -> None:
            extra[str(column)] = values[0] if isinstance(values, (list, tuple)) and len(values) == 1 else values

        total, applied, components = 0.0, False, {}
        correct = formatted = None
        for fn, name, weight in zip(self.functions.load(), self.names, self.weights):
            out = fn(
                prompts=[prompt], completions=[completion_arg],
                completion_ids=[list(completion_ids) if completion_ids is not None else None],
                **columns, trainer_state=None, log_extra=log_extra, log_metric=log_metric,
            )
            if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence) or len(out) != 1:
                raise TypeError(
                    f"reward function {name!r} returned {out!r}; expected a list with one value per completion"
                )
            if out[0] is None:
                continue
            value = _number(out[0], f"reward function {name!r}")
            components[name] = value
            total += weight * value
            applied = True
            if name == self.correct_from:
                correct = value >= self.correct_score
            if name == self.formatted_from:
                formatted = value > 0
        components.update(metrics)
        if not applied:
            return Reward.not_applicable("every reward function returned None", components)
        return Reward(total, correct, formatted, {"extra": extra} if extra else {}, components)


class VerlComputeScore:
    """A veRL ``compute_score`` as a tinyrl reward: the number it returns, or its dict's ``score``.

    Other numeric keys of a dict become components; ``acc`` (when present) is ``correct``, else
    ``score >= correct_score`` (veRL's scorers give 1 for a right answer); ``formatted`` is None (veRL's interface
    has no format signal); non-numeric keys (e.g. a parsed ``pred``) go to ``info``. ``kwargs`` are passed on
    every call, like veRL's ``custom_reward_function.reward_kwargs``.
    """

    _ARGUMENTS = ("data_source", "solution_str", "ground_truth", "extra_info")

    def __init__(self, fn: Any, kwargs: Mapping | None = None, correct_score: float = 1.0,
                 where: str = "compute_score", key: str | None = None):
        self.functions = _Functions([fn], where, key)
        self.kwargs = dict(kwargs or {})
        self.correct_score = _setting(correct_score, "correct_score")
        self.name = function_name(self.functions.load()[0])
        self._accepts = self._accepted(self.functions.load()[0])

    @property
    def arguments(self) -> tuple[str, ...]:
        """Which of veRL's arguments (data_source, solution_str, ground_truth, extra_info) the function takes."""
        return self._accepts

    @classmethod
    def _accepted(cls, fn: Callable[..., Any]) -> tuple[str, ...]:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return cls._ARGUMENTS
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return cls._ARGUMENTS
        return tuple(a for a in cls._ARGUMENTS if a in params)

    def prepare(self) -> None:
        self.functions.load()

    def __call__(self, completion: str, data_source: Any, ground_truth: Any, extra_info: Any) -> Reward:
        values = {"data_source": data_source, "solution_str": completion, "ground_truth": ground_truth,
                  "extra_info": extra_info}
        out = self.functions.load()[0](**{a: values[a] for a in self._accepts}, **self.kwargs)
        if not isinstance(out, Mapping):
            score = _number(out, f"compute_score {self.name!r}")
            return Reward(score, score >= self.correct_score, None)
        if "score" not in out:
            raise KeyError(f"compute_score {self.name!r} returned a dict without a 'score' key: {sorted(out)}")
        score = _number(out["score"], f"compute_score {self.name!r} ['score']")
        components, info = {}, {}
        for key, value in out.items():
            if key == "score":
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                components[str(key)] = float(value)
            else:
                info[str(key)] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        correct = bool(out["acc"]) if "acc" in out else score >= self.correct_score
        return Reward(score, correct, None, info, components)


def _is_conversation(prompt: Any) -> bool:
    """TRL's test: a prompt is conversational when it is a list of messages (dicts with a role)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, Mapping) and "role" in m for m in prompt)
