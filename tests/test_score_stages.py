"""What the scoring job's Ray workers run, called directly: the model preparation, the NaN-for-None
columns Ray Data hands on, and workers that must start without torch."""

import os

import numpy as np
import pytest
import torch

from cxr_batch.model.network import build_model
from cxr_batch.pixels.transforms import normalize
from cxr_batch.jobs.score_stages import prepare_model


def test_prepared_model_gives_the_same_outputs():
    x = normalize(torch.randint(0, 256, (2, 96, 96), dtype=torch.uint8))
    with torch.inference_mode():
        logits, features = build_model("resnet18", "none").eval()(x)
        fused = prepare_model(build_model("resnet18", "none"), torch.device("cpu"), channels_last=True, compile=False)
        logits2, features2 = fused(x)
    assert torch.allclose(logits, logits2, rtol=1e-4, atol=1e-4)
    assert torch.allclose(features, features2, rtol=1e-4, atol=1e-3 * features.abs().max().item())


def test_an_fp32_cpu_model_is_frozen_and_gives_the_same_outputs_at_any_batch_size():
    """Traced on one image, the frozen model must hold for every batch size the engines hand it (the
    last batch of a run is short), and only fp32 is frozen: a trace would drop bf16 autocast."""
    model = build_model("resnet18", "none", cam_layer=3, cam_stride=16).eval()
    frozen = prepare_model(build_model("resnet18", "none", cam_layer=3, cam_stride=16), torch.device("cpu"),
                           channels_last=True, compile=False, precision="fp32", image_size=64)
    assert isinstance(frozen, torch.jit.ScriptModule)  # not the eager fallback
    with torch.inference_mode():
        for n in (1, 3, 5):
            x = normalize(torch.randint(0, 256, (n, 64, 64), dtype=torch.uint8))
            (logits, features), (logits2, features2) = model(x), frozen(x)
            assert features2.shape == features.shape == (n, 256, 4, 4)
            assert torch.allclose(logits, logits2, rtol=1e-4, atol=1e-4)
            assert torch.allclose(features, features2, rtol=1e-4, atol=1e-4 * features.abs().max().item())
    bf16 = prepare_model(build_model("resnet18", "none", cam_layer=3, cam_stride=16), torch.device("cpu"),
                         channels_last=True, compile=False, precision="bf16", image_size=64)
    assert not isinstance(bf16, torch.jit.ScriptModule)


def test_decode_and_finish_workers_do_not_import_torch():
    """Every Ray worker that runs a decode or finish task imports cxr_batch.jobs.score_stages: with torch that
    cost ~3 s and ~400 MB per worker."""
    import subprocess
    import sys

    code = "import sys, cxr_batch.jobs.score_stages, cxr_batch.model.cam; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_block_of_good_images_is_not_read_as_errors(tmp_path):
    """Ray Data hands the next stage an all-None column as float NaN; NaN must not count as an error."""
    from cxr_batch.jobs.score_stages import finish_batch

    n = 3
    nan = np.full(n, np.nan, np.float32)
    batch = {"path": np.array(["a.png", "b.png", "c.png"], dtype=object), "label": nan, "format": nan, "sha256": nan,
             "modality": nan, "view_position": nan, "sop_instance_uid": nan, "error": nan,
             "width": np.full(n, 8, np.int32), "height": np.full(n, 8, np.int32), "bytes": np.full(n, 9, np.int64),
             "pixels": np.zeros((n, 16, 16), np.uint8), "cam": np.random.default_rng(0).random((n, 4, 4), np.float32),
             "prob_pneumonia": np.array([0.2, 0.6, 0.9], np.float32)}
    info = {"threshold": 0.5, "model_id": "m", "cam_stride": 4, "cam_offset": 0.0, "image_size": 16}
    out = finish_batch(batch, info=info, cam_dir=str(tmp_path), cam_size=None, archive=str(tmp_path),
                       max_pixels=10**6, cam_scale="relative")
    assert list(out["error"]) == [None] * n and list(out["label"]) == [None] * n
    assert list(out["pred"]) == ["NORMAL", "PNEUMONIA", "PNEUMONIA"]
    assert all(os.path.exists(p) for p in out["cam_path"])


def nan_checkpoint(tmp_path, name: str, poison) -> str:
    """A real resnet18 checkpoint whose weights ``poison`` breaks in place."""
    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint

    net = build_model("resnet18", "none", cam_stride=16)
    with torch.no_grad():
        poison(net)
    uri = str(tmp_path / name)
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16), uri)
    return uri


def test_non_finite_model_outputs_fail_closed(tmp_path):
    """A NaN or infinite logit must never become pred = NORMAL (NaN >= threshold is False): every such
    row is an error row without a prediction, through the real decode, model and finish stages."""
    from cxr_batch.jobs.score_stages import NON_FINITE, Scorer, decode_batch, finish_batch
    from cxr_batch.model.registry import describe
    from cxr_batch.synth.archive import make_archive

    archive = make_archive(tmp_path / "a", n_train=0, n_val=0, n_test=4, size=64, seed=1)
    paths = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.jpeg"))
    cases = {"nan-weights.ckpt": lambda net: net.fc.weight.fill_(float("nan")),
             "inf-bias.ckpt": lambda net: net.fc.bias.fill_(float("inf")),
             "nan-conv.ckpt": lambda net: net.trunk[-1][0].conv1.weight.view(-1)[0].fill_(float("nan"))}
    for name, poison in cases.items():
        info = describe(nan_checkpoint(tmp_path, name, poison)).to_dict()
        batch = decode_batch({"path": np.array(paths, dtype=object)}, archive=str(archive), image_size=64,
                             max_pixels=10**6)
        scored = Scorer(info, threads=1, precision="fp32", compile=False, channels_last=True)(batch)
        out = finish_batch(scored, info=info, cam_dir=str(tmp_path / "cams"), cam_size=None, archive=str(archive),
                           max_pixels=10**6, cam_scale="absolute")
        assert list(out["error"]) == [NON_FINITE] * len(paths), name
        assert list(out["pred"]) == [None] * len(paths) and np.isnan(out["prob_pneumonia"]).all(), name
        assert list(out["cam_path"]) == [None] * len(paths), name


def test_scoring_applies_the_checkpoint_temperature_and_old_checkpoints_mean_t_1(tmp_path):
    from images import encode
    from PIL import Image

    from cxr_batch.jobs.score_stages import Scorer, decode_batch
    from cxr_batch.model.calibration import calibrated, margins
    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.registry import describe

    net = build_model("resnet18", "none", seed=3, cam_stride=16).eval()
    with torch.no_grad():
        net.fc.weight.mul_(300)  # a spread of probabilities, not all 0.5
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(encode(Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)), "PNG"))
    batch = decode_batch({"path": np.array([f"{i}.png" for i in range(6)], dtype=object)}, archive=str(tmp_path / "a"),
                         image_size=64, max_pixels=10**7)
    with torch.no_grad():
        margin = margins(net(normalize(torch.from_numpy(batch["pixels"])))[0].numpy())
        net.fc.bias.add_(torch.tensor([0.5, -0.5]) * float(np.median(margin)))  # centre: some above 0.5, some below
        margin = margins(net(normalize(torch.from_numpy(batch["pixels"])))[0].numpy())
    for temperature in (3.0, None):
        ck = make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16,
                             temperature=temperature or 1.0)
        if temperature is None:
            del ck["temperature"]  # as written before calibration existed
        save_checkpoint(ck, str(tmp_path / "m.ckpt"))
        info = describe(str(tmp_path / "m.ckpt"))
        assert info.temperature == (temperature or 1.0)
        out = Scorer(info.to_dict(), threads=1, precision="fp32", compile=False, channels_last=True)(dict(batch))
        assert np.allclose(out["logit_pneumonia"], margin, atol=1e-3)
        # The CAM is the log-odds map: in logit units, averaging to the image's raw (uncalibrated) logit.
        assert np.allclose(out["cam"].mean((1, 2)), margin, atol=1e-3)
        assert np.allclose(out["prob_pneumonia"], calibrated(margin, temperature or 1.0), atol=1e-4)
        assert out["prob_pneumonia"].min() < 0.4 and out["prob_pneumonia"].max() > 0.6


def test_an_io_error_is_a_row_error_and_outside_links_are_not_read(tmp_path):
    from cxr_batch.errors import DecodeError
    from cxr_batch.jobs.score_stages import _read

    os.symlink("/proc/self/mem", tmp_path / "io_error.jpeg")  # fails to read (EIO) for anyone, root too
    with pytest.raises(DecodeError, match="^unreadable file: "):
        _read(str(tmp_path), "io_error.jpeg", sniff=False, follow_symlinks=True)
    with pytest.raises(DecodeError, match="^symlink to outside the archive: not read"):
        _read(str(tmp_path), "io_error.jpeg", sniff=False, follow_symlinks=False)


def test_each_failure_gets_the_status_that_says_whether_a_rerun_helps(tmp_path):
    """The file's own fault is final ("error", "skipped"); the environment's is "retry"."""
    from images import encode
    from PIL import Image

    from cxr_batch.jobs.score_stages import decode_batch

    good = encode(Image.new("L", (64, 64), 128), "PNG")
    (tmp_path / "ok.png").write_bytes(good)
    (tmp_path / "big.png").write_bytes(good + b"\0" * 4000)  # grew past --max-bytes after the listing
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "NOTES").write_bytes(b"exported by PACS")
    os.symlink("/proc/self/mem", tmp_path / "eio.png")
    paths = ["ok.png", "big.png", "broken.png", "NOTES", "gone.png", "eio.png"]
    out = decode_batch({"path": np.array(paths, dtype=object), "sniff": np.array([p == "NOTES" for p in paths])},
                       archive=str(tmp_path), image_size=32, max_pixels=10**6, follow_symlinks=True,
                       max_bytes=len(good) + 100)
    got = dict(zip(paths, zip(out["status"], out["error"])))
    assert got["ok.png"] == (None, None)  # the finish stage says "scored"
    assert got["big.png"][0] == "error" and got["big.png"][1].startswith("file larger than --max-bytes")
    assert got["broken.png"][0] == "error"
    assert got["NOTES"][0] == "skipped"
    assert got["gone.png"] == ("retry", "file vanished after it was listed")
    assert got["eio.png"][0] == "retry" and got["eio.png"][1].startswith("unreadable file: ")


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    from cxr_batch.jobs.score_stages import auto_precision

    assert auto_precision("cpu", True) == "bf16" and auto_precision("cuda", True) == "bf16"
    assert auto_precision("cpu", False) == "fp32" and auto_precision("cuda", False) == "fp32"
    assert auto_precision("mps", True) == "fp32"  # autocast there is not what was measured


def test_native_bf16_matches_the_cpu_flags_and_the_scorer_uses_it():
    """oneDNN's check against the kernel's own view of the CPU: AVX512-BF16 or AMX-BF16 flags."""
    from cxr_batch.jobs.score_stages import Scorer, native_bf16
    from cxr_batch.model.registry import describe

    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    native = native_bf16(torch.device("cpu"))
    assert native == bool({"avx512_bf16", "amx_bf16"} & set(flags))
    scorer = Scorer(describe("resnet18:none").to_dict(), threads=1, precision="auto", compile=False, channels_last=False)
    assert scorer.precision == ("bf16" if native else "fp32") and scorer.autocast == native
    assert Scorer(describe("resnet18:none").to_dict(), threads=1, precision="fp32", compile=False,
                  channels_last=False).autocast is False


def test_a_scorer_refuses_a_cam_grid_that_its_network_does_not_have():
    """The driver places the cells without the network (archs.resnet_grid); a Scorer whose network puts
    them elsewhere must stop rather than write every peak half a cell off."""
    from cxr_batch.jobs.score_stages import Scorer
    from cxr_batch.model.registry import describe

    info = describe("resnet18:none").to_dict()
    Scorer(info, threads=1, precision="fp32", compile=False, channels_last=False)
    with pytest.raises(RuntimeError, match="resnet_grid"):
        Scorer({**info, "cam_offset": 8.0}, threads=1, precision="fp32", compile=False, channels_last=False)


def test_the_second_read_for_full_size_cams_has_the_first_read_s_checks(tmp_path):
    """--cam-size 0 reads each file again for its overlay: that read refuses an outside link and a
    file over --max-bytes as the first does, and a file whose bytes changed since it was scored."""
    import hashlib

    from PIL import Image

    from cxr_batch.jobs.score_stages import CHANGED, finish_batch
    from images import encode

    archive, outside = tmp_path / "archive", tmp_path / "secret.png"
    archive.mkdir()
    png = encode(Image.new("L", (32, 32), 90), "PNG")
    outside.write_bytes(png)
    for name in ("same.png", "changed.png"):
        (archive / name).write_bytes(png)
    (archive / "big.png").write_bytes(png + bytes(4000))
    os.symlink(outside, archive / "link.png")  # swapped in after its first read
    names = ["same.png", "link.png", "changed.png", "big.png"]
    digest = hashlib.sha256(png).hexdigest()
    n = len(names)
    batch = {"path": np.array(names, dtype=object), "error": np.array([None] * n, dtype=object),
             "sha256": np.array([digest, digest, hashlib.sha256(b"before").hexdigest(),
                                 hashlib.sha256((archive / "big.png").read_bytes()).hexdigest()], dtype=object),
             "width": np.full(n, 32, np.int32), "height": np.full(n, 32, np.int32), "bytes": np.full(n, 9, np.int64),
             "pixels": np.zeros((n, 16, 16), np.uint8), "cam": np.random.default_rng(0).random((n, 4, 4), np.float32),
             "prob_pneumonia": np.full(n, 0.7, np.float32)}
    info = {"threshold": 0.5, "model_id": "m", "cam_stride": 4, "cam_offset": 0.0, "image_size": 16}
    out = finish_batch(batch, info=info, cam_dir=str(tmp_path / "cams"), cam_size=0, archive=str(archive),
                       max_pixels=10**6, cam_scale="relative", max_bytes=len(png) + 100)
    got = dict(zip(names, zip(out["status"], out["error"])))
    assert got["same.png"] == ("scored", None) and os.path.exists(out["cam_path"][0])
    assert got["link.png"][0] == "error" and "symlink to outside the archive: not read" in got["link.png"][1]
    assert got["changed.png"] == ("retry", f"CAM PNG not written: TransientError: {CHANGED}")
    assert got["big.png"][0] == "error" and "file larger than --max-bytes" in got["big.png"][1]
    assert list(out["cam_path"][1:]) == [None] * 3
