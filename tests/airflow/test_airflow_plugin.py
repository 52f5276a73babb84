"""The plugin: its registration in Airflow, the job list and job pages (metrics, plots, files), and its
refusals (no user, paths leaving the results root)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import pytest
from fastapi.testclient import TestClient

import mask2former_jobs as jobs
import mask2former_plugin as plugin


def job_documents(*, action: str = "train", status: str = "SUCCESS", metrics=None) -> Dict[str, bytes]:
    """The files of a finished job folder: status.json (three validation mIoU values), metrics.json, _FINISHED."""
    lines = [{"date": "2024-01-01", "time": "10:00:00", "status": "STARTED", "message": f"{action} started"}]
    if action == "train":
        for epoch, miou in ((1, 1.5), (2, 4.5), (3, 4.0)):
            lines.append({"date": "2024-01-01", "time": f"10:0{epoch}:00", "status": "RUNNING",
                          "message": "validation", "epoch": epoch, "max_epoch": 3, "kpi": {"mIoU": miou}})
    # the final line's kpi has no epoch (as the engine writes it): a value, never a point of the plots
    lines.append({"date": "2024-01-01", "time": "10:05:00", "status": status, "message": "done <b>",
                  "kpi": {"mIoU": 4.0} if action == "train" else {"parity_max_abs_diff": 1e-5}})
    documents = {"status.json": "".join(json.dumps(line) + "\n" for line in lines).encode(), "_FINISHED": b"{}"}
    if metrics is not None:
        documents["metrics.json"] = json.dumps(metrics).encode()
    return documents


def write_job(root: Path, job: str, **kwargs) -> Path:
    folder = root / job
    folder.mkdir(parents=True)
    for name, content in job_documents(**kwargs).items():
        (folder / name).write_bytes(content)
    return folder


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("MASK2FORMER_RESULTS_ROOT", str(tmp_path / "results"))
    write_job(tmp_path / "results", "mask2former_pipeline/manual__1/train",
              metrics={"mIoU": 4.0, "PQ": 2.0, "per_class": {"sky": {"IoU": 9.0}}, "panoptic": {"SQ": 70.0}})
    write_job(tmp_path / "results", "mask2former_pipeline/manual__1/export", action="export", metrics={})
    (tmp_path / "results" / "mask2former_pipeline/manual__1/export/overlay.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "results" / "mask2former_pipeline/manual__1/train/per_class.csv").write_text("class,IoU\nsky,9\n")
    (tmp_path / "results" / "mask2former_pipeline/manual__1/train/model.pth").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("outside the results root")
    app = plugin.build_app()
    app.dependency_overrides[plugin.require_user] = lambda: object()
    app.dependency_overrides[plugin.current_access] = lambda: plugin.Access(dag_ids=None, recorded_roots={},
                                                                             run_order={})
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
    assert train["best_mIoU"] == {"value": 4.5, "epoch": 2}  # the best epoch, not the last
    assert "<td>4.5 (epoch 2)</td>" in page.text


def test_job_pages_plot_per_epoch_show_single_values_as_values_and_link_every_listed_file(client):
    import re

    train = client.get("/jobs/mask2former_pipeline/manual__1/train").text
    chart = re.search(r'<svg class="chart"[^>]*aria-label="mIoU".*?</svg>', train).group(0)
    ticks = re.findall(r'class="tick">([^<]*)<', chart)
    assert ticks[2:] == ["1", "3"]  # x axis: epochs 1 to 3, not status line numbers
    assert chart.count("<circle") == 3
    assert "Best mIoU: <b>4.5</b> at epoch 2" in train
    export = client.get("/jobs/mask2former_pipeline/manual__1/export").text
    assert "<svg" not in export and "parity_max_abs_diff</td><td>1e-05" in export  # one value: no chart
    links = re.findall(r"<li><a href='([^']+)'>", train)
    assert links and all(client.get(link[len("/mask2former"):]).status_code == 200 for link in links)
    assert any(link.endswith("per_class.csv") for link in links)
    assert "and 2 other files (models, checkpoints" in train and "model.pth" not in train  # and _FINISHED
    assert client.get("/files/mask2former_pipeline/manual__1/train/per_class.csv").text == "class,IoU\nsky,9\n"


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


def test_a_skipped_task_page_says_why_and_a_missing_job_page_is_a_page(client, tmp_path):
    folder = tmp_path / "results" / "mask2former_pipeline/manual__1/gen_trt_engine"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"date": "2024-01-01", "time": "10:00:00", "status": "SKIPPED",
                                                    "message": "needs a CUDA GPU", "action": "gen_trt_engine"}) + "\n")
    page = client.get("/jobs/mask2former_pipeline/manual__1/gen_trt_engine")
    assert page.status_code == 200 and "SKIPPED" in page.text and "needs a CUDA GPU" in page.text
    missing = client.get("/jobs/mask2former_pipeline/nope/train")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "No job folder" in missing.text


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


def test_list_is_newest_run_first_and_limit_pages_it(client, tmp_path):
    """Runs newest first by when they were due (the metadata database), a run's tasks by name."""
    write_job(tmp_path / "results", "mask2former_pipeline/manual__2/train", metrics={"mIoU": 1.0})

    def order(run_order, **params):
        client.app.dependency_overrides[plugin.current_access] = lambda: plugin.Access(
            dag_ids=None, recorded_roots={}, run_order=run_order)
        return client.get("/api/jobs", params=params).json()

    first, second = ("mask2former_pipeline", "manual__1"), ("mask2former_pipeline", "manual__2")
    listed = order({first: 2.0, second: 1.0})
    assert [j["job_id"] for j in listed["jobs"]] == ["mask2former_pipeline/manual__1/train",
                                                     "mask2former_pipeline/manual__1/export",
                                                     "mask2former_pipeline/manual__2/train"]
    assert [j["job_id"] for j in order({first: 1.0, second: 2.0})["jobs"]][0] == "mask2former_pipeline/manual__2/train"
    page = order({first: 1.0, second: 2.0}, limit=1, offset=1)
    assert [j["job_id"] for j in page["jobs"]] == ["mask2former_pipeline/manual__1/train"]
    assert page["total_entries"] == 3
    text = client.get("/", params={"limit": 1}).text
    assert "manual__2/train" in text and "manual__1/export" not in text and "offset=1&amp;limit=1" in text
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422


def test_served_files_have_their_type_and_never_run_as_pages(client, tmp_path):
    results = tmp_path / "results"
    export = results / "mask2former_pipeline" / "manual__1" / "export"
    (export / "spec.yaml").write_text("train:\n  num_epochs: 3\n")
    (export / "model.pth").write_bytes(b"weights")
    (export / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (results / "champion.json").write_text("{}")
    spec = client.get("/files/mask2former_pipeline/manual__1/export/spec.yaml")
    assert spec.status_code == 200 and spec.text == "train:\n  num_epochs: 3\n"
    assert spec.headers["content-type"].startswith("text/plain")
    image = client.get("/files/mask2former_pipeline/manual__1/export/overlay.png")
    assert image.headers["content-type"] == "image/png" and image.headers["content-length"] == "6"
    assert image.headers["content-security-policy"] == "sandbox"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert client.get("/files/mask2former_pipeline/manual__1/export/model.pth").status_code == 404  # not served
    assert client.get("/files/champion.json").status_code == 404  # not inside a job folder
    assert client.get("/files/mask2former_pipeline/manual__1/export/leak.txt").status_code == 404  # link out of root


def test_root_parameter_takes_the_configured_root_and_refuses_other_local_paths(client, tmp_path):
    results = tmp_path / "results"
    listing = client.get("/api/jobs", params={"root": f"file://{results}"})
    assert listing.status_code == 200 and listing.json()["total_entries"] == 2
    page = client.get("/jobs/mask2former_pipeline/manual__1/export", params={"root": f"{results}/"})
    assert page.status_code == 200 and "files/mask2former_pipeline/manual__1/export/overlay.png?root=" in page.text
    other = tmp_path / "other"
    write_job(other, "d/r/t", metrics={"mIoU": 1.0})
    (other / "d/r/t/notes.txt").write_text("readable only if the root were accepted")
    for root in ("/etc", str(other), f"file://{other}", str(results / ".."), "http://example.com/results"):
        for url in ("/", "/api/jobs", "/jobs/d/r/t", "/files/d/r/t/notes.txt", "/files/passwd"):
            refused = client.get(url, params={"root": root})
            assert refused.status_code == 403, (url, root)
            assert "readable" not in refused.text
