"""Multi-process training: the world of ranks, FSDP2 sharding, collectives, full weights, sharded checkpoints.

This is the one module that knows about ranks. `torchrun --nproc_per_node=N -m tinyrl.train ...` starts N
processes; each calls `init_world`, which joins the process group and returns its `World`. A plain
`tinyrl-train` (no torchrun) gets a world of one process: the same methods, as identities (`sum(x)` is `x`,
`shard(model)` is `model`), so the trainer has one code path.

Data parallelism (PyTorch FSDP2, `torch.distributed.fsdp.fully_shard`): every rank holds 1/N of each
parameter, of its gradient and of its AdamW state; before a layer computes, FSDP all-gathers its parameters,
and after backward it reduce-scatters (averages) the gradients. So every rank must run the same number of
forward and backward passes through a sharded model, in the same order. The trainer keeps that promise in
two ways:

- passes whose number differs between ranks (sampling with per-rank decode lengths, the no-gradient
  log-prob and value passes over a rank's own micro-batches, evaluation) run inside `gathered(model)`: the
  whole model is all-gathered once, on every rank, then used without any collective, then resharded;
- gradient passes are counted up front (`lockstep`) and a rank with fewer micro-batches runs zero-weight
  passes on a one-token row (see `RLTrainer._optimizer_step`).

The trainer meets the other ranks at named points: `claim` and `positions` (drawing prompts and numbering groups
as one process would), `over_all_rows` (advantages over every rank's rows), `whole_batch` and `lockstep` (the
update), `reduce_metrics`, `mean`, `sum`, `concat` (counts, figures and samples), `any` (a stop signal),
`rng_states` (checkpoints), `written_by_main` (a directory rank 0 writes for all).

Every collective that waits on other ranks has the timeout `distributed.timeout_s`; a failure is reported
with this rank, the phase, and the phase every other rank last reached (`mark`, `reporting_failures`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinyrl import devices
from tinyrl.devices import resolve_device

log = logging.getLogger("tinyrl")

OPTIMIZER_DIR = "optimizer"  # inside a checkpoint: every optimizer's state, sharded (torch.distributed.checkpoint)

_WORLD: "World | None" = None  # the process group's world, once torchrun's process has joined it


class DistributedError(RuntimeError):
    """A rank stopped; the message names it, the phase it was in, and where the other ranks were."""


class World:
    """This process's place among the training processes, and the operations that span them.

    `rank` (0..size-1), `size`, `local_rank` (index on this machine) and `device` come from torchrun's
    environment. Rank 0 (`is_main`) alone writes metrics, samples, summaries and the Hugging Face weights.
    """

    def __init__(
        self,
        rank: int = 0,
        size: int = 1,
        local_rank: int = 0,
        device: torch.device | str = "cpu",
        *,
        group: Any = None,
        mesh: Any = None,
        store: Any = None,
        timeout_s: float = float("inf"),
    ) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = torch.device(device)
        self.group = group  # a gloo group for CPU-side agreement (counts, objects, checkpoints), any backend
        self.mesh = mesh  # the 1-D device mesh FSDP shards over
        self.timeout_s = timeout_s
        self._store = store  # where each rank posts the phase it is in, for failure reports
        self._phase = "startup"  # the phase this rank last entered

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True under torchrun (even with one process): models are FSDP-sharded and collectives are real."""
        return self.group is not None

    @property
    def load_device(self) -> torch.device:
        """Where to load a model before `shard`: the CPU under FSDP (each layer moves to the device as its
        shards are made, so no device ever holds a full copy), else the training device."""
        return torch.device("cpu") if self.sharded else self.device

    def check_cpu_offload(self, requested: bool) -> None:
        """Refuse `distributed.cpu_offload` where FSDP cannot offload: without torchrun or without a GPU."""
        if requested and not (self.sharded and self.device.type == "cuda"):
            from tinyrl.config import ConfigError

            raise ConfigError(
                "distributed.cpu_offload: offloading keeps FSDP's shards in CPU memory for GPU training; it needs "
                f"CUDA GPUs and a torchrun launch (even --nproc_per_node=1), and this process has {self}"
            )

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device})"

    # ------------------------------------------------------------------ agreement between ranks
    def sum(self, value: float) -> float:
        """The sum of `value` over ranks (float64, so integer counts stay exact)."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: float, op) -> float:
        value = float(value)
        if not self.sharded:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.group)
        return float(tensor.item())

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (any picklable value), in rank order."""
        if not self.sharded:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the run directory rank 0 decided)."""
        if not self.sharded:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self, what: str, timeout_s: float | None = None) -> None:
        """Wait until every rank gets here; on a timeout, the error names the ranks that did not arrive."""
        if not self.sharded:
            return
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else self.timeout_s)
        try:
            dist.monitored_barrier(group=self.group, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank} of {self.size}: waiting for every rank to finish {what}: {err}") from err

    def share(self, count: int) -> range:
        """This rank's contiguous share of `count` items (shares differ in size by at most one)."""
        return range(self.rank * count // self.size, (self.rank + 1) * count // self.size)

    # ------------------------------------------------------------------ the trainer's points of agreement
    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. a stop signal one rank received)."""
        return self.max(bool(flag)) > 0

    def mean(self, total: float, count: float) -> float:
        """sum(total) / sum(count) over ranks (count at least 1): e.g. a per-token mean over every rank's tokens."""
        count = self.sum(count)
        return self.sum(total) / max(count, 1.0)

    def concat(self, part: Any) -> Any:
        """Every rank's `part` joined in rank order with `+` (lists, `EvalSamples`): what one process would have."""
        parts = self.all_gather(part)
        joined = parts[0]
        for other in parts[1:]:
            joined = joined + other
        return joined

    def reduce_metrics(self, sums: Mapping[str, float], maxima: Mapping[str, float] | None = None,
                       minima: Mapping[str, float] | None = None) -> dict[str, float]:
        """One metrics dict for all ranks: `sums` added up, `maxima` the largest, `minima` the smallest (a key may
        be missing on some ranks)."""
        out: dict[str, float] = {}
        for rank_sums, rank_maxima, rank_minima in self.all_gather((sums, maxima or {}, minima or {})):
            for key, value in rank_sums.items():
                out[key] = out.get(key, 0.0) + value
            for key, value in rank_maxima.items():
                out[key] = max(out.get(key, value), value)
            for key, value in rank_minima.items():
                out[key] = min(out.get(key, value), value)
        return out

    def claim(self, need: int) -> tuple[int, int]:
        """Ranks draw from one sequence together, each `need` items (its own number): returns how many all ranks
        draw, and where this rank's contiguous block starts among them (rank order)."""
        needs = self.all_gather(need)
        return sum(needs), sum(needs[: self.rank])

    def positions(self, counts: Sequence[int]) -> list[int]:
        """Number every rank's items in the order one process would have them: batch by batch (`counts[b]` items
        of this rank in batch b; every rank has as many batches), rank by rank within a batch. Returns the
        numbers of this rank's items."""
        by_rank = self.all_gather(list(counts))
        mine, first = [], 0
        for batch in range(len(counts)):
            for rank, rank_counts in enumerate(by_rank):
                if rank == self.rank:
                    mine.extend(range(first, first + rank_counts[batch]))
                first += rank_counts[batch]
        return mine

    def over_all_rows(self, fn: Callable[..., tuple], *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """`fn` of every rank's rows together, and this rank's rows of what it returns.

        Each argument is this rank's `[rows]` or `[rows, width]` tensor (or None, passed as None); the ranks' rows
        are stacked in rank order, 2-D ones padded with zero columns to the widest rank's. Each `[rows, width]`
        tensor `fn` returns is cut back to this rank's rows and width. So estimators that normalise over the
        batch (GAE's whitening, REINFORCE++) give what one process would.
        """
        parts = self.all_gather(tensors)
        width = max(t.shape[1] for part in parts for t in part if t is not None and t.dim() == 2)
        joined = [None if parts[0][i] is None else torch.cat([_pad_columns(part[i], width) for part in parts])
                  for i in range(len(tensors))]
        first = sum(part[0].shape[0] for part in parts[: self.rank])
        rows = slice(first, first + tensors[0].shape[0])
        own_width = max(t.shape[1] for t in tensors if t is not None and t.dim() == 2)
        return tuple(out[rows, :own_width].contiguous() for out in fn(*joined))

    def whole_batch(self, normalizer):
        """The loss divisor of a whole mini-batch from this rank's (`algorithms.LossNormalizer`): summed over ranks
        and divided by their number, because FSDP averages the ranks' gradients; the average is then exactly the
        gradient of the whole mini-batch's loss."""
        return dataclasses.replace(normalizer, value=self.sum(normalizer.value) / self.size)

    @contextlib.contextmanager
    def written_by_main(self, path: Path, write: Callable[[Path], None], what: str, use: str) -> Iterator[Path]:
        """A directory rank 0 writes (`write(path)`, doing `what`) for every rank to read inside the block (doing
        `use`); rank 0 removes it once every rank is done. `path` must be on a filesystem all ranks see."""
        import shutil

        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
            write(path)
        self.barrier(what)
        yield path
        self.barrier(use)
        if self.is_main:
            shutil.rmtree(path)

    def rng_states(self) -> list[dict]:
        """Every rank's random-number state (`tinyrl.checkpoint.capture_rng`), in rank order: for a checkpoint."""
        from tinyrl.checkpoint import capture_rng

        return self.all_gather(capture_rng())

    def restore_rng_states(self, by_rank: list[dict] | None, fallback: dict) -> None:
        """This rank's state from `rng_states()` of a checkpoint of as many ranks, else `fallback`."""
        from tinyrl.checkpoint import restore_rng

        restore_rng(by_rank[self.rank] if by_rank and len(by_rank) == self.size else fallback)

    def lockstep(self, items: Sequence) -> Iterator:
        """Each of `items`, then None until this rank has had as many turns as the rank with the most. Under FSDP
        every forward/backward pass is a collective, so a rank out of items runs a pass that changes nothing on
        each None."""
        for i in range(int(self.max(len(items)))):
            yield items[i] if i < len(items) else None

    # ------------------------------------------------------------------ models
    def shard(self, model, *, compute_dtype: torch.dtype = torch.float32, cpu_offload: bool = False):
        """FSDP2-shard `model` in place: `fully_shard` per decoder layer, then the root; returns it.

        On GPU with a 16-bit `compute_dtype`, layers compute in that dtype while the sharded master weights,
        the gradient reduction and the optimizer stay float32. `cpu_offload` keeps the shards of parameters,
        gradients and optimizer state in CPU memory (the optimizer steps there). A frozen model (the
        reference) is sharded the same way and simply has no gradients. Identity in a world of one process.
        """
        if model is None or not self.sharded:
            return model
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mixed = MixedPrecisionPolicy()
        if self.device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):
            mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(
                f"cannot shard {type(model).__name__}: it names no decoder layer class in _no_split_modules"
            )
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mixed, offload_policy=offload, reshard_after_forward=True)
        # The root (embeddings, final norm, head) stays gathered from forward to backward: it is used by both.
        fully_shard(model, mesh=self.mesh, mp_policy=mixed, offload_policy=offload, reshard_after_forward=False)
        check_sharded(model, self.size)
        return model

    @contextlib.contextmanager
    def gathered(self, *models) -> Iterator[None]:
        """Hold the full (unsharded) parameters of `models` on every rank for the duration of the block.

        Inside, forward passes need no collective, so ranks may run different numbers of them (sampling with
        different decode lengths, their own micro-batches). Costs one full copy per model in its compute
        dtype, freed on exit. No gradients inside. Does nothing for unsharded models.
        """
        from torch.distributed.fsdp import FSDPModule

        roots = [m for m in models if isinstance(m, FSDPModule)]
        units = [(unit, unit is root) for root in roots for unit in root.modules() if isinstance(unit, FSDPModule)]
        if not units:
            yield
            return
        for unit, _ in units:
            unit.unshard()
        for unit, _ in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            with torch.no_grad():
                yield
        finally:
            for unit, is_root in units:
                unit.set_reshard_after_forward(not is_root, recurse=False)  # as `shard` set them
                unit.reshard()

    def full_weights(self, model, dtype: torch.dtype | None = None,
                     only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(hf_name, full tensor)` for every entry of the model's state dict, gathered one tensor at a time.

        Every rank receives every tensor (for per-rank rollout engines' `load_weights`); names are Hugging
        Face names. A tensor shared under two names is yielded once, under the name that comes first (a tied
        `lm_head.weight` is left out: it is the embedding, and vLLM skips it too). `dtype` (e.g. the compute
        dtype) casts each shard before it is gathered, which halves the traffic from float32 master weights to
        bf16. `only(name)` false leaves a tensor out (e.g. all but LoRA's adapters). Must be consumed to the end
        on every rank, in step: each tensor is a collective. In a world of one
        the model's own tensors are yielded (no copy unless cast).

        It first waits for the device's queued work: the consumer (a vLLM engine thread, an NCCL sender) reads
        on streams of its own, which do not wait for the optimizer's kernels on this thread's stream.
        """
        from torch.distributed.tensor import DTensor

        from tinyrl.models import tied_aliases

        devices.synchronize(self.device)
        aliases = tied_aliases(model)
        for name, tensor in model.state_dict().items():
            if name in aliases or (only is not None and not only(name)):
                continue
            if isinstance(tensor, DTensor):
                local = tensor.to_local()
                if local.device.type != self.device.type:  # CPU-offloaded shards travel over the device's backend
                    local = local.to(self.device)
                if dtype is not None:
                    local = local.to(dtype)
                tensor = DTensor.from_local(local, tensor.device_mesh, tensor.placements, shape=tensor.shape,
                                            stride=tensor.stride()).full_tensor()
            elif dtype is not None:
                tensor = tensor.to(dtype)
            yield name, tensor.detach()

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The full weights on rank 0, in CPU memory (an empty dict on the other ranks); collective."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        run_dir: str | os.PathLike,
        step: int,
        models: Mapping[str, Any],
        optimizers: Mapping[str, tuple[Any, torch.optim.Optimizer]],
        tokenizer: Any,
        state: dict,
        keep_last: int,
        export: Callable[[str, Any, dict], Mapping[str, Any] | None] | None = None,
    ) -> Path:
        """Write one atomic checkpoint: the full Hugging Face weights of `models` (rank 0), every rank's shard
        of each optimizer's state (`optimizer/`, torch.distributed.checkpoint) and `state` (rank 0).

        `optimizers` maps a name to (model, optimizer). `export(name, model, full_weights)`, on rank 0, may
        return the directories to write for a model instead of its own (a name to an object with
        `save_pretrained`; LoRA writes a merged model and the adapter); None keeps the default. Collective: every
        rank calls it; returns the path.
        """
        from tinyrl.checkpoint import begin_checkpoint, commit_checkpoint

        weights = {name: self.full_state_dict(model) for name, model in models.items()}
        staging = self.broadcast(begin_checkpoint(run_dir, step) if self.is_main else None)
        try:
            self._save_optimizers(staging / OPTIMIZER_DIR, optimizers)
            path = None
            if self.is_main:
                savers = {}
                for name, model in models.items():
                    exported = export(name, model, weights[name]) if export is not None else None
                    savers.update(exported if exported is not None else {name: _WeightsOf(model, weights[name])})
                path = commit_checkpoint(run_dir, step, staging, savers, tokenizer, state, keep_last=keep_last)
        except BaseException:
            if self.is_main:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.broadcast(path)

    def _save_optimizers(self, path: Path, optimizers: Mapping[str, tuple[Any, torch.optim.Optimizer]]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in optimizers.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            dcp.save(state, checkpoint_id=str(path), process_group=self.group, no_dist=not self.sharded)

    def load_optimizers(self, checkpoint_dir: str | os.PathLike, optimizers: Mapping[str, tuple[Any, torch.optim.Optimizer]]) -> None:
        """Load each optimizer's state from a checkpoint's `optimizer/` into this rank's shard.

        The checkpoint may come from another world size: torch.distributed.checkpoint reshards on load.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        path = Path(checkpoint_dir) / OPTIMIZER_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {OPTIMIZER_DIR}/ directory")
        for _, opt in optimizers.values():
            _materialise_state(opt)
        state = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in optimizers.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            dcp.load(state, checkpoint_id=str(path), process_group=self.group, no_dist=not self.sharded)
        for name, (model, opt) in optimizers.items():
            set_optimizer_state_dict(model, opt, state[name])

    # ------------------------------------------------------------------ failures
    def mark(self, step: int, phase: str) -> None:
        """Post the phase this rank is entering, so a failure report elsewhere can say where it stopped."""
        self._phase = f"step {step}, phase {phase}"
        if self._store is not None:
            try:
                self._store.set(f"phase/{self.rank}", f"step {step}, phase {phase}")
            except Exception:  # the store went away with its host; failure reports say "unknown"
                self._store = None

    def last_phases(self) -> dict[int, str]:
        """The phase every other rank last posted (or "unknown")."""
        out = {}
        for rank in range(self.size):
            if rank == self.rank:
                continue
            try:
                out[rank] = self._store.get(f"phase/{rank}").decode() if self._store is not None else "unknown"
            except Exception:
                out[rank] = "unknown"
        return out

    def explain(self, err: BaseException) -> DistributedError:
        """`err`, restated with this rank and where the other ranks were."""
        others = "; ".join(f"rank {r}'s last phase: {where}" for r, where in self.last_phases().items())
        return DistributedError(
            f"rank {self.rank} of {self.size} failed (its last phase: {self._phase}): {type(err).__name__}: {err}. "
            f"Other ranks: {others}. A rank "
            f"that exits, crashes or waits more than distributed.timeout_s={self.timeout_s:g} s at a collective "
            f"stops the others; the first error in the ranks' output is the cause."
        )

    @contextlib.contextmanager
    def reporting_failures(self) -> Iterator[None]:
        """Restate any error leaving the block with this rank and the other ranks' last phases."""
        try:
            yield
        except (DistributedError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            if self.size == 1:
                raise
            raise self.explain(err) from err


class _WeightsOf:
    """A model's `save_pretrained` with given full weights (a sharded model cannot save its own tensors)."""

    def __init__(self, model, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.weights = model, weights

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, state_dict=self.weights, **kwargs)


def _materialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (one step with zero gradients at lr 0) so a checkpoint has
    something to load into; the loaded values then replace them."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zero columns appended up to `width` (1-D tensors are returned as they are)."""
    if tensor.dim() == 1 or tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


def check_sharded(model, size: int) -> None:
    """Raise unless every parameter of `model` is a DTensor sharded over `size` ranks (no silent fallback)."""
    from torch.distributed.tensor import DTensor, Shard

    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            raise RuntimeError(f"FSDP did not shard {name}: it is a plain {type(param).__name__}")
        if param.device_mesh.size() != size or not all(isinstance(p, Shard) for p in param.placements):
            raise RuntimeError(
                f"FSDP sharded {name} as {param.placements} over {param.device_mesh.size()} ranks, expected "
                f"Shard over {size}"
            )


def _rank_device(name: str, local_rank: int, size: int) -> torch.device:
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if name == "cuda":
            raise ValueError("device=cuda: no CUDA device is visible to this process")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and size > 1:
        raise ValueError(
            f"device={name} names one GPU but torchrun started {size} ranks; use device=auto (rank r takes "
            f"cuda:LOCAL_RANK)"
        )
    return device


def _phase_store(timeout: datetime.timedelta):
    """A client of torchrun's rendezvous store, where ranks post their phases (None when unreachable)."""
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout,
            wait_for_workers=False,
        )
        return dist.PrefixStore("tinyrl", store)
    except Exception as err:  # reports then say "unknown"; training is unaffected
        log.warning("failure reports will not name other ranks' phases: %s", err)
        return None


def shutdown_world() -> None:
    """Leave torchrun's process group after a run that ended normally. gloo's worker threads must stop while the
    interpreter is still alive: left to interpreter exit, they can abort the process ("terminate called without an
    active exception", exit -6) after the run's work is done. A later `init_world` joins again."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def end_rank_process() -> None:
    """End a torchrun rank's process after its run ended normally and `shutdown_world` ran: what interpreter exit
    would do that matters (waiting for non-daemon threads, atexit handlers: logging, multiprocessing children,
    temporary files; flushing the standard streams), then `os._exit(0)` without interpreter finalization. Nothing
    happens outside torchrun.

    Why: FSDP2 keeps the gloo process group its mesh uses alive in C++ past `destroy_process_group` and `gc.collect`,
    so that group's worker threads still run at exit. A worker that drops the last reference to a finished
    collective's tensor whose Python object is already gone must take the GIL to free it; once the interpreter is
    finalizing, taking the GIL ends the thread inside a C++ destructor, and the process aborts ("terminate called
    without an active exception", exit -6) after the run's work is done and saved. It needs the worker to be
    descheduled for that instant, so it is rare and load-dependent (a core dump of one shows the worker in
    `~AsyncBroadcastWork` -> `take_gil` -> `pthread_exit` while the main thread is in `Py_FinalizeEx`)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def process_group_backend(device_type: str) -> str:
    """The default process group's backends: NCCL for CUDA tensors and gloo for CPU tensors on a GPU run.

    CPU tensors take part in collectives there too: with `distributed.cpu_offload` the sharded gradients live in
    CPU memory, and the gradient norm that `clip_grad_norm_` computes over their DTensors is all-reduced where
    they are; a group with NCCL alone fails that ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_world(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """The world of this process: torchrun's process group when launched by torchrun, else one process.

    Under torchrun it joins the process group once (`process_group_backend`; every collective times out after
    `timeout_s`), checks that the group has the size torchrun announced, and pins this rank's GPU. A single
    process on a GPU makes its device the current one too. Later calls return the same world.
    """
    global _WORLD
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        target = resolve_device(device)
        devices.use_device(target)  # `device=cuda:1` (the server layout's trainer): current in this thread too
        return World(device=target)
    if _WORLD is not None:
        return _WORLD
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _rank_device(device, local_rank, size)
    timeout = datetime.timedelta(seconds=timeout_s)
    devices.use_device(target)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(target.type), timeout=timeout)
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise RuntimeError(
            f"torchrun announced rank {rank} of {size}, but the process group has rank {dist.get_rank()} of "
            f"{dist.get_world_size()}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    group = dist.new_group(backend="gloo", timeout=timeout)
    mesh = init_device_mesh(target.type, (size,))
    _WORLD = World(rank, size, local_rank, target, group=group, mesh=mesh, store=_phase_store(timeout),
                   timeout_s=timeout_s)
    return _WORLD
