"""The DICOM header gate: a file whose header says it is no frontal chest radiograph gets status
"skipped" with the tag and value that rule it out, and is never decoded, scored or given a CAM.

One test per rule, each on files of pydicom's own test corpus (a CT, an MR, ultrasound stills and a
cine, reports, RT objects, secondary captures, a cervical-spine CR) or headers written here with
pydicom; then the whole path through `cxr-batch score` (local engine), its summary, a re-run and
--no-gate, and the HTML report's counts."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from cxr_batch.cli import main
from cxr_batch.errors import Skipped
from cxr_batch.pixels.decode import decode_image
from cxr_batch.pixels.gate import CHEST_SPELLINGS, gate_reason

from test_dicom import make_ds, ramp, to_bytes

NOT = "not a chest radiograph: "
# Real headers hold values DICOM does not allow ("dx", "Chest_PA"): written here on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS")


def corpus(name: str):
    """A header of pydicom's test corpus, read without its pixels (as the gate needs it)."""
    return dcmread(get_testdata_file(name), stop_before_pixels=True)


def chest(**tags):
    """A DX chest PA written by pydicom (make_ds: Computed Radiography SOP class, MONOCHROME2, PA)."""
    return make_ds(ramp(32, 32), modality="DX", **{"BodyPartExamined": "CHEST", **tags})


# --- one test per rule --------------------------------------------------------------------------


def test_a_dx_chest_pa_passes_and_decodes():
    assert gate_reason(chest()) is None
    d = decode_image(to_bytes(chest()), gate={"modalities": ("CR", "DX"), "views": ("PA", "AP")})
    assert d.format == "DICOM" and d.gray.shape == (32, 32) and d.meta["modality"] == "DX"
    cr = make_ds(ramp(), modality="CR", ViewPosition="AP", BodyPartExamined="CHEST")
    assert gate_reason(cr) is None


def test_modality_must_be_a_projection_radiograph():
    assert gate_reason(corpus("CT_small.dcm")) == NOT + "Modality CT"
    assert gate_reason(corpus("MR_small.dcm")) == NOT + "Modality MR"
    assert gate_reason(corpus("examples_rgb_color.dcm")) == NOT + "Modality US"  # an ultrasound still
    assert gate_reason(corpus("examples_ybr_color.dcm")) == NOT + "Modality US"  # a 30-frame cine
    rf = chest(Modality="RF")
    assert gate_reason(rf) == NOT + "Modality RF"
    assert gate_reason(rf, modalities=("CR", "DX", "rf")) is None  # --modalities decides, in any case
    assert gate_reason(chest(Modality="dx ")) is None


def test_a_file_without_a_modality_is_not_known_to_be_a_radiograph():
    # Colour photographs stored as secondary captures with no Modality, as a PACS export holds them.
    assert gate_reason(corpus("SC_jpeg_no_color_transform.dcm")) == NOT + "no Modality"
    ds = chest()
    del ds.Modality
    assert gate_reason(ds) == NOT + "no Modality"
    assert gate_reason(chest(Modality="")) == NOT + "no Modality"


def test_sop_classes_that_are_not_radiographs_are_refused():
    # Files whose Modality the gate is told to let through: the SOP class still rules them out.
    sr = "1.2.840.10008.5.1.4.1.1.88.11 (Basic Text SR Storage)"
    assert gate_reason(corpus("reportsi.dcm"), modalities=("SR",)) == NOT + "SOPClassUID " + sr
    assert gate_reason(corpus("rtplan.dcm"), modalities=("RTPLAN",)).endswith("(RT Plan Storage)")
    assert gate_reason(corpus("rtdose_1frame.dcm"), modalities=("RTDOSE",)).endswith("(RT Dose Storage)")
    assert gate_reason(corpus("CT_small.dcm"), modalities=("CT",)).endswith("(CT Image Storage)")
    # Without a Modality, the SOP class names what the file is: a DICOMDIR.
    assert gate_reason(corpus("DICOMDIR")) == NOT + "SOPClassUID 1.2.840.10008.1.3.10 (Media Storage Directory Storage)"
    for sop in (EncapsulatedPDFStorage, GrayscaleSoftcopyPresentationStateStorage,
                MultiFrameTrueColorSecondaryCaptureImageStorage, MultiFrameSingleBitSecondaryCaptureImageStorage):
        ds = chest(SOPClassUID=sop)  # a header that says DX, in an object that is no radiograph
        assert gate_reason(ds) == NOT + f"SOPClassUID {sop} ({sop.name})", sop.name
    ds = chest()
    del ds.SOPClassUID  # then the file meta's copy says it
    ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    assert gate_reason(ds) == NOT + f"SOPClassUID {EncapsulatedPDFStorage} (Encapsulated PDF Storage)"
    # A digitised film is stored as a secondary capture: its Modality, not the class, decides.
    assert gate_reason(chest(SOPClassUID=SecondaryCaptureImageStorage, Modality="CR")) is None
    assert gate_reason(corpus("image_dfl.dcm"), modalities=("OT",)) is None  # a grayscale secondary capture


def test_colour_is_not_a_radiograph():
    assert gate_reason(corpus("SC_rgb_jpeg.dcm"), modalities=("OT",)) == NOT + "PhotometricInterpretation RGB"
    for photometric in ("YBR_FULL", "PALETTE COLOR"):
        assert gate_reason(chest(PhotometricInterpretation=photometric)) == NOT + f"PhotometricInterpretation {photometric}"
    assert gate_reason(chest(PhotometricInterpretation="MONOCHROME1")) is None


def test_only_a_single_frame_is_a_radiograph():
    stack = make_ds(np.stack([ramp(), ramp()]), modality="DX")
    assert stack.NumberOfFrames == 2 and gate_reason(stack) == NOT + "NumberOfFrames 2"
    assert gate_reason(chest(NumberOfFrames=1)) is None


def test_the_body_part_must_be_the_chest_or_absent():
    cspine = corpus("dicomdirtests/77654033/CR2/6247")  # a real CR, AP, of the cervical spine
    assert (cspine.Modality, cspine.ViewPosition) == ("CR", "AP")
    assert gate_reason(cspine) == NOT + "BodyPartExamined CSPINE"
    assert gate_reason(corpus("JPEG2000.dcm"), modalities=("NM",)) == NOT + "BodyPartExamined WHOLE BODY"
    for part in ("ABDOMEN", "KNEE", "CHEST_ABDOMEN", "SKULL"):
        assert gate_reason(chest(BodyPartExamined=part)) == NOT + f"BodyPartExamined {part}"
    for part in (*CHEST_SPELLINGS, "chest", "Chest_PA", " thorax ", "PORT-CHEST"):
        assert gate_reason(chest(BodyPartExamined=part)) is None, part
    ds = chest()
    del ds.BodyPartExamined
    assert gate_reason(ds) is None


def test_lateral_views_are_refused_unless_allowed():
    lateral = corpus("dicomdirtests/77654033/CR1/6154")  # a real CR left lateral
    lateral.BodyPartExamined = "CHEST"  # (of the cervical spine: only the view is under test here)
    assert gate_reason(lateral) == NOT + "ViewPosition LL"
    assert gate_reason(lateral, views=("PA", "AP", "LL")) is None
    for view in ("RL", "LAT", "LATERAL", "LLD"):
        assert gate_reason(chest(ViewPosition=view)) == NOT + f"ViewPosition {view}"
    assert gate_reason(chest(ViewPosition="AP")) is None and gate_reason(chest(ViewPosition="")) is None


def test_a_gated_file_is_never_decoded():
    """Refused from the header: a CT whose pixels would fail every check (50,000 x 50,000 pixels
    in a transfer syntax nothing here decodes) is skipped, not an error about its pixels."""
    ct = make_ds(ramp(), modality="CT", Rows=50000, Columns=50000)
    ct.file_meta.TransferSyntaxUID = MPEG2MPML
    ct.PixelData = encapsulate([b"\0" * 16])
    ct["PixelData"].VR = "OB"
    with pytest.raises(Skipped) as e:
        decode_image(to_bytes(ct), gate={"modalities": ("CR", "DX"), "views": ("PA", "AP")})
    assert str(e.value) == NOT + "Modality CT" and e.value.meta["modality"] == "CT"
    with pytest.raises(Exception, match="too many pixels"):  # what the decoder says without the gate
        decode_image(to_bytes(ct))


# --- through `cxr-batch score` --------------------------------------------------------------------

GATED = {  # archive path -> the reason its row must give
    "export/ct.dcm": "Modality CT",
    "export/us_still.dcm": "Modality US",
    "export/us_cine.dcm": "Modality US",
    "export/lateral.dcm": "ViewPosition LL",
    "export/report.dcm": "Modality SR",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate") / "archive"
    (root / "export").mkdir(parents=True)
    (root / "export" / "chest_pa.dcm").write_bytes(to_bytes(chest()))
    (root / "export" / "lateral.dcm").write_bytes(to_bytes(chest(ViewPosition="LL")))
    for rel, name in (("ct.dcm", "CT_small.dcm"), ("us_still.dcm", "examples_rgb_color.dcm"),
                      ("us_cine.dcm", "examples_ybr_color.dcm"), ("report.dcm", "reportsi.dcm")):
        (root / "export" / rel).write_bytes(open(get_testdata_file(name), "rb").read())
    return root


def score(archive, out, *extra):
    r = CliRunner().invoke(main, ["score", str(archive), "--out", str(out), "--model", "resnet18:none",
                                  "--engine", "local", "--batch-size", "4", "--json", *extra])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])["summary"]
    return r.output, summary, {row["path"]: row for row in pq.read_table(out).to_pylist()}


@pytest.fixture(scope="module")
def gated(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate-out") / "results"
    return (out, *score(archive, out))


def test_a_gated_file_is_skipped_with_its_reason_and_gets_no_prediction_and_no_cam(gated):
    out, text, summary, rows = gated
    assert sorted(rows) == sorted([*GATED, "export/chest_pa.dcm"])  # one row per file
    for rel, reason in GATED.items():
        row = rows[rel]
        assert row["status"] == "skipped" and row["error"] == NOT + reason, rel
        assert row["pred"] is None and row["cam_path"] is None and np.isnan(row["prob_pneumonia"]), rel
        assert row["format"] == "DICOM" and row["sha256"] and row["bytes"] > 0
    assert rows["export/ct.dcm"]["modality"] == "CT" and rows["export/lateral.dcm"]["view_position"] == "LL"
    cams = out.parent / "results-cams"
    pngs = sorted(str(p.relative_to(cams)) for p in cams.rglob("*.png"))
    assert pngs == ["export/chest_pa.dcm.png"], pngs  # a CAM for the radiograph only
    ok = rows["export/chest_pa.dcm"]
    assert ok["status"] == "scored" and ok["pred"] in ("NORMAL", "PNEUMONIA") and ok["cam_path"]


def test_the_summary_counts_the_skipped_files_by_reason(gated):
    _, text, summary, _ = gated
    assert (summary["scored"], summary["skipped"], summary["errors"]) == (1, 5, 0)
    assert summary["skipped_by"] == {"Modality CT": 1, "Modality US": 2, "ViewPosition LL": 1, "Modality SR": 1}
    line = next(x for x in text.splitlines() if x.startswith("  skipped "))
    assert "5 not scored: Modality US 2, Modality CT 1, Modality SR 1, ViewPosition LL 1" in line
    assert "1 scored, 0 errors, 5 skipped" in text


def test_a_rerun_does_not_redo_a_skipped_file(gated, archive):
    out, _, _, rows = gated
    parts = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    _, summary, again = score(archive, out)
    assert summary["already_done"] == 6 and summary["scored"] == summary["skipped"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == parts  # nothing rewritten or added
    assert again.keys() == rows.keys()


def test_no_gate_scores_what_the_gate_skips(archive, tmp_path):
    _, summary, rows = score(archive, tmp_path / "ungated", "--no-gate")
    for rel in ("export/ct.dcm", "export/us_still.dcm", "export/us_cine.dcm", "export/lateral.dcm"):
        assert rows[rel]["status"] == "scored" and rows[rel]["pred"] in ("NORMAL", "PNEUMONIA"), rel
        assert rows[rel]["cam_path"], rel
    assert rows["export/report.dcm"]["status"] == "error"  # no pixels to score: an error, as before the gate
    assert summary["skipped"] == 0 and summary["skipped_by"] == {}


def test_the_views_and_modalities_options_reach_the_decode_stage(archive, tmp_path):
    from cxr_batch.jobs.score import ScoreSettings
    from cxr_batch.jobs.score_stages import decode_batch

    # The settings as the CLI builds them (the first --json line; the unknown model then stops the run).
    r = CliRunner().invoke(main, ["score", str(archive), "--out", str(tmp_path / "x"), "--model", "resnet99:none",
                                  "--json", "--views", "pa, ap,LL", "--modalities", "CR,DX,CT"])
    settings = json.loads(r.output.splitlines()[0].removeprefix("settings: "))
    assert (settings["gate"], settings["modalities"], settings["views"]) == (True, ["CR", "DX", "CT"], ["PA", "AP", "LL"])
    s = ScoreSettings(archive=str(archive), out=str(tmp_path / "x"), modalities=tuple(settings["modalities"]),
                      views=tuple(settings["views"]))
    paths = np.array(["export/lateral.dcm", "export/ct.dcm"], dtype=object)
    out = decode_batch({"path": paths}, archive=str(archive), image_size=64, max_pixels=10**7, gate=s.gate_rules())
    assert out["error"][0] is None and out["pixels"][0].any()  # the lateral is let through, and decoded
    # CT is let through by its Modality, and its SOP class still says it is no radiograph.
    assert out["error"][1] == NOT + "SOPClassUID 1.2.840.10008.5.1.4.1.1.2 (CT Image Storage)"
    assert out["status"][1] == "skipped" and not out["pixels"][1].any()
    r = CliRunner().invoke(main, ["score", str(archive), "--out", str(tmp_path / "x"), "--modalities", " , "])
    assert r.exit_code == 2 and "--modalities" in r.output


def test_help_documents_the_gate():
    text = " ".join(CliRunner().invoke(main, ["score", "--help"]).output.split())
    assert "--gate / --no-gate" in text and "--modalities LIST" in text and "--views LIST" in text
    assert "default: CR,DX" in text and "default: PA,AP" in text


def test_the_report_counts_skipped_files_as_not_scored_not_as_errors(gated, tmp_path):
    out = gated[0]
    r = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r.html").read_text()

    def card(key):
        return re.search(rf'data-count="{key}">.*?<div class="value">([^<]*)<', html, re.S).group(1)

    assert (card("files"), card("scored"), card("errors"), card("skipped")) == ("6", "1", "0", "5")
    assert "No errors: every file was scored, or not scored by design (5 skipped)." in html
    assert 'id="error-table"' not in html
