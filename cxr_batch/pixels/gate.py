"""Does a DICOM header say the file is a frontal chest radiograph? The gate before any decoding.

The model was trained on frontal chest radiographs: for a CT slice, an ultrasound still, a lateral
view or a scanned form, any P(pneumonia) is a wrong answer, and a silent one. ``gate_reason`` reads
what the header says the file is and names the first tag that rules it out, with its value; the
scoring job gives such a file a row with status "skipped" and never decodes it (docs/dicom-gate.md).

Rules, in the order they are checked:
  Modality                    one of ``modalities`` (CR, DX). Required by DICOM, so a file without
                              it is not known to be a radiograph and is refused (named by its SOP
                              class when that rules it out too).
  SOPClassUID                 an X-ray projection or secondary capture image class; reports, RT
                              objects, presentation states, encapsulated documents, CT, MR, ... are not
  PhotometricInterpretation   MONOCHROME1 or MONOCHROME2: colour is not a radiograph
  NumberOfFrames              1 (or absent): a cine or a stack is not one radiograph
  BodyPartExamined            a spelling of the chest (CHEST_SPELLINGS), or absent
  ViewPosition                one of ``views`` (PA, AP), or absent: a lateral is refused unless allowed
Other tags are absent from many real exports, so only a value that is there and wrong refuses a file.
Tags can lie; what the pixels look like is a separate question.
"""

from __future__ import annotations

import re
from collections.abc import MutableSequence
from functools import cache

PREFIX = "not a chest radiograph: "  # every gate reason starts with it (the summary counts what follows)
DEFAULT_MODALITIES = ("CR", "DX")  # computed and digital radiography: the projection radiographs
DEFAULT_VIEWS = ("PA", "AP")  # frontal
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# BodyPartExamined values taken for the chest, compared after upper-casing and turning runs of spaces,
# "_" and "-" into one space. The DICOM term is CHEST; sites also write the anatomy, a local language
# (Spanish, Portuguese, Italian, French, German) or the exam's name.
CHEST_SPELLINGS = frozenset({
    "CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "CHEST PA", "CHEST AP", "PA CHEST", "AP CHEST",
    "PORT CHEST", "PORTABLE CHEST", "CHEST PORTABLE", "TORAX", "PECHO", "TORACE", "POITRINE", "BRUST",
    "BRUSTKORB",
})
# Secondary Capture classes stay in: a digitised film or a radiograph converted to DICOM is stored as
# one, and its Modality (CR when the converter says so) decides. Single-bit (scanned documents) and
# true-colour secondary captures are not radiographs.
_RADIOGRAPH_CLASS_NAMES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation", "DigitalIntraOralXRayImageStorageForProcessing",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage",
    "XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage",
    "SecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
)
_MAX_VALUE = 64  # characters of a tag's value quoted in a reason: the value comes from an untrusted file


def gate_reason(ds, *, modalities=DEFAULT_MODALITIES, views=DEFAULT_VIEWS) -> str | None:
    """Why the header of ``ds`` (a pydicom Dataset; read with ``stop_before_pixels`` or not) rules the
    file out, as one line starting with PREFIX ("not a chest radiograph: Modality CT"), or None when
    nothing in it does. Values are compared upper-case, without surrounding spaces."""
    modality = _modality(ds, modalities)
    # Without a Modality, a SOP class that rules the file out says more (a DICOMDIR, a report).
    reason = (modality if modality != NO_MODALITY else None) or _sop_class(ds) or modality
    reason = reason or _photometric(ds) or _frames(ds) or _body_part(ds) or _view(ds, views)
    return PREFIX + reason if reason else None


NO_MODALITY = "no Modality"


def _modality(ds, allowed) -> str | None:
    value = _text(ds, "Modality")
    if value is None:
        return NO_MODALITY
    return None if value.upper() in _upper(allowed) else f"Modality {value}"


def _sop_class(ds) -> str | None:
    meta = getattr(ds, "file_meta", None) or {}
    value = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    if value is None or value in _radiograph_classes():
        return None  # a raw dataset without one: the other tags decide
    from pydicom.uid import UID

    name = UID(value).name
    return f"SOPClassUID {value}" + (f" ({name})" if name != value else "")


def _photometric(ds) -> str | None:
    value = _text(ds, "PhotometricInterpretation")
    if value is None:
        return "no PhotometricInterpretation"
    return None if value.upper() in MONOCHROME else f"PhotometricInterpretation {value}"


def _frames(ds) -> str | None:
    value = _text(ds, "NumberOfFrames")
    try:
        frames = int(value) if value is not None else 1
    except ValueError:
        return None  # not a number: the decoder says so ("invalid image size"), with the file's other faults
    return f"NumberOfFrames {value}" if frames > 1 else None


def _body_part(ds) -> str | None:
    value = _text(ds, "BodyPartExamined")
    if value is None or " ".join(re.split(r"[\s_-]+", value.upper())).strip() in CHEST_SPELLINGS:
        return None
    return f"BodyPartExamined {value}"


def _view(ds, allowed) -> str | None:
    value = _text(ds, "ViewPosition")
    return None if value is None or value.upper() in _upper(allowed) else f"ViewPosition {value}"


def _text(ds, keyword: str) -> str | None:
    """A tag's value as one short line, or None when it is absent, empty or unreadable (a mangled
    element counts as absent: Modality is then refused, an optional tag lets the file through)."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom parses elements lazily: a bad value raises here, of many types
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple, MutableSequence)):  # pydicom's MultiValue: a VM 1 tag written with several
        value = "\\".join(str(v) for v in value)
    text = " ".join(str(value).split())[:_MAX_VALUE]
    return text or None


def _upper(values) -> set[str]:
    return {str(v).strip().upper() for v in values}


@cache
def _radiograph_classes() -> frozenset[str]:
    import pydicom.uid  # here, not at import: the decode workers of a JPEG-only archive never load pydicom

    return frozenset(str(getattr(pydicom.uid, name)) for name in _RADIOGRAPH_CLASS_NAMES)
