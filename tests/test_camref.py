"""A row's cam_path: relative to the CAM folder now, absolute in older tables; both lead to the PNG."""

from cxr_batch.reports.camref import relative_cam, resolve_cam
from cxr_batch.reports.html.page import _cam_of


def test_a_relative_cam_path_is_found_under_the_root_in_the_metadata_or_where_the_folder_is_now(tmp_path):
    old, now = tmp_path / "old-cams", tmp_path / "now-cams"
    (now / "test" / "NORMAL").mkdir(parents=True)
    (now / "test" / "NORMAL" / "a.jpeg.png").write_bytes(b"png")
    assert relative_cam(str(now), str(now / "test" / "NORMAL" / "a.jpeg.png")) == "test/NORMAL/a.jpeg.png"
    assert relative_cam("s3://b/cams/", "s3://b/cams/x/a.png") == "x/a.png"
    # The folder moved: the metadata's root is gone, the one beside the table holds the PNG.
    assert resolve_cam("test/NORMAL/a.jpeg.png", str(old), str(now)) == str(now / "test" / "NORMAL" / "a.jpeg.png")
    assert _cam_of({"path": "test/NORMAL/a.jpeg", "cam_path": "test/NORMAL/a.jpeg.png"}, str(now), str(old)) \
        == str(now / "test" / "NORMAL" / "a.jpeg.png")


def test_an_old_table_s_absolute_cam_path_still_reads(tmp_path):
    png = tmp_path / "cams" / "a.jpeg.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    assert resolve_cam(str(png), "/elsewhere") == str(png)
    assert _cam_of({"path": "a.jpeg", "cam_path": str(png)}, str(tmp_path / "cams")) == str(png)
    assert resolve_cam(None, str(tmp_path)) is None

