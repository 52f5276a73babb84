"""The plugin: its registration in Airflow, the job list and job pages (metrics, plots, files), and its
refusals (no user, paths leaving the results root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import mask2former_jobs as jobs
import mask2former_plugin as plugin


def write_job(root: Path, job: str, *, action: str = "train", status: str = "SUCCESS", metrics=None) -> Path:
    folder = root / job
    folder.mkdir(parents=True)
    lines = [{"date": "2024-01-01", "time": "10:00:00", "status": "STARTED", "message": f"{action} started"}]
    for epoch, miou in ((1, 1.5), (2, 2.5), (3, 4.0)):
        lines.append({"date": "2024-01-01", "time": f"10:0{epoch}:00", "status": "RUNNING", "message": "validation",
                      "epoch": epoch, "max_epoch": 3, "kpi": {"mIoU": miou}})
    lines.append({"date": "2024-01-01", "time": "10:05:00", "status": status, "message": "done <b>"})
    (folder / "status.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "_FINISHED").write_text("{}")
    return folder


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("MASK2FORMER_RESULTS_ROOT", str(tmp_path / "results"))
    write_job(tmp_path / "results", "mask2former_pipeline/manual__1/train",
              metrics={"mIoU": 4.0, "PQ": 2.0, "per_class": {"sky": {"IoU": 9.0}}, "panoptic": {"SQ": 70.0}})
    write_job(tmp_path / "results", "mask2former_pipeline/manual__1/export", action="export", metrics={})
    (tmp_path / "results" / "mask2former_pipeline/manual__1/export/overlay.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "secret.txt").write_text("outside the results root")
    app = plugin.build_app()
    app.dependency_overrides[plugin.require_user] = lambda: object()
    return TestClient(app)


def test_plugin_registers_the_app_the_view_and_the_link():
    from airflow import plugins_manager

    loaded = {p.name: p for p in plugins_manager._get_plugins()[0]}
    registered = loaded["mask2former"]
    assert registered.fastapi_apps[0]["url_prefix"] == "/mask2former"
    assert registered.external_views[0]["href"] == "/mask2former/"
    assert registered.operator_extra_links[0].name == "Mask2Former job"


def test_job_list_shows_jobs_with_their_headline_metrics(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "mask2former_pipeline/manual__1/train" in page.text and "mask2former_pipeline/manual__1/export" in page.text
    assert "<td>4</td>" in page.text  # train's mIoU column
    listing = client.get("/api/jobs").json()
    assert listing["total_entries"] == 2
    train = next(j for j in listing["jobs"] if j["job_id"].endswith("/train"))
    assert train["action"] == "train" and train["status"] == "SUCCESS" and train["finished"]
    assert train["metrics"] == {"mIoU": 4.0, "PQ": 2.0, "per_class.sky.IoU": 9.0, "panoptic.SQ": 70.0}


def test_job_page_has_metrics_a_progress_plot_and_images(client):
    page = client.get("/jobs/mask2former_pipeline/manual__1/train")
    assert page.status_code == 200
    assert "<svg" in page.text and 'aria-label="mIoU"' in page.text
    assert "panoptic.SQ" in page.text
    assert "done &lt;b&gt;" in page.text  # messages are escaped
    export = client.get("/jobs/mask2former_pipeline/manual__1/export")
    assert "/mask2former/files/mask2former_pipeline/manual__1/export/overlay.png" in export.text
    image = client.get("/files/mask2former_pipeline/manual__1/export/overlay.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_unknown_jobs_and_paths_leaving_the_root_are_refused(client):
    assert client.get("/jobs/mask2former_pipeline/nope/train").status_code == 404
    assert client.get("/jobs/../secret.txt").status_code == 404
    assert client.get("/files/../secret.txt").status_code == 404
    assert client.get("/files/mask2former_pipeline/..%2F..%2F..%2Fsecret.txt").status_code == 404


def test_pages_need_an_authenticated_user(tmp_path, monkeypatch):
    from airflow.api_fastapi.app import init_auth_manager

    init_auth_manager()  # what the API server does at start
    monkeypatch.setenv("MASK2FORMER_RESULTS_ROOT", str(tmp_path))
    anonymous = TestClient(plugin.build_app())
    assert anonymous.get("/").status_code == 401
    assert anonymous.get("/api/jobs", headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)


def test_chart_scales_points_into_the_frame():
    svg = jobs.svg_chart("loss", [(1.0, 10.0), (2.0, 5.0), (3.0, 5.0)], width=200, height=100)
    points = svg.split('points="')[1].split('"')[0].split()
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert min(xs) >= 0 and max(xs) <= 200 and min(ys) >= 0 and max(ys) <= 100
    assert ys[0] < ys[1]  # the larger value is drawn higher
