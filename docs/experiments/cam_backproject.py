"""Round 14: where in the INPUT does the hot spot's evidence come from? (no training)

    python docs/experiments/cam_backproject.py CKPT OUT.npz ARCHIVE [sigma_px]

The map's cells above a lower lesion vote for it because the lesion lies in the lower part of
their receptive fields (cam-findings rounds 8 and 13: the blob reaches up over the lung). The
gradient of the hot spot's summed evidence with respect to the input pixels says which pixels
make those cells hot: if that is the lesion, a point read from it is free of the pull.
Reads the true positives of a ``cam_offset_why.py dump`` and prints pointing/offset per readout.
"""
import sys
import os

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cam_offset_why import load_tp, summary  # noqa: E402

from cxr_batch import POSITIVE  # noqa: E402
from cxr_batch.model.cam import hot_spot, hot_spot_weights, log_odds_map, weighted_centre  # noqa: E402


def hot_mask(m):
    w = hot_spot_weights(m)  # the shipped hot spot; a map with no cell above 0 (no true positive has one) adds nothing
    return np.zeros_like(m) if w is None else w


def centroid(a, frac):
    """Centroid (x, y) in pixel fractions of the connected region around a's max where a >= frac * max."""
    x, y = weighted_centre(hot_spot_weights(a, frac))
    return (x + .5) / a.shape[1], (y + .5) / a.shape[0]


def main(ckpt, npz, archive, sigma=4.0):
    from cxr_batch.jobs.score_stages import decode_batch
    from cxr_batch.model.registry import describe, fc_bias, fc_weight, load
    from cxr_batch.model.cam import CamGrid
    from cxr_batch.pixels.transforms import normalize

    torch.set_num_threads(2)
    z, tp, g, xyr = load_tp(npz)
    info = describe(ckpt)
    model = load(info).eval()
    grid = CamGrid(info.cam_stride, info.cam_offset, info.image_size)
    px = decode_batch({"path": np.asarray(z["rels"][tp], dtype=object)}, archive=archive,
                      image_size=info.image_size, max_pixels=10**8)["pixels"]
    res = {}
    for b in range(0, len(tp), 16):
        x = normalize(torch.from_numpy(np.ascontiguousarray(px[b:b + 16]))).requires_grad_(True)
        _, f = model(x)
        maps = log_odds_map(f, fc_weight(model).float(), fc_bias(model).float(), POSITIVE)
        m_np = maps.detach().numpy().astype(np.float64)
        masks = torch.from_numpy(np.stack([hot_mask(m) for m in m_np])).float()
        (maps * masks).sum().backward()
        gr = x.grad.sum(1).numpy()
        xin = x.detach()[:, 0].numpy()
        for k in range(len(gr)):
            res.setdefault("table's point (hot_spot)", []).append(hot_spot(m_np[k], grid))
            for name, a in (("|grad|", np.abs(gr[k])), ("relu(grad)", np.maximum(gr[k], 0)),
                            ("relu(grad*x)", np.maximum(gr[k] * xin[k], 0)), ("|grad*x|", np.abs(gr[k] * xin[k]))):
                a = ndimage.gaussian_filter(a, sigma)
                for frac in (0.5, 0.7):
                    res.setdefault(f"{name} s{sigma:g} >= {frac}", []).append(centroid(a, frac))
    print(npz, len(tp), "true positives")
    for name, p in res.items():
        print(f"  {name:28s}", summary(np.array(p, float), xyr))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(float(v) for v in sys.argv[4:]))
