"""Why does the CAM peak sit below the lesion? Cheap checks on already-trained models (no training).

    python docs/experiments/cam_offset_why.py dump CKPT ARCHIVE OUT.npz     # score the test split once, keep the maps
    python docs/experiments/cam_offset_why.py visible ARCHIVE SEED SIZE      # truth vs where the lesion shows on film
    python docs/experiments/cam_offset_why.py peaks OUT.npz [...]            # other peak estimators, bias maps removed
    python docs/experiments/cam_offset_why.py zones OUT.npz [...]            # offset by lesion height; peak-vs-truth slope
    python docs/experiments/cam_offset_why.py corners OUT.npz [...]          # peaks far off the lesion; hot top corners
    python docs/experiments/cam_offset_why.py shift CKPT OUT.npz ARCHIVE 0,8,-8   # content moved down t px, peak moved back
    python docs/experiments/cam_offset_why.py pad CKPT OUT.npz ARCHIVE edge:16,0:32  # image inside a larger canvas

Pointing and offsets as docs/experiments/cam_before_after.py and reports/metrics compute them:
over the true positives, peak within 1.5 lesion radii, offsets in lesion radii (x right, y down),
bootstrap 95% CIs over images. Results: docs/experiments/cam-findings.md, "Why below".
"""
import csv
import os
import sys

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

from cxr_batch import CLASSES, POSITIVE
from cxr_batch.model.cam import CamGrid, log_odds_map, peak, upsample

ZONES = ((0, .35), (.35, .5), (.5, .65), (.65, 1))


def dump(ckpt, archive, out):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cam_before_after import score
    from cxr_batch.jobs.trainset import labelled_files

    torch.set_num_threads(1)
    rels = [r for r, _ in labelled_files(archive, "test")]
    truth = {r["path"]: (float(r["x"]), float(r["y"]), float(r["r"]))
             for r in csv.DictReader(open(os.path.join(archive, "truth.csv"))) if r["x"]}
    info, cams, o = score(ckpt, archive, rels, 1)
    np.savez(out, cams=np.stack([np.asarray(c) for c in cams]), y=[CLASSES.index(v) for v in o["label"]],
             pred=[CLASSES.index(v) for v in o["pred"]], xyr=[truth.get(r, (np.nan,) * 3) for r in rels],
             rels=np.array(rels), peak=np.stack([o["cam_peak_x"], o["cam_peak_y"]], 1),
             stride=info.cam_stride, offset=info.cam_offset, size=info.image_size)


def load_tp(npz):
    z = np.load(npz, allow_pickle=True)
    tp = np.where((z["y"] == POSITIVE) & (z["pred"] == POSITIVE))[0]
    return z, tp, CamGrid(int(z["stride"]), float(z["offset"]), int(z["size"])), z["xyr"][tp].astype(float)


def summary(p, xyr, n_boot=2000, seed=0):
    """One line: pointing, mean dx, dy (radii) with bootstrap CIs, medians, and mean dy in input px by zone."""
    dx, dy = (p[:, 0] - xyr[:, 0]) / xyr[:, 2], (p[:, 1] - xyr[:, 1]) / xyr[:, 2]
    hit = np.hypot(dx, dy) <= 1.5
    idx = np.random.default_rng(seed).integers(0, len(dx), (n_boot, len(dx)))
    ci = [np.percentile(v[idx].mean(1), [2.5, 97.5]) for v in (hit, dx, dy)]
    dy_px = dy * xyr[:, 2]
    zones = [dy_px[(xyr[:, 1] >= lo) & (xyr[:, 1] < hi)].mean() for lo, hi in ZONES]
    return (f"pointing {hit.mean():.0%} ({ci[0][0]:.0%}-{ci[0][1]:.0%}) dx {dx.mean():+.2f} ({ci[1][0]:+.2f},"
            f"{ci[1][1]:+.2f}) dy {dy.mean():+.2f} ({ci[2][0]:+.2f},{ci[2][1]:+.2f}) median {np.median(dx):+.2f},"
            f"{np.median(dy):+.2f}; dy by lesion y zone (fraction of side): {' '.join(f'{v:+.3f}' for v in zones)}")


def top_centroid(m, frac):
    """Mass-weighted centroid (index units) of the connected region around the argmax where m >= frac * max."""
    i, j = np.unravel_index(np.argmax(m), m.shape)
    thr = max(frac * m[i, j], 0.0)
    lab, _ = ndimage.label(m >= thr)
    w = np.where(lab == lab[i, j], m - thr, 0.0)
    ys, xs = np.indices(m.shape)
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


def heaviest_centroid(m, frac, within_positive=False):
    """Round 14: the hot spot chosen by evidence, not by height. Components of m >= frac * max (or, with
    within_positive, of m > 0, and in the chosen one cells >= frac * its own max); the one whose cells add
    the most (m - level) wins: under global average pooling the map's mean is the logit, so that is the
    region that contributes most to P(pneumonia). Centroid weighted by m - level, index units."""
    top = m.max()
    if within_positive:
        lab, n = ndimage.label(m > 0)
        mass = ndimage.sum(m, lab, range(1, n + 1))
        keep = lab == 1 + int(np.argmax(mass))
        level = frac * m[keep].max()
        lab, n = ndimage.label(keep & (m >= level))
        w_all = np.where(lab > 0, m - level, 0.0)
        mass = ndimage.sum(w_all, lab, range(1, n + 1))
        w = np.where(lab == 1 + int(np.argmax(mass)), m - level, 0.0)
    else:
        level = frac * top
        lab, n = ndimage.label(m >= level)
        mass = ndimage.sum(m - level, lab, range(1, n + 1))
        w = np.where(lab == 1 + int(np.argmax(mass)), m - level, 0.0)
    ys, xs = np.indices(m.shape)
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


def estimators(cam, g, size):
    out = {"argmax+parabola (shipped)": peak(cam, g)}
    if cam.max() > 0:
        for f in (0.3, 0.5):
            cx, cy = heaviest_centroid(cam, f)
            out[f"heaviest >= {f} max"] = (g.to_fraction(cx), g.to_fraction(cy))
            cx, cy = heaviest_centroid(cam, f, True)
            out[f"heaviest > 0, then {f}"] = (g.to_fraction(cx), g.to_fraction(cy))
    i, j = np.unravel_index(np.argmax(cam), cam.shape)
    out["argmax cell"] = (g.to_fraction(j), g.to_fraction(i))
    up = upsample(cam, (size, size), g)
    for f in (0.5, 0.7, 0.8):
        cx, cy = top_centroid(cam, f)
        out[f"cells >= {f} max: centroid"] = (g.to_fraction(cx), g.to_fraction(cy))
        cx, cy = top_centroid(up, f)
        out[f"pixels >= {f} max: centroid"] = ((cx + .5) / size, (cy + .5) / size)
    return out


def peaks(npz):
    z, tp, g, xyr = load_tp(npz)
    cams, res = z["cams"], {"table's point (hot_spot, shipped)": list(z["peak"][tp].astype(float))}
    for k in tp:
        for name, p in estimators(cams[k].astype(np.float64), g, int(z["size"])).items():
            res.setdefault(name, []).append(p)
    for name, base in (("minus mean NORMAL map", cams[z["y"] != POSITIVE].mean(0)), ("minus mean map", cams.mean(0))):
        res[name] = [peak(cams[k] - base, g) for k in tp]
    print(npz, len(tp), "true positives")
    for name, p in res.items():
        print(f"  {name:28s}", summary(np.array(p, float), xyr))


def zones(npz):
    z, tp, g, xyr = load_tp(npz)
    p, s = z["peak"][tp].astype(float), int(z["size"])
    print(npz, len(tp), "true positives;", summary(p, xyr))
    rho = spearmanr(p[:, 1] - xyr[:, 1], xyr[:, 1])
    print(f"  Spearman(dy, lesion y) {rho[0]:+.2f} (p {rho[1]:.1g})")
    idx = np.random.default_rng(0).integers(0, len(tp), (2000, len(tp)))
    for k, axis in ((1, "y"), (0, "x")):
        b, a = np.polyfit(xyr[:, k], p[:, k], 1)
        lo, hi = np.percentile([np.polyfit(xyr[i, k], p[i, k], 1)[0] for i in idx], [2.5, 97.5])
        print(f"  {axis}: peak = {a:+.3f} + {b:.2f} x truth (slope CI {lo:.2f}-{hi:.2f}), fixed point {a / (1 - b):.2f}"
              f" of the side; mean truth {xyr[:, k].mean():.2f}")
    for lo, hi in ZONES:
        m = (xyr[:, 1] >= lo) & (xyr[:, 1] < hi)
        print(f"  lesion y in [{lo}, {hi}): n {m.sum():3d}, mean dy {(p[m, 1] - xyr[m, 1]).mean() * s:+6.1f} px at {s} px"
              f" = {((p[m, 1] - xyr[m, 1]) / xyr[m, 2]).mean():+.2f} r")


def corners(npz):
    """Round 13: how many true positives' peaks land far (> 4 radii) from the lesion, how many of those in a
    top corner, and how many NORMAL maps have their maximum in a top corner (a pattern common to both classes)."""
    z, tp, g, xyr = load_tp(npz)
    p = z["peak"][tp].astype(float)
    dx, dy = (p[:, 0] - xyr[:, 0]) / xyr[:, 2], (p[:, 1] - xyr[:, 1]) / xyr[:, 2]
    far = np.hypot(dx, dy) > 4
    corner = (p[:, 1] < 0.2) & ((p[:, 0] < 0.15) | (p[:, 0] > 0.85))
    normal = z["cams"][z["y"] != POSITIVE]
    n = normal.shape[-1]
    rows, side = round(n * 0.2), max(1, round(n * 0.15))
    top = [np.unravel_index(np.argmax(m), m.shape) for m in normal]
    in_corner = sum(1 for i, j in top if i < rows and (j < side or j >= n - side))
    print(f"{npz}: true positives' peaks > 4 radii off {far.sum()} of {len(tp)} (in a top corner {(far & corner).sum()}),"
          f" mean dy without them {dy[~far].mean():+.2f}; NORMAL maps with their maximum in a top corner"
          f" {in_corner}/{len(normal)}, with any cell > 0 {(normal.reshape(len(normal), -1).max(1) > 0).mean():.0%}")


def maps_of(ckpt, npz, archive):
    """The model and the true positives' decoded pixels (uint8, model input size)."""
    from cxr_batch.jobs.score_stages import decode_batch
    from cxr_batch.model.registry import describe, fc_bias, fc_weight, load

    torch.set_num_threads(1)
    z, tp, g, xyr = load_tp(npz)
    info = describe(ckpt)
    model = load(info).eval()
    px = decode_batch({"path": np.asarray(z["rels"][tp], dtype=object)}, archive=archive,
                      image_size=info.image_size, max_pixels=10**8)["pixels"]

    def run(x):
        from cxr_batch.pixels.transforms import normalize

        with torch.inference_mode():
            _, f = model(normalize(torch.from_numpy(np.ascontiguousarray(x)), channels_last=False))
            return log_odds_map(f, fc_weight(model).float(), fc_bias(model).float(), POSITIVE).numpy()
    return info, px, xyr, run


def shift(ckpt, npz, archive, ts):
    info, px, xyr, run = maps_of(ckpt, npz, archive)
    s, g = info.image_size, CamGrid(info.cam_stride, info.cam_offset, info.image_size)
    for t in (int(v) for v in ts.split(",")):
        rows = np.clip(np.arange(s) - t, 0, s - 1)  # content moves down by t px, edge rows repeated
        p = np.array([peak(c, g) for c in run(px[:, rows])])
        p[:, 1] -= t / s
        print(f"shift {t:+3d} px:", summary(p, xyr))


def pad(ckpt, npz, archive, specs):
    info, px, xyr, run = maps_of(ckpt, npz, archive)
    s = info.image_size
    for spec in specs.split(","):
        mode, n = spec.split(":")
        n = int(n)
        kw = {"mode": "edge"} if mode == "edge" else {"mode": "constant", "constant_values": int(mode)}
        g = CamGrid(info.cam_stride, info.cam_offset, s + 2 * n)
        p = np.array([peak(c, g) for c in run(np.pad(px, ((0, 0), (n, n), (n, n)), **kw))]) * (s + 2 * n)
        print(f"pad {spec}:", summary(np.clip((p - n) / s, 0, 1), xyr))


def visible(archive, seed, size):
    """Each positive test phantom again with and without its lesion (same generator state): the
    centroid of the film difference (smoothed, above half its max) against truth.csv."""
    from cxr_batch.synth.archive import SPLITS
    from cxr_batch.synth.phantom import phantom

    rows = [r for r in csv.DictReader(open(os.path.join(archive, "truth.csv"))) if r["x"] and r["path"].startswith("test/")]
    out = []
    for r in rows:
        rng = [int(seed), SPLITS.index("test"), int(r["path"].rsplit("-", 1)[1].split(".")[0])]
        a, t = phantom(np.random.default_rng(rng), int(size), opacity=True)
        b, _ = phantom(np.random.default_rng(rng), int(size), opacity=False)
        assert abs(t["x"] - float(r["x"])) < 1e-4 and abs(t["y"] - float(r["y"])) < 1e-4, r
        d = ndimage.gaussian_filter(a.astype(np.float32) - b.astype(np.float32), int(size) / 80)
        cx, cy = top_centroid(d, 0.5)
        out.append([t["x"], t["y"], t["r"], (cx + .5) / int(size), (cy + .5) / int(size)])
    v = np.array(out)
    print(f"{len(v)} lesions: visible centroid - truth", summary(v[:, 3:5], v[:, :3]).split("; ")[0])
    for lo, hi in ZONES:
        m = (v[:, 1] >= lo) & (v[:, 1] < hi)
        print(f"  lesion y in [{lo}, {hi}): n {m.sum()}, dy {((v[m, 4] - v[m, 1]) / v[m, 2]).mean():+.2f} r")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd in ("peaks", "zones", "corners"):
        for a in args:
            globals()[cmd](a)
    else:
        globals()[cmd](*args)
