"""The benchmark run: how fast `cxr-batch score` is, measured against two yardsticks in the same run, on the same archive:

  (a) baseline  plain PyTorch as a tutorial reader writes it: a Dataset that opens each file with PIL,
                torchvision Resize/ToTensor/Normalize, DataLoader(num_workers=2), an fp32 loop, a CAM
                PNG per image coloured with matplotlib, pandas -> Parquet at the end;
  (b) score     ``run_score`` end to end on a local Ray, once per precision mode;
  (c) forward   the model alone on in-memory tensors, prepared exactly as the Scorer prepares it
                (same precision and batch size): the most any pipeline around it can reach;
  (d) CLI       `cxr-batch score` in a fresh process per engine (local, ray), fp32: what a user
                waits for, start-up included, with the engine's breakdown of it (cli_run.py);
  (e) training  optional (--train-check): one `cxr-batch train` worker against a plain training loop of
                the same model, precision, batch and threads (training.py).

Throughput is images per second of wall time, start-up included (model build, actor start), so a
pipeline must earn its start-up on the archive size measured; "steady" is the rate from the first
rows out to the last, which leaves the start-up out. Peak memory is the summed RSS of the
process and all its descendants (DataLoader workers, every Ray process), sampled from /proc.

Agreement: every mode is compared with fp32 on the same images (joined on ``path``). An untrained
ResNet head (``resnet101:none``) is useless for that: activations of a random trunk grow through the
residual blocks (logits ~4e4, every probability exactly 0 or 1), so agreement would be 100% for
any arithmetic. Unless told otherwise the benchmark therefore scores a derived checkpoint: the same
architecture and weights, with batch-norm statistics re-estimated on 32 archive images (what the
first training steps would do) and a head along a random direction drawn with a fixed seed, scaled
so that P(PNEUMONIA) spreads around 0.5. Compute per image is unchanged.
"""


from __future__ import annotations

import gc
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import InputError
from . import host
from .baseline import baseline_pytorch
from .inputs import calibrated_checkpoint, make_bench_archive
from .memory import PeakMemory
from .probes import bare_forward, decode_check
from .settings import REFERENCE, BenchSettings, decode_on, parse_mode


def _timed(fn, *args, **kwargs) -> dict:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(mem.peak_rss_mb), "peak_anon_mb": round(mem.peak_anon_mb),
            "peak_process_mb": round(mem.peak_process_mb), "value": value}


def compare(reference, other) -> dict:
    """Label agreement and max |P difference| of ``other`` against ``reference`` (DataFrames), on path."""
    cols = ["path", "pred", "prob_pneumonia"]
    ref = reference[reference["pred"].notna()][cols]
    both = ref.merge(other[other["pred"].notna()][cols], on="path", suffixes=("_ref", ""))
    if both.empty:
        return {"compared": 0, "label_agreement": None, "max_prob_diff": None}
    return {"compared": len(both), "label_agreement": round(float((both["pred_ref"] == both["pred"]).mean()), 4),
            "max_prob_diff": float((both["prob_pneumonia_ref"] - both["prob_pneumonia"]).abs().max())}


def run_benchmark(s: BenchSettings, *, log=print, verbose: bool = False) -> dict:
    """Run (a), (c) and (b) on one archive and compare them; returns every number as a dict."""
    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = {"settings": asdict(s)}
    s = _without_ray(s, result, log)  # first: a refused --train-check is the only line, before torch loads
    result["machine"] = machine()
    log(f"benchmark settings: {json.dumps(asdict(s))}")
    t0 = time.perf_counter()
    archive, paths, model = _inputs(s, work, result, log)
    device = _device(s.device)
    _measure_baseline(s, work, archive, paths, model, device, result, log)
    _measure_forward(s, model, device, result, log)
    if s.decode_check:
        result["decode_check"] = decode_check(archive, paths, image_size=result["model"]["image_size"], device=device)
        log(f"decode check: {result['decode_check']}")
    _measure_score(s, work, archive, paths, model, device, result, log, verbose)
    _measure_cli(s, work, archive, len(paths), model, device, result, log)
    if s.train_check:
        _measure_train(s, work, device, result, log, verbose)
    _compare_all(work, result)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def ray_version() -> str | None:
    """Ray's version, or None where it is not installed."""
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def _without_ray(s: BenchSettings, result: dict, log) -> BenchSettings:
    """Where Ray is not installed (the lent GPU machines have torch but no Ray, and its wheel is larger
    than what travels there), measure what runs without it: (a), (c), (b) and the memory check on the
    local engine, (d) local. Ray's own rows are left out and said so; (e) trains with Ray and is refused."""
    result["score_engine"] = "ray" if ray_version() else "local"
    if result["score_engine"] == "ray":
        return s
    if s.train_check:
        raise InputError("--train-check runs `cxr-batch train`, which needs Ray, and Ray is not installed here;"
                         " install ray[data,train,default] or leave --train-check out.")
    result["skipped"] = ["(d) --engine ray"] if "ray" in s.engines else []
    log("Ray is not installed here: (b) and the memory check run on the local engine (no Ray)"
        + ("; (d) --engine ray is skipped" if result["skipped"] else ""))
    return replace(s, engines=tuple(e for e in s.engines if e != "ray"))


def _inputs(s: BenchSettings, work: Path, result: dict, log) -> tuple[str, list[str], str]:
    """(archive, its first ``s.images`` paths, the model spec (a), (b) and (c) all run)."""
    from ..archive.discover import discover
    from ..model.registry import describe

    t0 = time.perf_counter()
    archive = s.archive or str(make_bench_archive(work / "archive", s.images, s.min_side, s.max_side, seed=s.seed))
    entries = discover(archive)[: s.images]
    paths, sizes = [e.path for e in entries], [e.size for e in entries]
    result["archive"] = {"path": archive, "images": len(paths), "mean_kb": round(sum(sizes) / len(sizes) / 1024),
                         "prepared_s": round(time.perf_counter() - t0, 1)}
    info = describe(s.model)
    model, network = s.model, (info.cam_stride, info.cam_layer)
    if s.network() not in (None, network) and (info.trained or not s.calibrate):
        raise InputError(f"--cam-stride/--cam-layer rebuild an ARCH:WEIGHTS model (with --calibrate); {s.model} is"
                         f" a network with stride {info.cam_stride}, layer {info.cam_layer}. Leave them out for a"
                         " checkpoint.")
    if s.calibrate and not info.trained:
        name = "".join(c if c.isalnum() else "-" for c in s.model)[-60:]  # the cache is per spec, network and seed
        network = s.network() or network
        model = calibrated_checkpoint(s.model, archive, paths,
                                      work / f"calibrated-{name}-s{network[0]}-l{network[1]}-seed{s.seed}.ckpt",
                                      seed=s.seed, network=network)
    result["model"] = {"spec": s.model, "scored_as": model, "calibrated_head": model != s.model, "arch": info.arch,
                       "image_size": info.image_size, "cam_stride": network[0], "cam_layer": network[1]}
    log(f"archive {archive}: {len(paths)} images, mean {result['archive']['mean_kb']} KB; model {model}"
        f" (CAM stride {network[0]}, layer {network[1]})")
    return archive, paths, model


def _measure_baseline(s, work: Path, archive: str, paths: list, model: str, device: str, result: dict, log) -> None:
    """(a) plain PyTorch, on the first ``s.baseline_images`` images."""
    import torch

    from ..model.registry import describe, load

    result["device"] = device if device == "cpu" else f"cuda: {torch.cuda.get_device_name()}"
    scored = describe(model)
    state = load(scored).state_dict()
    base_paths = paths[: s.baseline_images] if s.baseline_images else paths
    r = _timed(baseline_pytorch, archive, base_paths, state, scored.arch, work / "baseline.parquet",
               batch_size=s.batch_size, device=device, cam_stride=scored.cam_stride, cam_layer=scored.cam_layer,
               threshold=scored.threshold,
               temperature=scored.temperature)
    result["baseline"] = _rate(r, len(base_paths))
    log(f"(a) plain PyTorch fp32: {result['baseline']['images_per_s']:.2f} images/s")
    del state
    gc.collect()


def _measure_forward(s: BenchSettings, model: str, device: str, result: dict, log) -> None:
    """(c) the bare forward, once per precision and compile setting (CAMs or not, it is the same)."""
    import torch

    result["forward"] = {}
    for mode in s.modes:
        precision, compiled, _ = parse_mode(mode)
        key = _forward_key(mode)
        if key not in result["forward"]:
            ips = bare_forward(model, precision=precision, compile=compiled, batch_size=s.batch_size,
                               batches=s.forward_batches, device=device)
            result["forward"][key] = {"images_per_s": round(ips, 2)}
            log(f"(c) bare forward {key}: {ips:.2f} images/s")
        if compiled:
            torch._dynamo.reset()
    gc.collect()


def _measure_score(s, work: Path, archive: str, paths: list, model: str, device: str, result: dict, log,
                   verbose: bool) -> None:
    """(b) ``run_score`` per mode on a local Ray that this starts (and the memory check); without Ray
    installed, on the local engine."""
    engine = result["score_engine"]
    with _local_ray(s, result, verbose) if engine == "ray" else nullcontext():
        result["score"] = {mode: _score_mode(s, work, archive, len(paths), model, device, mode, log, engine)
                           for mode in s.modes}
        if s.memory_check:
            result["memory_check"] = memory_check(s, work, log=log, engine=engine)


@contextmanager
def _local_ray(s: BenchSettings, result: dict, verbose: bool):
    """A local Ray for (b), warmed up, shut down after."""
    from ..jobs.ray_env import ray_running

    with ray_running(None, num_cpus=s.num_cpus, verbose=verbose):
        import ray
        import ray.data

        result["ray_cpus"] = ray.cluster_resources().get("CPU", 0)
        # Ray Data's first execution in a process starts its own helper actors, which takes seconds. Paid
        # once before any mode, with ray.init, so that it does not land on whichever mode runs first.
        t_warm = time.perf_counter()
        ray.data.range(2).map_batches(lambda b: b).materialize()
        result["ray_data_warmup_s"] = round(time.perf_counter() - t_warm, 1)
        yield


def _score_mode(s, work: Path, archive: str, n: int, model: str, device: str, mode: str, log, engine: str) -> dict:
    from ..jobs.score import ScoreSettings, run_score

    precision, compiled, cams = parse_mode(mode)
    settings = ScoreSettings(archive=archive, out=str(_score_out(work, mode)), model=model, batch_size=s.batch_size,
                             precision=precision, compile=compiled, cams=cams, overwrite=True, limit=n,
                             device="gpu" if device == "cuda" else "cpu", engine=engine, decode_on=decode_on(mode))
    marks = []  # (time, rows done) each time rows reach the driver (at most every 2 s)
    started_at = time.perf_counter()
    r = _timed(run_score, settings, progress=lambda sm, total: marks.append((time.perf_counter(), sm.scored + sm.errors)))
    summary = r.pop("value")
    row = _rate(r, summary.scored + summary.errors)
    row.update(errors=summary.errors, plan=summary.plan, **_steady(marks, started_at))
    log(f"(b) cxr-batch score {mode}: {row['images_per_s']:.2f} images/s ({row['seconds']:.1f} s,"
        f" peak RSS {row['peak_rss_mb']} MB)")
    return row


def _measure_cli(s: BenchSettings, work: Path, archive: str, n: int, model: str, device: str, result: dict,
                 log) -> None:
    """(d) per engine, after (b)'s Ray is gone: each run starts from nothing, as a user's does."""
    from .cli_run import run_score_cli, score_command

    result["cli"] = {}
    for engine in s.engines:
        cmd = score_command(archive, str(work / f"cli-{engine}"), model, engine=engine, precision=REFERENCE,
                            batch_size=s.batch_size, limit=n, device="gpu" if device == "cuda" else "cpu")
        r = _timed(run_score_cli, cmd)
        got = r.pop("value")
        sm = got["summary"]
        r["seconds"] = got["wall_s"]  # from the command's start to its exit, as a user waits
        row = _rate(r, sm["scored"] + sm["errors"])
        startup = {"process_s": round(got["wall_s"] - sm["seconds"], 2), **sm["startup"]}
        row.update(errors=sm["errors"], engine=sm["plan"].get("engine"), plan=sm["plan"], startup=startup)
        result["cli"][engine] = row
        log(f"(d) cxr-batch score --engine {engine}, fp32, fresh process: {row['images_per_s']:.2f} images/s"
            f" ({row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']} MB)")


def _measure_train(s: BenchSettings, work: Path, device: str, result: dict, log, verbose: bool) -> None:
    """(e) on a local Ray of its own, after the scoring runs: nothing else competes for the cores."""
    from ..jobs.ray_env import ray_running
    from .training import train_check

    with ray_running(None, num_cpus=s.num_cpus, verbose=verbose):
        result["train_check"] = train_check(s, work, device, log=log)


def _score_out(work: Path, mode: str) -> Path:
    return work / f"score-{mode.replace('+', '-')}"


def _compare_all(work: Path, result: dict) -> None:
    """Agreement with the fp32 run, and the ratios b/a and b/c. The fp32 run is the reference: its
    own agreement is not measured (comparing it with itself would always say 100%)."""
    import pandas as pd

    from ..archive.results import read_table

    ref = read_table(str(_score_out(work, REFERENCE))).to_pandas()
    # Agreement says something only where the model is unsure of some images: a saturated model (every P
    # 0 or 1) agrees with any arithmetic. The share of the reference run's P(PNEUMONIA) in [0.2, 0.8].
    p = ref["prob_pneumonia"].dropna()
    result["model"]["uncertain_share"] = round(float(p.between(0.2, 0.8).mean()), 3) if len(p) else None
    result["baseline"].update(compare(ref, pd.read_parquet(work / "baseline.parquet")))
    a = result["baseline"]["images_per_s"]
    for mode, row in result["score"].items():
        c = result["forward"][_forward_key(mode)]["images_per_s"]
        if mode == REFERENCE:
            row.update(compared=None, label_agreement=None, max_prob_diff=None, reference=True)
        else:
            row.update(compare(ref, read_table(str(_score_out(work, mode))).to_pandas()), reference=False)
        row.update(b_over_a=round(row["images_per_s"] / a, 2), b_over_c=round(row["images_per_s"] / c, 2),
                   b_over_c_steady=round(row["steady_images_per_s"] / c, 2) if row["steady_images_per_s"] else None)
    for engine, row in result.get("cli", {}).items():
        row.update(compare(ref, read_table(str(work / f"cli-{engine}")).to_pandas()),
                   b_over_a=round(row["images_per_s"] / a, 2))
    agreeing = [m for m, row in result["score"].items() if row["reference"] or (row["label_agreement"] or 0) >= 0.99]
    result["fastest_agreeing_mode"] = max(agreeing, key=lambda m: result["score"][m]["images_per_s"])


def _device(choice: str) -> str:
    import torch

    if choice == "gpu" and not torch.cuda.is_available():
        raise InputError("--device gpu, but torch sees no GPU here; use --device cpu or auto.")
    return "cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu"


def _forward_key(mode: str) -> str:
    return mode.replace("+nocams", "").replace("+cpudecode", "")


def _steady(marks: list, t0: float) -> dict:
    """Start-up (seconds until the first rows are out) and the rate from then on: what the
    pipeline does per image once the actor is up, apart from what it costs to start."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return {"first_rows_s": round(marks[0][0] - t0, 1) if marks else None, "steady_images_per_s": None}
    (t1, n1), (t2, n2) = marks[0], marks[-1]
    return {"first_rows_s": round(t1 - t0, 1), "steady_images_per_s": round((n2 - n1) / (t2 - t1), 2)}


def _rate(r: dict, images: int) -> dict:
    r.pop("value", None)
    return {"images": images, "images_per_s": round(images / r["seconds"], 2), **r}


def memory_check(s: BenchSettings, work: Path, *, log=print, engine: str = "ray") -> dict:
    """Score N, then 10N small phantoms with the same settings: peak memory must not grow with N."""
    from ..jobs.score import ScoreSettings, run_score

    n = s.memory_images
    archive = make_bench_archive(work / f"memory-archive-{s.memory_side}", 10 * n, s.memory_side, s.memory_side,
                                 seed=s.seed)
    out = {"model": s.memory_model, "side": s.memory_side}
    for key, limit in (("small", n), ("large", 10 * n)):
        settings = ScoreSettings(archive=str(archive), out=str(work / f"memory-{key}"), model=s.memory_model,
                                 batch_size=s.batch_size, overwrite=True, limit=limit, engine=engine)
        r = _timed(run_score, settings)
        r.pop("value")
        out[key] = {"images": limit, **r}
        log(f"memory check: {limit} images, peak RSS {r['peak_rss_mb']} MB, peak anon {r['peak_anon_mb']} MB")
    out["rss_growth"] = round(out["large"]["peak_rss_mb"] / out["small"]["peak_rss_mb"] - 1, 3)
    out["anon_growth"] = round(out["large"]["peak_anon_mb"] / out["small"]["peak_anon_mb"] - 1, 3)
    out["process_growth"] = round(out["large"]["peak_process_mb"] / out["small"]["peak_process_mb"] - 1, 3)
    return out


def machine() -> dict:
    import torch

    return {**host.machine(), "torch": torch.__version__, "ray": ray_version(), "torch_threads": torch.get_num_threads()}
