"""Which images belong to one patient, so that a validation split never puts a patient on both sides.

The public pediatric set has several images per patient (person1946_bacteria_4874.jpeg and
person1946_bacteria_4875.jpeg): split by image, validation shares patients with training and its
AUC, and the threshold chosen on it, are optimistic. The patient key of a file, first that applies:

1. The public set's file names: ``person1946_bacteria_4874.jpeg`` -> ``person1946``,
   ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.
2. A DICOM file's PatientID (files named .dcm/.dicom or with no extension). Only the header is
   read (``storage.open_file``, random access): pydicom stops before the pixel data and defers any
   large value, so neither the pixels nor, on S3, more than the header's bytes are fetched. The ID is replaced at once by a keyed
   hash (HMAC-SHA256 with a key drawn for this process and never stored): it appears in no log,
   checkpoint or table, and the hash cannot be looked up in a list of likely IDs, or matched
   across runs.
3. Otherwise the file itself: one image, one patient. Images of one patient named otherwise (and
   not DICOM) could then land on both sides; the training summary says how many files had no
   patient key, so the reader knows.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import random
import re
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..archive import storage

# Most specific first: NORMAL2-IM-1427-0001 would otherwise not match at all (IM- is anchored).
PUBLIC_NAMES = (
    re.compile(r"^(NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(person\d+)_", re.IGNORECASE),
)
DICOM_EXTENSIONS = (".dcm", ".dicom", "")
_KEY = secrets.token_bytes(32)  # this process's HMAC key: never written anywhere

BY_NAME, BY_DICOM, BY_FILE = "file name", "DICOM PatientID", "one file each"


def key_from_name(uri: str) -> str | None:
    name = posixpath.basename(str(uri))
    for pattern in PUBLIC_NAMES:
        m = pattern.match(name)
        if m:
            return m.group(1)
    return None


def dicom_patient_id(root: str, rel: str) -> str | None:
    """PatientID from the header of DICOM file ``rel`` under ``root``, without reading its pixels;
    None when absent, empty or unreadable."""
    from pydicom import dcmread

    from ..pixels.dicom import is_dicom, is_raw_dataset

    try:
        with storage.open_file(root, rel, random_access=True) as f:  # pydicom seeks past what it defers
            head = f.read(132)
            if not (is_dicom(head) or is_raw_dataset(head)):  # the decode stage's own test
                return None
            f.seek(0)
            ds = dcmread(f, stop_before_pixels=True, defer_size=1024, specific_tags=["PatientID"],
                         force=not is_dicom(head))
            value = ds.get("PatientID")
    except Exception:  # an unreadable header: the file is its own patient; decode reports it later
        return None
    value = str(value).strip() if value is not None else ""
    return value or None


def hashed(patient_id: str) -> str:
    return "dicom-" + hmac.new(_KEY, patient_id.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]


def patient_key(root: str, rel: str) -> tuple[str, str]:
    """-> (key, how) of file ``rel`` under ``root``: the key groups a patient's files; ``how`` is
    BY_NAME, BY_DICOM or BY_FILE."""
    key = key_from_name(rel)
    if key:
        return key, BY_NAME
    if posixpath.splitext(posixpath.basename(str(rel)))[1].lower() in DICOM_EXTENSIONS:
        pid = dicom_patient_id(root, rel)
        if pid:
            return hashed(pid), BY_DICOM
    return "file:" + str(rel), BY_FILE


@dataclass(frozen=True)
class PatientSplit:
    train: list  # [(path relative to the data folder, label)]
    val: list
    val_groups: list  # the patient key of each val item (hashed for DICOM)
    grouping: str  # "grouped 5,216 images into 1,340 patients by file name"
    n_patients: int
    n_val_patients: int


def split_by_patient(root: str, items: list, val_fraction: float, seed: int) -> PatientSplit:
    """Whole patients to validation, about ``val_fraction`` of each class's images (``items``:
    [(path relative to ``root``, label)]).

    Strata are the label sets of patients (NORMAL only, PNEUMONIA only, both): within each, the
    patients are shuffled (seeded) and taken while that brings the stratum's validation count
    closer to its target, so validation keeps the class balance as far as whole patients allow.
    A stratum of one patient stays in training (it cannot be split)."""
    keyed = [(uri, y, *patient_key(root, uri)) for uri, y in items]
    groups: dict[str, list] = defaultdict(list)
    for uri, y, key, _ in keyed:
        groups[key].append((uri, y))
    strata: dict[tuple, list] = defaultdict(list)
    # Ordered by their first file, not by key: the hashed keys change every run, the split must not.
    for key in sorted(groups, key=lambda k: min(groups[k])):
        strata[tuple(sorted({y for _, y in groups[key]}))].append(key)
    rng = random.Random(seed)
    val_keys = set()
    for stratum in sorted(strata):
        val_keys |= _take(strata[stratum], groups, val_fraction, rng)
    train = sorted(t for k in groups if k not in val_keys for t in groups[k])
    val = sorted(t for k in val_keys for t in groups[k])
    key_of = {uri: key for uri, _, key, _ in keyed}
    how = Counter(h for *_, h in keyed)
    return PatientSplit(train, val, [key_of[uri] for uri, _ in val], _describe(len(items), len(groups), how),
                        len(groups), len(val_keys))


def _take(keys: list, groups: dict, fraction: float, rng: random.Random) -> set:
    if len(keys) < 2:
        return set()
    keys = list(keys)
    rng.shuffle(keys)
    target = max(1, round(sum(len(groups[k]) for k in keys) * fraction))
    taken, n = set(), 0
    for k in keys:
        size = len(groups[k])
        if len(taken) == len(keys) - 1:  # training keeps at least one patient of every stratum
            break
        if not taken or abs(n + size - target) < abs(n - target):
            taken.add(k)
            n += size
    return taken


def _describe(n_images: int, n_patients: int, how: Counter) -> str:
    parts = [f"{how[k]:,} by {k}" if k != BY_FILE else f"{how[k]:,} {k} (no patient key)"
             for k in (BY_NAME, BY_DICOM, BY_FILE) if how[k]]
    return f"grouped {n_images:,} images into {n_patients:,} patients ({'; '.join(parts)})"
