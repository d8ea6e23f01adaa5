"""Where on the chest the CAM's offset comes from (cam-findings round 8).

  python docs/experiments/cam_zones.py maps NAME --layer 2 --seed 4   # a cam_train.py state dict's maps
  python docs/experiments/cam_zones.py zones NAME                     # offset by lesion height and size, profile
  python docs/experiments/cam_zones.py visible                        # the film's own shift of each lesion

``maps`` evaluates /tmp/camexp/NAME.pt (written by cam_train.py) on the 400 seed-2 test phantoms and keeps
each map; ``zones`` splits the hot-spot centre's offset by where the lesion is (upper, middle, lower part of
the image) and by its radius, and prints the map's mean profile along the lesion's column; ``visible``
draws each test phantom twice from the same generator state (with and without the lesion: the two differ
only there) and compares the centroid of what the lesion changes on the film with the truth (the centroid
of the density it adds), so a shift the film itself makes is told apart from one the network makes.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path("/tmp/camexp")
TEST = ROOT / "test-s2-256-400"
BANDS = ((0, .35, "upper"), (.35, .5, "mid-upper"), (.5, .65, "mid-lower"), (.65, 1, "lower"))


def maps(a):
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    import cam_train as ct
    from cxr_batch.jobs.trainset import labelled_files, load_pixels
    from cxr_batch.model.cam import hot_spot
    from cxr_batch.model.receptive import cam_grid
    torch.set_num_threads(1)
    model = ct.model_for("resnet18", 16, a.seed, layer=a.layer)
    grid = cam_grid(model.trunk, 224)
    model.load_state_dict(torch.load(ROOT / f"{a.name}.pt", weights_only=True))
    truth = {r["path"]: r for r in csv.DictReader(open(TEST / "truth.csv"))}
    te = labelled_files(str(TEST), "test")
    x, y, _ = load_pixels(str(TEST), te, 224, 10**8)
    rows = ct.evaluate(model, x, y, [u for u, _ in te], {}, grid)
    out = []
    for r in rows:
        p, m = r["plain"]
        t = truth[r["path"]]
        out.append({"path": r["path"], "label": t["label"], "p": p, "hot": hot_spot(m, grid), "map": m.tolist(),
                    "x": t["x"], "y": t["y"], "r": t["r"]})
    (ROOT / "zones").mkdir(exist_ok=True)
    (ROOT / "zones" / f"{a.name}.json").write_text(json.dumps(out))


def zones(a):
    rows = json.loads((ROOT / "zones" / f"{a.name}.json").read_text())
    tp = [r for r in rows if r["label"] == "PNEUMONIA" and r["p"] >= 0.5]
    d = np.array([[r["hot"][0] - float(r["x"]), r["hot"][1] - float(r["y"]), float(r["r"]), float(r["y"])] for r in tp])
    dy = d[:, 1] / d[:, 2]
    hit = np.hypot(d[:, 0] / d[:, 2], dy) <= 1.5
    print(f"{a.name}: {len(tp)} true positives, pointing {hit.mean():.0%}, mean dy {dy.mean():+.2f} radii,"
          f" slope of peak y on lesion y {np.polyfit(d[:, 3], d[:, 3] + d[:, 1], 1)[0]:.2f}")
    for lo, hi, name in BANDS:
        s = (d[:, 3] >= lo) & (d[:, 3] < hi)
        print(f"  lesion y {lo:.2f}-{hi:.2f} ({name:9s}) n {s.sum():3d}  dy {dy[s].mean():+.2f} radii"
              f" ({256 * d[s, 1].mean():+5.1f} px of 256)  pointing {hit[s].mean():.0%}")
    for lo, hi in ((0, .05), (.05, .07), (.07, .1), (.1, .3)):
        s = (d[:, 2] >= lo) & (d[:, 2] < hi)
        print(f"  radius {lo:.2f}-{hi:.2f} n {s.sum():3d}  dy {dy[s].mean():+.2f} radii  pointing {hit[s].mean():.0%}")
    steps = np.linspace(-2.5, 2.5, 11)
    print("  map along the lesion's column, share of its maximum, at lesion radii", " ".join(f"{s:+.1f}" for s in steps))
    for lo, hi, name in BANDS:
        prof = []
        for r in tp:
            if not lo <= float(r["y"]) < hi:
                continue
            m = np.array(r["map"])
            stride = 224 / m.shape[0]  # the cells' spacing; centres at stride * i (receptive-field geometry)
            j = int(round(float(r["x"]) * 224 / stride))
            col = m[:, max(0, j - 1):j + 2].mean(1)
            ys = (float(r["y"]) + steps * float(r["r"])) * 224 / stride
            prof.append(np.interp(ys, np.arange(m.shape[0]), col, left=np.nan, right=np.nan) / np.abs(col).max())
        print(f"  {name:9s}", " ".join(f"{v:+.2f}" for v in np.nanmean(prof, 0)))


def visible(a):
    from scipy import ndimage
    from cxr_batch.synth.phantom import phantom
    rows = [r for r in csv.DictReader(open(TEST / "truth.csv")) if r["x"]]
    d = []
    for r in rows:
        i = int(r["path"].split("-")[-1].split(".")[0])
        with_, t = phantom(np.random.default_rng([2, 2, i]), 256, opacity=True)  # the archive's seed 2, split 2
        without, _ = phantom(np.random.default_rng([2, 2, i]), 256, opacity=False)
        diff = ndimage.gaussian_filter(with_.astype(np.float32) - without.astype(np.float32), 1.0)
        w = diff * (diff >= 0.5 * diff.max())
        ys, xs = np.indices(diff.shape)
        vx, vy = (w * (xs + .5)).sum() / w.sum() / 256, (w * (ys + .5)).sum() / w.sum() / 256
        d.append([vx - t["x"], vy - t["y"], t["r"], t["y"]])
    d = np.array(d)
    dy = d[:, 1] / d[:, 2]
    print(f"visible centroid - truth over {len(d)} lesions: dx {np.mean(d[:, 0] / d[:, 2]):+.2f}, dy {dy.mean():+.2f} radii")
    for lo, hi, name in BANDS:
        s = (d[:, 3] >= lo) & (d[:, 3] < hi)
        print(f"  lesion y {lo:.2f}-{hi:.2f} ({name:9s}) n {s.sum():3d}  dy {dy[s].mean():+.2f} radii")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["maps", "zones", "visible"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    {"maps": maps, "zones": zones, "visible": visible}[a.what](a)


if __name__ == "__main__":
    main()
