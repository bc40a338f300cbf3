"""The Task protocol, the Reward result, and the task registry (built-in tasks, plugins, files).

This module uses the standard library only: reward worker processes import it, and so does code that must run
without torch. Scoring in worker processes lives in `tinyrl.reward_workers`.

A task is one small object that makes seeded problem sets, renders prompts, and scores completions:

    @register_task("my_task")
    class MyTask:
        def dataset(self, split, size, seed): ...   # list of row dicts
        def prompt(self, row): ...                  # text a base model continues (or messages(row) for chat)
        def reward(self, completion, row): ...      # a Reward

Optional members and their defaults: ``name`` (the registered name, else the class name in snake case),
``stop`` (``()``), ``chat_prefix`` (``""``), ``messages(row)`` (one user message holding ``prompt(row)``),
``prompt(row)`` (the messages' contents joined by blank lines), ``demonstration(row)`` (a teacher completion for
the supervised warm start), ``prepare_worker()`` (called once in each reward worker before it scores, to load what
scoring needs). ``reward`` may also take a ``completion_ids`` keyword (the completion's token ids).

``get_task`` builds a task from a registered name, an installed plugin (entry-point group ``tinyrl.tasks``),
``"pkg.module:MyTask"`` or ``"path/to/file.py:MyTask"``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

__all__ = [
    "Reward",
    "reward_rates",
    "Task",
    "TooFewProblems",
    "TaskError",
    "TaskFileNotFound",
    "TaskTypeError",
    "SPLITS",
    "ENTRY_POINT_GROUP",
    "register_task",
    "get_task",
    "available_tasks",
    "task_catalog",
    "complete_task",
    "load_object",
]

SPLITS = ("train", "validation", "test")
ENTRY_POINT_GROUP = "tinyrl.tasks"  # installed packages register tasks here: `name = "pkg.module:Factory"`


class TaskError(ValueError):
    """A task cannot be built from what it was given: an unknown name, a missing file, an argument the task does
    not take, a data row it cannot use. The message is one line naming what is wrong and what would be right;
    ``key`` names the task setting at fault (``name``, ``kwargs.train_file``, ...) when there is one. The command
    line prints it as ``task.<key>: <message>`` with exit status 2, before any model loads. A task's own
    constructor may raise it for a bad argument."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key

    def config_line(self) -> str:
        """The message as the command line prints it, naming the config key."""
        return f"task.{self.key}: {self}" if self.key else f"task: {self}"


class TaskFileNotFound(TaskError, FileNotFoundError):
    """A file a task needs (its code, its data) is not there."""


class TaskTypeError(TaskError, TypeError):
    """An argument a task does not take, or an object that is not a task."""


class TooFewProblems(ValueError):
    """Raised by a task's `dataset()` when a split holds fewer distinct problems than were asked for. Callers that
    took the size from a config key report it as that key's error (a one-line refusal, not a traceback)."""


@dataclass(frozen=True)
class Reward:
    """The verdict on one completion.

    ``score`` is what RL maximises (any finite float; a non-finite score is turned into an error). ``correct`` is
    the accuracy signal, kept apart from a shaped score; ``formatted`` says an answer in the expected format was
    found; either is None when the reward does not judge it (a figure made from it is then not reported rather than
    made up). ``info`` says why, for people reading samples and errors (e.g. ``{"reason": "wrong numbers"}``;
    failures carry ``{"error": ..., "traceback": ..., "where": ...}``). ``components`` are named parts of the score
    (e.g. ``{"correct": 1.0, "format": 0.0}``, or one value per TRL reward function), each logged as
    ``reward/<name>``, averaged over the completions that report it.

    `Reward.not_applicable` says the reward does not apply to this completion (TRL's None from every reward
    function): its score is NaN, it is left out of its group's statistics and gets zero advantage.
    """

    score: float
    correct: bool | None
    formatted: bool | None
    info: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)

    @classmethod
    def not_applicable(cls, reason: str, components: dict | None = None) -> Reward:
        """A verdict that the reward does not apply: score NaN, correct and formatted None,
        ``info = {"not_applicable": reason}``."""
        return cls(math.nan, None, None, {"not_applicable": str(reason)}, dict(components or {}))

    @property
    def applies(self) -> bool:
        """False for `not_applicable` verdicts."""
        return not (isinstance(self.score, float) and math.isnan(self.score))


def reward_rates(rewards: Sequence[Reward]) -> dict[str, float | None]:
    """What a set of rewards says, each figure over the completions it can speak for (None: nothing to report).

    ``mean_reward``: the mean score of the rewards that apply. ``accuracy``: the share judged correct among the
    rewards that judge correctness (``correct`` not None), a failed reward counting as wrong; None when no reward
    that ran judged correctness. ``format_rate`` and ``formatted_but_wrong`` (formatted and judged wrong) likewise,
    from ``formatted``. ``not_applicable``: how many rewards did not apply.
    """
    applying = [r for r in rewards if r.applies]
    failed = sum(1 for r in applying if isinstance(r.info, dict) and "error" in r.info)
    ran = [r for r in applying if not (isinstance(r.info, dict) and "error" in r.info)]

    def share(judged: list[Reward], hit) -> float | None:
        return sum(1 for r in judged if hit(r)) / (len(judged) + failed) if judged else None

    both = [r for r in ran if r.correct is not None and r.formatted is not None]
    return {
        "mean_reward": sum(float(r.score) for r in applying) / len(applying) if applying else None,
        "accuracy": share([r for r in ran if r.correct is not None], lambda r: r.correct),
        "format_rate": share([r for r in ran if r.formatted is not None], lambda r: r.formatted),
        "formatted_but_wrong": share(both, lambda r: r.formatted and not r.correct),
        "not_applicable": float(len(rewards) - len(applying)),
    }


class Task(Protocol):
    """What the trainer, the data exporter and the evaluator need from a task (after `complete_task`)."""

    name: str
    stop: tuple[str, ...]  # stop strings for generation; engines must keep them in the returned text
    chat_prefix: str  # text the assistant turn begins with in chat form ("" if none)

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        """``size`` distinct problems of ``split`` (one of SPLITS), the same for the same seed."""
        ...

    def prompt(self, row: dict) -> str:
        """Base-model template; the model continues this text."""
        ...

    def messages(self, row: dict) -> list[dict]:
        """Chat form: ``[{"role": "system" | "user", "content": ...}]``."""
        ...

    def reward(self, completion: str, row: dict) -> Reward:
        """Score one completion of ``row``'s prompt."""
        ...


_REQUIRED_MEMBERS = ("dataset", "reward")

# ----------------------------------------------------------------------------------------------------------------
# Defaults for the optional members
# ----------------------------------------------------------------------------------------------------------------


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class _TaskWithDefaults:
    """A user's task object with tinyrl's defaults for the members it leaves out; everything else is the task's."""

    def __init__(self, task: Any, name: str):
        self._task = task
        self.name = getattr(task, "name", name)
        self.stop = tuple(getattr(task, "stop", ()))
        self.chat_prefix = getattr(task, "chat_prefix", "")

    def __getattr__(self, attr: str):  # only reached for what the wrapper itself lacks
        if attr == "_task" or (attr.startswith("__") and attr.endswith("__")):
            raise AttributeError(attr)
        return getattr(self._task, attr)

    def __reduce__(self):  # rebuilt in worker processes without going through __getattr__
        return (_TaskWithDefaults, (self._task, self.name))

    def prompt(self, row: dict) -> str:
        if hasattr(self._task, "prompt"):
            return self._task.prompt(row)
        return "\n\n".join(str(m.get("content", "")) for m in self._task.messages(row))

    def messages(self, row: dict) -> list[dict]:
        if hasattr(self._task, "messages"):
            return self._task.messages(row)
        return [{"role": "user", "content": self._task.prompt(row)}]


def complete_task(task: Any, name: str | None = None) -> Task:
    """``task`` itself when it has every Task member, else a wrapper that supplies the defaults.

    Raises TypeError naming what cannot be defaulted: ``dataset``, ``reward``, and one of ``prompt``/``messages``.
    """
    if isinstance(task, _TaskWithDefaults):
        return task
    label = name or type(task).__name__
    missing = [m for m in _REQUIRED_MEMBERS if not callable(getattr(task, m, None))]
    if not (callable(getattr(task, "prompt", None)) or callable(getattr(task, "messages", None))):
        missing.append("prompt or messages")
    if missing:
        raise TaskTypeError(f"task {label!r} ({type(task).__name__}) lacks Task member(s): {', '.join(missing)}; "
                            "a task needs dataset(split, size, seed), reward(completion, row) and prompt(row) or "
                            "messages(row)", key="name")
    if all(hasattr(task, m) for m in ("name", "stop", "chat_prefix", "prompt", "messages")):
        return task
    default_name = name if name and ":" not in name else _snake_case(type(task).__name__)
    return _TaskWithDefaults(task, default_name)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Any]] = {}
# Built-in tasks register themselves when their module is imported; get_task imports it on first use.
_BUILTIN_MODULES = {
    "countdown": "tinyrl.tasks.countdown",
    "multiplication": "tinyrl.tasks.multiplication",
    "math": "tinyrl.tasks.math_answer",
    "file": "tinyrl.file_task",
}
# Modules loaded from a file path: {module name: path}. Worker processes load them again under the same names so
# that pickled tasks defined in such files can be rebuilt there.
_FILE_MODULES: dict[str, str] = {}


def register_task(name: str, factory: Callable[..., Any] | None = None):
    """Register ``factory`` (a class or function returning a task) under ``name``.

    Use as ``register_task("x", MyTask)`` or as a decorator ``@register_task("x")``. Registering the same
    name again is allowed only for the same factory (e.g. its module was imported twice).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_task: name must be a non-empty string without ':', got {name!r}")

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"register_task({name!r}): factory must be callable, got {fn!r}")
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and _qualified_name(old) != _qualified_name(fn):
            raise ValueError(
                f"register_task: task name {name!r} is already registered to {_qualified_name(old)}; "
                f"choose another name for {_qualified_name(fn)}"
            )
        _REGISTRY[name] = fn
        return fn

    return add if factory is None else add(factory)


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plugin tasks by name (first one wins if two distributions use the same name)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def available_tasks() -> list[str]:
    """Names that ``get_task`` accepts without a module or file path: registered, built-in and plugin tasks."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES) | set(_plugins()))


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a task from a registered name, a plugin name, ``"pkg.module:Attr"`` or ``"path/to/file.py:Attr"``.

    Unknown names raise ValueError listing the available tasks; keyword arguments the factory does not accept
    raise TypeError naming them. Members the task leaves out get their defaults (see `complete_task`).
    """
    if not isinstance(name, str) or not name:
        raise TaskError(f"get_task: name must be a non-empty string, got {name!r}", key="name")
    factory = _resolve_factory(name)
    _check_kwargs(name, factory, kwargs)
    return complete_task(factory(**kwargs), name)


def task_catalog() -> list[dict[str, str]]:
    """Every task available by name: ``{"name", "source", "description", "arguments"}``, sorted by name.

    ``source`` is ``built-in``, ``plugin (<distribution>)`` or ``registered (<module>)``. A plugin that fails to
    load is listed with the error as its description rather than hiding the others.
    """
    plugins = _plugins()
    out = []
    for name in available_tasks():
        if name in _BUILTIN_MODULES:
            source = "built-in"
        elif name in plugins and name not in _REGISTRY:
            dist = getattr(plugins[name], "dist", None)
            source = f"plugin ({dist.name})" if dist is not None else "plugin"
        else:
            source = f"registered ({getattr(_REGISTRY[name], '__module__', '?')})"
        try:
            factory = _resolve_factory(name)
        except Exception as exc:  # a broken plugin must not hide the other tasks
            out.append({"name": name, "source": source, "description": f"cannot load: {exc}", "arguments": ""})
            continue
        doc = inspect.getdoc(factory) or ""
        out.append(
            {"name": name, "source": source, "description": doc.split("\n\n")[0].replace("\n", " "),
             "arguments": _describe_arguments(factory)}
        )
    return out


def _describe_arguments(factory: Callable[..., Any]) -> str:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return "?"
    shown = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            shown.append(("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name)
        elif p.default is p.empty:
            shown.append(p.name)
        else:
            shown.append(f"{p.name}={p.default!r}")
    return ", ".join(shown)


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _resolve_factory(name: str) -> Callable[..., Any]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
        if name in _REGISTRY:
            return _REGISTRY[name]
        raise RuntimeError(f"module {_BUILTIN_MODULES[name]} did not register task {name!r}")
    if ":" not in name:
        plugin = _plugins().get(name)
        if plugin is None:
            raise TaskError(
                f"unknown task {name!r}{_did_you_mean(name, available_tasks())}; available tasks: "
                f"{', '.join(available_tasks())} (or give 'pkg.module:Attr' or 'path/to/file.py:Attr')", key="name"
            )
        try:
            factory = plugin.load()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise TaskError(f"plugin task {name!r} ({plugin.value}) failed to load: {problem}", key="name") from exc
        return _REGISTRY.get(name) or register_task(name, factory)
    return load_object(name, "task spec", key="name")


def _did_you_mean(given: str, choices: Any) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ""."""
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def load_object(spec: str, what: str = "spec", key: str | None = None) -> Any:
    """The object ``spec`` names: ``"pkg.module:attr"``, ``"pkg.module.attr"`` or ``"path/to/file.py:attr"``.

    Errors are `TaskError` (a ValueError) or `TaskFileNotFound` (a FileNotFoundError) naming ``what`` and the spec
    (and carrying ``key``); an error raised while a module or file runs propagates as it is. A file is loaded once
    per process under a name derived from its absolute path, and worker processes load it again under that name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"{what}: expected 'pkg.module:attr' or 'path/to/file.py:attr', got {spec!r}", key=key)
    where, sep, attr = spec.rpartition(":")
    if not sep:
        where, _, attr = spec.rpartition(".")
    if not attr or not where:
        raise TaskError(f"{what} {spec!r} must look like 'pkg.module:attr' or 'path/to/file.py:attr'", key=key)
    if where.endswith(".py"):
        module = _load_file_module(where, what, key)
    else:
        module = _import_module(where, spec, what, key)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [name for name in vars(module) if not name.startswith("_")]
        raise TaskError(f"{what} {spec!r}: {where} has no attribute {attr!r}{_did_you_mean(attr, public)}",
                        key=key) from None


def _import_module(module_name: str, spec: str, what: str, key: str | None):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if not (f"{module_name}.".startswith(f"{missing}.") or missing.startswith(f"{module_name}.")):
            raise  # the module exists but something it imports does not: its own traceback says where
        raise TaskError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})", key=key) from exc


def _load_file_module(path_text: str, what: str, key: str | None = None):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise TaskFileNotFound(f"{what}: file not found: {path_text} (resolved to {path})", key=key)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"tinyrl_file_task_{_identifier(path.stem)}_{digest}"
    module = sys.modules.get(module_name) or exec_file_module(module_name, str(path))
    _FILE_MODULES[module_name] = str(path)
    return module


def file_modules() -> dict[str, str]:
    """Modules loaded from files in this process: ``{module name: path}``."""
    return dict(_FILE_MODULES)


def _identifier(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)


def exec_file_module(module_name: str, path: str):
    """Load the Python file ``path`` as module ``module_name`` (and keep it in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load Python file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call report it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        takes = f"it accepts: {', '.join(sorted(accepted))}" if accepted else "it takes no arguments"
        hints = "".join(_did_you_mean(u, accepted) for u in unknown[:1])
        raise TaskTypeError(f"task {name!r} got unknown argument(s) {', '.join(unknown)}{hints}; {takes}",
                            key=f"kwargs.{unknown[0]}")
