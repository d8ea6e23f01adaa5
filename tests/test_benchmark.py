"""The benchmark keeps working (tiny archive, small model); its numbers are never asserted."""

import json

import pytest
import torch
from click.testing import CliRunner

from cxr_batch.benchmark import PeakMemory, compare
from cxr_batch.cli import main
from cxr_batch.model import build_model
from cxr_batch.score import ScoreSettings, plan_resources, prepare_model
from cxr_batch.transforms import normalize


def test_prepared_model_gives_the_same_outputs():
    x = normalize(torch.randint(0, 256, (2, 96, 96), dtype=torch.uint8))
    with torch.inference_mode():
        logits, features = build_model("resnet18", "none").eval()(x)
        fused = prepare_model(build_model("resnet18", "none"), torch.device("cpu"), channels_last=True, compile=False)
        logits2, features2 = fused(x)
    assert torch.allclose(logits, logits2, rtol=1e-4, atol=1e-4)
    assert torch.allclose(features, features2, rtol=1e-4, atol=1e-3 * features.abs().max().item())


def test_two_cpu_plan_gives_torch_both_cpus_and_still_fits():
    plan = plan_resources(2, 0, ScoreSettings(archive=".", out="o"))
    assert plan.actors == 1 and plan.torch_threads == 2
    assert plan.actors * plan.cpus_per_actor + 2 * plan.task_cpus <= 2  # or Ray Data waits forever
    explicit = plan_resources(2, 0, ScoreSettings(archive=".", out="o", cpus_per_actor=1))
    assert explicit.torch_threads == 1  # an explicit --cpus-per-actor is taken at its word
    big = plan_resources(16, 0, ScoreSettings(archive=".", out="o"))
    assert big.torch_threads == 4 and big.actors == 3


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
                                  "--max-side", "256", "--model", "resnet18:none", "--batch-size", "4",
                                  "--memory-check", "--memory-images", "4", "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    assert "b/a" in r.output and "(b) cxr-batch score, bf16" in r.output
    result = json.loads(out.read_text())
    assert {"machine", "settings", "archive", "model", "baseline", "forward", "score", "fastest_agreeing_mode",
            "memory_check"} <= set(result)
    assert result["model"]["calibrated_head"] is True
    assert result["baseline"]["images"] == 8
    for key in ("images_per_s", "seconds", "peak_rss_mb", "peak_anon_mb", "label_agreement", "max_prob_diff"):
        assert key in result["baseline"], key
    for mode in ("fp32", "bf16"):
        row = result["score"][mode]
        for key in ("images_per_s", "b_over_a", "b_over_c", "first_rows_s", "peak_rss_mb", "label_agreement",
                    "max_prob_diff", "plan"):
            assert row[key] is not None, (mode, key)
        assert row["images"] == 8 and row["errors"] == 0 and "steady_images_per_s" in row and "b_over_c_steady" in row
        assert result["forward"][mode]["images_per_s"] > 0
    assert result["score"]["fp32"]["label_agreement"] == 1.0 and result["score"]["fp32"]["max_prob_diff"] == 0.0
    m = result["memory_check"]
    assert m["small"]["images"] == 4 and m["large"]["images"] == 40
    assert {"rss_growth", "anon_growth", "process_growth"} <= set(m)
