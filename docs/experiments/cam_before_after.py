"""Before/after numbers of the CAM geometry fix through the shipped scoring code, without Ray.

A model trained by scratch/exp.py (state dict) becomes a checkpoint; the test split is decoded,
scored and finished by jobs/score_stages (decode_batch, Scorer, finish_batch) exactly as a scoring
run does. "after" is the table's cam_peak_x/y (receptive-field geometry, model.receptive);
"before" is the old geometry, cell j at (j + 0.5) / w, applied to the same maps. Pointing and
offsets come from reports.metrics.pointing_game, as `cxr-batch evaluate` computes them.

python docs/experiments/cam_before_after.py STATE.pt|CHECKPOINT.ckpt ARCHIVE_DIR --image-size 128 --stride 16 [--out result.json]
"""
import argparse
import csv
import json
import os

import numpy as np
import torch

from cxr_batch import CLASSES, POSITIVE
from cxr_batch.jobs.score_stages import Scorer, decode_batch, finish_batch
from cxr_batch.jobs.trainset import labelled_files
from cxr_batch.model.cam import CamGrid, peak
from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
from cxr_batch.model.network import build_model
from cxr_batch.model.registry import describe
from cxr_batch.reports.metrics import pointing_game, roc_auc


def score(ckpt, archive, rels, threads):
    info = describe(ckpt)
    batch = decode_batch({"path": np.asarray(rels, dtype=object)}, archive=archive, image_size=info.image_size,
                         max_pixels=10**8)
    scored = Scorer(info.to_dict(), threads=threads, precision="fp32", compile=False, channels_last=True)(batch)
    out = finish_batch(dict(scored), info=info.to_dict(), cam_dir=None, cam_size=None, archive=archive,
                       max_pixels=10**8, cam_scale="absolute")
    return info, scored["cam"], out


def with_ci(peaks, xyr, n_boot=2000, seed=0):
    """pointing_game plus bootstrap 95% CIs (over images) of the rate and the mean offsets."""
    game = pointing_game(peaks, xyr)
    dx, dy = (peaks[:, 0] - xyr[:, 0]) / xyr[:, 2], (peaks[:, 1] - xyr[:, 1]) / xyr[:, 2]
    hit = np.hypot(dx, dy) <= game["tolerance"]
    idx = np.random.default_rng(seed).integers(0, len(dx), (n_boot, len(dx)))
    for key, v in (("rate", hit), ("mean_dx_in_radii", dx), ("mean_dy_in_radii", dy)):
        game[key + "_ci95"] = [float(q) for q in np.percentile(v[idx].mean(1), [2.5, 97.5])]
    game["median_dx_in_radii"], game["median_dy_in_radii"] = float(np.median(dx)), float(np.median(dy))
    return game


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("archive")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = a.state
    if not a.state.endswith(".ckpt"):  # a state dict from cam_train.py: threshold 0.5, T = 1
        net = build_model(a.arch, "none", cam_stride=a.stride)
        net.load_state_dict(torch.load(a.state, weights_only=True))
        ckpt = a.state.rsplit(".", 1)[0] + ".ckpt"
        save_checkpoint(make_checkpoint(net, arch=a.arch, image_size=a.image_size, threshold=0.5, settings={},
                                        cam_stride=a.stride), ckpt)
    rels = [r for r, _ in labelled_files(a.archive, "test")]
    truth = {r["path"]: (float(r["x"]), float(r["y"]), float(r["r"]))
             for r in csv.DictReader(open(os.path.join(a.archive, "truth.csv"))) if r["x"]}
    info, cams, out = score(ckpt, a.archive, rels, a.threads)
    y = np.array([CLASSES.index(lab) for lab in out["label"]])
    p = np.asarray(out["prob_pneumonia"], np.float64)
    threshold = info.threshold  # a checkpoint from `cxr-batch train`: its own (chosen on validation)
    tp = [i for i in range(len(rels)) if y[i] == POSITIVE and out["pred"][i] == CLASSES[POSITIVE]]
    xyr = np.array([truth[rels[i]] for i in tp])
    old = CamGrid(info.cam_stride, info.cam_stride / 2 - 0.5, info.image_size)  # (j + 0.5) / w
    before = np.array([peak(cams[i], old) for i in tp])
    after = np.array([(out["cam_peak_x"][i], out["cam_peak_y"][i]) for i in tp])
    res = {"state": a.state, "grid_after": [info.cam_stride, info.cam_offset, info.image_size],
           "grid_before": [old.stride, old.offset, old.input_size], "n_test": len(rels),
           "threshold": threshold, "temperature": info.temperature,
           "accuracy": float(np.mean((p >= threshold) == (y == POSITIVE))), "auc": roc_auc(y, p), "n_tp": len(tp),
           "before": with_ci(before, xyr), "after": with_ci(after, xyr),
           "cam_max": {c: float(np.median(out["cam_max"][y == k])) for k, c in enumerate(CLASSES)},
           "load": os.getloadavg()}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
