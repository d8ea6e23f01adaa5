"""What the OOD check costs on the scoring path: the model stage (score_stages.Scorer) with the check
against the same stage with --ood off, on the same batches, alternated so both see the same machine.

    python scripts/ood_cost.py [ARCH] [IMAGE_SIZE] [ROUNDS]

A checkpoint of ARCH with statistics of the right width is written to a temporary folder (the cost
does not depend on what the weights learned). Prints images/s of each and their ratio, and the time of
the check alone (the Mahalanobis distance of a batch's pooled features, as the Scorer computes it) as a
share of the whole stage's time on the same batch: on a busy machine the ratio of two rates moves by a
few per cent either way, the check's own share does not.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from cxr_batch.jobs.score_stages import Scorer
from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
from cxr_batch.model.network import build_model
from cxr_batch.model.ood import OodStats
from cxr_batch.model.registry import describe


def main(arch="resnet18", size=96, rounds=10, batch=16):
    size, rounds = int(size), int(rounds)
    with tempfile.TemporaryDirectory() as tmp:
        net = build_model(arch, "none")
        d = net.fc.in_features
        stats = OodStats(means=np.zeros((2, d)), precision=np.eye(d), threshold=1e9)
        ck = make_checkpoint(net, arch=arch, image_size=size, threshold=0.5, settings={})
        save_checkpoint({**ck, "ood": stats.to_entries()}, f"{tmp}/m.ckpt")
        info = describe(f"{tmp}/m.ckpt").to_dict()
        kw = dict(info=info, threads=torch.get_num_threads(), precision="fp32", compile=False, channels_last=True)
        scorers = {"off": Scorer(**kw, ood="off"), "skip": Scorer(**kw, ood="skip")}
        rng = np.random.default_rng(0)
        batch_d = {"path": np.array([f"{i}.png" for i in range(batch)], object),
                   "error": np.array([None] * batch, object), "status": np.array([None] * batch, object),
                   "pixels": rng.integers(0, 255, (batch, size, size), dtype=np.uint8)}
        for s in scorers.values():  # warm-up: the first calls trace and allocate
            s(dict(batch_d))
        times = {k: [] for k in scorers}
        for _ in range(rounds):
            for k, s in scorers.items():
                t = time.perf_counter()
                s(dict(batch_d))
                times[k].append(time.perf_counter() - t)
        skip = scorers["skip"]
        with torch.no_grad():
            feats = skip.model(torch.zeros(batch, 3, size, size).contiguous(memory_format=torch.channels_last))[1]
        check = []
        if skip.ood is not None:
            for _ in range(rounds * 10):
                t = time.perf_counter()
                skip.ood_scores(feats)
                check.append(time.perf_counter() - t)
        rate = {k: batch / statistics.median(v) for k, v in times.items()}
        print(f"{arch} at {size} px, batch {batch}, {torch.get_num_threads()} threads, {rounds} rounds (median):"
              f" --ood off {rate['off']:.1f} images/s, --ood skip {rate['skip']:.1f} images/s,"
              f" ratio {rate['skip'] / rate['off']:.3f}")
        if check:
            share = statistics.median(check) / statistics.median(times["skip"])
            print(f"the check alone: {statistics.median(check) * 1e3:.3f} ms per batch of {batch},"
                  f" {100 * share:.3f}% of the stage's time")


if __name__ == "__main__":
    main(*sys.argv[1:])
