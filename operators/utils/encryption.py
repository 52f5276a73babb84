"""The key that opens and seals a job's encrypted models, taken from Airflow at execute time.

An operator names where the key lives, never the key itself:

* ``encryption_key_conn_id``: an Airflow connection whose *password* is the key (a ``generic`` connection
  made in the UI, by ``airflow connections add``, by ``AIRFLOW_CONN_<ID>`` or by a secrets backend);
* ``encryption_key_variable``: an Airflow Variable whose value is the key.

The key is read in :meth:`EncryptionKeySource.resolve`, called from ``execute`` (never at DAG parse), and
registered with Airflow's secrets masker (``airflow.sdk.log.mask_secret``), so a task log line that would
show it shows ``***``. The engine receives it only through the environment variable
``MASK2FORMER_ENCRYPTION_KEY`` of its job process, which passes it to the engine (see
:func:`operators.launchers.job_process_env` and :func:`operators.pod_job.engine_env`): never in
``spec_overrides``, spec.yaml, the command line, XCom or a log line. Kubernetes pods take it from a
Kubernetes Secret instead (:class:`operators.launchers.KubernetesPodLauncher`), so it is never a literal in
a pod spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from airflow.sdk.exceptions import AirflowFailException

from mask2former.crypto import KEY_ENV  # the environment variable the engine's CLI reads the key from

__all__ = ["KEY_ENV", "EncryptionKeyArguments", "EncryptionKeySource"]


@dataclass(frozen=True)
class EncryptionKeySource:
    """Where an operator's encryption key lives: a connection id, a Variable name, or neither."""

    conn_id: Optional[str] = None
    variable: Optional[str] = None

    def __post_init__(self) -> None:
        for name, value in (("encryption_key_conn_id", self.conn_id), ("encryption_key_variable", self.variable)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string naming where the key lives, got {value!r}.")
        if self.conn_id and self.variable:
            raise ValueError("Give encryption_key_conn_id or encryption_key_variable, not both: one key opens and "
                             "seals a job's models.")

    @property
    def configured(self) -> bool:
        return bool(self.conn_id or self.variable)

    def describe(self) -> str:
        """Where the key is read from (for messages; never the key)."""
        if self.conn_id:
            return f"the password of the Airflow connection '{self.conn_id}'"
        if self.variable:
            return f"the Airflow Variable '{self.variable}'"
        return "nowhere (no encryption key)"

    def resolve(self) -> Optional[str]:
        """The key, read now and masked in task logs; None when no source is configured.

        Raises AirflowFailException (no retry: the configuration is wrong) when the connection or Variable
        does not exist or is empty.
        """
        if not self.configured:
            return None
        from airflow.sdk.log import mask_secret

        key = self._read_connection() if self.conn_id else self._read_variable()
        if not isinstance(key, str) or not key:
            raise AirflowFailException(f"The encryption key is {self.describe()}, which is empty: set it to the "
                                       "passphrase the models are (or will be) encrypted with.")
        mask_secret(key)
        return key

    def _read_connection(self) -> Optional[str]:
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            connection = Connection.get(self.conn_id)
        except AirflowNotFoundException:
            raise AirflowFailException(f"encryption_key_conn_id '{self.conn_id}': no such Airflow connection; create "
                                       "one (e.g. conn_type generic) whose password is the key.") from None
        return connection.password

    def _read_variable(self) -> Optional[str]:
        from airflow.sdk import Variable

        value = Variable.get(self.variable, default=None)
        if value is None:
            raise AirflowFailException(f"encryption_key_variable '{self.variable}': no such Airflow Variable; create "
                                       "it with the key as its value.")
        return value


class EncryptionKeyArguments:
    """Operator mix-in: the ``encryption_key_conn_id`` / ``encryption_key_variable`` arguments (plain
    attributes, not template fields: a rendered template would store the key in the metadata database)."""

    encryption_key_conn_id: Optional[str] = None
    encryption_key_variable: Optional[str] = None

    def _init_encryption_key(self, *, conn_id: Optional[str], variable: Optional[str]) -> None:
        """Store and check the arguments (ValueError when both are given or one is not a name)."""
        self.encryption_key_conn_id = conn_id
        self.encryption_key_variable = variable
        _ = self.encryption_key_source

    @property
    def encryption_key_source(self) -> EncryptionKeySource:
        """Where this task's encryption key lives (read only by ``resolve()`` at execute time)."""
        return EncryptionKeySource(conn_id=self.encryption_key_conn_id, variable=self.encryption_key_variable)
