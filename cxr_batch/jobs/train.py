"""The training job's driver: Ray Train data-parallel fine-tuning of a CamResNet.

Transfer learning as it should be done: ImageNet weights when available, a new 2-class head, a
warm-up with the backbone frozen (so the random head's large gradients do not wreck pretrained
filters), then all layers at a lower learning rate with cosine decay. Classes are weighted by
inverse frequency (the public set is 74% PNEUMONIA). Every epoch all ranks all-reduce their
counts, rank 0 writes ``last.ckpt`` (then ``best.ckpt`` when the epoch is the best so far, by
train_config.best_epoch), and a re-run of the same ``--out`` resumes from ``last.ckpt``. The
driver holds the lease on ``--out`` (archive/lease.py) for the whole run, as scoring does.

What the workers run is train_worker.py. Each epoch's metrics come back to this process through
a Ray Train callback (``_EpochRelay``, run in Ray Train's controller) and a queue, so the driver
prints one line per epoch itself, and the workers' notes (unreadable images, a resume) with it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, replace
from queue import Empty

import numpy as np
from ray.train import UserCallback

from ..archive import storage
from ..archive.lease import Lease
from ..errors import InputError, TrainingError, one_line
from ..model.archs import WEIGHTS
from .ood_fit import fit_ood
from .ray_env import check_shared_storage, node_cpus
from .train_config import TrainSettings, best_epoch, fit_worker_cpus, still_learning, weak_model
from .trainset import Split, make_split


def run_train(s: TrainSettings, *, echo=print, progress=None, register: bool | None = None) -> dict:
    """Run (or resume) training; returns the final summary dict. Ray must be initialised.

    ``echo(line)`` gets the job's own lines (data, model, the workers' notes); ``progress(metrics,
    epochs)`` gets rank 0's metrics of each finished epoch."""
    import ray

    s = replace(s, data=storage.absolute(s.data), out=storage.absolute(s.out),
                weights=s.weights if s.weights in WEIGHTS else storage.absolute(s.weights))
    split = make_split(s.data, val_fraction=s.val_fraction, seed=s.seed)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = bool(gpus >= 1) if s.gpu is None else s.gpu
    if use_gpu and gpus < s.workers:
        raise InputError(f"{s.workers} GPU workers, but the cluster has {int(gpus)} GPUs: lower --workers or pass"
                         " --device cpu.")
    if s.cpus_per_worker is None:  # settings.json and the checkpoints record the number the workers got
        s = replace(s, cpus_per_worker=fit_worker_cpus(s.workers, node_cpus(), use_gpu))
    _check_fits(s, use_gpu)
    check_resumable(s)
    # Rank 0 writes checkpoints that every rank reads on restart; each worker decodes its shard of DATA.
    check_shared_storage({"--out": s.out, "DATA": s.data}, job="the training workers")
    # One run per --out, as for scoring: two runs would interleave last.ckpt, best.ckpt and history.json.
    with Lease(s.out, run_id=uuid.uuid4().hex[:8], details={"data": s.data}) as lease:
        return _train(s, split, use_gpu, lease, echo, progress, register)


def _train(s: TrainSettings, split: Split, use_gpu: bool, lease: Lease, echo, progress, register) -> dict:
    """The run itself, while this process holds the lease on --out."""
    lease.check()
    storage.write_bytes_atomic(storage.join(s.out, "settings.json"), json.dumps(asdict(s), indent=2).encode())
    storage.write_bytes_atomic(storage.join(s.out, "val_files.json"), json.dumps(split.record(), indent=1).encode())
    counts = np.bincount([y for _, y in split.train], minlength=2)
    echo(f"train: {len(split.train)} images (NORMAL {counts[0]}, PNEUMONIA {counts[1]}); validation: {split.val_note}")
    echo(f"model: {s.arch} to layer{s.cam_layer} (CAM stride {s.cam_stride}), weights {s.weights}; {s.epochs} epochs"
         f" ({s.n_warmup} warm-up), shifts up to {s.translate:g} of the side"
         f"{f', quiet-NORMAL loss {s.cam_quiet:g}' if s.cam_quiet else ''}, {s.workers} "
         f"{'GPU' if use_gpu else 'CPU'} worker{'s' if s.workers > 1 else ''}"
         f"{'' if use_gpu else f' of {s.cpus_per_worker:g} CPU' + ('' if s.cpus_per_worker == 1 else 's')}"
         f", batch {s.batch_size} per worker")
    t0 = time.perf_counter()
    _fit(s, split, counts, use_gpu, lambda ranks: _on_epoch(ranks, s.epochs, echo, progress))
    if not storage.exists(storage.join(s.out, "history.json")):  # no epoch finished, yet Ray saw no error
        raise TrainingError(f"Training ended without finishing an epoch; nothing was written to {s.out}. See the"
                            " workers' notes above (unreadable images?).")
    history = json.loads(storage.read_bytes(storage.join(s.out, "history.json")))
    lease.check()  # a run that lost --out must not add the OOD statistics to another run's best.ckpt
    ood = fit_ood(s, split, use_gpu=use_gpu)  # the OOD statistics of best.ckpt, stored in it (jobs/ood_fit.py)
    summary = {**_summary(s, history, split.val_note, time.perf_counter() - t0), "ood": ood}
    return register_if_fit(summary, history, complete=len(history) == s.epochs, register=register)


def register_if_fit(summary: dict, history: list[dict], *, complete: bool, register: bool | None) -> dict:
    """Say whether the run's model is weak, and register best.ckpt as the default model of `cxr-batch score`
    when asked (``register`` True), or when not told (None) and the model is not weak. A run that stopped
    before its last epoch is never registered."""
    summary["weak"] = weak_model(history)
    if not complete or register is False:
        return summary
    if register is None and summary["weak"]:
        summary["not_registered"] = f"not as the default model: {summary['weak']} (--register to do it anyway)"
        return summary
    from ..model.registry import register_default

    summary["registered_as_default"] = str(register_default(summary["best_checkpoint"]))
    return summary


# What a checkpoint's run must share with this one for a re-run of --out to continue it: the data, the
# network and the schedule. (A different --workers or --max-failures is fine.)
RESUME_KEYS = ("data", "arch", "image_size", "cam_stride", "cam_layer", "epochs", "batch_size", "seed")
_BEFORE_THE_KEY = {"cam_layer": 4}  # what a run written before a key existed had


def check_resumable(s: TrainSettings) -> None:
    """A re-run of --out resumes from its last.ckpt: refuse, in one line and before any Ray work, a
    last.ckpt that is not ours or that another configuration wrote (it would be continued with
    weights and a schedule that this run did not ask for, and settings.json would be overwritten)."""
    uri = storage.join(s.out, "last.ckpt")
    if not storage.exists(uri):
        return
    from ..model.entries import checkpoint_entries

    # Neither weights nor hash read: the workers read the weights when they resume.
    then = {**_BEFORE_THE_KEY, **(checkpoint_entries(uri, with_id=False)[0].get("settings") or {})}
    now = asdict(s)
    changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS if then.get(k) != now[k]]
    if changed:
        raise InputError(f"{s.out} holds a run with other settings ({'; '.join(changed)}): re-running an --out resumes"
                         " it. Pass the same settings to resume, or a new --out to start another run.")


def _summary(s: TrainSettings, history: list, validation: str, seconds: float) -> dict:
    best = best_epoch(history)  # the rule the workers used for best.ckpt
    return {"out": s.out, "best_checkpoint": storage.join(s.out, "best.ckpt"), "best_epoch": best["epoch"],
            "epochs": len(history), "val_auc": best["val_auc"], "val_acc": best["val_acc"],
            "threshold": best["threshold"], "seconds": seconds, "validation": validation,
            "val_files": storage.join(s.out, "val_files.json"),
            # rows of runs begun before calibration existed lack these: T = 1 there
            "temperature": best.get("temperature", 1.0), "temperature_note": best.get("temperature_note", "not fitted"),
            "val_ece_before": best.get("val_ece_before"), "val_ece_after": best.get("val_ece_after"),
            "images_per_s_per_worker": float(np.mean([h["images_per_s_per_worker"] for h in history])),
            "still_learning": still_learning(history)}


def _fit(s: TrainSettings, split: Split, counts, use_gpu: bool, on_epoch) -> None:
    """TorchTrainer.fit() over the workers of train_worker.py; ``on_epoch(per-rank metrics)`` runs
    in this process, from a thread, as each epoch ends. A failure in the workers (after
    ``max_failures`` restarts) becomes one TrainingError line."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from .train_worker import train_loop

    queue = Queue(actor_options={"num_cpus": 0})  # zero CPUs: it must never wait for the workers' CPUs
    ray_path, ray_fs = _ray_storage(s.out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": asdict(s), "train": split.train, "val": split.val, "class_counts": counts.tolist(),
                           "validation": split.record()},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=use_gpu, placement_strategy=s.placement,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(
            # A fresh name each call: resuming is ours (from last.ckpt), so a finished earlier run
            # in the same storage cannot make Ray skip this one.
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[_EpochRelay(queue)],
        ),
    )
    done = threading.Event()
    pump = threading.Thread(target=_pump, args=(queue, done, on_epoch), daemon=True)
    pump.start()
    try:
        trainer.fit()
    except TrainingFailedError as e:
        raise TrainingError(f"Training failed in its workers: {_worker_cause(e)}") from None
    finally:
        done.set()
        pump.join()
        with suppress(Exception):  # progress lines are never worth hiding the run's own outcome
            while not queue.empty():  # epochs that ended while the pump was stopping
                on_epoch(queue.get_nowait())
            queue.shutdown()


class _EpochRelay(UserCallback):
    """Runs in Ray Train's controller (an actor, whose output goes to Ray's logs): hands each
    epoch's metrics, one dict per rank, to the driver through a Ray queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics)


def _pump(queue, done: threading.Event, on_epoch) -> None:
    while not done.is_set():
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            continue
        except Exception:  # the queue actor is gone (Ray shutting down): training goes on without lines
            return
        on_epoch(item)


def _on_epoch(ranks: list[dict], epochs: int, echo, progress) -> None:
    for m in ranks:
        for note in m.get("notes") or ():
            echo(note)
    if progress:
        progress(ranks[0], epochs)


def _worker_cause(e: Exception) -> str:
    """One line from a Ray Train failure: the first worker's own exception when Ray kept it."""
    for rank, exc in sorted(getattr(e, "worker_failures", {}).items()):
        base = getattr(exc, "_base_exc", exc)  # Ray wraps it together with its traceback text
        return f"rank {rank}: {type(base).__name__}: {one_line(base, 300)}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return one_line(lines[-1] if lines else e, 300)


def _check_fits(s: TrainSettings, use_gpu: bool) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    need = s.workers * s.cpus_per_worker
    if need > cpus:
        raise InputError(f"{s.workers} workers x {s.cpus_per_worker:g} CPUs need {need:g} CPUs; the Ray cluster has"
                         f" {cpus:g}. Lower --workers.")


def _ray_storage(out: str):
    """-> (storage_path, storage_filesystem) for Ray Train's RunConfig, under <out>/ray. For a URI
    Ray gets storage.py's own filesystem, so its files and our checkpoints go through one endpoint,
    region and set of credentials, decided in one place."""
    if storage.is_uri(out):
        fs, path = storage.resolve(storage.join(out, "ray"))
        return path, fs
    return os.path.abspath(os.path.join(out, "ray")), None
