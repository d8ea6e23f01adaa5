"""What layer4's stride costs: the plain network (CAM stride 32) against layer4 without its last stride
(16; dilated in ResNet-50/101), for training (forward and backward) and scoring (forward).

    python scripts/stride_cost.py [IMAGE_SIZE] [ROUNDS] [ARCH ...]

Counts floating-point operations with torch's FlopCounterMode (exact, the same on every machine), then
times both on the same batches, alternated so both see the same machine, and prints the ratios.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cxr_batch.model.network import build_model


def _step(net, x, train: bool) -> None:
    """One training step's forward and backward, or one scoring forward."""
    if train:
        net(x)[0].sum().backward()
    else:
        with torch.no_grad():
            net(x)


def _flops(net, x, train: bool) -> int:
    with FlopCounterMode(display=False) as fc:
        _step(net, x, train)
    return fc.get_total_flops()


def _seconds(net, x, train: bool) -> float:
    t = time.perf_counter()
    _step(net, x, train)
    return time.perf_counter() - t


def main(size=224, rounds=3, *archs, batch=4):
    size, rounds = int(size), int(rounds)
    x = torch.randn(batch, 3, size, size)
    for arch in archs or ("resnet18", "resnet101"):
        nets = {s: build_model(arch, "none", cam_stride=s) for s in (32, 16)}
        for train in (True, False):
            flops = {s: _flops(n, x, train) for s, n in nets.items()}
            times = {s: [] for s in nets}
            for s, n in nets.items():  # warm-up
                _seconds(n, x, train)
            for _ in range(rounds):
                for s, n in nets.items():
                    times[s].append(_seconds(n, x, train))
            t = {s: statistics.median(v) for s, v in times.items()}
            what = "training step" if train else "scoring forward"
            print(f"{arch} {size} px, batch {batch}, {what}: GFLOP/image stride 32 {flops[32] / batch / 1e9:.2f},"
                  f" stride 16 {flops[16] / batch / 1e9:.2f} (x{flops[16] / flops[32]:.2f});"
                  f" time x{t[16] / t[32]:.2f} ({rounds} rounds, median, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main(*sys.argv[1:])
