"""Benchmark of the archive I/O layer, against the code it replaced, in one run:

  1. local listing of an N-file archive (hard links to a few real-size images, built in /tmp and
     deleted after): the previous ``discover`` (one thread, Python objects, every extensionless
     file opened to sniff it) beside ``list_archive`` with 1 and 32 threads; seconds and peak RSS,
     each in a fresh process.
  2. S3 listing on the loopback server (moto, in a process of its own) of K extensionless keys:
     the previous way (one recursive listing, then one GET per extensionless key, one at a time)
     beside ``list_archive`` with 1 and 32 threads.
  3. (``--e2e``) ``cxr-batch score ARCHIVE --out X --limit 64 --model resnet18:none``: time to the
     first scored row and the driver's peak RSS, and the same with ``--baseline-src`` (a checkout of
     an earlier cxr-batch) when given. This part starts Ray.

    python -m cxr_batch.bench.listing /tmp/cxr-listing --files 1000000 --s3-keys 20000 --e2e
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .host import machine, run_json

SOURCES = 4  # distinct real-size images behind the hard links (plus one DICOM)


@dataclass(frozen=True, kw_only=True)
class ListingBenchSettings:
    workdir: str
    files: int = 1_000_000
    per_folder: int = 1000  # files per folder, as a PACS export's series or a dataset's class folders
    dicom_share: float = 0.01  # extensionless DICOM links (the rest are .jpeg)
    s3_keys: int = 20_000
    s3_sniff_sample: int = 1000  # the previous way's GETs are timed on this many keys, then extrapolated
    e2e: bool = False
    baseline_src: str | None = None  # a checkout of an earlier cxr-batch for the e2e baseline
    archive: str | None = None  # an archive built by an earlier run with --keep (else one is built)
    keep: bool = False  # keep the archive (it is deleted by default)


# ---------------------------------------------------------------- inputs

def build_local(root: Path, s: ListingBenchSettings) -> dict:
    """N hard links to a few real-size images: an archive of a million files in seconds. A file
    takes at most 65,000 links on ext4, so each image has as many copies as its links need."""
    import numpy as np
    from PIL import Image

    from ..synth.phantom import phantom

    src = root / "_sources"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(SOURCES):
        pixels, _ = phantom(rng, 2000, opacity=bool(i % 2))
        Image.fromarray(pixels).save(src / f"src{i}.jpeg", quality=90)
        images.append((src / f"src{i}.jpeg").read_bytes())
    every = max(1, round(1 / s.dicom_share)) if s.dicom_share > 0 else 0
    sources = _copies(src, "jpeg", images, s.files)
    dicoms = _copies(src, "dcm", [_dicom_bytes(pixels)], s.files // every + 1 if every else 0)
    t0 = time.perf_counter()
    archive = root / "archive"
    n_jpeg = n_dicom = 0
    for i in range(s.files):
        folder = archive / f"p{i // s.per_folder:05d}"
        if i % s.per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        if every and i % every == 0:
            os.link(dicoms[n_dicom // LINKS_PER_FILE], folder / f"IM{i:08d}")
            n_dicom += 1
        else:
            os.link(sources[n_jpeg // LINKS_PER_FILE], folder / f"im{i:08d}.jpeg")
            n_jpeg += 1
    return {"path": str(archive), "files": s.files, "built_s": round(time.perf_counter() - t0, 1),
            "mean_kb": round(sum(len(b) for b in images) / len(images) / 1024), "dicom_files": n_dicom}


LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one file


def _copies(folder: Path, ext: str, blobs: list[bytes], links: int) -> list[Path]:
    """Enough copies of ``blobs`` (round robin) to take ``links`` hard links."""
    paths = []
    for j in range(max(1, -(-links // LINKS_PER_FILE))):
        paths.append(folder / f"copy{j}.{ext}")
        paths[-1].write_bytes(blobs[j % len(blobs)])
    return paths


def _dicom_bytes(pixels) -> bytes:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds, meta = Dataset(), FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta, ds.SOPClassUID, ds.Modality = meta, meta.MediaStorageSOPClassUID, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 7, 0, 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------- what runs in the measured processes

# The obvious discover(), kept here as the baseline that the parallel listing must beat: one thread, a
# FileEntry per file, extensionless files opened and sniffed while listing, a sorted Python list.
BASELINE = r'''
import json, os, posixpath, sys, time
from dataclasses import dataclass
import pyarrow.fs as pafs
from cxr_batch.archive import storage
from cxr_batch.archive.discover import IMAGE_EXTENSIONS
from cxr_batch.archive.storage import text_name as _text
@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
def wanted(name):
    if name.startswith("."): return "no"
    ext = os.path.splitext(name)[1].lower()
    return "yes" if ext in IMAGE_EXTENSIONS else ("sniff" if ext == "" else "no")
def local(root):
    seen, stack = set(), [(root, "")]
    while stack:
        folder, rel = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen: continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it: items = list(it)
        for e in items:
            name = _text(e.name); child = f"{rel}/{name}" if rel else name
            if e.is_dir(follow_symlinks=True):
                if not e.name.startswith("."): stack.append((e.path, child))
                continue
            kind = wanted(e.name)
            if kind == "no": continue
            if kind == "sniff":
                with open(e.path, "rb") as f:
                    if f.read(132)[128:132] != b"DICM": continue
            yield FileEntry(child, e.stat().st_size)
def store(fs, root, sample):
    sniffed, t_sniff = 0, 0.0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File: continue
        rel = posixpath.relpath(info.path, root)
        kind = wanted(posixpath.basename(rel))
        if kind == "sniff" and sniffed < sample:  # timed on a sample, extrapolated by the caller
            t = time.perf_counter()
            with fs.open_input_file(info.path) as f: head = f.read(132)
            t_sniff += time.perf_counter() - t; sniffed += 1
        yield FileEntry(rel, info.size), sniffed, t_sniff
t0 = time.perf_counter()
fs, root = storage.resolve(sys.argv[1])
if isinstance(fs, pafs.LocalFileSystem):
    files, extra = sorted(local(root), key=lambda e: e.path), {}
else:
    out = list(store(fs, root, int(sys.argv[2])))
    files = sorted((e for e, _, _ in out), key=lambda e: e.path)
    extra = {"sniffed": out[-1][1], "sniff_s": out[-1][2]} if out else {}
import resource
print(json.dumps({"files": len(files), "seconds": time.perf_counter() - t0, **extra,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
'''

OURS = r'''
import json, sys, time
import pyarrow as pa
from cxr_batch.archive.discover import list_archive
from cxr_batch.archive.results import pending
t0 = time.perf_counter()
listing = list_archive(sys.argv[1], threads=int(sys.argv[2]) or None)
t_list = time.perf_counter() - t0
# What the scoring driver does next: --limit 64, then the resume anti-join against 1,000 done paths.
todo = pending(listing.first(64).files, [listing.files["path"].slice(0, 1000).combine_chunks()])
import resource
print(json.dumps({"files": listing.files.num_rows, "seconds": t_list, "todo": todo.num_rows, **listing.stats(),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
'''


def run_measured(code: str, *args: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python (its peak RSS is its own, from getrusage); -> its JSON line."""
    return run_json([sys.executable, "-c", code, *args], what="measured listing process", env=env)[0]


# ---------------------------------------------------------------- S3 on loopback

SERVER = r'''
import logging, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
import boto3
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="x",
             aws_secret_access_key="x").create_bucket(Bucket="bench")
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
body = b"\0" * 128 + b"DICM" + b"\0" * 892
for i in range(int(sys.argv[1])):  # a PACS export: studies of 2 series of 50 extensionless images
    backend.put_object("bench", f"studies/{i // 100:05d}/series{i // 50 % 2}/IM{i % 50:04d}", body)
print(port, flush=True)
sys.stdin.read()  # serve until the benchmark closes our stdin
'''


def bench_s3(s: ListingBenchSettings) -> dict:
    """The previous S3 listing (one thread, a GET per extensionless key) beside ``list_archive``."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(s.s3_keys)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        env.pop("AWS_ENDPOINT_URL_S3", None)
        uri = "s3://bench/studies"
        base = run_measured(BASELINE, uri, str(s.s3_sniff_sample), env=env)
        # Listing and sniffing are timed apart: the sniff GETs ran on a sample, extrapolated to every key.
        per_get = base["sniff_s"] / max(1, base["sniffed"])
        base["seconds_listing"] = base["seconds"] - base["sniff_s"]
        base["seconds"] = base["seconds_listing"] + per_get * s.s3_keys
        base["sniff_get_ms"] = round(1000 * per_get, 2)
        return {"keys": s.s3_keys, "baseline": base, "ours_1": run_measured(OURS, uri, "1", env=env),
                "ours": run_measured(OURS, uri, "0", env=env)}
    finally:
        server.stdin.close()
        server.wait(timeout=60)


# ---------------------------------------------------------------- end to end (starts Ray)

def bench_e2e(archive: str, work: Path, src: str | None) -> dict:
    """``cxr-batch score ARCHIVE --out X --limit 64 --model resnet18:none``: seconds to the first
    published rows (parts of 16 rows) and to the end, and the driver's peak RSS (VmHWM, polled)."""
    out = work / f"e2e-out-{'baseline' if src else 'ours'}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + "-cams", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": src} if src else dict(os.environ)
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", archive, "--out", str(out), "--limit", "64",
           "--model", "resnet18:none", "--rows-per-part", "16"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                         cwd=src or None)
    first, peak_kb = None, 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak_kb = max(peak_kb, next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")))
        except (OSError, StopIteration):
            pass
        if first is None and out.is_dir() and any(n.startswith("part-") for n in os.listdir(out)):
            first = time.perf_counter() - t0
        time.sleep(0.05)
    log = p.stdout.read()
    if p.returncode != 0:
        raise RuntimeError(f"cxr-batch score failed ({p.returncode}):\n{log[-3000:]}")
    return {"first_rows_s": round(first, 1) if first else None, "total_s": round(time.perf_counter() - t0, 1),
            "driver_peak_rss_mb": round(peak_kb / 1024), "code": src or "this checkout"}


# ---------------------------------------------------------------- the run

def run(s: ListingBenchSettings, log=print) -> dict:
    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = {"settings": asdict(s), "machine": machine()}
    try:
        if s.archive:
            local = {"path": s.archive, "files": "given"}
        elif s.files:
            log(f"building {s.files:,} hard links under {work}")
            local = build_local(work, s)
        for name, code, args in (("baseline", BASELINE, ()), ("ours_1", OURS, ("1",)), ("ours", OURS, ("0",))):
            if s.archive or s.files:
                log(f"local listing: {name}")
                result.setdefault("local", {"archive": local})[name] = run_measured(code, local["path"], *args)
        if s.s3_keys:
            log(f"S3 listing of {s.s3_keys:,} keys on loopback")
            result["s3"] = bench_s3(s)
        if s.e2e and "local" in result:
            log("end to end: cxr-batch score --limit 64")
            result["e2e"] = {"ours": bench_e2e(local["path"], work, None)}
            if s.baseline_src:
                result["e2e"]["baseline"] = bench_e2e(local["path"], work, s.baseline_src)
    finally:
        if not s.keep and not s.archive:
            shutil.rmtree(work / "archive", ignore_errors=True)
            shutil.rmtree(work / "_sources", ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def format_table(r: dict) -> str:
    lines = [f"{'measurement':<62}{'files':>11}{'seconds':>9}{'files/s':>11}{'ratio':>7}{'peak RSS MB':>13}"]

    def row(label, m, base):
        ratio = base["seconds"] / m["seconds"] if m["seconds"] else float("nan")
        lines.append(f"{label:<62}{m['files']:>11,}{m['seconds']:>9.1f}{m['files'] / m['seconds']:>11,.0f}"
                     f"{ratio:>7.1f}{m['peak_rss_mb']:>13,}")

    for part, title in (("local", "local disk"), ("s3", "S3 on loopback (moto)")):
        if part not in r:
            continue
        base = r[part]["baseline"]
        row(f"{title}: previous discover (1 thread, sniffing)", base, base)
        row(f"{title}: list_archive, 1 thread", r[part]["ours_1"], base)
        row(f"{title}: list_archive, {'8' if part == 'local' else '32'} threads (default)", r[part]["ours"], base)
    if "s3" in r:
        b = r["s3"]["baseline"]
        lines.append(f"  S3 previous: listing {b['seconds_listing']:.1f} s + one GET per extensionless key at"
                     f" {b['sniff_get_ms']} ms (timed on {b['sniffed']:,} keys, extrapolated to {r['s3']['keys']:,})")
    for name, e in r.get("e2e", {}).items():
        lines.append(f"end to end, {name} ({e['code']}): first rows after {e['first_rows_s']} s, done in"
                     f" {e['total_s']} s, driver peak RSS {e['driver_peak_rss_mb']:,} MB")
    m = r["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB; load average"
                 f" {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_batch.bench.listing", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--files", type=int, default=1_000_000, help="files in the local archive; 0 skips the local part")
    p.add_argument("--s3-keys", type=int, default=20_000, help="0 skips the S3 part")
    p.add_argument("--e2e", action="store_true", help="also time `cxr-batch score --limit 64` (starts Ray)")
    p.add_argument("--baseline-src", default=None, help="a checkout of an earlier cxr-batch for the e2e baseline")
    p.add_argument("--keep", action="store_true", help="keep the generated archive")
    p.add_argument("--archive", default=None, help="reuse an archive an earlier run kept (--keep)")
    p.add_argument("--out-json", default=None)
    a = p.parse_args(argv)
    s = ListingBenchSettings(workdir=a.workdir, files=a.files, s3_keys=a.s3_keys, e2e=a.e2e,
                             baseline_src=a.baseline_src, keep=a.keep, archive=a.archive)
    result = run(s, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
