"""`cxr-batch score` end to end on a real local Ray, read back with pyarrow, pandas and duckdb."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.cli import main
from cxr_batch.archive.discover import discover

from images import broken


@pytest.fixture(scope="module")
def scored(ray_session, phantoms, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    archive = root / "archive"
    shutil.copytree(phantoms, archive)
    for name, data in broken().items():
        (archive / "test" / "NORMAL" / name).write_bytes(data)
    (archive / "unlabelled" / "deeper").mkdir(parents=True)
    shutil.copy(next((archive / "test" / "PNEUMONIA").iterdir()), archive / "unlabelled" / "deeper" / "X.JPG")
    out = root / "results.parquet"
    result = CliRunner().invoke(main, ["score", str(archive), "--out", str(out), "--model", "resnet18:none",
                                       "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return archive, out, result


def test_one_row_per_input_file_and_errors_only_for_bad_files(scored):
    archive, out, result = scored
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    expected = [e.path for e in discover(str(archive))]
    assert len(paths) == len(set(paths)) == len(expected)
    assert set(paths) == set(expected)
    rows = table.to_pylist()
    errors = {r["path"]: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {f"test/NORMAL/{n}" for n in broken()}
    assert "empty file" in errors["test/NORMAL/empty.jpeg"] and "not an image" in errors["test/NORMAL/text.jpeg"]
    assert table.schema.field("cam_max").type == "float"
    for r in rows:
        if r["error"] is None:
            assert r["pred"] in ("NORMAL", "PNEUMONIA") and 0 <= r["prob_pneumonia"] <= 1
            assert 0 <= r["cam_peak_x"] <= 1 and 0 <= r["cam_peak_y"] <= 1
            # The CAM is in logit units and averages to the image's raw logit, so its maximum is at least that.
            assert r["cam_max"] >= r["logit_pneumonia"] - 1e-3
            assert r["width"] == 192 and r["height"] == 192 and len(r["sha256"]) == 64
            assert r["model"] == "resnet18:none"
            assert r["label"] == (None if r["path"].startswith("unlabelled") else r["path"].split("/")[1])
            with Image.open(r["cam_path"]) as im:
                assert im.size == (224, 224) and im.mode == "RGB"
        else:
            assert r["pred"] is None and r["cam_path"] is None
    assert "errors" in result.output and "scored" in result.output and "images/s" in result.output
    assert "UNTRAINED 2-class head" in result.stderr  # resnet18:none: said before anything runs


def test_settings_and_model_in_parquet_metadata(scored):
    archive, out, _ = scored
    meta = json.loads(pq.read_schema(next(out.iterdir())).metadata[b"cxr_batch"])
    assert meta["model_id"] == "resnet18:none"
    assert meta["settings"]["archive"] == str(archive) and meta["settings"]["batch_size"] == 8
    assert meta["model"]["trained"] is False


def test_other_readers_see_one_table(scored):
    _, out, _ = scored
    import duckdb
    import pandas as pd

    n = pq.read_table(out).num_rows
    assert len(pd.read_parquet(out)) == n
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0] == n


def test_rerun_resumes_without_duplicates(scored):
    archive, out, _ = scored
    before = pq.read_table(out).num_rows
    result = CliRunner().invoke(main, ["score", str(archive), "--out", str(out), "--model", "resnet18:none"])
    assert result.exit_code == 0, result.output
    assert "already in the output" in result.output
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == before


def test_relative_paths_mean_the_user_s_directory(ray_session, phantoms, tmp_path, monkeypatch):
    """`cxr-batch score archive --out out.parquet` from any directory: Ray's workers do not share
    the user's working directory, so relative paths must be resolved before they travel."""
    shutil.copytree(phantoms / "test" / "NORMAL", tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["score", "archive", "--out", "out.parquet", "--model", "resnet18:none", "--limit", "6",
                                  "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()  # --json: the settings first, the summary last, as JSON
    assert json.loads(lines[0].removeprefix("settings: "))["archive"] == "archive"
    assert json.loads(lines[-1])["summary"]["scored"] == 6
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(rows) == 6 and all(row["error"] is None for row in rows), rows[0]
    for row in rows:
        assert row["cam_path"].startswith(str(tmp_path / "out-cams") + "/")
        with Image.open(row["cam_path"]) as im:
            im.verify()
