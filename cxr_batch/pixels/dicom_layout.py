"""Does a DICOM byte stream end inside an element? The evidence behind every "truncated" message.

pydicom reads a cut file without complaint: a value shorter than its declared length is kept as
it is, a partial element header at the end is dropped, and a cut inside an undefined-length
sequence empties the whole dataset. So "no pixel data" alone cannot tell a header-only object (a
DICOMDIR stub, a structured report) from a file cut short. This walk follows the element layout
(PS3.5 section 7) from the start and reports where the bytes run out; a layout it cannot follow
(an invalid VR, a stray delimiter, a deflated dataset) gives no verdict rather than a guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

UNDEFINED = 0xFFFFFFFF
META = 0x00020000  # File Meta Information Group Length: how many bytes of meta follow it
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


@dataclass(frozen=True)
class Cut:
    tag: int  # the element the bytes end in (0 when they end inside an element's own header)
    have: int  # bytes of its value present
    need: int  # bytes its header declares (0 when unknown: an unterminated sequence)

    def where(self) -> str:
        if not self.tag:
            return "inside an element header"
        if self.tag == META:
            if not self.need:
                return "before its file meta information"
            return f"inside its file meta information ({self.have:,} of {self.need:,} bytes)"
        name = f"element ({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"
        if self.need:
            return f"inside {name} ({self.have:,} of {self.need:,} bytes)"
        return f"inside {name} before its sequence delimiter"


class _Ends(Exception):
    def __init__(self, cut: Cut):
        self.cut = cut


class _Unknown(Exception):
    """A layout this walk does not follow: no verdict."""


def find_cut(data: bytes, *, implicit: bool, little: bool) -> Cut | None:
    """Where ``data`` (a whole file) ends inside an element, or None when every element is whole
    or the layout cannot be followed. ``implicit``/``little`` is the dataset's encoding (pydicom's
    ``Dataset.original_encoding``); the file meta group is always explicit VR little endian."""
    start = 132 if data[128:132] == b"DICM" else 0
    if start and len(data) == start:  # a Part 10 file always has its file meta after the marker
        return Cut(META, 0, 0)
    if start and len(data) > start + 1 and data[start: start + 2] != b"\x02\x00":
        return None  # no file meta after the marker: garbage, not a layout to judge
    try:
        _elements(memoryview(data), start, (implicit, little), in_item=False)
    except _Ends as e:
        return e.cut
    except (_Unknown, struct.error):
        return None
    return None


def _header(buf, pos: int, enc: tuple[bool, bool]) -> tuple[int, bytes | None, int, int]:
    """-> (tag, vr or None, value length, header size) of the element at ``pos``."""
    implicit, little = enc
    end = "<" if little else ">"
    if len(buf) - pos < 8:
        raise _Ends(Cut(0, 0, 0))
    group, elem = struct.unpack_from(end + "HH", buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:  # items and delimiters carry no VR in either encoding
        return tag, None, struct.unpack_from(end + "L", buf, pos + 4)[0], 8
    vr = bytes(buf[pos + 4: pos + 6])
    if not (vr.isalpha() and vr.isupper()):
        raise _Unknown
    if vr in _LONG_VRS:
        if len(buf) - pos < 12:
            raise _Ends(Cut(0, 0, 0))
        return tag, vr, struct.unpack_from(end + "L", buf, pos + 8)[0], 12
    return tag, vr, struct.unpack_from(end + "H", buf, pos + 6)[0], 8


def _elements(buf, pos: int, enc: tuple[bool, bool], *, in_item: bool) -> int:
    """Walk a dataset from ``pos``; return where it ends (after its item delimiter, inside an item)."""
    meta = not in_item  # a dataset may open with the group 0002 file meta, always explicit VR little endian
    last, meta_start, meta_len = -1, 0, 0
    while pos < len(buf):
        if meta and bytes(buf[pos: pos + 2]) == b"\x02\x00":
            tag, vr, length, size = _header(buf, pos, (False, True))
        else:
            meta = False
            tag, vr, length, size = _header(buf, pos, enc)
        if tag == ITEM_END and in_item:
            return pos + size
        if tag <= last or tag in (ITEM, ITEM_END, SEQ_END):
            raise _Unknown  # elements come in ascending tag order: this is not the layout we think it is
        last = tag
        pos = _value(buf, pos + size, tag, vr, length, enc)
        if meta and tag == META and length == 4:
            meta_start, meta_len = pos, struct.unpack_from("<L", buf, pos - 4)[0]
    if meta_start + meta_len > len(buf):  # the meta group's length promises more bytes than the file holds
        raise _Ends(Cut(META, len(buf) - meta_start, meta_len))
    if in_item:
        raise _Ends(Cut(ITEM, 0, 0))
    return pos


def _value(buf, pos: int, tag: int, vr: bytes | None, length: int, enc: tuple[bool, bool]) -> int:
    """Skip one element's value; an undefined length is a run of items up to a sequence delimiter
    (a sequence, an undefined-length UN, or encapsulated pixel data)."""
    if length != UNDEFINED:
        if pos + length > len(buf):
            raise _Ends(Cut(tag, len(buf) - pos, length))
        return pos + length
    inner = (True, enc[1]) if vr == b"UN" else enc  # PS3.5 6.2.2: an undefined-length UN holds implicit VR
    try:
        while True:
            item, _, item_len, size = _header(buf, pos, (True, enc[1]))
            pos += size
            if item == SEQ_END:
                return pos
            if item != ITEM:
                raise _Unknown
            if item_len == UNDEFINED:
                pos = _elements(buf, pos, inner, in_item=True)
            else:
                pos = _value(buf, pos, ITEM, None, item_len, inner)
    except _Ends as e:  # name the outer element, unless the bytes end inside one of its items' elements
        raise _Ends(Cut(tag, 0, 0) if e.cut.tag in (0, ITEM) else e.cut) from None
