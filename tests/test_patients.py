"""Validation split off train/ by patient: the public set's names, DICOM PatientIDs, else the file."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from cxr_batch import CLASSES
from cxr_batch.jobs import patients
from cxr_batch.jobs.trainset import make_split
from images import encode
from test_dicom import make_ds, to_bytes

SECRET_IDS = ("PID-ZQ-1001", "PID-ZQ-1002", "PID-ZQ-1003", "PID-ZQ-1004", "PID-ZQ-1005", "PID-ZQ-1006")


def _jpeg(seed: int) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)), "JPEG")


def _dicom(patient_id: str, uid: str) -> bytes:
    ds = make_ds(np.zeros((16, 16), np.uint8), PatientID=patient_id, SOPInstanceUID=uid)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return to_bytes(ds)


@pytest.fixture(scope="module")
def public_like(tmp_path_factory):
    """train/ as the public set names it, several images per patient, plus DICOMs that share a
    PatientID under unrelated names, and a few files with no patient key -> (root, patient of each file)."""
    root = tmp_path_factory.mktemp("patients") / "data"
    rng = random.Random(7)
    truth, n = {}, 0

    def put(rel, data, patient):
        nonlocal n
        path = root / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        truth[f"train/{rel}"] = patient  # split items are paths relative to the data folder
        n += 1

    for p in range(1, 31):  # PNEUMONIA: person<N>_bacteria/virus_<image>, 1-5 images each
        for _ in range(rng.randint(1, 5)):
            put(f"PNEUMONIA/person{p}_{rng.choice(['bacteria', 'virus'])}_{n}.jpeg", _jpeg(n), f"person{p}")
    for p in range(100, 115):  # NORMAL: IM-NNNN-NNNN and NORMAL2-IM-NNNN-NNNN
        for k in range(rng.randint(1, 4)):
            put(f"NORMAL/IM-{p:04d}-{k + 1:04d}.jpeg", _jpeg(n), f"IM-{p:04d}")
        for k in range(rng.randint(1, 3)):
            put(f"NORMAL/NORMAL2-IM-{p:04d}-{k + 1:04d}.jpeg", _jpeg(n), f"NORMAL2-IM-{p:04d}")
    for i, pid in enumerate(SECRET_IDS):  # DICOMs: one patient's images under unrelated names
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        for k in range(3):
            uid = f"1.2.826.0.1.3680043.8.498.{1000 + 10 * i + k}"
            name = f"{label}/scan_{i}_{k}.dcm" if k < 2 else f"{label}/IMG{i}{k}"  # no extension: sniffed
            put(name, _dicom(pid, uid), pid)
    for i in range(6):
        put(f"{['NORMAL', 'PNEUMONIA'][i % 2]}/odd name {i}.png", encode(Image.new("L", (8, 8)), "PNG"), f"file{i}")
    return root, truth


def test_no_patient_is_on_both_sides_of_the_split(public_like):
    root, truth = public_like
    for seed in range(5):
        split = make_split(str(root), val_fraction=0.2, seed=seed)
        train_patients = {truth[u] for u, _ in split.train}
        val_patients = {truth[u] for u, _ in split.val}
        assert val_patients and not train_patients & val_patients, (seed, train_patients & val_patients)
        assert sorted(u for u, _ in split.train + split.val) == sorted(truth)  # every file once
        labels = [y for _, y in split.val]
        assert set(labels) == {0, 1}  # stratified: both classes validate
        for cls in (0, 1):  # about 20% of each class's images, as far as whole patients allow
            share = labels.count(cls) / sum(1 for u, y in split.train + split.val if y == cls)
            assert 0.1 <= share <= 0.3, (seed, cls, share)


def test_the_split_is_reproducible_and_the_seed_matters(public_like):
    root, _ = public_like
    a, b = make_split(str(root), val_fraction=0.2, seed=1), make_split(str(root), val_fraction=0.2, seed=1)
    assert a.val == b.val
    assert make_split(str(root), val_fraction=0.2, seed=2).val != a.val


def test_keys_from_public_names_dicom_ids_and_files(public_like):
    root, truth = public_like
    assert patients.key_from_name("person1946_bacteria_4874.jpeg") == "person1946"
    assert patients.key_from_name("IM-0115-0001.jpeg") == "IM-0115"
    assert patients.key_from_name("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert patients.key_from_name("scan_1_0.dcm") is None
    split = make_split(str(root), val_fraction=0.2, seed=0)
    n_dicom = sum(v in SECRET_IDS for v in truth.values())
    n_name = sum(v.startswith(("person", "IM-", "NORMAL2")) for v in truth.values())
    assert (f"grouped {len(truth)} images into {len(set(truth.values()))} patients ({n_name} by file name;"
            f" {n_dicom} by DICOM PatientID; 6 one file each (no patient key))") == split.grouping
    assert split.grouping in split.val_note and "patients from train/" in split.val_note


def test_patient_ids_are_never_written_in_clear(public_like, tmp_path):
    root, truth = public_like
    split = make_split(str(root), val_fraction=0.5, seed=0)
    record = json.dumps(split.record())
    assert any(truth[u] in SECRET_IDS for u, _ in split.val)  # the record covers some DICOM patients
    for pid in SECRET_IDS:
        assert pid not in record and "ZQ" not in record
    groups = {g for g in split.val_groups if g.startswith("dicom-")}
    dicom_val = {truth[u] for u, _ in split.val if truth[u] in SECRET_IDS}
    assert len(groups) == len(dicom_val)  # one opaque key per patient


def test_patient_id_is_read_from_the_header_without_the_pixels(tmp_path):
    """A 32 MB DICOM: reading its PatientID must read a few KB, never the pixel data."""
    path = tmp_path / "big.dcm"
    ds = make_ds(np.zeros((4096, 4096), np.uint16), PatientID="PID-ZQ-9999")
    path.write_bytes(to_bytes(ds))
    assert path.stat().st_size > 32_000_000

    def bytes_read():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before = bytes_read()
    assert patients.dicom_patient_id(str(tmp_path), "big.dcm") == "PID-ZQ-9999"
    assert bytes_read() - before < 1_000_000
    cut = tmp_path / "cut.dcm"  # pixels cut off: the header still names the patient
    cut.write_bytes(path.read_bytes()[:4096])
    assert patients.dicom_patient_id(str(tmp_path), "cut.dcm") == "PID-ZQ-9999"
    (tmp_path / "x.dcm").write_bytes(b"not a dicom at all" * 20)
    assert patients.patient_key(str(tmp_path), "x.dcm") == ("file:x.dcm", patients.BY_FILE)


def test_a_class_with_a_single_patient_stays_in_training(tmp_path):
    for i in range(8):
        (tmp_path / "data" / "train" / "PNEUMONIA").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / "PNEUMONIA" / f"person1_virus_{i}.jpeg").write_bytes(_jpeg(i))
        (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg").write_bytes(_jpeg(100 + i))
    split = make_split(str(tmp_path / "data"), val_fraction=0.25, seed=0)
    assert {y for _, y in split.train} == {0, 1}
    assert {y for _, y in split.val} == {CLASSES.index("NORMAL")} and len(split.val) == 2
    assert os.path.basename(split.train[-1][0]).startswith("person1_")
