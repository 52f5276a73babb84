"""Mask2FormerStorageHook: every call the Airflow side makes to where datasets and results live.

A location is a local path, a ``file://`` URI or ``s3://bucket/prefix``; S3 goes through the Amazon
provider's :class:`~airflow.providers.amazon.aws.hooks.s3.S3Hook` of ``aws_conn_id`` (``None``: boto3's
own credential chain and ``AWS_ENDPOINT_URL``). The operations live in
:class:`~operators.hooks.object_store.ObjectStore`, which a job process uses without Airflow. What it does:

* files: :meth:`exists`, :meth:`read_bytes` (from an offset), :meth:`read_json`, :meth:`write_bytes`,
  :meth:`write_json`, :meth:`upload_file`, :meth:`delete`, :meth:`open` (streamed), :meth:`list_files`,
  :meth:`list_folders`;
* staging (:meth:`stage`): every ``s3://`` / ``file://`` value of a job's overrides made local once, in
  the engine's cache (:func:`mask2former.data.staging.cache_source`: keyed by ETag, archives extracted safely);
* job folders: :meth:`publish` (``_FINISHED`` last; unchanged files skipped by the SHA-256 each object carries in
  its metadata), :meth:`restore` (a retried job's checkpoints),
  :meth:`index` (a published folder's names, its small files for real, for the engine's resolvers),
  :meth:`read_status`, :meth:`beat` / :meth:`last_beat` (a detached job's heartbeat) and
  :meth:`request_stop` / :meth:`stop_requested` (how a trigger on another machine stops a job).

S3 failures become :class:`StorageError` naming the location and the S3 error code, never credentials.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Dict, Optional

from airflow.sdk.bases.hook import BaseHook

from mask2former.data.staging import S3_RETRIES, TRANSFER_CHUNK_BYTES, TRANSFER_CONCURRENCY

from .object_store import (DIGEST_METADATA, FINISHED_MARKER, HEARTBEAT_FILE, INDEX_FILES, STOP_FILE, ObjectStore,
                           OpenedFile, PublishResult, StagingResult, StorageError, StorageNotFound, StorageUnavailable,
                           StoredFile)


class Mask2FormerStorageHook(ObjectStore, BaseHook):
    """Datasets and job folders on the local disk or S3 (see the module docstring).

    :param aws_conn_id: the Airflow connection of the S3 (or MinIO) store; None uses boto3's own chain.
    """

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "Mask2Former storage"

    def __init__(self, aws_conn_id: Optional[str] = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id

    @cached_property
    def s3(self) -> Any:
        """The provider's S3Hook: the engine's part size and concurrency, and its retries
        (:data:`~mask2former.data.staging.S3_RETRIES`) unless the connection's ``config_kwargs`` set some."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from botocore.config import Config

        settings = {"aws_conn_id": self.aws_conn_id, "transfer_config_args": {
            "multipart_threshold": TRANSFER_CHUNK_BYTES, "multipart_chunksize": TRANSFER_CHUNK_BYTES,
            "max_concurrency": TRANSFER_CONCURRENCY}}
        hook = S3Hook(**settings)
        configured = hook.conn_config.botocore_config
        if configured is not None and configured.retries:
            return hook
        retries = Config(retries=dict(S3_RETRIES))
        return S3Hook(**settings, config=retries.merge(configured) if configured is not None else retries)

    def job_environment(self) -> Dict[str, str]:
        """What a job process outside Airflow needs to reach S3 as this connection does: its credentials
        (read now; a role's session credentials expire), endpoint and region, as boto3's environment."""
        if not self.aws_conn_id:
            return {}
        credentials = self.s3.get_credentials()
        env = {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key}
        if credentials.token:
            env["AWS_SESSION_TOKEN"] = credentials.token
        if self.s3.conn_config.endpoint_url:
            env["AWS_ENDPOINT_URL_S3"] = self.s3.conn_config.endpoint_url
        if self.s3.conn_region_name:
            env["AWS_DEFAULT_REGION"] = self.s3.conn_region_name
        return env


__all__ = ["DIGEST_METADATA", "FINISHED_MARKER", "HEARTBEAT_FILE", "INDEX_FILES", "STOP_FILE", "Mask2FormerStorageHook",
           "OpenedFile", "PublishResult", "StagingResult", "StorageError", "StorageNotFound", "StorageUnavailable", "StoredFile"]
