"""`cxr-batch report` and `score --report`: a real scoring run's table -> an HTML page, checked in a
real headless Chromium (console, images, links, sorting) and against the table read with pyarrow."""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_batch.bench.inputs import calibrated_checkpoint
from cxr_batch.cli import main
from cxr_batch.archive.discover import discover
from cxr_batch.reports.html.data import aggregate, normalise_errors

from browser import open_page
from images import broken

HOSTILE = "<img src=x onerror=alert(1)> & co.png"  # a legal file name that is also HTML


@pytest.fixture(scope="module")
def scored(ray_session, phantoms, tmp_path_factory):
    """A real `cxr-batch score --report` run: labelled folders, broken files, a hostile name, an
    unlabelled folder; small parts so that the report reads several."""
    root = tmp_path_factory.mktemp("report")
    archive = root / "archive"
    shutil.copytree(phantoms, archive)
    for name, data in broken().items():
        (archive / "test" / "NORMAL" / name).write_bytes(data)
    ward = archive / "site b" / "ward 3"
    ward.mkdir(parents=True)
    shutil.copy(next((archive / "test" / "PNEUMONIA").iterdir()), ward / HOSTILE)
    shutil.copy(next((archive / "test" / "NORMAL").iterdir()), ward / "plain.jpeg")
    # An untrained head puts every P near 0.55, all above 0.5: a head standardised on the archive
    # spreads them around the threshold, so that some images are flagged and some are not.
    model = calibrated_checkpoint("resnet18:none", str(archive), [f.path for f in discover(str(archive))],
                                  root / "spread.ckpt")
    out = root / "results.parquet"
    r = CliRunner().invoke(main, ["score", str(archive), "--out", str(out), "--model", model,
                                  "--batch-size", "8", "--rows-per-part", "10", "--report"])
    assert r.exit_code == 0, r.output
    return archive, out, r.output


@pytest.fixture(scope="module")
def page(scored, browser, tmp_path_factory):
    _, out, _ = scored
    shot = tmp_path_factory.mktemp("shots") / "score-report.png"
    dialogs = []
    pg, check = open_page(browser, out.parent / "results-report.html", shot)
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    keep = os.environ.get("CXR_REPORT_SCREENSHOTS")  # a copy for people to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "score-report.png")
    yield pg, check, dialogs, shot
    pg.close()


def _table(out) -> pa.Table:
    return pq.read_table(out)


def _card(pg, key: str) -> str:
    return pg.locator(f"[data-count='{key}'] .value").inner_text()


def test_score_report_flag_writes_the_page_beside_the_output(scored):
    _, out, output = scored
    page = out.parent / "results-report.html"
    assert f"report        {page}" in output
    assert page.stat().st_size > 10_000


def test_page_loads_in_a_browser_with_every_image_and_no_errors(page):
    pg, check, dialogs, shot = page
    assert check.console == [], check.console
    assert check.requests_failed == [] and check.external == []  # works offline: nothing fetched from anywhere
    assert len(check.images) >= 2 * 12 and all(i["ok"] for i in check.images), [i for i in check.images if not i["ok"]]
    assert shot.stat().st_size > 50_000
    assert dialogs == []  # the hostile file name ran no script


def test_counts_on_the_page_equal_the_table(scored, page):
    _, out, _ = scored
    pg = page[0]
    t = _table(out)
    n_err = t.num_rows - t["error"].null_count
    assert int(_card(pg, "files").replace(",", "")) == t.num_rows
    assert int(_card(pg, "scored").replace(",", "")) == t.num_rows - n_err
    assert int(_card(pg, "errors").replace(",", "")) == n_err == len(broken())
    flagged = pc.sum(pc.equal(t["pred"], "PNEUMONIA")).as_py()
    assert 0 < flagged < t.num_rows - n_err  # the fixture's model flags some images, not all
    assert int(_card(pg, "flagged").replace(",", "")) == flagged
    assert _card(pg, "retry") == "0"  # scoring writes a status column; nothing failed for a transient reason


def test_folder_table_counts_each_first_level_folder(scored, page):
    _, out, _ = scored
    pg = page[0]
    rows = pg.eval_on_selector_all("#folder-table tbody tr", "rs => rs.map(r => Array.from(r.cells).map(c => c.dataset.v))")
    t = _table(out).to_pylist()
    files = Counter(r["path"].split("/")[0] for r in t)
    flagged = Counter(r["path"].split("/")[0] for r in t if r["pred"] == "PNEUMONIA")
    assert {r[0]: int(r[1]) for r in rows} == dict(files)
    flagged_col = pg.eval_on_selector_all("#folder-table thead th", "hs => hs.map(h => h.textContent)").index("flagged")
    assert {r[0]: int(r[flagged_col]) for r in rows} == {k: flagged.get(k, 0) for k in files}
    assert {r[0]: int(r[3]) for r in rows}["test"] == len(broken())


def test_clicking_a_header_sorts_the_folder_table(page):
    pg = page[0]

    def column(i):
        return pg.eval_on_selector_all("#folder-table tbody tr", f"rs => rs.map(r => r.cells[{i}].dataset.v)")

    pg.click("#folder-table th:nth-child(2)")  # files
    up = [int(v) for v in column(1)]
    pg.click("#folder-table th:nth-child(2)")
    down = [int(v) for v in column(1)]
    assert up == sorted(up) and down == sorted(up, reverse=True) and len(set(up)) > 1
    pg.click("#folder-table th:nth-child(1)")
    assert column(0) == sorted(column(0), key=str.lower)


def test_errors_are_grouped_with_example_paths(scored, page):
    _, out, _ = scored
    pg = page[0]
    t = _table(out).to_pylist()
    failed = {r["path"] for r in t if r["error"] is not None}
    groups = pg.eval_on_selector_all("#error-table tbody tr", "rs => rs.map(r => [+r.dataset.count, "
                                     "Array.from(r.querySelectorAll('.examples li')).map(li => li.textContent)])")
    assert sum(n for n, _ in groups) == len(failed)
    assert {p for _, ex in groups for p in ex} <= failed


def test_galleries_hold_the_most_suspicious_and_most_uncertain_with_links_to_their_cams(scored, page):
    _, out, _ = scored
    pg = page[0]
    ok = [r for r in _table(out).to_pylist() if r["error"] is None]
    by_path = {r["path"]: r for r in ok}
    tiles = pg.eval_on_selector_all("#suspicious figure.tile", "fs => fs.map(f => [f.dataset.path, f.querySelector('a') && f.querySelector('a').getAttribute('href')])")
    kth = sorted((r["prob_pneumonia"] for r in ok), reverse=True)[11]
    assert len(tiles) == 12 and all(by_path[p]["prob_pneumonia"] >= kth for p, _ in tiles)
    margin = sorted(abs(r["prob_pneumonia"] - r["threshold"]) for r in ok)[11]
    unsure = pg.eval_on_selector_all("#uncertain figure.tile", "fs => fs.map(f => f.dataset.path)")
    assert len(unsure) == 12 and all(abs(by_path[p]["prob_pneumonia"] - by_path[p]["threshold"]) <= margin for p in unsure)
    for path, href in tiles:  # each thumbnail links to its own full-size CAM PNG, relative to the page
        target = (out.parent / unquote(href)).resolve()
        assert target == Path(by_path[path]["cam_path"]).resolve() and target.is_file()


def test_hostile_file_names_are_text_not_html(scored, browser, tmp_path):
    _, out, _ = scored
    # a gallery as large as the archive, so the hostile file is in it whatever its probability
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "all.html"), "--gallery", "100"])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "all.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt; &amp; co.png" in html
    pg, check = open_page(browser, tmp_path / "all.html", tmp_path / "all.png")
    assert check.console == [] and all(i["ok"] for i in check.images)
    assert any(p.endswith(HOSTILE) for p in pg.eval_on_selector_all("figure.tile", "fs => fs.map(f => f.dataset.path)"))
    pg.close()


def test_folder_depth_option_and_one_line_errors(scored, tmp_path):
    _, out, _ = scored
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "r.html"), "--folder-depth", "2"])
    assert r.exit_code == 0, r.output
    a, _ = aggregate(str(out), depth=2)
    expected = Counter("/".join(r["path"].split("/")[:-1][:2]) for r in _table(out).to_pylist())
    assert dict(zip(a.folders["folder"].to_pylist(), a.folders["files"].to_pylist())) == dict(expected)
    assert "site b/ward 3" in expected
    for args, message in [(["report", str(tmp_path / "nothing")], "No results under"),
                          (["report", str(out), "--folder-depth", "0"], "0 is not in the range")]:
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_a_status_column_counts_retryable_failures_and_old_parts_still_read(scored, tmp_path):
    """Tables gain a `status` column later (INTERFACES.md): parts with it and parts without it in
    one folder, as a resumed run after an upgrade leaves them."""
    _, out, _ = scored
    mixed = tmp_path / "mixed.parquet"
    shutil.copytree(out, mixed)
    parts = sorted(mixed.glob("part-*.parquet"))
    for part in parts:  # as written before the status column existed
        pq.write_table(pq.read_table(part).drop_columns(["status"]), part)
    old = tmp_path / "old.parquet"
    shutil.copytree(mixed, old)
    last = parts[-1]
    t = pq.read_table(last)
    failed = pc.is_valid(t["error"]).to_pylist()
    retry = [i for i, f in enumerate(failed) if not f][:2]
    status = ["retry" if i in retry else ("error" if f else "scored") for i, f in enumerate(failed)]
    error = [("unreadable file: timed out after 30 s" if i in retry else e) for i, e in enumerate(t["error"].to_pylist())]
    pred = [(None if i in retry else p) for i, p in enumerate(t["pred"].to_pylist())]
    t = t.set_column(t.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    t = t.set_column(t.schema.get_field_index("pred"), "pred", pa.array(pred, pa.string()))
    pq.write_table(t.append_column("status", pa.array(status, pa.string())), last)
    before, _ = aggregate(str(old))
    after, _ = aggregate(str(mixed))
    assert len(retry) == 2 and after.retry == 2 and before.retry is None
    assert after.scored == before.scored - 2 and after.count("error") == before.count("error")
    assert [g.count for g in after.errors if g.status == "retry"] == [2]
    r = CliRunner().invoke(main, ["report", str(mixed), "--out", str(tmp_path / "m.html")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "m.html").read_text()
    retry_card = re.search(r'data-count="retry">.*?<div class="value">([^<]*)<', html, re.S).group(1)
    assert retry_card == "2" and "retryable" in html


def test_error_messages_group_by_cause_not_by_number_or_name():
    msgs = pa.array(["truncated or corrupt image data (JPEG): image file is truncated (59 bytes not processed)",
                     "truncated or corrupt image data (JPEG): image file is truncated (1,204 bytes not processed)",
                     "too many pixels: Image size (12000x12000 = 144000000 pixels) exceeds limit",
                     "too many pixels: Image size (20000x9000 = 180000000 pixels) exceeds limit",
                     "unsupported DICOM transfer syntax 1.2.840.10008.1.2.4.90: install pylibjpeg",
                     "unsupported DICOM transfer syntax 1.2.840.10008.1.2.4.91: install pylibjpeg",
                     "unreadable file: [Errno 5] Input/output error: '/mnt/a/b c.dcm'",
                     "unreadable file: [Errno 5] Input/output error: '/mnt/x/y.dcm'",
                     "empty file (0 bytes)"])
    norm = normalise_errors(msgs).to_pylist()
    assert len(set(norm)) == 5
    assert norm[0] == norm[1] and norm[2] == norm[3] and norm[4] == norm[5] and norm[6] == norm[7]


def test_report_reads_results_on_s3_and_writes_there(scored, tmp_path, monkeypatch):
    import s3server

    _, out, _ = scored
    with s3server.s3_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        uri = s3server.upload_tree(env, out, "runs/results.parquet")
        r = CliRunner().invoke(main, ["report", uri])
        assert r.exit_code == 0, r.output
        html = s3server.get(env, "runs/results-report.html").decode()
    files = re.search(r'data-count="files">.*?<div class="value">([\d,]+)<', html, re.S).group(1)
    assert int(files.replace(",", "")) == _table(out).num_rows
    assert html.count("data:image/jpeg;base64,") == 24  # thumbnails inside the page; no links off a bucket
    assert 'class="img" href=' not in html


def test_the_model_section_reads_the_checkpoint_without_loading_its_weights(scored):
    """The report reads a checkpoint's small entries with a restricted unpickler (no torch): they
    must equal what torch.load(weights_only=True) gives, and the file's hash must be the model id."""
    from cxr_batch.model.checkpoint import load_checkpoint
    from cxr_batch.reports.html.model import checkpoint_facts

    ckpt = str(scored[1].parent / "spread.ckpt")
    loaded = load_checkpoint(ckpt)
    facts = checkpoint_facts(ckpt, loaded.model_id)
    assert facts["same_file"] is True and facts["model_id"] == loaded.model_id
    for k in ("arch", "image_size", "threshold", "settings", "epoch", "cam_stride"):
        assert facts[k] == loaded.ckpt[k], k
    assert "state_dict" not in facts and checkpoint_facts(ckpt, "0" * 16)["same_file"] is False


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    import io
    import pickle
    import zipfile

    from cxr_batch.reports.html.model import checkpoint_facts

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"format": "cxr-batch-checkpoint", "x": Evil()}, protocol=2))
    (tmp_path / "evil.ckpt").write_bytes(buf.getvalue())
    facts = checkpoint_facts(str(tmp_path / "evil.ckpt"))
    assert "error" in facts and not marker.exists()


def test_a_moved_table_finds_its_cams_beside_it(scored, browser, tmp_path):
    """cam_path is absolute: after `mv results.parquet results-cams elsewhere/` the page still shows
    and links the CAMs that moved with the table."""
    _, out, _ = scored
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved / "results.parquet")
    shutil.copytree(out.parent / "results-cams", moved / "results-cams")
    hidden = out.parent / "results-cams.away"
    (out.parent / "results-cams").rename(hidden)
    try:
        r = CliRunner().invoke(main, ["report", str(moved / "results.parquet")])
        assert r.exit_code == 0, r.output
        pg, check = open_page(browser, moved / "results-report.html", tmp_path / "moved.png")
        hrefs = pg.eval_on_selector_all("figure.tile a", "as => as.map(a => a.getAttribute('href'))")
        pg.close()
    finally:
        hidden.rename(out.parent / "results-cams")
    assert len(hrefs) == 24 and all(h.startswith("results-cams/") for h in hrefs)
    assert all((moved / unquote(h)).is_file() for h in hrefs) and all(i["ok"] for i in check.images)
