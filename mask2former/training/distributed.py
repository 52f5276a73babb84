"""Devices, precision, strategy and the launch of one process per device.

Plan (:func:`plan_devices`):

* GPUs present: ``train.num_gpus`` processes per node on ``train.gpu_ids`` (``NUM_GPU_PER_NODE`` overrides
  the count, as orchestrators set it); ``train.num_nodes`` nodes, or ``WORLD_SIZE / processes per node``
  when the orchestrator sets ``WORLD_SIZE`` (total processes, the torch.distributed meaning).
* CPU only: the same number of CPU processes (DDP over gloo); fp16 and FSDP need CUDA and are refused.
* More than one process in all: strategy ``train.distributed_strategy`` (ddp | fsdp).

Launch (:class:`LocalWorkers`): the process that runs the train action is local rank 0; it starts the other
local ranks as ``python -m mask2former.training.worker`` processes (never the CLI again, so they write no
status lines and need no results-folder bookkeeping) with ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, then Lightning joins them into one process group. When the
orchestrator already started one process per device (``LOCAL_RANK`` set, e.g. torchrun), nothing is started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import _thread
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Union

from .errors import TrainingSetupError

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
ENV_KEYS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_MODULE = "mask2former.training.worker"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """What Lightning's Trainer gets: accelerator, devices, num_nodes, strategy, precision."""

    accelerator: str                 # "gpu" | "cpu"
    devices: Union[int, List[int]]   # GPU indices, or a number of CPU processes
    processes_per_node: int
    num_nodes: int
    strategy: str                    # "auto" | "ddp" | "fsdp"
    precision: str                   # Lightning precision string

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.num_nodes

    def describe(self) -> str:
        where = f"GPUs {self.devices}" if self.accelerator == "gpu" else \
            f"{self.processes_per_node} CPU process{'es' if self.processes_per_node > 1 else ''}"
        nodes = f" on each of {self.num_nodes} nodes" if self.num_nodes > 1 else ""
        return f"{where}{nodes}, strategy {self.strategy}, precision {self.precision}"


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise TrainingSetupError(f"Environment variable {name}={raw!r} is not an integer.") from None
    if value < 1:
        raise TrainingSetupError(f"Environment variable {name}={raw!r} must be >= 1.")
    return value


def plan_devices(train_cfg: Any, *, cuda_devices: int, env: Mapping[str, str]) -> DevicePlan:
    """Devices, nodes, strategy and precision of a run; TrainingSetupError for what this machine cannot do."""
    per_node = _env_int(env, "NUM_GPU_PER_NODE") or train_cfg.num_gpus
    if cuda_devices > 0:
        ids = list(train_cfg.gpu_ids[:per_node]) if len(train_cfg.gpu_ids) >= per_node else list(range(per_node))
        absent = [i for i in ids if i >= cuda_devices]
        if absent:
            raise TrainingSetupError(f"train.gpu_ids {ids} names GPU(s) {absent}, but this machine has "
                                     f"{cuda_devices} CUDA GPU(s) (indices 0..{cuda_devices - 1}).")
        accelerator, devices = "gpu", ids
    else:
        if train_cfg.precision == "fp16":
            raise TrainingSetupError("train.precision fp16 needs a CUDA GPU (fp16 autocast is not supported on "
                                     "the CPU); this machine has none: use bf16 or fp32.")
        accelerator, devices = "cpu", per_node
    world_size = _env_int(env, "WORLD_SIZE")
    num_nodes = train_cfg.num_nodes
    if world_size is not None:
        if world_size % per_node:
            raise TrainingSetupError(f"WORLD_SIZE={world_size} (total processes) is not a multiple of the "
                                     f"{per_node} processes per node (NUM_GPU_PER_NODE / train.num_gpus).")
        num_nodes = world_size // per_node
    total = per_node * num_nodes
    strategy = "auto"
    if total > 1:
        strategy = train_cfg.distributed_strategy
        if strategy == "fsdp" and accelerator != "gpu":
            raise TrainingSetupError("train.distributed_strategy fsdp needs CUDA GPUs; this machine has none "
                                     "(use ddp, which runs over CPU processes too).")
    if num_nodes > 1 and not env.get("MASTER_ADDR"):
        raise TrainingSetupError(f"Training on {num_nodes} nodes needs MASTER_ADDR and MASTER_PORT (the address "
                                 "of node 0) and NODE_RANK in the environment; MASTER_ADDR is not set.")
    return DevicePlan(accelerator=accelerator, devices=devices, processes_per_node=per_node, num_nodes=num_nodes,
                      strategy=strategy, precision=PRECISIONS[train_cfg.precision])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_launched_externally(env: Mapping[str, str]) -> bool:
    """True when an outside launcher (torchrun, a pod per device) started this process as one rank."""
    return "LOCAL_RANK" in env


def global_rank(env: Mapping[str, str], plan: DevicePlan) -> int:
    return int(env.get("NODE_RANK", 0)) * plan.processes_per_node + int(env.get("LOCAL_RANK", 0))


def _let_python_handle_sigint() -> Any:
    """Install Python's KeyboardInterrupt handler for SIGINT where it is ignored or left to the OS; returns the
    disposition it replaced (None when Python handled SIGINT already, or off the main thread, where handlers
    cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGINT)
    if current not in (signal.SIG_IGN, signal.SIG_DFL):
        return None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return current


class WorkerFailed(RuntimeError):
    """A local worker process ended with a non-zero exit code."""


@dataclass
class LocalWorkers:
    """Starts local ranks 1..n-1 of this node for the duration of a ``with`` block (see the module docstring).

    The environment of this process gets the rendezvous variables while the block runs and is restored
    afterwards. If a worker dies, the others are stopped and the main thread is interrupted; leaving the
    block with an error stops the workers; a normal exit waits for them and raises :class:`WorkerFailed`
    when one failed.

    The interrupt is a simulated SIGINT (``_thread.interrupt_main``), which does nothing where SIGINT is
    ignored: Airflow's LocalExecutor workers ignore it and the task's processes inherit that, as does any
    command started with ``&`` from a script. While the block runs, SIGINT therefore raises KeyboardInterrupt
    in this process whatever it inherited; the inherited disposition is restored afterwards.
    """

    plan: DevicePlan
    spec_path: Path
    results_dir: Path
    env: MutableMapping[str, str] = field(default_factory=lambda: os.environ)
    wait_timeout_s: float = 300.0
    worker_args: Sequence[str] = ()  # more arguments of the worker command (see mask2former.training.worker)
    procs: List[subprocess.Popen] = field(default_factory=list)
    failure: Optional[str] = None
    _saved_env: Dict[str, Optional[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: Optional[threading.Thread] = None
    _active: bool = False
    _inherited_sigint: Any = None

    @property
    def needed(self) -> bool:
        return self.plan.world_size > 1 and not is_launched_externally(self.env)

    def __enter__(self) -> "LocalWorkers":
        if not self.needed:
            return self
        self._active = True
        self._saved_env = {key: self.env.get(key) for key in ENV_KEYS}
        self.env.setdefault("MASTER_ADDR", "127.0.0.1")
        self.env.setdefault("MASTER_PORT", str(free_port()))
        self.env.setdefault("NODE_RANK", "0")
        self.env["WORLD_SIZE"] = str(self.plan.world_size)
        self.env["LOCAL_RANK"] = "0"
        for local_rank in range(1, self.plan.processes_per_node):
            child_env = dict(self.env, LOCAL_RANK=str(local_rank))
            command = [sys.executable, "-m", WORKER_MODULE, "--spec", str(self.spec_path),
                       "--results-dir", str(self.results_dir), *self.worker_args]
            self.procs.append(subprocess.Popen(command, env=child_env))
        log.info("Started %d local worker process(es) for %s (rendezvous %s:%s)", len(self.procs),
                 self.plan.describe(), self.env["MASTER_ADDR"], self.env["MASTER_PORT"])
        self._inherited_sigint = _let_python_handle_sigint()
        self._watcher = threading.Thread(target=self._watch, name="train-workers", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for local_rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    self.failure = f"training worker (local rank {local_rank}) exited with code {code}"
                    log.error("%s; stopping the other workers", self.failure)
                    self._terminate()
                    _thread.interrupt_main()
                    return

    def _terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._active:
            return
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        try:
            if exc_type is not None:
                self._terminate()
                return
            for local_rank, proc in enumerate(self.procs, start=1):
                try:
                    code = proc.wait(timeout=self.wait_timeout_s)
                except subprocess.TimeoutExpired:
                    self._terminate()
                    raise WorkerFailed(f"training worker (local rank {local_rank}) did not exit within "
                                       f"{self.wait_timeout_s:.0f} s after training") from None
                if code != 0:
                    raise WorkerFailed(f"training worker (local rank {local_rank}) exited with code {code}")
        finally:
            self._active = False
            if self._inherited_sigint is not None:
                signal.signal(signal.SIGINT, self._inherited_sigint)
                self._inherited_sigint = None
            for key, value in self._saved_env.items():
                if value is None:
                    self.env.pop(key, None)
                else:
                    self.env[key] = value
