"""CAM localisation experiments in-process (no Ray): train a CamResNet on phantoms, then measure where
the CAM peaks land against truth.csv, under the old tile-middle geometry ("naive") and the
receptive-field geometry ("rf"), on plain and flipped inputs (maps flipped back), and averaged (TTA).

Archives, state dicts and results/NAME.json go to /tmp/camexp. The numbers in README's CAMs section:
  python docs/experiments/cam_train.py A --size 160 --image-size 128 --threads 1
  python docs/experiments/cam_train.py A_eq01 --size 160 --image-size 128 --threads 1 --eq 0.1
then docs/experiments/cam_before_after.py on each state dict (scores through the shipped stages).
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr_batch.model.cam import CamGrid, log_odds_map, peak
from cxr_batch.model.camloss import paired_loss
from cxr_batch.model.network import build_model
from cxr_batch.model.receptive import cam_grid
from cxr_batch.synth.archive import make_archive
from cxr_batch.jobs.trainset import augment, labelled_files, load_pixels
from cxr_batch.pixels.transforms import normalize
from cxr_batch.reports.metrics import roc_auc

ROOT = Path("/tmp/camexp")


def archive(seed, size, n_train, n_test):
    d = ROOT / f"arch-s{seed}-{size}-{n_train}-{n_test}"
    if not (d / "truth.csv").exists():
        tmp = d.with_suffix(".tmp")
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        make_archive(tmp, n_train=n_train, n_val=0, n_test=n_test, size=size, seed=seed)
        os.rename(tmp, d)
    truth = {}
    import csv
    for r in csv.DictReader(open(d / "truth.csv")):
        if r["x"]:
            truth[str(d / r["path"])] = (float(r["x"]), float(r["y"]), float(r["r"]))
    return d, truth


def reflect_padding(model):
    """Every zero-padded conv of the trunk pads by reflection instead (the max-pool keeps its -inf pad)."""
    for m in model.trunk.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding):
            m.padding_mode = "reflect"
    return model


def intensity_field(x, gen, amp, cells=5):
    """Add a smooth random intensity field (``cells`` x ``cells`` normal values, bicubic up to the image;
    amplitude ``amp`` of the [0, 1] range): a whole lung field brighter or darker than usual stops
    being evidence, a lesion's own edges and texture still are."""
    if amp <= 0:
        return x
    b, s, _ = x.shape
    f = torch.randn(b, 1, cells, cells, generator=gen)
    f = torch.nn.functional.interpolate(f, size=(s, s), mode="bicubic", align_corners=True).squeeze(1)
    return (x + amp * f).clamp(0, 1)


def translate(x, gen, frac):
    """Shift each image by up to ``frac`` of the side in x and y, edge rows repeated."""
    if frac <= 0:
        return x
    b, s, _ = x.shape
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * frac * 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    grid = torch.nn.functional.affine_grid(theta, (b, 1, s, s), align_corners=False)
    return torch.nn.functional.grid_sample(x.unsqueeze(1), grid, padding_mode="border", align_corners=False).squeeze(1)


class LsePooled(nn.Module):
    """The same trunk and head, but the binary logit is the log-sum-exp (sharpness r) of the CAM's log-odds map
    instead of its mean: r -> 0 is global average pooling (the shipped model), r -> inf global max pooling."""

    def __init__(self, base, r):
        super().__init__()
        self.trunk, self.fc, self.r = base.trunk, base.fc, r

    def forward(self, x):
        feats = self.trunk(x)
        m = log_odds_map(feats, self.fc.weight, self.fc.bias, 1).flatten(1)
        z = (torch.logsumexp(self.r * m, 1) - math.log(m.shape[1])) / self.r
        return torch.stack([-z / 2, z / 2], 1), feats


def layer3_head(model, seed, cut=1):
    """The trunk cut after layer3 (``cut`` 1: stride 16, a smaller receptive field) or layer2 (``cut`` 2: stride 8,
    smaller still), with a fresh head on its channels."""
    from cxr_batch.model.network import CamResNet
    trunk = nn.Sequential(*list(model.trunk.children())[:-cut])
    with torch.no_grad():
        c = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    torch.manual_seed(seed + 1)
    m = CamResNet(trunk, c)
    nn.init.normal_(m.fc.weight, std=0.01)
    nn.init.zeros_(m.fc.bias)
    return m


def model_for(arch, stride, seed, pad="zeros", lse=0.0, layer=4):
    if layer == 3 and pad == "zeros" and not lse:  # the network `cxr-batch train` ships since round 6
        return build_model(arch, "none", seed=seed, cam_stride=16, cam_layer=3)
    if layer in (2, 3):
        return layer3_head(model_for(arch, 32, seed, pad, lse), seed, cut=4 - layer)
    if lse > 0:
        return LsePooled(model_for(arch, stride, seed, pad), lse)
    if pad == "reflect":
        return reflect_padding(model_for(arch, stride, seed))
    if stride == 8:  # scratch only: drop layer3's and layer4's strides (resnet18)
        m = build_model(arch, "none", seed=seed, cam_stride=16)
        blk = m.trunk[6][0]
        blk.conv1.stride = (1, 1)
        blk.downsample[0].stride = (1, 1)
        return m
    return build_model(arch, "none", seed=seed, cam_stride=stride)


class HighPass(nn.Module):
    """Subtract a Gaussian blur (sigma ``frac`` of the side, reflect padding) from the input: the lung zones'
    slow brightness gradient goes, a lesion's local contrast stays. Not learnable; linear, so applying it after
    the per-channel normalisation is the same as before it, up to scale."""

    def __init__(self, frac):
        super().__init__()
        self.frac = frac

    def forward(self, x):
        from torchvision.transforms.functional import gaussian_blur  # reflect padding, separable kernel
        sigma = self.frac * x.shape[-1]
        k = 2 * int(3 * sigma) + 1
        return x - gaussian_blur(x, [k, k], [sigma, sigma])


def maps_of(model, x):
    logits, feats = model(x)
    return logits, log_odds_map(feats, model.fc.weight, model.fc.bias, 1)


def step_loss(a, model, xb, yb, loss_fn, grid, step):
    """-> (loss, classification loss, consistency loss) of one step. --eq > 0: the shipped
    flip-consistency loss (model/camloss.py), called as jobs/train_worker.py calls it."""
    if a.eq > 0:
        loss, cls, _ = paired_loss(model, model.fc, normalize(xb), yb, loss_fn, weight=a.eq, grid=grid, step=step)
        return loss, cls, (loss - cls) / a.eq
    if a.hide > 0:
        return hidden_loss(model, normalize(xb), yb, loss_fn, a.hide, a.hide_level)
    logits, _ = model(normalize(xb))
    cls = loss_fn(logits, yb)
    return cls, cls, torch.zeros(())


def hide_hottest(feats, fc, prob, level, gen=None):
    """Zero the features of the cells whose PNEUMONIA log-odds reach ``level`` of the map's
    maximum, in a random ``prob`` share of the images (attention-based dropout, Choe & Shim 2019):
    the head must then find evidence beyond the single most telling spot."""
    with torch.no_grad():
        m = log_odds_map(feats, fc.weight, fc.bias, 1)
        top = m.flatten(1).amax(1).clamp_min(0).view(-1, 1, 1)
        hot = (m >= level * top) & (top > 0)
        pick = torch.rand(len(m), generator=gen) < prob
        keep = ~(hot & pick.view(-1, 1, 1))
    return feats * keep.unsqueeze(1).to(feats.dtype)


def hidden_loss(model, x, yb, loss_fn, prob, level):
    feats = model.trunk(x)
    logits = model.fc(hide_hottest(feats, model.fc, prob, level).mean(dim=(2, 3)))
    cls = loss_fn(logits, yb)
    return cls, cls, torch.zeros(())


def train(a, model, x, y, grid):
    """AdamW with cosine decay, the training job's augmentation; prints one JSON line per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    log = []
    for epoch in range(1, a.epochs + 1):
        lr = a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / a.epochs)))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        gen = torch.Generator().manual_seed(a.seed * 1000 + epoch)
        order = torch.randperm(len(y), generator=gen)
        t0, tot, toteq, n = time.time(), 0.0, 0.0, 0
        bs = a.batch // 2 if a.eq > 0 else a.batch  # with twins: the same number of images per forward pass
        for step in range(math.ceil(len(y) / bs)):
            idx = order[step * bs:(step + 1) * bs].numpy()
            xb = translate(augment(torch.from_numpy(x[idx]), gen, scale=(a.crop, 1.0)), gen, a.translate)
            xb = intensity_field(xb, gen, a.field)
            loss, cls, eq = step_loss(a, model, xb, torch.from_numpy(y[idx]), loss_fn, grid, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(cls.detach()) * len(idx)
            toteq += float(eq.detach()) * len(idx)
            n += len(idx)
        row = {"epoch": epoch, "loss": tot / n, "eq": toteq / n, "s": time.time() - t0}
        log.append(row)
        print(json.dumps(row), flush=True)
    return log


@torch.no_grad()
def evaluate(model, x, y, paths, truth, grid, tta=False):
    model.eval()
    rows = []
    for i in range(0, len(y), 25):
        xb = torch.from_numpy(x[i:i + 25]).float() / 255
        res = {}
        for name, t in (("plain", None), ("hflip", 2), ("vflip", 1)):
            xi = xb if t is None else xb.flip(t)
            logits, m = maps_of(model, normalize(xi))
            if t is not None:
                m = m.flip(t)  # exact flip back: cell j <-> w-1-j is pixel 16j <-> 223-16j: geometry below
            res[name] = (torch.softmax(logits, 1)[:, 1].numpy(), m.numpy(), t)
        for k in range(len(xb)):
            r = {"path": paths[i + k], "y": int(y[i + k])}
            for name, (p, m, t) in res.items():
                r[name] = (float(p[k]), m[k])
            rows.append(r)
    return rows


def flipped_grid(grid, w):
    """Geometry of a map computed on an exactly flipped input, after flipping the map back."""
    # cell j of the flipped-back map came from flipped cell w-1-j, centred on flipped pixel
    # off + s(w-1-j) = original pixel N-1-off-s(w-1-j) = (N-1-off-s(w-1)) + s j
    return CamGrid(grid.stride, grid.input_size - 1 - grid.offset - grid.stride * (w - 1), grid.input_size)


def naive_grid(grid, w):
    return CamGrid(grid.stride, grid.stride / 2 - 0.5, grid.input_size)  # (j+0.5)/w of the image


def up2(m, gx, gy, n=224):
    from cxr_batch.model.cam import _interp_matrix
    return _interp_matrix(m.shape[0], n, gy) @ m @ _interp_matrix(m.shape[1], n, gx).T


def view_peak(r, view, g, gf):
    """The peak of one test row's map(s) for ``view``: plain, hflip/vflip (map of the flipped input,
    flipped back; gf places its cells), tta_* (maps averaged at pixel resolution)."""
    if view.startswith("tta"):
        ms = [up2(r["plain"][1], g, g)]
        if "h" in view[4:]:
            ms.append(up2(r["hflip"][1], gf, g))
        if "v" in view[4:]:
            ms.append(up2(r["vflip"][1], g, gf))
        mm = np.mean(ms, 0)
        iy, ix = np.unravel_index(np.argmax(mm), mm.shape)
        return (ix + 0.5) / 224, (iy + 0.5) / 224
    if view == "centre":  # the shipped table point (model.cam.hot_spot)
        from cxr_batch.model.cam import hot_spot
        return hot_spot(r["plain"][1], g)
    m = r[view][1]
    if view == "plain":
        return peak(m, g)
    if view == "hflip":
        return peak(m, gf)[0], peak(m, g)[1]
    return peak(m, g)[0], peak(m, gf)[1]


def offsets(tp, truth, g, gf, view):
    d = []
    for r in tp:
        tx, ty, tr = truth[r["path"]]
        px, py = view_peak(r, view, g, gf)
        d.append(((px - tx), (py - ty), tr, tx, ty))
    d = np.array(d)
    dist = np.hypot(d[:, 0], d[:, 1]) / d[:, 2]
    return {"pointing": float(np.mean(dist <= 1.5)),
            "dx_r": float(np.mean(d[:, 0] / d[:, 2])), "dy_r": float(np.mean(d[:, 1] / d[:, 2])),
            "dx_px256": float(np.mean(d[:, 0]) * 256), "dy_px256": float(np.mean(d[:, 1]) * 256),
            "median_dist_r": float(np.median(dist)),
            # peak vs lesion position, least squares: 1 = the peak follows the lesion (cam-findings "zones")
            "slope_x": float(np.polyfit(d[:, 3], d[:, 3] + d[:, 0], 1)[0]),
            "slope_y": float(np.polyfit(d[:, 4], d[:, 4] + d[:, 1], 1)[0])}


def cam_max_stats(rows, y):
    """Absolute-scale material: map maxima and means by class."""
    mx = np.array([r["plain"][1].max() for r in rows])
    return {"pos_median": float(np.median(mx[y == 1])), "neg_median": float(np.median(mx[y == 0])),
            "neg_p95": float(np.percentile(mx[y == 0], 95)), "pos_p05": float(np.percentile(mx[y == 1], 5)),
            "pos_p50_mean": float(np.median([r["plain"][1].mean() for r in rows if r["y"] == 1])),
            "neg_mean_median": float(np.median([r["plain"][1].mean() for r in rows if r["y"] == 0]))}


def hits_by_size(tp, truth, grid):
    radii = np.array([truth[r["path"]][2] for r in tp])
    hits = []
    for r in tp:
        tx, ty, tr = truth[r["path"]]
        px, py = peak(r["plain"][1], grid)
        hits.append(np.hypot(px - tx, py - ty) / tr <= 1.5)
    hits = np.array(hits)
    return {f"{lo:.2f}-{hi:.2f}": [int(hits[(radii >= lo) & (radii < hi)].sum()), int(((radii >= lo) & (radii < hi)).sum())]
            for lo, hi in ((0, 0.06), (0.06, 0.1), (0.1, 0.3))}


def summarise(rows, truth, grid, threshold=0.5):
    w = rows[0]["plain"][1].shape[-1]
    geoms = {"rf": (grid, flipped_grid(grid, w)), "naive": (naive_grid(grid, w), naive_grid(grid, w))}
    y = np.array([r["y"] for r in rows])
    p = np.array([r["plain"][0] for r in rows])
    out = {"acc": float(((p >= threshold) == y).mean()), "auc": roc_auc(y, p)}
    tp = [r for r in rows if r["y"] == 1 and r["plain"][0] >= threshold]
    out["n_tp"] = len(tp)
    if not tp:
        return out
    for gname, (g, gf) in geoms.items():
        for view in ("plain", "centre", "hflip", "vflip", "tta_h", "tta_v", "tta_hv"):
            out[f"{gname}/{view}"] = offsets(tp, truth, g, gf, view)
    out["cam_max"] = cam_max_stats(rows, y)
    out["rf_by_size"] = hits_by_size(tp, truth, grid)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--crop", type=float, default=0.7)
    ap.add_argument("--eq", type=float, default=0.0, help="weight of the CAM flip-consistency loss (train --cam-consistency)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad", default="zeros", choices=["zeros", "reflect"], help="padding mode of the trunk's convs")
    ap.add_argument("--lse", type=float, default=0.0, help="log-sum-exp pooling of the log-odds map, sharpness r (0: mean)")
    ap.add_argument("--eval-archive", default=None, help="evaluate on this archive's test/ instead")
    ap.add_argument("--layer", type=int, default=4, choices=[2, 3, 4], help="3 (2): the CAM from layer3 (layer2) with its own head")
    ap.add_argument("--field", type=float, default=0.0, help="amplitude of a smooth random intensity field added in training")
    ap.add_argument("--hide", type=float, default=0.0, help="share of images whose hottest cells are hidden in training")
    ap.add_argument("--hide-level", type=float, default=0.8, help="cells at or above this fraction of the maximum")
    ap.add_argument("--translate", type=float, default=0.0, help="extra random shift, fraction of the side")
    ap.add_argument("--highpass", type=float, default=0.0, help="subtract a Gaussian blur of this sigma (fraction of the side) from the input")
    ap.add_argument("--eval-only", default=None, metavar="STATE", help="no training: evaluate this state dict")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d, truth = archive(a.data_seed, a.size, a.n_train, a.n_test)
    tr = labelled_files(str(d), "train")
    te = labelled_files(str(d), "test")
    x, y, _ = load_pixels(str(d), tr, a.image_size, 10**8)
    xt, yt, _ = load_pixels(str(d), te, a.image_size, 10**8)
    model = model_for(a.arch, a.stride, a.seed, a.pad, a.lse, a.layer)
    grid = cam_grid(model.trunk, a.image_size)
    if a.highpass > 0:  # after the grid: the blur moves no cell centre
        model.trunk = nn.Sequential(HighPass(a.highpass), *model.trunk.children())
    with torch.no_grad():
        w = model.eval()(torch.zeros(1, 3, a.image_size, a.image_size))[1].shape[-1]
    t0 = time.time()
    if a.eval_only:
        model.load_state_dict(torch.load(a.eval_only, weights_only=True))
        log = []
    else:
        log = train(a, model, x, y, grid)
    if a.eval_archive:  # e.g. the 400 seed-2 test phantoms of the before/after table
        d, truth = Path(a.eval_archive), {}
        import csv
        for r in csv.DictReader(open(d / "truth.csv")):
            if r["x"]:
                truth[str(d / r["path"])] = (float(r["x"]), float(r["y"]), float(r["r"]))
        te = labelled_files(str(d), "test")
        xt, yt, _ = load_pixels(str(d), te, a.image_size, 10**8)
    rows = evaluate(model, xt, yt, [str(d / u) for u, _ in te], truth, grid)
    res = {"args": vars(a), "grid": str(grid), "w": w, "train_s": time.time() - t0, "log": log,
           "load": os.getloadavg(), **summarise(rows, truth, grid)}
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    torch.save(model.state_dict(), ROOT / f"{a.name}.pt")
    for k in ("acc", "auc", "n_tp", "rf/plain", "rf/centre", "naive/plain", "rf/hflip", "rf/vflip", "rf/tta_hv", "rf_by_size", "cam_max"):
        print(k, res[k])


if __name__ == "__main__":
    main()
