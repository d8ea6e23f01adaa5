"""JPEGs decoded where the model runs (`--decode-on device`: nvJPEG on a GPU). Here the same code runs
torchvision's decode on the CPU: the model must see the same pixels as from the CPU decode stage, every
other file must be decoded as before, and every failure must keep the error the CPU path gives it."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_batch.jobs.score import ScoreSettings, run_score
from cxr_batch.jobs.score_stages import Scorer, decode_batch
from cxr_batch.model.registry import describe
from cxr_batch.synth.archive import make_archive

GRAY = ["test/NORMAL", "test/PNEUMONIA"]  # the phantoms: 8-bit grayscale JPEGs of 300 px


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Phantoms, plus one file of each kind the device must leave to the CPU, or fail on."""
    root = tmp_path_factory.mktemp("device-decode")
    make_archive(root, n_train=0, n_val=0, n_test=4, size=300, seed=2)
    phantom = next((root / "test" / "PNEUMONIA").glob("*.jpeg"))
    data, im = phantom.read_bytes(), Image.open(phantom)
    odd = root / "odd" / "NORMAL"
    odd.mkdir(parents=True)
    for name, mode, fmt in (("rgb.jpeg", "RGB", "JPEG"), ("cmyk.jpeg", "CMYK", "JPEG"), ("png.png", "L", "PNG")):
        im.convert(mode).save(odd / name, fmt)
    (odd / "truncated.jpeg").write_bytes(data[: len(data) * 2 // 3])
    # A whole-looking file (SOI ... EOI) whose entropy-coded data ends early: the header passes the check.
    (odd / "early-eoi.jpeg").write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    (odd / "text.jpeg").write_bytes(b"not a jpeg at all")
    # A sound header over a broken Huffman table: the device fails on it (and the batched call with it),
    # the CPU decoder too, and its error is the row's.
    bad = bytearray(data)
    at = bad.find(b"\xff\xc4")
    bad[at + 5: at + 25] = b"\xff" * 20
    (odd / "bad-huffman.jpeg").write_bytes(bytes(bad))
    return root


def _paths(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".jpeg", ".png"))


def test_device_decoded_jpegs_give_the_model_the_cpu_path_s_pixels_and_failures_keep_their_errors(folder):
    paths = _paths(folder)
    batch = {"path": np.array(paths, dtype=object)}
    args = dict(archive=str(folder), image_size=224, max_pixels=10**8)
    cpu, dev = decode_batch(batch, **args), decode_batch(batch, **args, device_decode=True)
    to_device = {p for p, b in zip(paths, dev["jpeg"]) if b}
    # early-eoi.jpeg looks whole from outside (SOI ... EOI), so it goes to the device; whether a decoder
    # refuses it or fills its missing half, the row must get the CPU path's verdict (libjpeg via PIL fills it).
    assert to_device == {p for p in paths if p.startswith(tuple(GRAY))} | {
        f"odd/NORMAL/{name}.jpeg" for name in ("rgb", "early-eoi", "bad-huffman")}
    assert not dev["pixels"][[p in to_device for p in paths]].any()  # left for the Scorer

    scorer = Scorer(describe("resnet18:none").to_dict(), threads=2, precision="fp32", compile=False,
                    channels_last=True, max_pixels=10**8)
    scorer.decode_jpegs(dev)
    assert "jpeg" not in dev
    for k in ("error", "status", "width", "height", "format", "sha256", "bytes"):
        assert list(dev[k]) == list(cpu[k]), k
    assert sum(e is None for e in cpu["error"]) == len(to_device) - 1 + 2  # less bad-huffman; the CMYK and the PNG
    assert dev["error"][paths.index("odd/NORMAL/bad-huffman.jpeg")].startswith("truncated or corrupt image data")
    # Full-size decode + antialiased resize against the CPU's decode + PIL's resize (300 px: no reduced-
    # scale decode): measured 0.1 gray levels apart on average, 1 at most.
    diff = np.abs(dev["pixels"].astype(int) - cpu["pixels"].astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 3, (diff.mean(), diff.max())
    assert (dev["pixels"][[p not in to_device for p in paths]] == cpu["pixels"][[p not in to_device for p in paths]]).all()


def test_a_device_decoded_run_on_ray_has_the_cpu_run_s_rows_and_pictures(folder, ray_session, tmp_path):
    """Through Ray Data the bytes travel from the decode tasks to the model actor as an Arrow column, and
    the overlays composed beside the model come back to the finish tasks, which only encode them."""
    runs = {}
    for decode_on, engine in (("cpu", "local"), ("device", "ray")):
        s = ScoreSettings(archive=str(folder), out=str(tmp_path / decode_on), model="resnet18:none", engine=engine,
                          decode_on=decode_on, batch_size=4, cam_scale="relative")
        summary = run_score(s)
        assert summary.plan["decode_on"] == decode_on and summary.plan["engine"] == engine
        runs[decode_on] = {r["path"]: r for r in pq.read_table(tmp_path / decode_on).to_pylist()}
    cpu, dev = runs["cpu"], runs["device"]
    assert sorted(cpu) == sorted(dev) == _paths(folder)
    for p in cpu:
        assert (dev[p]["error"], dev[p]["status"], dev[p]["width"]) == (cpu[p]["error"], cpu[p]["status"], cpu[p]["width"]), p
        if cpu[p]["error"] is None:
            assert abs(dev[p]["logit_pneumonia"] - cpu[p]["logit_pneumonia"]) < 0.05 * (1 + abs(cpu[p]["logit_pneumonia"])), p
            a, b = (np.asarray(Image.open(r[p]["cam_path"]), dtype=int) for r in (cpu, dev))
            assert a.shape == b.shape == (224, 224, 3) and dev[p]["cam_path"] != cpu[p]["cam_path"]
            assert np.abs(a - b).mean() < 2, (p, np.abs(a - b).mean())  # the same picture, to rounding


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_overlays_composed_in_torch_are_the_numpy_overlays(scale):
    import torch

    from cxr_batch.model.cam import CamGrid, overlay, overlay_batch

    rng = np.random.default_rng(0)
    grid = CamGrid(16, 7.5, 224)
    gray = rng.integers(0, 256, (4, 224, 224), dtype=np.uint8)
    cams = rng.normal(2, 4, (4, 14, 14)).astype(np.float32)
    cams[3] = 1.0  # a flat map: no heat on the relative scale, a constant one on the absolute
    want = np.stack([overlay(g, c, grid, scale=scale) for g, c in zip(gray, cams)])
    got = overlay_batch(torch.from_numpy(gray), torch.from_numpy(cams), grid, scale=scale).numpy()
    assert got.dtype == np.uint8 and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_decode_on_auto_is_the_cpu_without_a_gpu_and_bad_values_are_refused(tmp_path):
    from cxr_batch.errors import InputError
    from cxr_batch.jobs.score import _plan

    assert _plan("local", ScoreSettings(archive=".", out="o")).decode_on == "cpu"  # this machine has no GPU
    assert _plan("local", ScoreSettings(archive=".", out="o", decode_on="device")).decode_on == "device"
    with pytest.raises(InputError, match="Invalid --decode-on 'gpu'"):
        ScoreSettings(archive=".", out="o", decode_on="gpu")
    from cxr_batch.cli.summaries import _engine_line

    plan = {"engine": "local", "torch_threads": 2, "workers": 1}
    assert "beside the model" in _engine_line({**plan, "decode_on": "device"})  # the summary says where
    assert "beside the model" not in _engine_line({**plan, "decode_on": "cpu"})
