"""What a run checks about this machine before anything expensive: the optional packages its components need
(the rollout engine's from its row in `tinyrl.rollout.ENGINES`), that the user code it names loads (a policy loss,
an advantage estimator or an engine given as `module:name` or `file.py:name`), that its model can be found
(offline, a hub name must be in the local cache), and that a large model has a GPU.

`validate` (tinyrl/config.py) checks the config alone; `preflight` checks the config against the machine.
Every failure is a one-line `ConfigError` naming the key and what to do instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from tinyrl.config import ConfigError, TrainConfig, looks_local

# Components a config can choose that need packages outside the core install (the rollout engine's are in its
# row of tinyrl.rollout.ENGINES):
# (the choice as the user writes it, whether the config chooses it, modules that must be importable, how to get them)
OPTIONAL_COMPONENTS: list[tuple[str, Callable[[TrainConfig], bool], tuple[str, ...], str]] = [
    ("logging.tensorboard=true", lambda c: c.logging.tensorboard, ("tensorboard",),
     "pip install 'tinyrl[tensorboard]'"),
    ("logging.wandb", lambda c: c.logging.wandb is not None, ("wandb",), "pip install 'tinyrl[wandb]'"),
]


CPU_PARAMETER_LIMIT = 1_000_000_000  # above this, training on a CPU takes days: ask for a GPU or device=cpu


def preflight(cfg: TrainConfig) -> None:
    """Raise ConfigError when the run cannot work on this machine (see the module docstring)."""
    check_optional_components(cfg)
    check_user_code(cfg)
    for key, source in (("model.path", cfg.model.path), ("model.critic_path", cfg.model.critic_path)):
        check_model_available(key, source)
    check_fits_device(cfg)
    check_engine_fits_launch(cfg)
    check_engine_placement(cfg)


def check_optional_components(cfg: TrainConfig) -> None:
    from tinyrl.rollout import engine_spec

    engine = engine_spec(cfg.rollout.engine)
    components = [(f"rollout.engine={cfg.rollout.engine}", lambda c: True, engine.needs(cfg.rollout), engine.install),
                  *OPTIONAL_COMPONENTS]
    for choice, chosen, modules, remedy in components:
        if not chosen(cfg):
            continue
        for module in modules:
            if not _importable(module):
                raise ConfigError(f"{choice} needs the module {module!r}, which is not importable here: {remedy}")


def check_user_code(cfg: TrainConfig) -> None:
    """Load what the config names in user code (`module:name`, `file.py:name`): the policy loss, the advantage
    estimator, the rollout engine. A load error, a loss that does not take a `loss_kwargs` key, or a group
    estimator with groups of one is one line naming the key."""
    import inspect

    from tinyrl import algorithms
    from tinyrl.config import check_group_size
    from tinyrl.rollout import engine_class

    a = cfg.algorithm
    choices = [("algorithm.policy_loss", a.policy_loss, algorithms.POLICY_LOSSES, "policy loss"),
               ("algorithm.advantage", a.advantage, algorithms.ADVANTAGE_ESTIMATORS, "advantage estimator")]
    for key, name, registry, what in choices:
        if name in registry or not algorithms.is_function_spec(name):
            continue
        try:
            fn = algorithms.resolve_function(registry, name, what)
        except Exception as err:  # the user's module may raise anything while it loads
            raise ConfigError(f"{key}: cannot load {name!r}: {type(err).__name__}: {err}") from err
        if key == "algorithm.advantage":
            check_group_size(fn, a, cfg.rollout)
    loss = algorithms.POLICY_LOSSES[a.policy_loss]
    params = inspect.signature(loss).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for name in a.loss_kwargs:
            if name not in params:
                raise ConfigError(f"algorithm.loss_kwargs.{name}: the policy loss {a.policy_loss!r} takes no argument "
                                  f"{name!r}; its arguments: {', '.join(params)}")
    if ":" in cfg.rollout.engine:
        try:
            engine_class(cfg.rollout.engine, cfg.rollout.layout)
        except Exception as err:
            raise ConfigError(f"rollout.engine: cannot load {cfg.rollout.engine!r}: {err}") from err


def check_model_available(key: str, source: str | None) -> None:
    """A hub name (`org/name`) must be cached locally when the hub is offline or unreachable."""
    if source is None or looks_local(source) or _cached_file(source, "config.json") is not None:
        return
    reason = _offline_reason()
    if reason is not None:
        raise ConfigError(
            f"{key}: {source!r} is not in the local Hugging Face cache and {reason}; pass {key}=/path/to/a/local "
            f"copy of the model, or download it first where the hub is reachable (hf download {source})"
        )


def check_fits_device(cfg: TrainConfig) -> None:
    """A model over `CPU_PARAMETER_LIMIT` parameters with `device=auto` on a machine without a GPU is refused."""
    if cfg.device != "auto" or cfg.model.path is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    params = estimated_parameters(cfg.model.path)
    if params is None or params <= CPU_PARAMETER_LIMIT:
        return
    raise ConfigError(
        f"model.path: {cfg.model.path!r} has about {params / 1e9:.1f}B parameters and this machine has no GPU "
        f"(device=auto found none); run it on a GPU machine, or pass device=cpu to train on the CPU anyway"
    )


STALENESS_UNDER_TORCHRUN = (
    "trainer.max_staleness: under torchrun each rank samples with a colocated engine, which cannot sample while its "
    "own rank updates; use trainer.max_staleness=0, or train in one process with the engine in its own process "
    "(rollout.layout=server)")


def check_engine_fits_launch(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Under torchrun each training rank generates its own share of the prompts; the engine's row says what of its
    layout cannot (`EngineSpec.launch_problem`: a vLLM server, or tensor parallelism), and asynchronous rollouts
    (`trainer.max_staleness`) are refused, since a rank's engine cannot sample while that rank updates. `world_size` defaults to
    torchrun's (`WORLD_SIZE`; 1 without torchrun)."""
    from tinyrl.rollout import engine_spec

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check = engine_spec(cfg.rollout.engine).launch_problem
    problem = check(cfg.rollout, world_size) if check is not None and world_size > 1 else None
    if problem is not None:
        raise ConfigError(problem)
    if world_size > 1 and cfg.trainer.max_staleness:
        raise ConfigError(STALENESS_UNDER_TORCHRUN)


def check_engine_placement(cfg: TrainConfig) -> None:
    """The engine must sample where the config means it to, in one process (torchrun places engines itself): the
    engine's row says what it cannot (`EngineSpec.placement_problem`, e.g. a colocated vLLM engine on another GPU
    than the first visible one, or NCCL weight sync between two ranks of one GPU)."""
    from tinyrl.rollout import engine_spec

    check = engine_spec(cfg.rollout.engine).placement_problem
    if check is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    problem = check(cfg)
    if problem is not None:
        raise ConfigError(problem)


def estimated_parameters(source: str) -> int | None:
    """Parameters of a decoder-only transformer from its config.json (None when the file is not at hand)."""
    path = Path(source) / "config.json" if looks_local(source) else _hub_file(source, "config.json")
    if path is None or not Path(path).is_file():
        return None
    c = json.loads(Path(path).read_text())
    try:
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or heads
        inner = c.get("intermediate_size", 4 * hidden)
    except KeyError:
        return None
    head_dim = c.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + 3 * hidden * inner)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def _cached_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
    return found if isinstance(found, str) else None


def _hub_file(repo_id: str, filename: str) -> str | None:
    """A small file of a hub repository: from the cache, else downloaded (None when neither works)."""
    found = _cached_file(repo_id, filename)
    if found is not None or _offline_reason() is not None:
        return found
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception:  # no such repository or file, no access: loading the model will say so
        return None


def _offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"the hub is switched off ({var}=1)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    if not _reachable(host, 443, timeout_s=3.0):
        return f"{host} cannot be reached from this machine"
    return None


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection opens within `timeout_s` (name resolution included, which has no timeout of its
    own, hence the thread)."""
    result = {"ok": False}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result["ok"]
