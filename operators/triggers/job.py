"""Mask2FormerJobTrigger: a deferred task follows its detached job (a pod or a local process) through storage.

Every ``check_interval`` seconds it reads, through the storage hook, the job folder's new status.json lines
(logged into the task's log), its ``_HEARTBEAT`` and ``_FINISHED``. It fires once:

* ``success`` / ``failure``: status.json ends with SUCCESS / FAILURE and the folder is published;
* ``error``: the job stopped beating for ``stale_after`` seconds (its process or pod died), never beat
  within ``startup_timeout`` of its launch, or ran past its ``deadline`` (a stop is requested first).

Only storage is used, so the triggerer may run on another machine than the job, and a restarted triggerer
re-attaches from the serialized arguments. When a user kills the task (mark failed, clear), :meth:`on_kill`
writes a stop request into the job folder (and deletes the pod), which the job process obeys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Dict, Optional, Tuple

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from mask2former import results

from ..hooks.storage import Mask2FormerStorageHook

FINAL_STATUSES = ("SUCCESS", "FAILURE")


class Mask2FormerJobTrigger(BaseTrigger):
    """Fires when a detached Mask2Former job ends (see the module docstring).

    :param job_uri: the job's published folder (local path or ``s3://``).
    :param aws_conn_id: connection of the storage hook.
    :param check_interval: seconds between polls.
    :param started_at: POSIX time of the launch.
    :param startup_timeout: seconds the job may take to send its first heartbeat (a pod being scheduled).
    :param stale_after: seconds without a heartbeat after which the job counts as dead.
    :param deadline: POSIX time after which the job is stopped and the task fails (``job_timeout``).
    :param pod: ``{"name", "namespace", "kubernetes_conn_id"}`` of the job's pod, deleted when the task is killed.
    """

    def __init__(self, *, job_uri: str, aws_conn_id: Optional[str], check_interval: float, started_at: float,
                 startup_timeout: float, stale_after: float, deadline: Optional[float] = None,
                 pod: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self.job_uri = job_uri
        self.aws_conn_id = aws_conn_id
        self.check_interval = check_interval
        self.started_at = started_at
        self.startup_timeout = startup_timeout
        self.stale_after = stale_after
        self.deadline = deadline
        self.pod = pod
        self._last_line: Dict[str, Any] = {}

    def serialize(self) -> Tuple[str, Dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            "job_uri": self.job_uri, "aws_conn_id": self.aws_conn_id, "check_interval": self.check_interval,
            "started_at": self.started_at, "startup_timeout": self.startup_timeout, "stale_after": self.stale_after,
            "deadline": self.deadline, "pod": self.pod}

    def hook(self) -> Mask2FormerStorageHook:
        return Mask2FormerStorageHook(aws_conn_id=self.aws_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self.hook()
        offset, first = 0, True
        while True:
            lines, offset = await sync_to_async(hook.read_status)(self.job_uri, offset)
            if first and len(lines) > 1:
                self.log.info("following job %s: %d status line(s) so far", self.job_uri, len(lines))
                lines = lines[-1:]
            elif first:
                self.log.info("following job %s", self.job_uri)
            first = False
            for line in lines:
                self.log.info(results.describe_status(line))
            event = await self._check(hook, lines)
            if event is not None:
                yield TriggerEvent(event)
                return
            await asyncio.sleep(self.check_interval)

    async def _check(self, hook: Mask2FormerStorageHook, lines: list) -> Optional[Dict[str, Any]]:
        if lines:
            self._last_line = lines[-1]
        last = self._last_line
        if last.get("status") in FINAL_STATUSES and await sync_to_async(hook.is_finished)(self.job_uri):
            return {"status": last["status"].lower(), "job_uri": self.job_uri, "message": last.get("message", "")}
        now = time.time()
        if self.deadline is not None and now > self.deadline:
            await sync_to_async(hook.request_stop)(self.job_uri, "the job ran past its job_timeout")
            await self._delete_pod()
            return self._error(f"the job ran longer than its job_timeout and was asked to stop "
                               f"({now - self.started_at:.0f} s since its launch)")
        record = await sync_to_async(hook.last_beat)(self.job_uri)
        beat = record["time"] if record else None
        if beat is None or beat < self.started_at:
            if now - self.started_at > self.startup_timeout:
                return self._error(f"the job sent no heartbeat within {self.startup_timeout:.0f} s of its launch "
                                   "(a pod that cannot be scheduled or pulled, or a process that could not start)")
        elif now - beat > self.stale_after:
            return self._error(f"the job's last heartbeat is {now - beat:.0f} s old: its process or pod died "
                               "(its folder keeps the checkpoints written so far; a retry resumes from them)")
        return None

    def _error(self, message: str) -> Dict[str, Any]:
        return {"status": "error", "job_uri": self.job_uri, "message": message}

    async def on_kill(self) -> None:
        """The user killed the task: ask the job to stop through its folder (and delete its pod)."""
        await sync_to_async(self.hook().request_stop)(self.job_uri, "the Airflow task was stopped by a user")
        self.log.info("asked job %s to stop", self.job_uri)
        await self._delete_pod()

    async def _delete_pod(self) -> None:
        if not self.pod:
            return
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        hook = AsyncKubernetesHook(conn_id=self.pod["kubernetes_conn_id"])
        await hook.delete_pod(name=self.pod["name"], namespace=self.pod["namespace"])
