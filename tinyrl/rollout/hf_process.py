"""The transformers engine in a process of its own (`rollout.engine=hf rollout.layout=server`).

The trainer submits generations and weight loads; a worker process runs them one after another, in the order they
were sent, so a generation is sampled by exactly the weights loaded before it was submitted, however long either
side takes. Meanwhile the trainer process is free to update: this is what lets `trainer.max_staleness` overlap
sampling with training on one machine without vLLM.

Messages cross a pipe as plain pickles: the model is copied into the worker once at start (never shared memory, so
the trainer's in-place updates cannot reach the sampler), and each weight load is one `torch.save` of the full
state. A background thread writes to the pipe, so `submit` and `load_weights` return while the worker is still
busy with an earlier generation. The worker ends when told to, on an error (it reports the error first), or when
the trainer's end of the pipe closes (the trainer died).
"""

from __future__ import annotations

import io
import math
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Sequence

from tinyrl.rollout.base import Completion, EngineFailed, PendingGeneration, RolloutEngine, SamplingConfig

POLL_S = 0.2  # how often a waiting trainer checks that the worker is still alive


class HFProcessEngine(RolloutEngine):
    """`HFEngine` run in a spawned worker process; generations overlap whatever the trainer does meanwhile."""

    shares_policy_weights = False
    environment_feedback = False  # the task's environment lives in the trainer's process

    def __init__(self, model, tokenizer, batch_size: int = 512, threads: int | None = None,
                 timeout_s: float = 1800.0, start_timeout_s: float = 600.0):
        """`threads`: torch threads in the worker (default: the trainer's count at start); `timeout_s`: how long to
        wait for a generation called through `generate`; `start_timeout_s`: for the worker to start (a fresh
        interpreter importing torch: seconds on an idle machine, more on a loaded one)."""
        import torch

        self.timeout_s = timeout_s
        # a fresh interpreter (not multiprocessing's spawn, which re-runs the caller's main module), talking over a
        # socket pair
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen([sys.executable, "-m", "tinyrl.rollout.hf_process", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        # plain pickle copies the tensors; torch's multiprocessing pickler would move the trainer's weights into
        # shared memory and let every update leak into the sampler
        self._conn.send_bytes(pickle.dumps((model, tokenizer, batch_size, threads or torch.get_num_threads())))
        self._outbox: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="tinyrl-rollout-sender", daemon=True)
        self._sender.start()
        self._results: dict[int, tuple] = {}
        self._submitted = 0
        self._failure: str | None = None
        self._await(lambda: "ready" in self._results, start_timeout_s, "starting the rollout engine process")

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ------------------------------------------------------------------ the RolloutEngine interface
    def submit(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> PendingGeneration:
        if sampling.feedback is not None:
            raise ValueError("the transformers engine in its own process cannot write the task's environment into "
                             "completions; use rollout.layout=colocated")
        self._check_alive("submitting a generation")
        ticket = self._submitted
        self._submitted += 1
        self._outbox.put(("generate", ticket, [list(p) for p in prompt_token_ids], sampling))
        pending = PendingGeneration(lambda timeout_s: self._collect(ticket, timeout_s, pending))
        return pending

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        return self.submit(prompt_token_ids, sampling).result(self.timeout_s)

    def load_weights(self, named_tensors) -> None:
        """Queue a load of these weights; every generation submitted afterwards is sampled by them."""
        import torch

        self._check_alive("loading weights")
        buffer = io.BytesIO()
        torch.save({name: tensor.detach().cpu() for name, tensor in named_tensors}, buffer)
        self._outbox.put(("load", buffer.getvalue()))

    def close(self) -> None:
        if self._process.poll() is None:
            self._outbox.put(("close",))
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._outbox.put(None)
        self._sender.join(timeout=10)
        self._conn.close()

    # ------------------------------------------------------------------ plumbing
    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the worker is gone; the waiting side reports it
                return

    def _collect(self, ticket: int, timeout_s: float, pending: PendingGeneration) -> list[Completion]:
        self._await(lambda: ticket in self._results, timeout_s, "rollout generation")
        completions, idle_s, loads = self._results.pop(ticket)
        pending.engine_idle_s, pending.weight_loads = idle_s, loads
        return completions

    def _await(self, ready, timeout_s: float, what: str) -> None:
        """Read the worker's messages until `ready()`; raise one clear error if it fails, dies or overruns."""
        deadline = time.monotonic() + timeout_s if math.isfinite(timeout_s) else math.inf
        while not ready():
            if self._failure is not None:
                raise EngineFailed(f"the rollout engine process failed: {self._failure}")
            left = deadline - time.monotonic()
            if left <= 0:
                limit = "" if what.startswith("starting") else " (rollout.timeout_s)"
                raise EngineFailed(f"{what} did not finish within {timeout_s:g} s{limit}; the rollout engine process "
                                   f"(pid {self.pid}) is hung or too slow")
            if self._conn.poll(min(POLL_S, left)):
                try:
                    self._receive(self._conn.recv())
                except (EOFError, OSError):
                    self._failure = f"it exited (code {self._exit_code()}) during {what}"
            elif self._process.poll() is not None:
                self._failure = f"it exited (code {self._process.returncode}) during {what}"

    def _receive(self, message: tuple) -> None:
        if message[0] == "ready":
            self._results["ready"] = ()
        elif message[0] == "done":
            _, ticket, completions, idle_s, loads = message
            self._results[ticket] = (completions, idle_s, loads)
        else:
            self._failure = message[1]

    def _check_alive(self, what: str) -> None:
        if self._failure is not None:
            raise EngineFailed(f"the rollout engine process failed: {self._failure}")
        if self._process.poll() is not None:
            raise EngineFailed(f"the rollout engine process exited (code {self._process.returncode}) before {what}")

    def _exit_code(self) -> int | None:
        try:
            return self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None


def _serve(conn: Connection) -> None:
    """The worker: generate and load weights in the order the trainer sent them, until told to close or the
    trainer's end of the pipe closes. Each result carries the seconds the worker sat waiting since its previous
    generation (for weights, or for the next batch) and how many weight loads it has applied."""
    import signal

    import torch

    from tinyrl.rollout.hf import HFEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it checkpoints, then closes this worker
    try:
        model, tokenizer, batch_size, threads = pickle.loads(conn.recv_bytes())
        torch.set_num_threads(threads)
        engine = HFEngine(model, tokenizer, batch_size=batch_size)
    except Exception:
        conn.send(("error", f"could not start: {traceback.format_exc().strip().splitlines()[-1]}"))
        return
    conn.send(("ready",))
    loads, idle_s = 0, 0.0
    while True:
        waiting_since = time.perf_counter()
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        idle_s += time.perf_counter() - waiting_since
        try:
            if message[0] == "close":
                return
            if message[0] == "load":
                engine.load_weights(torch.load(io.BytesIO(message[1]), weights_only=True).items())
                loads += 1
            elif message[0] == "generate":
                _, ticket, prompts, sampling = message
                completions = engine.generate(prompts, sampling)
                conn.send(("done", ticket, completions, idle_s, loads))
                idle_s = 0.0
        except (BrokenPipeError, ConnectionResetError):
            return  # the trainer is gone
        except Exception:
            conn.send(("error", f"{message[0]} raised {traceback.format_exc().strip().splitlines()[-1]}"))
            return


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
