"""The score report's galleries: each tile is worth a look, none is shown twice."""


def test_the_uncertain_gallery_never_repeats_a_suspicious_image(tmp_path):
    """Every image is both near the threshold and high: without the rule the galleries would be the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr_batch.archive.results import SCHEMA
    from cxr_batch.reports.html.data import GallerySpec, aggregate

    n = 20
    probs = [0.5 + 0.01 * i for i in range(n)]  # no two the same distance from the threshold
    rows = [{"path": f"test/x{i:02d}.jpeg", "prob_pneumonia": p, "threshold": 0.6033, "pred": "PNEUMONIA" if p >= 0.6033 else "NORMAL",
             "status": "scored", "model": "m"} for i, p in enumerate(probs)]
    out = tmp_path / "r.parquet"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({b"cxr_batch": b"{}"})), out / "part-0000abcd-00000.parquet")
    a, _ = aggregate(str(out), galleries=[GallerySpec("suspicious", "prob", 6), GallerySpec("uncertain", "margin", 6, unlike="suspicious")])
    top, unsure = a.galleries["suspicious"]["path"].to_pylist(), a.galleries["uncertain"]["path"].to_pylist()
    assert len(top) == len(unsure) == 6 and not set(top) & set(unsure)
    rest = sorted((r for r in rows if r["path"] not in top), key=lambda r: abs(r["prob_pneumonia"] - 0.6033))
    assert set(unsure) == {r["path"] for r in rest[:6]}
