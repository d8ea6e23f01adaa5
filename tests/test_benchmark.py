"""The benchmark keeps working (tiny archive, small model); its numbers are never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cxr_batch.bench.baseline import _torchvision_names
from cxr_batch.bench.inputs import make_bench_archive
from cxr_batch.bench.memory import PeakMemory
from cxr_batch.bench.run import compare
from cxr_batch.bench.settings import BenchSettings, decode_on, parse_mode
from cxr_batch.errors import EXIT_ERROR, InputError
from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
from cxr_batch.cli import main
from cxr_batch.model.network import build_model, torchvision_resnet
from cxr_batch.model.registry import describe

ROOT = str(Path(__file__).resolve().parents[1])


def test_modes_parse_and_bad_ones_are_refused():
    assert parse_mode("fp32") == ("fp32", False, True)
    assert parse_mode("bf16+compile") == ("bf16", True, True)
    assert parse_mode("bf16+nocams+compile") == ("bf16", True, False)
    assert parse_mode("bf16+cpudecode") == ("bf16", False, True) and decode_on("bf16+cpudecode") == "cpu"
    assert decode_on("bf16+nocams") == "auto"  # score's default: the GPU decodes where the model runs on one
    for bad in ("fp16", "bf16+fast", "fp32+compile+compile", ""):
        assert parse_mode(bad) is None, bad
    with pytest.raises(InputError, match="fp32 is required"):
        BenchSettings(workdir=".", modes=("bf16",))
    with pytest.raises(InputError, match="Invalid modes"):
        BenchSettings(workdir=".", modes=("fp32", "int8"))
    with pytest.raises(InputError, match="Invalid device"):
        BenchSettings(workdir=".", device="tpu")


def test_bench_archive_is_the_same_whoever_draws_it(tmp_path, monkeypatch):
    parallel = make_bench_archive(tmp_path / "a", 6, 64, 96, seed=3)  # a process pool on a multi-CPU machine
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    serial = make_bench_archive(tmp_path / "b", 6, 64, 96, seed=3)
    files = sorted(p.relative_to(parallel) for p in parallel.rglob("*.jpeg"))
    assert len(files) == 6 and {f.parts[0] for f in files} == {"NORMAL", "PNEUMONIA"}
    assert all((parallel / f).read_bytes() == (serial / f).read_bytes() for f in files)


@pytest.mark.parametrize("cam_layer,cam_stride", [(4, 16), (3, 16), (2, 8)])
def test_baseline_builds_the_checkpoint_s_own_network(tmp_path, cam_layer, cam_stride):
    """A trained checkpoint ends at layer3 or layer2 (earlier ones ran layer4 without its stride);
    the plain-PyTorch baseline must compute the same network, or its speed and agreement compare
    different models."""
    assert describe("resnet18:none").cam_stride == 32 and describe("resnet18:none").cam_layer == 4
    path = str(tmp_path / "s16.ckpt")
    net = build_model("resnet18", "none", cam_stride=cam_stride, cam_layer=cam_layer).eval()
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={},
                                    cam_stride=cam_stride, cam_layer=cam_layer), path)
    info = describe(path)
    assert info.cam_stride == cam_stride and info.cam_layer == cam_layer
    plain = torchvision_resnet(info.arch, info.cam_stride, info.cam_layer)  # what the baseline builds
    plain.fc = torch.nn.Linear(plain.fc.in_features, 2)
    plain.load_state_dict(_torchvision_names(net.state_dict()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), net(x)[0], atol=1e-5)


def test_cam_layer_3_benchmarks_the_trained_models_network_with_the_spec_s_weights(tmp_path):
    """`--cam-layer 3` measures the network `cxr-batch train` writes from ImageNet weights, `--cam-stride 16`
    the one it wrote before (layer4 dilated), without a trained checkpoint: the spec's own weights, its
    own batch-norm estimate and head."""
    from cxr_batch.bench.inputs import calibrated_checkpoint
    from cxr_batch.model.registry import load

    archive = make_bench_archive(tmp_path / "a", 4, 64, 64, seed=1)
    paths = sorted(str(p.relative_to(archive)) for p in archive.rglob("*.jpeg"))
    assert BenchSettings(workdir=".", cam_layer=3).network() == (16, 3)
    assert BenchSettings(workdir=".", cam_stride=16).network() == (16, 4) and BenchSettings(workdir=".").network() is None
    layer3 = calibrated_checkpoint("resnet18:none", str(archive), paths, tmp_path / "l3.ckpt", network=(16, 3))
    dilated = calibrated_checkpoint("resnet18:none", str(archive), paths, tmp_path / "s16.ckpt", network=(16, 4))
    plain = calibrated_checkpoint("resnet18:none", str(archive), paths, tmp_path / "s32.ckpt")
    assert describe(dilated).cam_stride == 16 and describe(plain).cam_stride == 32
    assert (describe(layer3).cam_stride, describe(layer3).cam_layer) == (16, 3)
    a, b, c = (load(describe(m)).state_dict() for m in (dilated, plain, layer3))
    assert torch.equal(a["trunk.0.weight"], b["trunk.0.weight"])  # the same weights, only layer4's stride differs
    assert torch.equal(c["trunk.6.0.conv1.weight"], b["trunk.6.0.conv1.weight"]) and "trunk.7.0.conv1.weight" not in c
    assert BenchSettings(workdir=".", cam_layer=2).network() == (8, 2)
    with pytest.raises(InputError, match="stride 8 is layer2's"):
        BenchSettings(workdir=".", cam_stride=8)
    with pytest.raises(InputError, match="cam stride 16 with cam layer 3"):
        BenchSettings(workdir=".", cam_layer=3, cam_stride=32)


def test_compare_joins_on_path_and_skips_errors():
    import pandas as pd

    ref = pd.DataFrame({"path": ["a", "b", "c"], "pred": ["NORMAL", "PNEUMONIA", None], "prob_pneumonia": [0.2, 0.7, None]})
    other = pd.DataFrame({"path": ["c", "b", "a"], "pred": ["NORMAL", "NORMAL", "NORMAL"], "prob_pneumonia": [0.1, 0.45, 0.25]})
    r = compare(ref, other)
    assert r["compared"] == 2 and r["label_agreement"] == 0.5 and abs(r["max_prob_diff"] - 0.25) < 1e-9


def test_peak_memory_sees_this_process():
    with PeakMemory() as mem:
        block = bytearray(64 * 2**20)
    del block
    assert mem.peak_rss_mb >= 64 and mem.peak_anon_mb >= 64


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_writes_every_field(ray_session, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["benchmark", str(tmp_path / "work"), "--images", "8", "--min-side", "256",
                                  "--max-side", "256", "--model", "resnet18:none", "--cam-layer", "3", "--batch-size", "4",
                                  "--modes", "fp32,bf16,bf16+nocams", "--engines", "local", "--baseline-images", "6",
                                  "--decode-check", "--train-check", "--train-images", "16",
                                  "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    assert "b/a" in r.output and "(b) cxr-batch score, bf16" in r.output
    result = json.loads(out.read_text())
    assert {"machine", "settings", "archive", "model", "baseline", "forward", "score", "fastest_agreeing_mode"} <= set(result)
    assert result["model"]["calibrated_head"] is True and result["model"]["cam_stride"] == 16
    assert result["model"]["cam_layer"] == 3 and "CAM stride 16 (ends at layer3" in r.output
    from cxr_batch.archive.results import read_table

    probs = [p for p in read_table(str(tmp_path / "work" / "score-fp32")).column("prob_pneumonia").to_pylist()
             if p is not None]
    assert result["model"]["uncertain_share"] == round(sum(0.2 <= p <= 0.8 for p in probs) / len(probs), 3)
    assert "P(PNEUMONIA) in [0.2, 0.8] for" in r.output
    assert result["baseline"]["images"] == 6 and result["archive"]["images"] == 8
    assert result["device"] == "cpu" and result["decode_check"]["pil_draft_per_core_images_per_s"] > 0
    assert set(result["forward"]) == {"fp32", "bf16"}  # +nocams runs the same forward
    nocams = result["score"]["bf16+nocams"]
    assert nocams["images"] == 8 and nocams["errors"] == 0 and nocams["b_over_c"] is not None
    assert (tmp_path / "work" / "score-bf16-cams").is_dir() and not (tmp_path / "work" / "score-bf16-nocams-cams").exists()
    for key in ("images_per_s", "seconds", "peak_rss_mb", "peak_anon_mb", "label_agreement", "max_prob_diff"):
        assert key in result["baseline"], key
    for mode in ("fp32", "bf16"):
        row = result["score"][mode]
        for key in ("images_per_s", "b_over_a", "b_over_c", "first_rows_s", "peak_rss_mb", "plan"):
            assert row[key] is not None, (mode, key)
        assert row["images"] == 8 and row["errors"] == 0 and "steady_images_per_s" in row and "b_over_c_steady" in row
        assert result["forward"][mode]["images_per_s"] > 0
    # fp32 is the reference: comparing it with itself would always say 100%, so it claims nothing.
    assert result["score"]["fp32"]["reference"] and result["score"]["fp32"]["label_agreement"] is None
    bf16 = result["score"]["bf16"]
    assert not bf16["reference"] and bf16["compared"] == 8 and 0 <= bf16["label_agreement"] <= 1
    assert bf16["max_prob_diff"] is not None
    fp32_row = next(line for line in r.output.splitlines() if line.startswith("(b) cxr-batch score, fp32 "))
    assert "reference" in fp32_row and "100.0%" not in fp32_row
    # (d): the command in a fresh process, its start-up broken down, the same labels as (b) at fp32
    cli = result["cli"]["local"]
    assert cli["engine"] == "local" and cli["images"] == 8 and cli["errors"] == 0 and cli["b_over_a"] > 0
    assert cli["label_agreement"] == 1.0 and cli["compared"] == 8
    assert cli["startup"]["process_s"] > 0 and cli["startup"]["model_check_s"] > 0  # a fresh process pays both
    assert {"torch_import_s", "model_build_s", "first_batch_s", "first_rows_s"} <= set(cli["startup"])
    assert "(d) score CLI, fp32, local" in r.output and "start-up, engine local (s): process" in r.output
    # (e): one training worker on the session's 2-CPU Ray gets both CPUs, as the plain loop's threads
    t = result["train_check"]
    assert t["worker_cpus"] == t["threads"] == 2 and t["images"] == 16 and t["epochs"] == 2
    assert t["plain_images_per_s"] > 0 and t["worker_images_per_s"] > 0 and t["worker_over_plain"] > 0
    assert "(e) training resnet18" in r.output and "worker/plain" in r.output


def _without_ray(tmp_path) -> dict:
    """The environment of a machine where `import ray` fails, as on the lent GPU machines (torch, no
    Ray): a sitecustomize that every Python process started with it (the (d) command too) imports first."""
    block = tmp_path / "no-ray"
    block.mkdir()
    (block / "sitecustomize.py").write_text('import sys\nsys.modules["ray"] = None  # import ray -> ImportError\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), ROOT])}


@pytest.mark.slow
def test_benchmark_runs_without_ray_on_the_local_engine_and_says_what_it_left_out(tmp_path):
    env, out = _without_ray(tmp_path), tmp_path / "bench.json"
    cmd = [sys.executable, "jobs/benchmark.py", str(tmp_path / "work"), "--images", "4", "--min-side", "256",
           "--max-side", "256", "--model", "resnet18:none", "--batch-size", "4", "--modes", "fp32",
           "--engines", "local,ray", "--baseline-images", "2", "--memory-check", "--memory-images", "2",
           "--out-json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["ray"] is None and result["score_engine"] == "local"
    assert result["score"]["fp32"]["plan"]["engine"] == "local" and result["score"]["fp32"]["images"] == 4
    assert list(result["cli"]) == ["local"] and result["skipped"] == ["(d) --engine ray"]
    m = result["memory_check"]  # (it runs the same code as with Ray: one block of bench/run.py)
    assert m["small"]["images"] == 2 and m["large"]["images"] == 20
    assert {"rss_growth", "anon_growth", "process_growth"} <= set(m) and "memory check (" in r.stdout
    assert "(b) ran on the local engine: Ray is not installed here; not measured: (d) --engine ray" in r.stdout
    refused = subprocess.run(cmd + ["--train-check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == EXIT_ERROR and "--train-check runs `cxr-batch train`, which needs Ray" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
