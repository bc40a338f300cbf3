"""Helpers shared by every family: input checks that name the bad tensor, masking, option routing, constants."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from tinyrl.task import load_object

# exp(20) ~ 4.9e8: finite in float16/bfloat16/float32, far beyond any clip range in use.
LOG_RATIO_CLAMP = 20.0


def _lookup(registry: Mapping[str, Callable], name: str, what: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid names: {sorted(registry)}")
    return registry[name]


def is_function_spec(name: str) -> bool:
    """Whether `name` points at a function in user code (`pkg.module:function` or `path/to/file.py:function`)
    rather than naming a registered one."""
    return isinstance(name, str) and ":" in name


def resolve_function(registry: dict[str, Callable], name: str, what: str) -> Callable:
    """The function `name` of `registry` (e.g. `POLICY_LOSSES`); a `module:function` or `file.py:function` spec is
    loaded (importing the user's code) and registered under the spec, so every later lookup finds it."""
    if name not in registry and is_function_spec(name):
        fn = load_object(name, what)
        if not callable(fn):
            raise ValueError(f"{what} {name!r} is a {type(fn).__name__}, not a function")
        registry[name] = fn
    return _lookup(registry, name, what)


def _as_mask(response_mask: Tensor, name: str = "response_mask") -> Tensor:
    """`response_mask` as a bool `[B, T]` tensor; 0/1 ints or floats are accepted, anything else is an error."""
    if not isinstance(response_mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(response_mask.shape)}")
    if response_mask.dtype == torch.bool:
        return response_mask
    if ((response_mask != 0) & (response_mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1")
    return response_mask.bool()


def _check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (same as response_mask)")


def _check_values(name: str, x: Tensor, mask: Tensor, allow_inf: bool = False) -> None:
    """Raise if `x` is NaN (or, unless `allow_inf`, infinite) anywhere `mask` is True, naming the rows."""
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    bad = bad & mask
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(-1).nonzero().flatten().tolist()
        kind = "NaN" if allow_inf else "non-finite (NaN or inf)"
        raise ValueError(f"{name} has {kind} values on response tokens in rows {rows[:10]}")


def _float_dtype(x: Tensor) -> torch.dtype:
    """Arithmetic dtype: float32 at least, float64 kept."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with every position outside `mask` set to 0 (NaN/inf there cannot reach values or gradients)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _supported_kwargs(fn: Callable, kwargs: Mapping[str, object]) -> dict[str, object]:
    """The subset of `kwargs` that `fn` declares (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _declared_options(registry: Mapping[str, Callable], skip: frozenset[str]) -> set[str]:
    names: set[str] = set()
    for fn in registry.values():
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return names - skip


def _check_options(options: Mapping[str, object], registry: Mapping[str, Callable], fn: Callable, what: str,
                   skip: frozenset[str]) -> None:
    """Options known to some registered function pass (the chosen one may ignore them); unknown names raise."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = _declared_options(registry, skip)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; options in use: {sorted(known)}")
