"""Real-world archives through `cxr-batch score` on a real local Ray: DICOMs of every kind, odd but
valid images, hostile names and broken files. One archive, scored once; each test checks one promise:
every input is one row, bad files say why in one line, nothing identifies a patient, nothing is
written outside the output and CAM folders. (Unsafe checkpoints: test_checkpoint.py.)"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, MPEG2MPML, RLELossless

from cxr_batch.cli import main
from images import broken, encode
from test_dicom import make_ds, to_bytes

# Distinctive, and not hex, so a sha256 in the output can never contain them by chance.
PATIENT_NAME, PATIENT_ID = "Doe^Johnathan", "PID-QZ-7731"
LEAKS = ("Doe", "Johnathan", PATIENT_ID, "QZ-7731", "19450704", "ACC-QZ-99", "Saint Quorzl")


def chest(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth gray picture with a bright blob (uint8), different per seed."""
    y, x = np.mgrid[0:h, 0:w]
    r = random.Random(seed)
    cy, cx = r.uniform(0.3, 0.7) * h, r.uniform(0.3, 0.7) * w
    a = 60 + 40 * np.sin(x / 9.0) + 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * h * w))
    return np.clip(a, 0, 255).astype(np.uint8)


def dicom(pixels: np.ndarray, uid: str, **kw) -> object:
    ds = make_ds(pixels, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, PatientBirthDate="19450704",
                 AccessionNumber="ACC-QZ-99", InstitutionName="Saint Quorzl Hospital", SOPInstanceUID=uid, **kw)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def dicoms() -> dict[str, tuple[bytes, dict]]:
    """name -> (file bytes, expected meta): MONOCHROME1 and 2, 8/12/16-bit, JPEG 2000, RLE, no extension,
    no preamble."""
    g = chest(64, 64).astype(np.uint16)
    out = {}
    ds = dicom(chest(64, 64), "1.2.826.0.1.3680043.8.498.101", modality="CR")
    out["dicom/cr_mono2_8bit.dcm"] = (to_bytes(ds), {"modality": "CR", "view_position": "PA"})
    ds = dicom(g * 16, "1.2.826.0.1.3680043.8.498.102", bits_stored=12, photometric="MONOCHROME1",
               modality="DX", ViewPosition="AP", WindowCenter=2000, WindowWidth=3000)
    out["dicom/dx_mono1_12bit.dcm"] = (to_bytes(ds), {"modality": "DX", "view_position": "AP"})
    ds = dicom(g * 256, "1.2.826.0.1.3680043.8.498.103", modality="DX")
    out["dicom/dx_mono2_16bit.DCM"] = (to_bytes(ds), {"modality": "DX", "view_position": "PA"})
    ds = dicom(g * 16, "1.2.826.0.1.3680043.8.498.104", bits_stored=12, modality="CR")
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    out["dicom/cr_jpeg2000.dicom"] = (to_bytes(ds), {"modality": "CR", "view_position": "PA"})
    ds = dicom(g * 256, "1.2.826.0.1.3680043.8.498.105", photometric="MONOCHROME1", modality="CR")
    ds.compress(RLELossless, generate_instance_uid=False)
    out["dicom/cr_rle_mono1.dcm"] = (to_bytes(ds), {"modality": "CR", "view_position": "PA"})
    ds = dicom(g * 16, "1.2.826.0.1.3680043.8.498.106", bits_stored=12, modality="DX")
    out["dicom/series 7/IM0001"] = (to_bytes(ds), {"modality": "DX", "view_position": "PA"})  # found by its preamble
    ds = dicom(chest(64, 64), "1.2.826.0.1.3680043.8.498.107", modality="CR")
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # no preamble, no file meta: an ACR-NEMA era export
    out["dicom/no_preamble.dcm"] = (buf.getvalue(), {"modality": "CR", "view_position": "PA"})
    return out


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the start of the one-line error its row must carry)."""
    bomb = dicom(np.zeros((2, 2), np.uint16), "1.2.826.0.1.3680043.8.498.201")
    bomb.Rows = bomb.Columns = 50000
    mpeg = dicom(chest(16, 16), "1.2.826.0.1.3680043.8.498.202")
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg.PixelData = encapsulate([b"\0" * 16])
    mpeg["PixelData"].VR = "OB"
    report = dicom(chest(16, 16), "1.2.826.0.1.3680043.8.498.203")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    cut = to_bytes(dicom(chest(64, 64).astype(np.uint16), "1.2.826.0.1.3680043.8.498.204"))
    b = broken()
    return {
        "bad/empty.jpeg": (b["empty.jpeg"], "empty file (0 bytes)"),
        "bad/notes.png": (b["text.jpeg"], "not an image: the bytes are no format Pillow or pydicom can read"),
        "bad/truncated.jpeg": (b["truncated.jpeg"], "truncated or corrupt image data (JPEG)"),
        "bad/bomb.png": (png_declaring(60000, 60000), "too many pixels: "),
        "bad/bomb_dicom.dcm": (to_bytes(bomb), "too many pixels: 50000x50000 = 2,500,000,000"),
        "bad/noise.dcm": (random.Random(0).randbytes(4096), "not an image"),
        "bad/garbage_after_preamble.dcm": (b"\0" * 128 + b"DICM" + random.Random(1).randbytes(600), "DICOM has no pixel data"),
        "bad/mpeg2.dcm": (to_bytes(mpeg), "unsupported DICOM transfer syntax MPEG2"),
        # A report is no radiograph, whatever its Modality says: the DICOM gate skips it (status "skipped").
        "bad/structured_report.dcm": (to_bytes(report), "not a chest radiograph: SOPClassUID 1.2.840.10008.5.1.4.1.1.88.11"
                                                        " (Basic Text SR Storage)"),
        "bad/cut_short.dcm": (cut[:-3000], "truncated pixel data"),
    }


def odd_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Odd but valid: name -> (bytes, (width, height))."""
    L = Image.fromarray(chest())
    rgb = L.convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((96, 80), 200, np.uint8)))
    pal = L.convert("P")
    a16 = chest().astype(np.uint16) * 16  # 12-bit values in a 16-bit PNG
    wide = Image.fromarray(np.tile(chest(200, 100), (1, 30)))
    images = {
        "odd/cmyk.jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "odd/rgba.png": encode(rgba, "PNG"),
        "odd/palette.png": encode(pal, "PNG"),
        "odd/palette_transparent.gif": encode(pal, "GIF", transparency=0),
        "odd/deep16.png": encode(Image.fromarray(a16), "PNG"),
        "odd/one_bit.png": encode(L.convert("1"), "PNG"),
        "odd/progressive.jpeg": encode(L, "JPEG", quality=90, progressive=True),
        "odd/gray.bmp": encode(L, "BMP"),
        "odd/gray16.tiff": encode(Image.fromarray(a16), "TIFF"),
        "odd/gray.webp": encode(L, "WEBP", lossless=True),
        "odd/UPPER.JPG": encode(L, "JPEG"),
        "odd/SCAN.PNG": encode(L, "PNG"),
        "odd/Mixed.JpEg": encode(rgb, "JPEG"),
        "odd/ünïcödé scan 01.png": encode(L, "PNG"),
        "odd/chest x-ray (copy 2).jpeg": encode(L, "JPEG"),
        "odd/日本語/胸部.png": encode(L, "PNG"),
    }
    sizes = {k: (80, 96) for k in images}
    images["odd/tiny.png"], sizes["odd/tiny.png"] = encode(Image.fromarray(chest(8, 8)), "PNG"), (8, 8)
    images["odd/wide.jpeg"], sizes["odd/wide.jpeg"] = encode(wide, "JPEG"), (3000, 200)
    return {k: (images[k], sizes[k]) for k in images}


# Names that must not steer a CAM PNG out of its folder, nor onto another image's PNG. On POSIX
# a name cannot hold "/", but it can hold a backslash, control characters and bytes that are not UTF-8
# (names starting with "." are hidden files, not inputs).
HOSTILE_NAMES = [
    "names/a\\..\\..\\..\\escape.png",  # backslashes: a path that climbs out, read on Windows
    "names/a/escape.png",  # what the name above sanitises to: the two PNGs must not collide
    "names/ leading and trailing space .png",
    "names/new\nline\ttab.png",  # control characters
    "names/C:/drive.png",  # a drive letter as a folder name
    "names/x..png",
    "names/caf\u00e9.png",  # NFC
    "names/cafe\u0301.png",  # the same name in NFD (as macOS writes it): another file on Linux
    "names/" + "\u80f8" * 83 + ".png",  # 253 bytes: a CAM name with ".png" added would be too long
]


def build(root) -> tuple[str, dict]:
    """Write the archive; returns (archive path, {rel path: what its row must show})."""
    archive = root / "archive"
    expect = {}

    def put(rel, data):
        path = archive / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    for rel, (data, meta) in dicoms().items():
        put(rel, data)
        expect[rel] = ("dicom", meta)
    for rel, (data, message) in bad_files().items():
        put(rel, data)
        expect[rel] = ("error", message)
    for rel, (data, size) in odd_images().items():
        put(rel, data)
        expect[rel] = ("ok", size)
    png = encode(Image.fromarray(chest(seed=5)), "PNG")
    for i, rel in enumerate(HOSTILE_NAMES):
        put(rel, encode(Image.fromarray(chest(seed=10 + i)), "PNG"))
        expect[rel] = ("ok", (80, 96))
    # A name that is not UTF-8 (a Latin-1 archive unzipped on Linux): os.fsencode round-trips it.
    latin = os.fsdecode(b"names/r\xe9sum\xe9.png")
    put(latin, png)
    expect["names/r\\xe9sum\\xe9.png"] = ("ok", (80, 96))

    # An unreadable file. As root, chmod 000 does not stop a read (CAP_DAC_OVERRIDE), so that
    # case only runs as a normal user (test_an_io_error_is_a_row_error reads /proc/self/mem instead).
    if os.geteuid() != 0:
        put("bad/no_permission.jpeg", png)
        os.chmod(archive / "bad" / "no_permission.jpeg", 0)
        expect["bad/no_permission.jpeg"] = ("error", "unreadable file: permission denied")

    # A file without an extension is a candidate; the decode stage finds it is not DICOM.
    put("bad/notdicom_noext", b"plain text, no DICM marker")
    expect["bad/notdicom_noext"] = ("error", "skipped: no file extension and not DICOM")

    # Not inputs, so no rows: a folder loop (its files are listed once), a link to itself,
    # a dangling link, links to outside the archive, hidden files, other extensions.
    os.symlink(archive, archive / "odd" / "loop")
    os.symlink("self.jpeg", archive / "bad" / "self.jpeg")
    os.symlink(root / "nowhere.png", archive / "bad" / "dangling.png")
    os.symlink("/proc/self/mem", archive / "bad" / "io_error.jpeg")
    os.symlink("/", archive / "bad" / "root")
    put("bad/.hidden.jpeg", png)
    put("bad/readme.txt", b"hello")
    return str(archive), expect


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    archive, expect = build(root)
    out = root / "out" / "results.parquet"
    cam_dir = root / "out" / "deep" / "cams"
    before = snapshot(root)
    result = CliRunner().invoke(main, ["score", archive, "--out", str(out), "--cam-dir", str(cam_dir),
                                       "--model", "resnet18:none", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    return dict(root=root, out=out, cam_dir=cam_dir, expect=expect, rows=rows, result=result, before=before)


def snapshot(root) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def test_exactly_one_row_per_input_file(scored):
    assert sorted(scored["rows"]) == sorted(scored["expect"])
    table = pq.read_table(scored["out"])
    assert table.num_rows == len(scored["expect"])  # no duplicates hiding behind the dict


def test_bad_files_carry_their_one_line_error(scored):
    for rel, (kind, expected) in scored["expect"].items():
        row = scored["rows"][rel]
        if kind != "error":
            continue
        assert row["error"] is not None and row["error"].startswith(expected), (rel, row["error"])
        assert "\n" not in row["error"] and len(row["error"]) < 400
        assert row["pred"] is None and row["cam_path"] is None


def test_bombs_are_refused_before_decoding(scored):
    # The PNG declares 3.6 G pixels in 70 bytes: refused from the header, the job did not run out of memory.
    assert scored["rows"]["bad/bomb.png"]["bytes"] < 200
    assert "exceeds the limit of 100,000,000" in scored["rows"]["bad/bomb_dicom.dcm"]["error"]


def test_odd_but_valid_images_are_scored(scored):
    for rel, (kind, size) in scored["expect"].items():
        if kind != "ok":
            continue
        row = scored["rows"][rel]
        assert row["error"] is None, (rel, row["error"])
        assert row["pred"] in ("NORMAL", "PNEUMONIA") and 0 <= row["prob_pneumonia"] <= 1
        assert (row["width"], row["height"]) == size, rel
        with Image.open(row["cam_path"]) as im:
            im.load()
            assert im.size == (224, 224)
    assert scored["rows"]["odd/cmyk.jpeg"]["format"] == "JPEG" and scored["rows"]["odd/gray.webp"]["format"] == "WEBP"


def test_dicoms_are_scored_with_their_attributes(scored):
    for rel, (kind, meta) in scored["expect"].items():
        if kind != "dicom":
            continue
        row = scored["rows"][rel]
        assert row["error"] is None, (rel, row["error"])
        assert row["format"] == "DICOM" and (row["width"], row["height"]) == (64, 64)
        assert row["modality"] == meta["modality"] and row["view_position"] == meta["view_position"]
        assert row["sop_instance_uid"].startswith("1.2.826.0.1.3680043.8.498.10")
        assert row["pred"] in ("NORMAL", "PNEUMONIA")
        with Image.open(row["cam_path"]) as im:
            im.load()
    uids = [scored["rows"][r]["sop_instance_uid"] for r, (k, _) in scored["expect"].items() if k == "dicom"]
    assert len(set(uids)) == len(uids) == 7


def test_monochrome1_is_shown_inverted(scored):
    """The same picture stored MONOCHROME1 must look like its MONOCHROME2 twin, not its negative."""
    rows = scored["rows"]
    # Both hold chest(64, 64) * 16 / * 256 with the blob bright in the MONOCHROME2 sense;
    # MONOCHROME1 files stored the same raw values, so their display is the negative.
    m2 = np.asarray(Image.open(rows["dicom/dx_mono2_16bit.DCM"]["cam_path"]).convert("L"), np.float32)
    m1 = np.asarray(Image.open(rows["dicom/cr_rle_mono1.dcm"]["cam_path"]).convert("L"), np.float32)
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] < 0


def test_no_output_identifies_the_patient(scored):
    texts = [json.dumps(list(scored["rows"].values()), default=str), scored["result"].output]
    for part in scored["out"].iterdir():  # the parts, and the lease's files
        if part.suffix == ".parquet":
            texts.append(json.dumps({k.decode(): v.decode() for k, v in (pq.read_schema(part).metadata or {}).items()}))
        texts.append(part.read_bytes().decode("latin-1"))
    for d, _, files in os.walk(scored["cam_dir"]):
        texts += [os.path.join(d, f) for f in files]
        texts += [open(os.path.join(d, f), "rb").read().decode("latin-1") for f in files]
    text = "\n".join(texts)
    for leak in LEAKS:
        assert leak not in text, leak


def test_cam_pngs_stay_inside_the_cam_folder_and_never_collide(scored):
    new = snapshot(scored["root"]) - scored["before"]
    cam_dir, out = str(scored["cam_dir"]) + os.sep, str(scored["out"]) + os.sep
    outside = [p for p in new if not (p.startswith(cam_dir) or p.startswith(out))]
    assert outside == []
    cams = [r["cam_path"] for r in scored["rows"].values() if r["cam_path"]]
    assert len(cams) == len(set(cams)) == sum(r["error"] is None for r in scored["rows"].values())
    for p in cams:
        assert os.path.realpath(p).startswith(os.path.realpath(scored["cam_dir"]) + os.sep)
        assert os.path.exists(p)
    assert sorted(p for p in new if p.startswith(cam_dir)) == sorted(cams)  # no temp files left over
