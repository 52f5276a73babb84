"""The jobs page under a real auth manager (the FAB provider's): two users, each allowed to read one DAG,
through the API server's REST API with their own JWT. Each sees only the jobs of their DAG, cannot open
the other's job pages or files, and cannot browse a root that no run of their DAGs recorded."""

from __future__ import annotations

import pytest

from airflow_stack import AirflowStack
from test_airflow_plugin import write_job

pytestmark = pytest.mark.slow

FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
PIPELINE = "mask2former_pipeline"
RETRAIN = "mask2former_retrain"
#: user -> (password, the one DAG their role may read)
USERS = {"pia": ("pia-pass-1", PIPELINE), "remy": ("remy-pass-1", RETRAIN)}


def fab_setup():
    commands = [("fab-db", "migrate"), ("dags", "reserialize"), ("sync-perm", "--include-dags")]
    for user, (password, dag_id) in USERS.items():
        role = f"{user}_reader"
        commands += [("roles", "create", role), ("roles", "add-perms", role, "-r", f"DAG:{dag_id}", "-a", "can_read"),
                     ("users", "create", "--username", user, "--password", password, "--role", role,
                      "--email", f"{user}@example.com", "--firstname", user, "--lastname", "reader")]
    return commands


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-fab")
    results = home / "results"
    for dag_id in (PIPELINE, RETRAIN):
        write_job(results, f"{dag_id}/manual__1/train", metrics={"mIoU": 4.0})
    stack = AirflowStack(home, setup=fab_setup(), extra_env={
        "AIRFLOW__CORE__AUTH_MANAGER": FAB, "MASK2FORMER_RESULTS_ROOT": str(results),
        "MASK2FORMER_DATA_ROOT": str(home / "data")})
    try:
        yield stack.start(timeout=300)
    finally:
        stack.stop()


def test_each_user_sees_and_opens_only_the_jobs_of_the_dags_they_may_read(stack):
    import requests

    for user, (password, dag_id) in USERS.items():
        other = RETRAIN if dag_id == PIPELINE else PIPELINE
        headers = {"Authorization": f"Bearer {stack.login(user, password)}"}

        def get(path, **params):
            return requests.get(f"{stack.base_url}/mask2former{path}", headers=headers, params=params, timeout=60)

        listing = get("/api/jobs").json()
        assert [job["job_id"] for job in listing["jobs"]] == [f"{dag_id}/manual__1/train"], user
        assert get(f"/jobs/{dag_id}/manual__1/train").status_code == 200
        assert get(f"/jobs/{other}/manual__1/train").status_code == 404
        assert get(f"/files/{other}/manual__1/train/status.json").status_code == 404
        assert get(f"/files/{dag_id}/manual__1/train/status.json").status_code == 200
        assert get("/api/jobs", root="s3://some-other-bucket").status_code == 403
        assert get(f"/files/{other}/other_run/train/secrets.json", root="s3://some-other-bucket").status_code == 403
