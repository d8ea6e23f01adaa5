"""A training run killed by signal (the driver, or one worker process) still ends with every epoch once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cxr_batch.model.checkpoint import load_checkpoint
from cxr_batch.synth.archive import make_archive

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = tmp_path_factory.mktemp("tiny") / "data"
    make_archive(data, n_train=48, n_val=24, n_test=0, size=96, seed=5)
    return data


def _train_cmd(data, out, address):
    return [sys.executable, "-m", "cxr_batch.cli", "train", str(data), "--out", str(out), "--arch", "resnet18",
            "--weights", "none", "--epochs", str(EPOCHS), "--image-size", "64", "--batch-size", "8",
            "--workers", "2", "--no-register", "--address", address]


def _wait_for_checkpoint(out, proc, timeout=240):
    """The first epoch's history. Rank 0 writes last.ckpt, then history.json (each atomically), so
    waiting for history.json means both are there; waiting for last.ckpt and then reading
    history.json raced with its writing."""
    history = out / "history.json"
    t0 = time.time()
    while not history.exists():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.time() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.2)
    assert (out / "last.ckpt").exists()
    return json.loads(history.read_text())


def _history(out):
    return json.loads((out / "history.json").read_text())


def test_killed_driver_resumes_from_last_checkpoint(ray_session, tiny, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny, out, address), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = _wait_for_checkpoint(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _history(out)
    assert 1 <= len(done_before) < EPOCHS, "the kill came too late to test resuming"
    again = subprocess.run(_train_cmd(tiny, out, address), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    history = _history(out)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[0] == first[0]  # epoch 1 was not trained again: its record is the killed run's
    # val/ has 24 images (< 50): validation is taken from train/ by patient, recorded, and summarised
    assert "patients from train/" in again.stdout and "grouped 48 images into 48 patients" in again.stdout
    record = json.loads((out / "val_files.json").read_text())
    best = load_checkpoint(str(out / "best.ckpt")).ckpt
    assert best["val_files"] == record["files"]  # one record: the checkpoint says what val_files.json says
    assert (best["val_note"], best["val_grouping"]) == (record["validation"], record["grouping"])
    assert record["grouping"].startswith("grouped 48 images into 48 patients")
    assert len(record["files"]) == history[-1]["val_n"] and all(f.startswith("train/") for f in record["files"])
    assert load_checkpoint(str(out / "last.ckpt")).ckpt["epoch"] == EPOCHS


def test_run_survives_the_loss_of_a_worker_process(ray_session, tiny, tmp_path):
    from ray.util.state import list_actors

    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny, out, address), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(out, proc)
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from" in output  # the group was restarted from last.ckpt, not left to finish
    history = _history(out)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))


def test_one_training_run_per_out_and_sigterm_stops_it_as_ctrl_c_does(ray_session, tiny, tmp_path):
    """A second `train` on the same --out is refused in one line while the first holds the lease;
    SIGTERM (`ray job stop`, Kubernetes) then stops the first with one line and exit 143, its lease
    released, so a re-run starts at once. Each epoch writes last.ckpt before best.ckpt."""
    from cxr_batch.archive.lease import LEASE_FILE
    from cxr_batch.errors import EXIT_ERROR

    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny, out, address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out, proc)
    assert (out / "last.ckpt").stat().st_mtime_ns <= (out / "best.ckpt").stat().st_mtime_ns
    second = subprocess.run(_train_cmd(tiny, out, address), capture_output=True, text=True, timeout=300)
    assert second.returncode == EXIT_ERROR, second.stderr[-3000:]
    error = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"--out {out} is in use by another cxr-batch run" in error[0], second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert proc.poll() is None, "the refused run stopped the first one"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert not (out / LEASE_FILE).exists()
