"""Optuna studies shared by parallel workers: samplers, pruners, storage, retries.

* ``bayesian``: TPE (``constant_liar`` so parallel workers do not all propose the same point);
  ``random``: uniform random sampling; ``hyperband``: TPE proposals with Optuna's HyperbandPruner
  over epochs (resource = epoch, from 1 to ``max_epochs``, ``reduction_factor``), fed the validation
  mIoU after each validation.
* Storage: SQLite in the search folder on one machine (WAL journal and a long busy timeout, so
  parallel workers wait for the lock instead of failing, plus retries around each study call),
  PostgreSQL (or any SQLAlchemy URL) when workers run on several machines.
* Optuna's heartbeat: a running trial beats every ``HEARTBEAT_INTERVAL_S``; one silent for
  ``HEARTBEAT_GRACE_S`` (its worker was killed) is failed by the next :func:`optuna.storages.fail_stale_trials`
  and queued again once (``RetryHeartbeatStaleTrialCallback``, formerly ``RetryFailedTrialCallback``), so no
  trial stays RUNNING without an owner.

The monitoring metric is mIoU, maximised.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import optuna

from .policy import AutoMLConfigError

ALGORITHMS = ("bayesian", "hyperband", "random")
MONITOR_METRIC = "mIoU"
DIRECTION = "maximize"
SQLITE_FILE = "study.db"
#: Seconds a SQLite connection waits for another worker's lock before it reports "database is locked".
SQLITE_BUSY_TIMEOUT_S = 120
#: Attempts of one study call when the database is busy or a connection dropped.
STORAGE_ATTEMPTS = 8
#: Seconds between a running trial's heartbeats, and of silence after which its trial counts as orphaned.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60
#: Times a trial whose worker died is run again.
STALE_TRIAL_RETRIES = 1

T = TypeVar("T")


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise AutoMLConfigError(f"automl algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
    return algorithm


def startup_trials(max_recommendations: int) -> int:
    """Random trials before TPE models the results: half the budget, at least 2, at most 10 (TPE's default)."""
    return max(2, min(10, max_recommendations // 2))


def make_sampler(algorithm: str, *, seed: Optional[int], max_recommendations: int) -> optuna.samplers.BaseSampler:
    check_algorithm(algorithm)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(max_recommendations),
                                      constant_liar=True)


def make_pruner(algorithm: str, *, max_epochs: int, reduction_factor: int) -> optuna.pruners.BasePruner:
    check_algorithm(algorithm)
    if algorithm != "hyperband":
        return optuna.pruners.NopPruner()
    if reduction_factor < 2:
        raise AutoMLConfigError(f"reduction_factor must be >= 2 for hyperband, got {reduction_factor}.")
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=reduction_factor)


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{Path(folder).absolute() / SQLITE_FILE}"


def redact_url(url: str) -> str:
    """The storage URL with any password replaced by ``***`` (for logs, plans and XCom)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _prepare_sqlite(url: str) -> None:
    """Create the database file in WAL mode (readers no longer block the writer; the mode persists)."""
    path = Path(url[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


@contextlib.contextmanager
def heartbeat_calls() -> Iterator[None]:
    """Optuna's heartbeat with ask/tell: the trial runner records the beats (Optuna's own thread lives in
    ``Study.optimize``, hence its warning on ``ask``), and the heartbeat API is marked experimental."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


@functools.lru_cache(maxsize=None)
def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage for ``url`` (``sqlite:///abs/path.db``, ``postgresql+psycopg2://user@host/db``, ...), one per
    process, with Optuna's heartbeat and the retry of trials whose worker died."""
    if url.startswith("sqlite:///"):
        _prepare_sqlite(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    elif url.startswith("sqlite:"):
        raise AutoMLConfigError(f"study storage {url!r}: use an absolute SQLite file, sqlite:////abs/path/study.db.")
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with heartbeat_calls():
        return retrying(lambda: optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=STALE_TRIAL_RETRIES)), what=f"open the study storage {redact_url(url)}")


def _transient(error: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(error, OperationalError):
        return True
    return isinstance(error, DBAPIError) and getattr(error, "connection_invalidated", False)


def retrying(call: Callable[[], T], *, what: str, attempts: int = STORAGE_ATTEMPTS,
             first_delay_s: float = 0.2, log: Optional[Callable[[str], None]] = None) -> T:
    """``call()``, retried with exponential back-off while the database is busy or a connection dropped."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - only transient database errors are retried
            if not _transient(error) or attempt == attempts:
                raise
            if log:
                log(f"study storage busy ({type(error).__name__}) while trying to {what}; retry {attempt} in "
                    f"{delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def create_study(*, study_name: str, storage_url: str, algorithm: str, seed: Optional[int], max_recommendations: int,
                 max_epochs: int, reduction_factor: int) -> optuna.Study:
    """Create the study (or load it when a retried planner finds it already there)."""
    storage = open_storage(storage_url)
    return retrying(lambda: optuna.create_study(
        study_name=study_name, storage=storage, direction=DIRECTION, load_if_exists=True,
        sampler=make_sampler(algorithm, seed=seed, max_recommendations=max_recommendations),
        pruner=make_pruner(algorithm, max_epochs=max_epochs, reduction_factor=reduction_factor)),
        what=f"create study {study_name}")


def load_study(*, study_name: str, storage_url: str, algorithm: str, seed: Optional[int], max_recommendations: int,
               max_epochs: int, reduction_factor: int) -> optuna.Study:
    """The shared study, with this worker's own sampler (seeded by the caller) and the common pruner."""
    storage = open_storage(storage_url)
    try:
        return retrying(lambda: optuna.load_study(
            study_name=study_name, storage=storage,
            sampler=make_sampler(algorithm, seed=seed, max_recommendations=max_recommendations),
            pruner=make_pruner(algorithm, max_epochs=max_epochs, reduction_factor=reduction_factor)),
            what=f"load study {study_name}")
    except KeyError:
        raise AutoMLConfigError(f"study {study_name!r} does not exist in {redact_url(storage_url)}; the planning "
                                "step creates it.") from None


__all__ = ["ALGORITHMS", "DIRECTION", "HEARTBEAT_GRACE_S", "HEARTBEAT_INTERVAL_S", "MONITOR_METRIC",
           "check_algorithm", "create_study", "load_study", "make_pruner", "make_sampler", "open_storage",
           "redact_url", "retrying", "sqlite_url"]
