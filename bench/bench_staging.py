"""Benchmark: staging the same synthetic dataset twice from a local moto S3 server.

The first run downloads and extracts everything; the second must come from the cache (target: 0 bytes
downloaded, no GetObject). Writes ``bench/results/staging.json`` and prints a table.

    .venv/bin/python bench/bench_staging.py [--images 96] [--image-kb 48] [--workers 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mask2former.data.sources import plan_data_sources  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def synthetic_archive(*, count: int, size: int, suffix: str) -> bytes:
    """A .tar.gz of ``count`` incompressible files of ``size`` bytes (like JPEGs)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for index in range(count):
            info = tarfile.TarInfo(f"{index:06d}{suffix}")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buffer.getvalue()


def synthetic_dataset(*, images: int, image_bytes: int) -> dict[str, bytes]:
    objects: dict[str, bytes] = {}
    for split, count in (("train", images), ("val", max(1, images // 4))):
        objects[f"{split}/images.tar.gz"] = synthetic_archive(count=count, size=image_bytes, suffix=".jpg")
        objects[f"{split}/images_panoptic.tar.gz"] = synthetic_archive(count=count, size=image_bytes // 8,
                                                                       suffix=".png")
        annotations = {"images": [{"id": i, "file_name": f"{i:06d}.jpg"} for i in range(count)]}
        objects[f"{split}/annotations_panoptic.json"] = json.dumps(annotations).encode()
    objects["train/label_map_panoptic.json"] = json.dumps(
        [{"id": 1, "name": "thing", "color": [255, 0, 0], "isthing": 1}]).encode()
    return objects


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(*, images: int, image_kb: int, workers: int, out: Path) -> dict[str, Any]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # the storage hook without a connection: boto3's environment
    try:
        from operators import Mask2FormerStorageHook

        storage = Mask2FormerStorageHook(aws_conn_id=None)
        client = boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        gets: list[str] = []
        storage.get_conn().meta.events.register("provide-client-params.s3.GetObject",
                                                lambda params, **_: gets.append(params["Key"]))
        client.create_bucket(Bucket="bench")
        objects = synthetic_dataset(images=images, image_bytes=image_kb * 1024)
        for key, body in objects.items():
            client.put_object(Bucket="bench", Key=key, Body=body)
        plan = plan_data_sources("train", "s3://bench/train", "s3://bench/val", "coco_panoptic",
                                 exists=storage.exists)
        runs = {}
        with tempfile.TemporaryDirectory(prefix="bench-staging-") as cache:
            for name in ("first", "second"):
                gets.clear()
                began = time.perf_counter()
                result = storage.stage(plan, cache, max_workers=workers, log=lambda line: None)
                runs[name] = {
                    "seconds": round(time.perf_counter() - began, 3),
                    "downloaded_bytes": result.downloaded_bytes,
                    "downloaded_files": result.downloaded_files,
                    "get_object_requests": len(gets),
                    "cache_hits": result.cache_hits,
                    "extracted_archives": result.extracted_archives,
                }
    finally:
        server.stop()
    report = {
        "benchmark": "Mask2FormerStorageHook.stage, same coco_panoptic train+val dataset twice from moto S3 on "
                     "127.0.0.1",
        "objects": len(objects),
        "object_bytes": sum(len(body) for body in objects.values()),
        "images_train": images,
        "image_bytes": image_kb * 1024,
        "max_workers": workers,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
        "target_met": runs["second"]["downloaded_bytes"] == 0 and runs["second"]["get_object_requests"] == 0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['objects']} objects, {report['object_bytes'] / 1e6:.2f} MB, max_workers={report['max_workers']}")
    print(f"{'run':<8}{'seconds':>9}{'bytes downloaded':>18}{'GetObject':>11}{'cache hits':>12}{'extracted':>11}")
    for name, run_ in report["runs"].items():
        print(f"{name:<8}{run_['seconds']:>9.3f}{run_['downloaded_bytes']:>18,}{run_['get_object_requests']:>11}"
              f"{run_['cache_hits']:>12}{run_['extracted_archives']:>11}")
    print("target (second run downloads 0 bytes):", "met" if report["target_met"] else "NOT met")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="training images (val gets a quarter)")
    parser.add_argument("--image-kb", type=int, default=48, help="size of one synthetic image in KiB")
    parser.add_argument("--workers", type=int, default=4, help="the storage hook's stage max_workers")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "staging.json")
    args = parser.parse_args()
    report = run(images=args.images, image_kb=args.image_kb, workers=args.workers, out=args.out)
    print_table(report)
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
