"""The launch of local worker ranks: rendezvous environment, failure of a worker, environment restored."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mask2former.training.distributed import DevicePlan, LocalWorkers


def _plan(processes: int) -> DevicePlan:
    return DevicePlan(accelerator="cpu", devices=processes, processes_per_node=processes, num_nodes=1,
                      strategy="ddp" if processes > 1 else "auto", precision="32-true")


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL],
                         ids=["python-handler", "ignored", "os-default"])
def test_a_failing_worker_interrupts_the_main_process_and_names_the_rank(tmp_path, inherited):
    """Also where this process inherited SIGINT ignored (an Airflow LocalExecutor task, a command started with
    ``&``), on which the simulated SIGINT of the interrupt would otherwise do nothing."""
    previous = signal.signal(signal.SIGINT, inherited)
    try:
        _fail_a_worker(tmp_path)
        assert signal.getsignal(signal.SIGINT) is inherited
    finally:
        signal.signal(signal.SIGINT, previous)


def _fail_a_worker(tmp_path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.getcwd()}
    workers = LocalWorkers(plan=_plan(2), spec_path=tmp_path / "missing-spec.yaml", results_dir=tmp_path, env=env)
    with pytest.raises(KeyboardInterrupt):
        with workers:
            assert env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
            assert int(env["MASTER_PORT"]) > 0 and len(workers.procs) == 1
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the worker cannot read its spec and exits with code 1
                time.sleep(0.1)
    assert workers.failure == "training worker (local rank 1) exited with code 1"
    assert all(proc.poll() is not None for proc in workers.procs)
    assert set(env) == {"PATH", "PYTHONPATH"}  # rendezvous variables removed again


def test_nothing_is_started_for_one_process_or_an_external_launcher(tmp_path):
    env = {}
    with LocalWorkers(plan=_plan(1), spec_path=tmp_path / "s.yaml", results_dir=tmp_path, env=env) as workers:
        assert not workers.procs and env == {}
    env = {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}  # e.g. torchrun started every rank
    with LocalWorkers(plan=_plan(2), spec_path=tmp_path / "s.yaml", results_dir=tmp_path, env=env) as workers:
        assert not workers.procs and env == {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}
