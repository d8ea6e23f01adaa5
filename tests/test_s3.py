"""The archive and every output on ``s3://``, against a real S3-compatible server on loopback.

The jobs run as subprocesses (``python jobs/train.py ...``), each starting its own local Ray
*after* the AWS_* variables are in its environment, so that every Ray worker inherits them. The
session-wide ``ray_session`` cannot serve here: it may have started before these variables
existed, and a process can be connected to one Ray at a time. Results are read back with boto3 and
pyarrow, not through storage.py, so a bug there cannot hide itself.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cxr_batch.archive import storage
from cxr_batch.archive.discover import discover

import s3server
from s3server import BUCKET

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    with s3server.s3_server() as env, pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


@pytest.fixture(scope="module")
def s3_archive(s3, phantoms):
    return s3server.upload_tree(s3, phantoms, "archive")


def run_job(s3: dict, script: str, *args: str, timeout: int = 300) -> dict:
    """Run jobs/<script> with a local Ray of its own; -> its JSON summary (the last line printed)."""
    env = s3server.subprocess_env(s3, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    p = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])["summary"]


def test_storage_round_trip_on_s3(s3):
    base = f"s3://{BUCKET}/roundtrip"
    storage.write_bytes_atomic(storage.join(base, "a", "b.bin"), b"hello")
    assert storage.read_bytes(f"{base}/a/b.bin") == b"hello"
    assert s3server.get(s3, f"{base}/a/b.bin") == b"hello"  # really on the server
    assert storage.exists(f"{base}/a/b.bin") and storage.is_dir(f"{base}/a") and storage.list_dir(f"{base}/a") == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/missing")
    storage.delete_dir(f"{base}/a")
    assert not storage.exists(f"{base}/a/b.bin")


def test_discover_lists_the_same_files_on_s3_as_on_disk(s3_archive, phantoms):
    assert [e.path for e in discover(s3_archive)] == [e.path for e in discover(str(phantoms))]


@pytest.fixture(scope="module")
def trained(s3, s3_archive):
    out = f"s3://{BUCKET}/runs/r1"
    summary = run_job(s3, "train.py", s3_archive, "--out", out, "--arch", "resnet18", "--weights", "none",
                      "--image-size", "64", "--epochs", "2", "--workers", "1", "--batch-size", "8")
    return out, summary


@pytest.mark.slow
def test_train_writes_checkpoints_history_and_ray_state_to_s3(s3, trained):
    out, summary = trained
    run_keys = s3server.keys(s3, "runs/r1/")
    for name in ("last.ckpt", "best.ckpt", "history.json", "settings.json"):
        assert f"runs/r1/{name}" in run_keys, run_keys
    # Ray Train's own run folder (RunConfig storage_path) went to the same bucket, not to local disk.
    assert any(k.startswith("runs/r1/ray/") for k in run_keys), run_keys
    history = json.loads(s3server.get(s3, "runs/r1/history.json"))
    assert [h["epoch"] for h in history] == [1, 2] and summary["epochs"] == 2
    from cxr_batch.model.weights import load_state_file_bytes

    ck = load_state_file_bytes(s3server.get(s3, "runs/r1/best.ckpt"), "best.ckpt")
    assert ck["arch"] == "resnet18" and ck["image_size"] == 64 and ck["settings"]["out"] == out
    assert summary["best_checkpoint"] == f"{out}/best.ckpt"
    assert "registered_as_default" in summary  # a Ray of its own: --register is on by default


@pytest.mark.slow
def test_score_with_a_checkpoint_on_s3_writes_parquet_and_pngs_to_s3(s3, s3_archive, trained):
    out = f"s3://{BUCKET}/scores/test"
    summary = run_job(s3, "score.py", f"{s3_archive}/test", "--out", out, "--model", trained[1]["best_checkpoint"],
                      "--batch-size", "8", "--stall-timeout", "120")
    table, parts = s3server.read_parquet_folder(s3, "scores/test")
    assert parts and all(p.startswith("scores/test/part-") for p in parts)
    rows = table.to_pylist()
    expected = [e.path for e in discover(f"{s3_archive}/test")]
    assert sorted(r["path"] for r in rows) == sorted(expected) and len(expected) == 16
    assert all(r["error"] is None and r["pred"] in ("NORMAL", "PNEUMONIA") for r in rows)
    assert summary["scored"] == 16 and summary["errors"] == 0
    for r in rows[:3]:
        assert r["cam_path"].startswith(f"s3://{BUCKET}/scores/test-cams/")
        with Image.open(io.BytesIO(s3server.get(s3, r["cam_path"]))) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    assert len([k for k in s3server.keys(s3, "scores/test-cams/") if k.endswith(".png")]) == 16


@pytest.fixture(scope="module")
def pacs(s3):
    """A PACS export on S3: 50,000 extensionless DICOM keys (studies/NNNNN/seriesK/IMnnnn), one
    extensionless text file among the first by path, and hidden keys that are not inputs."""
    import numpy as np
    from test_dicom import make_ds, to_bytes

    dicom = to_bytes(make_ds(np.arange(256, dtype=np.uint16).reshape(16, 16)))
    names = [f"studies/{s:05d}/series{k}/IM{n:04d}" for s in range(500) for k in range(2) for n in range(50)]
    extra = [("studies/00000/series0/NOTES", b"exported by PACS v2\n"), ("studies/.DS_Store", b"x"),
             ("studies/00001/.trash/IM0000", dicom)]
    s3server.put_many(s3, "pacs", [(k, dicom) for k in names] + extra)
    return "s3://pacs/studies", sorted(n[len("studies/"):] for n in names + ["studies/00000/series0/NOTES"])


@pytest.mark.slow
def test_50000_extensionless_keys_are_listed_in_parallel_and_sniffed_by_the_decoders(s3, pacs):
    archive, paths = pacs
    assert len(paths) == 50_001
    summary = run_job(s3, "score.py", archive, "--out", f"s3://{BUCKET}/scores/pacs", "--model", "resnet18:none",
                      "--limit", "64", "--no-cams", "--batch-size", "16", "--stall-timeout", "300", timeout=600)
    assert summary["listed"] == 50_001 and summary["seen"] == 64
    listing = summary["listing"]
    assert listing["max_in_flight"] > 1 and listing["requests"] > 1
    table, _ = s3server.read_parquet_folder(s3, "scores/pacs")
    rows = {r["path"]: r for r in table.to_pylist()}
    assert sorted(rows) == paths[:64]  # --limit: the first 64 by path, each once
    assert rows["00000/series0/NOTES"]["error"].startswith("skipped: no file extension and not DICOM")
    assert all(r["error"] is None and r["format"] == "DICOM" for p, r in rows.items() if p != "00000/series0/NOTES")
    assert (summary["scored"], summary["skipped"], summary["errors"]) == (63, 1, 0)
