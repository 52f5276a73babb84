"""Looking for a secret where it must not be: text, files, and the command lines of a running process tree.

A secret counts as leaked when any ``width``-character piece of it shows (so a truncated or partly masked
copy is caught too). Reusable by any test: the engine's CLI runs, task logs, XCom values.

    watcher = CommandLineWatcher(proc.pid); watcher.start(); ...; watcher.stop()
    assert not leaks(watcher.text(), KEY)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple, Union

Data = Union[str, bytes]


def secret_pieces(secret: str, width: int = 8) -> Set[str]:
    """Every ``width``-character piece of ``secret`` (the whole secret when it is shorter)."""
    if len(secret) <= width:
        return {secret}
    return {secret[i:i + width] for i in range(len(secret) - width + 1)}


def leaks(data: Data, *secrets: str, width: int = 8) -> List[str]:
    """The pieces of ``secrets`` found in ``data`` (text, or bytes searched as UTF-8)."""
    found = []
    for secret in secrets:
        for piece in sorted(secret_pieces(secret, width)):
            if (piece.encode() in data) if isinstance(data, bytes) else (piece in data):
                found.append(piece)
    return found


def file_leaks(root: Union[str, Path], *secrets: str, width: int = 8) -> Dict[str, List[str]]:
    """{path: pieces} for every file under ``root`` (hidden ones included) that shows a piece of a secret."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            found = leaks(path.read_bytes(), *secrets, width=width)
            if found:
                out[str(path)] = found
    return out


def _children(pid: int) -> List[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children, or every /proc/*/stat as a fallback)."""
    kids: List[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            try:
                kids += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
        return kids
    except OSError:
        return []


def process_tree(pid: int) -> List[int]:
    """``pid`` and all its descendants alive now."""
    seen, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += _children(current)
    return seen


def command_line(pid: int) -> str:
    """/proc/<pid>/cmdline as one string (arguments joined by spaces); '' once the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class CommandLineWatcher:
    """Samples the command lines of a process and all its descendants until stopped (a background thread)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        # every (pid, command line) read: a child's line changes at exec (a fork shows its parent's line first)
        self.seen: Dict[Tuple[int, str], None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "CommandLineWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(self.pid):
                line = command_line(pid)
                if line:
                    self.seen.setdefault((pid, line), None)
            time.sleep(self.interval_s)

    def lines(self) -> List[str]:
        return [line for _, line in self.seen]

    def text(self) -> str:
        return "\n".join(self.lines())

    def matching(self, fragment: str) -> List[str]:
        return [line for line in self.lines() if fragment in line]


__all__ = ["CommandLineWatcher", "command_line", "file_leaks", "leaks", "process_tree",
           "secret_pieces"]
