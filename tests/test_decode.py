import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr_batch.pixels.decode import decode_image
from cxr_batch.errors import DecodeError

from images import all_modes, broken, encode, gradient


@pytest.mark.parametrize("name,data", sorted(all_modes().items()))
def test_every_mode_decodes_to_one_gray_channel_in_0_1(name, data):
    d = decode_image(data)
    assert d.gray.dtype == np.float32 and d.gray.shape == (96, 80)
    assert (d.width, d.height) == (80, 96)
    assert 0.0 <= d.gray.min() and d.gray.max() <= 1.0
    # The bright square is bright and the dark edge dark in every mode: no inversion, no channel mix-up.
    assert d.gray[15:25, 15:25].mean() > 0.9
    assert d.gray[50:90, 0:3].mean() < 0.15


def test_sixteen_bit_is_windowed_not_clipped():
    d = decode_image(all_modes()["I16.png"])
    assert (d.gray >= 0.999).mean() < 0.2  # an 8-bit read of 12-bit data turns most pixels white
    assert len(np.unique(d.gray)) > 50


def test_rgba_and_palette_match_plain_gray():
    m = all_modes()
    ref = decode_image(m["L.png"]).gray
    for name in ("RGBA.png", "RGB.png", "P.png"):
        assert np.abs(decode_image(m[name]).gray - ref).max() < 2 / 255, name


def test_large_jpeg_decodes_at_reduced_scale_but_reports_its_own_size():
    big = Image.fromarray(np.tile(gradient(), (20, 20)))  # 1920 x 1600
    d = decode_image(encode(big, "JPEG"), draft=224)
    assert (d.width, d.height) == (1600, 1920)
    assert min(d.gray.shape) >= 224 and d.gray.shape[0] < 1920


def _png_declaring(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(_png_declaring(60000, 60000))  # 3.6 G pixels: above PIL's own limit too
    with pytest.raises(DecodeError, match="too many pixels: 5000x5000"):
        decode_image(_png_declaring(5000, 5000), max_pixels=1_000_000)


@pytest.mark.parametrize("name,match", [("empty.jpeg", "empty file"), ("text.jpeg", "not an image"),
                                        ("truncated.jpeg", "truncated or corrupt")])
def test_bad_files_raise_one_line_decode_errors(name, match):
    with pytest.raises(DecodeError, match=match) as e:
        decode_image(broken()[name])
    assert "\n" not in str(e.value)
