"""Which out-of-distribution score? The measurement behind docs/decisions/002-ood-score.md.

    python scripts/ood_scores.py RUN/best.ckpt DATA FOREIGN

DATA: a `cxr-batch synth` archive (train/ val/ test/); FOREIGN: a folder written by
cxr_batch.synth.foreign.make_foreign. For each candidate score it prints the AUROC of test (in
distribution) against foreign images and, with the threshold at a percentile of the validation
images' scores, the share of test images put out of scope and of foreign images caught, by kind.
Images go through the scoring path's decode and preprocessing (pixels/decode.py, transforms.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cxr_batch.archive.discover import label_from_path
from cxr_batch.model.checkpoint import load_checkpoint, model_from_checkpoint
from cxr_batch.model.ood import auroc, fit_gaussian, mahalanobis, pooled, threshold_at
from cxr_batch.pixels.decode import decode_image
from cxr_batch.pixels.transforms import normalize, to_model_pixels
from cxr_batch import CLASSES


def load(files, size):
    px, kept = [], []
    for f in files:
        try:
            px.append(to_model_pixels(decode_image(Path(f).read_bytes(), max_pixels=10**8, draft=size).gray, size))
            kept.append(f)
        except Exception:
            pass
    return np.stack(px), kept


def run(model, px):
    feats, logits = [], []
    with torch.inference_mode():
        for i in range(0, len(px), 64):
            lg, f = model(normalize(torch.from_numpy(px[i:i + 64])))
            feats.append(pooled(f).numpy())
            logits.append(lg.float().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def knn(feats, bank, k):
    u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    return 1 - np.sort(u(feats) @ u(bank).T, axis=1)[:, -k]


def main(ckpt_path, data, foreign):
    ck = load_checkpoint(ckpt_path).ckpt
    model = model_from_checkpoint(ck).eval()
    size = int(ck["image_size"])
    split = {s: sorted(str(p) for p in Path(data, s).rglob("*.jpeg")) for s in ("train", "val", "test")}
    sets = {s: (run(model, load(fs, size)[0]), fs) for s, fs in split.items()}
    fpx, ffiles = load(sorted(str(p) for p in Path(foreign).rglob("*") if p.is_file()), size)
    (ff, fl) = run(model, fpx)
    kinds = np.array([Path(f).parent.name for f in ffiles])
    (tf, tl), tfiles = sets["train"]
    ty = np.array([CLASSES.index(label_from_path(f)) for f in tfiles])
    print(f"train {len(tf)}, val {len(sets['val'][0][0])}, test {len(sets['test'][0][0])}, foreign {len(ff)} decoded"
          f" ({', '.join(f'{k} {n}' for k, n in zip(*np.unique(kinds, return_counts=True)))})")
    t = lambda a: torch.from_numpy(a)
    scores = {}
    for shrink in (0.01, 0.1, 0.5):
        m, p = fit_gaussian(tf, ty, shrinkage=shrink)
        scores[f"mahalanobis (shrinkage {shrink})"] = lambda f, lg, m=m, p=p: mahalanobis(t(f), t(m), t(p)).numpy()
    scores["energy -logsumexp(logits)"] = lambda f, lg: -torch.logsumexp(t(lg), 1).numpy()
    scores["max softmax (1 - p_max)"] = lambda f, lg: 1 - torch.softmax(t(lg), 1).max(1).values.numpy()
    for k in (1, 10):
        scores[f"kNN cosine, k={k}"] = lambda f, lg, k=k: knn(f, tf, k)
    for name, fn in scores.items():
        val = fn(*sets["val"][0])
        test = fn(*sets["test"][0])
        out = fn(ff, fl)
        line = f"{name:32s} AUROC {auroc(test, out):.4f}"
        for pct in (99.0, 99.5, 100.0):
            th = threshold_at(val, pct)
            line += f" | p{pct:g}: test out {np.mean(test > th):.1%}, foreign caught {np.mean(out > th):.1%}"
        print(line)
        th = threshold_at(val, 99.5)
        print("    by kind at p99.5: " + ", ".join(f"{k} {np.mean(out[kinds == k] > th):.0%}" for k in np.unique(kinds)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
