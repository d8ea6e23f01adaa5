"""DICOM bytes -> grayscale pixels: the DICOM half of the decode boundary (see ``decode.py``).

The pixel path follows the DICOM display pipeline (PS3.4 N.2.1.1), first frame only:
  stored values -> Modality LUT (Rescale Slope/Intercept) -> VOI LUT or first Window Center/Width
  (else the data's own min..max) -> [0, 1] -> MONOCHROME1 inverted, so 0 is black (air dark,
  bone bright). RGB/YBR/palette images become luminance.

``meta`` holds what a scoring row may carry: modality, view, SOP Instance UID and pixel format.
Nothing that identifies a patient leaves this module, so output tables can be shared.
"""

from __future__ import annotations

import io

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import DecodeError, Skipped, one_line
from .dicom_layout import Cut, find_cut
from .gate import gate_reason
from .gray import window_minmax

# What to install per compressed family, matched on the syntax's name in this order ("JPEG 2000"
# before "JPEG"); pydicom's own list names gdcm by its import name, not what to pip install.
_INSTALL = (
    ("JPEG 2000", "pip install pylibjpeg pylibjpeg-openjpeg"),  # also HTJ2K
    ("JPEG", "pip install pylibjpeg pylibjpeg-libjpeg"),  # baseline, extended, lossless, JPEG-LS
    ("RLE", "pip install pylibjpeg pylibjpeg-rle"),
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
# Rec. 601 luma, the weights Pillow's convert("L") uses: a colour DICOM and the same picture
# saved as a JPEG decode to the same gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_dicom(head: bytes) -> bool:
    """True when ``head`` (at least the first 132 bytes of a file) has the DICOM preamble marker.

    Archives often hold DICOMs with no extension (``IM0001``), so the content decides, not the name.
    """
    return bytes(head[128:132]) == b"DICM"


def is_raw_dataset(head: bytes) -> bool:
    """True when ``head`` opens with a group 0002 or 0008 tag, little or big endian: a DICOM dataset
    without the preamble (ACR-NEMA era exports, some PACS dumps). Anything else is not tried as
    DICOM: pydicom's force=True "succeeds" on arbitrary bytes with junk."""
    return bytes(head[:2]) in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def decode_dicom(data: bytes, *, max_pixels: int, gate: dict | None = None) -> tuple[np.ndarray, dict]:
    """Decode a whole DICOM file to ``(gray, meta)``: gray float32 (H, W) in [0, 1], 0 = black.
    ``gate``: gate.gate_reason's keyword arguments; a file its header rules out raises ``Skipped``
    before any size check or pixel decode."""
    ds = _read(data, gate)
    rows, cols = _check_size(ds, max_pixels)
    ts = _transfer_syntax(ds)
    _check_decoder(ts)
    _check_length(ds, ts, data)
    try:
        # index=0 decodes the first frame only: a multi-frame file costs one frame of memory.
        arr = pixel_array(ds, index=0)
    except Exception as e:  # plugins raise RuntimeError, ValueError, ... on bad codestreams
        cut = _cut(data, ds)
        if cut:
            raise DecodeError(f"truncated pixel data ({ts.name}): the file ends {cut.where()}; copy it again") from None
        raise DecodeError(f"cannot decode pixel data ({ts.name}), though no element is cut short (a damaged"
                          f" codestream, or one the decoder does not support): {one_line(e)}") from None
    try:
        gray = _to_gray(arr, ds)
    except DecodeError:
        raise
    except Exception as e:  # a malformed LUT or palette in the header
        raise DecodeError(f"cannot map DICOM pixels to gray: {one_line(e)}") from None
    return gray, _meta(ds, rows, cols)


def _read(data: bytes, gate: dict | None = None) -> Dataset:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    has_preamble = is_dicom(data[:132])
    # Without the preamble, only try a raw dataset (ACR-NEMA era, some PACS exports) when it
    # opens with a group 0002/0008 tag: force=True on arbitrary bytes "succeeds" with junk.
    if not has_preamble and not is_raw_dataset(data):
        raise DecodeError("not a DICOM file: no 'DICM' marker at byte 128 and no DICOM tag at byte 0")
    try:
        ds = dcmread(io.BytesIO(data), force=not has_preamble)
    except Exception as e:
        raise DecodeError(f"unreadable DICOM header: {one_line(e)}") from None
    try:
        ds.get("Rows")  # elements are parsed lazily: surface a mangled header here
    except Exception as e:
        cut = _cut(data, ds)
        if cut:
            raise DecodeError(f"truncated DICOM file: it ends {cut.where()}; copy it again") from None
        raise DecodeError(f"unreadable DICOM header: {one_line(e)}") from None
    pixels = any(k in ds for k in _PIXEL_KEYWORDS)
    # A header that says what it is (a report, an RT plan, a CT) is judged on that; one that says
    # nothing and holds no pixels is junk or cut short, which the messages below tell apart.
    if gate is not None and (pixels or _names_itself(ds)):
        reason = gate_reason(ds, **gate)
        if reason:
            raise Skipped(reason, _identity(ds))
    if not pixels:
        raise DecodeError(_no_pixels_message(ds, data, has_preamble))
    return ds


def _names_itself(ds: Dataset) -> bool:
    try:
        return bool(ds.get("Modality") or ds.get("SOPClassUID")
                    or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID"))
    except Exception:  # a mangled element: not a header that says what it is
        return False


def _cut(data: bytes, ds: Dataset) -> Cut | None:
    """Where the file ends inside an element (see dicom_layout), or None: no evidence of a cut."""
    if getattr(ds, "file_meta", {}).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return None  # the dataset is zlib-compressed: its elements are not laid out in the bytes
    implicit, little = ds.original_encoding
    return find_cut(data, implicit=bool(implicit), little=little is not False)


def _no_pixels_message(ds: Dataset, data: bytes, has_preamble: bool) -> str:
    """No Pixel Data element: say "truncated" only when the bytes end inside an element, and never
    send the user to copy a whole file again (a DICOMDIR stub or a report stays what it is)."""
    # The file meta's copy of the SOP class survives a cut inside the dataset.
    sop = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    kind = UID(str(sop)).name if sop else None
    if not has_preamble and not kind:
        raise DecodeError("not an image: no format Pillow reads, and no DICOM dataset pydicom can make sense of")
    cut = _cut(data, ds)
    if cut and cut.tag in _PIXEL_TAGS:  # pydicom drops a dataset whose encapsulated pixel data has no end
        return f"truncated pixel data: the file ends {cut.where()}; copy it again"
    image = "Rows" in ds or (kind is not None and "Image" in kind)
    # Cut short: an image object, or one with nothing left that says what it was (no SOP class, or
    # the cut inside the file meta that names it).
    if cut and (image or kind is None or cut.tag >> 16 == 0x0002):
        return f"truncated DICOM file: it ends {cut.where()}, before any pixel data; copy it again"
    if image:
        return (f"DICOM has no pixel data: a header-only {kind or 'image'} object (no element is cut short:"
                " a stub, or an export that left the pixels out)")
    also = f"; the file is also cut short ({cut.where()})" if cut else ""
    return f"DICOM has no pixel data (SOP class: {kind or 'none'}): not an image object{also}"


def _check_size(ds: Dataset, max_pixels: int) -> tuple[int, int]:
    """Refuse oversized images from the header alone, before any pixel buffer is allocated."""
    if "Rows" not in ds or "Columns" not in ds:
        raise DecodeError("DICOM has pixel data but no Rows/Columns in its header: the image cannot be laid out")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"DICOM header has an invalid image size: {one_line(e)}") from None
    if rows < 1 or cols < 1 or frames < 1:
        raise DecodeError(
            f"DICOM header has an invalid image size: Rows={rows}, Columns={cols}, NumberOfFrames={frames}"
        )
    # The limit applies per frame because only the first frame is ever decoded.
    if rows * cols > max_pixels:
        raise DecodeError(
            f"too many pixels: {cols}x{rows} = {rows * cols:,} exceeds the limit of {max_pixels:,}"
            " (raise --max-pixels if this file is trusted)"
        )
    return rows, cols


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ts = meta.get("TransferSyntaxUID")
    if ts:
        return UID(ts)
    # No file meta (raw dataset): its pixels are native and laid out as the dataset was parsed,
    # which pydicom recorded; the decoder needs that written down as a transfer syntax.
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    return ts


def _check_decoder(ts: UID) -> None:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecodeError(
            f"unsupported DICOM transfer syntax {ts.name}: no Python decoder exists for it;"
            " convert the file to an uncompressed syntax first (e.g. dcmtk's dcmdjpeg or gdcmconv --raw)"
        ) from None
    if not decoder.is_available:
        hint = next((cmd for family, cmd in _INSTALL if family in ts.name), None)
        hint = hint or "install one of: " + "; ".join(decoder.missing_dependencies)
        raise DecodeError(f"unsupported DICOM transfer syntax {ts.name}: {hint}")


def _check_length(ds: Dataset, ts: UID, data: bytes) -> None:
    """Name a cut-short native file as such; compressed streams are checked by their decoder."""
    if ts.is_compressed or "PixelData" not in ds:
        return
    need, have = get_expected_length(ds, "bytes"), len(ds.PixelData)
    if have >= need:
        return
    if _cut(data, ds):
        raise DecodeError(f"truncated pixel data: {have:,} of {need:,} bytes; the file was cut short, copy it again")
    raise DecodeError(
        f"pixel data shorter than its header says: {have:,} of {need:,} bytes, though no element is cut short"
        " (a wrong Rows/Columns/Bits Allocated from its writer; copying it again will not help)")


def _to_gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb, np.iinfo(rgb.dtype).max)
    if arr.ndim == 3:  # RGB, or YBR that pixel_array has already converted to RGB
        return _luma(arr, 2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1)
    values = apply_modality_lut(arr, ds)
    gray = _apply_voi(values, ds)
    if gray is None:
        # No display window in the file: use the data's own range, never an 8-bit truncation.
        gray = window_minmax(values)
    if photometric == "MONOCHROME1":  # stored with 0 = white; flip after windowing, as viewers do
        gray = 1.0 - gray
    return np.ascontiguousarray(gray, dtype=np.float32)


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The file's VOI LUT, or its first Window Center/Width, mapped onto [0, 1]; None if it has neither."""
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        n, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
        values = np.rint(values).astype(np.int64)  # LUT inputs are integers (and floats make pydicom warn)
        probe = np.arange(first, first + n)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        probe = np.array([-1e30, 1e30])
    else:
        return None
    try:
        out = apply_voi_lut(values, ds, index=0)
        # pydicom returns the VOI output in a range that depends on bits stored, rescale and LUT
        # depth; pushing the whole input domain through reads that range from pydicom itself.
        with np.errstate(over="ignore"):
            ends = apply_voi_lut(probe, ds, index=0)
    except (ValueError, TypeError, IndexError, NotImplementedError):
        return None  # e.g. Window Width 0 from a buggy modality: the image is fine, the window is not
    lo, hi = float(np.min(ends)), float(np.max(ends))
    if not hi > lo:
        return None
    return np.clip((out - lo) * (1.0 / (hi - lo)), 0.0, 1.0).astype(np.float32)


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    """Colour has no VOI: keep the absolute scale, as for 8-bit JPEGs, so a dark photo stays dark."""
    gray = rgb[..., :3].astype(np.float32) @ _LUMA
    return np.clip(gray * np.float32(1.0 / max(full_scale, 1)), 0.0, 1.0)


def _meta(ds: Dataset, rows: int, cols: int) -> dict:
    """An allow-list, not a deny-list: a new identifying tag can never slip into the output."""
    return {
        **_identity(ds),
        "photometric": _text(ds, "PhotometricInterpretation") or "",
        "bits_stored": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        "width": cols,
        "height": rows,
    }


def _identity(ds: Dataset) -> dict:
    """What the file says it is, for its row whether it is decoded or skipped (a skipped file's
    header was judged, not checked: a mangled value there leaves the column empty)."""
    out = {}
    tags = (("modality", "Modality"), ("view_position", "ViewPosition"), ("sop_instance_uid", "SOPInstanceUID"))
    for key, keyword in tags:
        try:
            out[key] = _text(ds, keyword)
        except Exception:  # pydicom parses elements lazily, and raises many types for a bad value
            out[key] = None
    return out


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None
