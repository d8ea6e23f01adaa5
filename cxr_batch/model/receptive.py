"""Where each cell of a network's feature map sits in its input: the centre of its receptive field,
walked layer by layer from each convolution's and pooling's kernel, stride, padding and dilation.

A layer with kernel k, stride s, padding p and dilation d computes output j from inputs
s*j - p ... s*j - p + d*(k - 1), centred on input s*j + (d*(k - 1)/2 - p). Chaining layers composes
these affine maps; at a residual join both branches must agree (they do in a ResNet, and a block
where they did not would blur its own geometry, so it is refused rather than guessed).
"""

from __future__ import annotations

from torch import nn

from .cam import CamGrid

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def cam_grid(trunk: nn.Module, input_size: int) -> CamGrid:
    """The geometry of ``trunk``'s output cells in an input of ``input_size`` pixels."""
    stride, offset = _walk(trunk)
    if stride != int(stride):
        raise ValueError(f"the trunk's overall stride {stride} is not an integer")
    return CamGrid(int(stride), float(offset), int(input_size))


def _walk(module: nn.Module) -> tuple[float, float]:
    """(stride, offset): output cell j is centred on input pixel offset + stride * j."""
    if isinstance(module, _SPATIAL):
        return _layer(module)
    children = dict(module.named_children())
    if not children:
        if any(hasattr(module, a) for a in ("stride", "kernel_size", "padding")):
            raise ValueError(f"cannot place the cells of a {type(module).__name__}: add it to receptive._walk")
        return 1.0, 0.0  # batch norm, ReLU, identity: the grid passes through unchanged
    skip = children.pop("downsample", None)
    main = _compose([_walk(c) for c in children.values()])
    if _is_residual(module):
        other = _walk(skip) if skip is not None else (1.0, 0.0)
        if other != main:
            raise ValueError(f"{type(module).__name__}: the residual branches disagree on the cell grid"
                             f" ({main} vs {other})")
    elif skip is not None:
        raise ValueError(f"{type(module).__name__} has a 'downsample' child but is not a known residual block")
    return main


def _is_residual(module: nn.Module) -> bool:
    from .resnet import BasicBlock, Bottleneck

    return isinstance(module, (BasicBlock, Bottleneck))


def _compose(maps: list[tuple[float, float]]) -> tuple[float, float]:
    """Layers applied in order: a cell at (s2 * j + o2) of the previous output -> input pixels."""
    stride, offset = 1.0, 0.0
    for s, o in maps:
        offset += stride * o
        stride *= s
    return stride, offset


def _layer(m: nn.Module) -> tuple[float, float]:
    k, s, p = (_square(getattr(m, a), a, m) for a in ("kernel_size", "stride", "padding"))
    d = _square(getattr(m, "dilation", 1), "dilation", m)
    return float(s), d * (k - 1) / 2.0 - p


def _square(value, name: str, m: nn.Module) -> int:
    if isinstance(value, str):
        raise ValueError(f"{type(m).__name__} padding {value!r}: give it as numbers")
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"{type(m).__name__} has a non-square {name} {value}; the CAM grid assumes square layers")
    return int(a)
