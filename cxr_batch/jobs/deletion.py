"""Evaluate's CAM deletion curves (reports/faithfulness.py) as one Ray task, run with the scoring
job's own stages: ``decode_batch`` as scoring decodes, ``Scorer`` as scoring scores (the same
precision and temperature), sized like one scoring actor (a GPU when the cluster has one).

``deletion_task`` is what the task runs (worker code: it imports the scoring stages, never a
driver); ``run_deletion`` is the driver side, called by evaluate.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from ..archive import storage
from ..reports.faithfulness import deletion_curves, sample_positives, summarize
from .score_stages import Scorer, cam_grid_of, decode_batch


def _scorer_fn(scorer, template: dict):
    """The Scorer as ``score(pixels)``: rows shaped like the decode stage's, pixels swapped in."""
    def score(pixels):
        batch = {k: np.repeat(v[:1], len(pixels), axis=0) for k, v in template.items()}
        batch["pixels"] = np.ascontiguousarray(pixels)
        out = scorer(batch)
        return out["prob_pneumonia"], out["cam"]
    return score


def deletion_task(paths: list, *, archive: str, info: dict, plan: dict, score_settings: dict, steps: int,
                  seed: int, n_boot: int) -> dict:
    """Runs in one Ray task (on a GPU when the cluster has one): decode as scoring does, then curves."""
    t0 = time.perf_counter()
    batch = decode_batch({"path": np.asarray(paths, dtype=object)}, archive=archive, image_size=info["image_size"],
                         max_pixels=score_settings["max_pixels"])
    ok = np.array([e is None for e in batch["error"]], bool)
    if not ok.any():
        return {"n_images": 0, "note": "no sampled image could be decoded again"}
    scorer = Scorer(info, threads=plan["torch_threads"], precision=score_settings["precision"], compile=False,
                    channels_last=score_settings["channels_last"])
    template = {k: v[ok] for k, v in batch.items()}
    curves = deletion_curves(_scorer_fn(scorer, template), template["pixels"], cells=cam_grid_of(info), steps=steps,
                             seed=seed, batch_size=score_settings["batch_size"])
    out = summarize(curves, n_boot=n_boot, seed=seed)
    out.update(seconds=time.perf_counter() - t0, paths=[p for p, good in zip(paths, ok) if good],
               p_start=curves["cam"][:, 0].tolist())
    return out


def run_deletion(rows: list, score_settings, info: dict, *, n_images: int, steps: int, seed: int = 0,
                 n_boot: int = 1000) -> dict | None:
    """Deletion curves for a sample of ``rows`` (evaluate's table) with the model ``info`` (a
    ModelInfo dict, as the scoring job resolved it), as one Ray task sized like one scoring actor
    (a GPU when the cluster has one). None when there is nothing to do."""
    import ray

    from .score import plan_resources  # the driver's sizing rule; a lazy import keeps it off the worker

    paths = sample_positives(rows, n_images, seed)
    if not paths or steps < 1:
        return None
    res = ray.cluster_resources()
    plan = plan_resources(res.get("CPU", 0), res.get("GPU", 0), score_settings)
    task = ray.remote(deletion_task).options(num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor, max_retries=1)
    return ray.get(task.remote(paths, archive=storage.absolute(score_settings.archive), info=info, plan=asdict(plan),
                               score_settings=asdict(score_settings), steps=steps, seed=seed, n_boot=n_boot))
