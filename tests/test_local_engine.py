"""The local engine (no Ray) gives the table the Ray engine gives; its process pool loses only the
task of a worker that dies; --engine auto picks local only where Ray would be started for nothing."""

import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cxr_batch.archive.results import SCHEMA, read_table
from cxr_batch.jobs.proc_pool import DONE, FAILED, LOST, ProcessPool
from cxr_batch.jobs.score import ScoreSettings, choose_engine, run_score

from images import broken


def test_a_worker_that_dies_loses_only_its_own_task():
    with ProcessPool(2) as pool:
        ok = [pool.submit(math.sqrt, float(i * i), tag=i) for i in range(6)]
        dead = pool.submit(os._exit, 3, tag="dead")  # the worker process ends with the task in hand
        bad = pool.submit(math.sqrt, -1.0, tag="bad")
        later = [pool.submit(math.sqrt, float(i * i), tag=i) for i in range(6, 10)]
        got = {}
        for _ in range(12):
            r = pool.get()
            got[r.task] = r
        assert pool.replaced == 1
        assert got[dead].status == LOST and got[dead].tag == "dead"
        assert got[bad].status == FAILED and "ValueError" in got[bad].value
        for t in ok + later:  # before and after the death, on either worker
            assert got[t].status == DONE and got[t].value == float(got[t].tag)
        assert all(w.proc.is_alive() for w in pool.workers)


def test_finishing_goes_before_decoding():
    with ProcessPool(1) as pool:
        pool.submit(os.getpid, priority=1, tag="first")  # the only worker starts on this one
        low = [pool.submit(os.getpid, priority=1, tag=f"decode{i}") for i in range(3)]
        high = pool.submit(os.getpid, priority=0, tag="finish")
        order = [pool.get().tag for _ in range(5)]
    assert order.index("finish") <= 1 and len(low) == 3 and high is not None


def test_decoding_ahead_of_the_model_start_is_bounded_in_bytes():
    """While torch loads, the pool may decode more than the steady queue, but never more than
    STARTUP_BYTES of pixels, whatever the archive's size or the model's image size."""
    from cxr_batch.jobs.local_engine import STARTUP_BYTES, startup_rows
    from cxr_batch.jobs.score_stages import StageConfig

    for side, rows in ((224, 32), (512, 16), (4096, 32), (224, 1)):
        stages = StageConfig(decode=dict(image_size=side), decode_rows=rows)
        n = startup_rows(stages, 8 * rows)
        assert n % rows == 0 and n >= 8 * rows  # whole decode calls, never below the steady queue
        assert n * side * side <= max(STARTUP_BYTES, 8 * rows * side * side)
    assert startup_rows(StageConfig(decode=dict(image_size=224), decode_rows=32), 256) > 1000  # covers a start-up


def test_auto_is_local_only_where_ray_would_start_for_this_run(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # connected=False: a Ray left running by an earlier test in this process must not decide.
    node = dict(connected=False)
    assert choose_engine("auto", 600, cpus=2, gpus=0, **node) == "local"
    assert choose_engine("auto", 10**6, cpus=2, gpus=0, **node) == "local"  # one model process either way
    assert choose_engine("auto", 10**6, cpus=16, gpus=1, **node) == "local"  # one GPU: the same plan as Ray's
    assert choose_engine("auto", 10**6, cpus=64, gpus=0, **node) == "ray"  # several model actors
    assert choose_engine("auto", 600, cpus=64, gpus=0, **node) == "local"
    assert choose_engine("auto", 600, cpus=16, gpus=4, **node) == "ray"  # one actor per GPU
    assert choose_engine("ray", 10, cpus=2, gpus=0, **node) == "ray" and choose_engine("local", 10**7) == "local"
    assert choose_engine("auto", 10, cpus=2, gpus=0, connected=True) == "ray"  # the Ray this process joined
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose_engine("auto", 10, cpus=2, gpus=0, **node) == "ray"


@pytest.fixture(scope="module")
def archive(phantoms, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines") / "archive"
    shutil.copytree(phantoms / "test", root)
    for name, data in broken().items():
        (root / "NORMAL" / name).write_bytes(data)
    return root


def _score(archive, out, engine, **kw):
    s = ScoreSettings(archive=str(archive), out=str(out), model="resnet18:none", batch_size=4, engine=engine,
                      rows_per_part=7, **kw)
    return run_score(s), read_table(str(out)).to_pandas().sort_values("path").reset_index(drop=True)


def test_local_and_ray_engines_give_the_same_table(ray_session, archive, tmp_path):
    local_summary, local = _score(archive, tmp_path / "local", "local")
    ray_summary, ray = _score(archive, tmp_path / "ray", "ray")
    assert local_summary.plan["engine"] == "local" and ray_summary.plan["engine"] == "ray"
    assert list(local.columns) == list(ray.columns) and len(local) == len(ray) == 16 + len(broken())
    assert local["path"].is_unique and local_summary.scored == ray_summary.scored == 16
    floats = [f.name for f in SCHEMA if pa.types.is_floating(f.type)]  # equal up to float noise
    for col in local.columns:
        if col == "cam_path":
            continue
        if col in floats:
            assert np.allclose(local[col], ray[col], atol=1e-5, equal_nan=True), col
        else:
            assert local[col].equals(ray[col]), col
    # pandas 3 reads a null string as NaN, not None: ask pandas what is missing.
    assert local["cam_path"].isna().equals(ray["cam_path"].isna()) and local["cam_path"].notna().sum() == 16
    for a, b in zip(local["cam_path"].dropna(), ray["cam_path"].dropna()):
        assert os.path.relpath(a, tmp_path / "local-cams") == os.path.relpath(b, tmp_path / "ray-cams")
        pa_, pb = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
        assert pa_.shape == pb.shape == (224, 224, 3) and np.abs(pa_ - pb).mean() < 0.5
    assert {"ray_start_s", "first_rows_s"} <= set(ray_summary.startup)
    assert {"pool_start_s", "torch_import_s", "model_build_s", "first_batch_s", "first_rows_s"} <= set(local_summary.startup)


def test_local_engine_resumes_and_never_starts_ray(archive, tmp_path):
    import sys

    had_ray = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    first, _ = _score(archive, tmp_path / "out", "local", limit=9)
    again, table = _score(archive, tmp_path / "out", "local")
    assert first.scored + first.errors == 9 and again.already_done == 9
    assert table["path"].is_unique and len(table) == 16 + len(broken())
    if not had_ray:
        assert not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
