"""Whole-file checks that SimpleITK does not make: every voxel present, every value a number, even slices.

Three kinds of damaged input read "successfully" with SimpleITK and would
give a wrong result with exit status 0:

* a truncated NIfTI file (``.nii`` or ``.nii.gz``, e.g. a copy or download
  that did not finish): ITK's NIfTI reader fills the missing voxels with 0;
* NaN or infinite voxels in a float NIfTI file: the same reader replaces them
  with 0, so they cannot be seen in the image it returns;
* a DICOM series with a damaged slice file or with a gap: GDCM leaves out a
  file it cannot parse, and ITK stacks the remaining slices on a grid that
  assumes one uniform spacing (it only prints a warning).

Each check raises :class:`~ContrastiveSegLib.errors.InputError` naming the
file, so that ``finetune``, ``selftrain``, ``pretrain`` and ``predict`` stop
before anything is trained or written.  NRRD and MetaImage readers already
refuse truncated data, so they need no check here.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Optional, Sequence

import numpy as np

from ..errors import InputError

_CHUNK_BYTES = 1 << 22
# NIfTI datatype codes of real floating-point voxels -> numpy type.
_FLOAT_DATATYPES = {16: np.float32, 64: np.float64}
# Slice positions may differ from the common spacing by this share of it (scanner rounding).
SLICE_SPACING_TOLERANCE = 0.01


@dataclass
class NiftiLayout:
    """Where the voxels of a NIfTI file are and how many bytes they take.

    Attributes:
        voxel_offset: byte offset of the first voxel in the (decompressed) file.
        voxel_bytes: bytes of voxel data the header promises.
        datatype: the NIfTI datatype code (16: float32, 64: float64, 4: int16, ...).
        byte_order: ``"<"`` or ``">"``.
    """

    voxel_offset: int
    voxel_bytes: int
    datatype: int
    byte_order: str

    @property
    def expected_size(self) -> int:
        return self.voxel_offset + self.voxel_bytes


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _nifti_layout(header: bytes) -> Optional[NiftiLayout]:
    """The layout from the first bytes of a NIfTI-1 or NIfTI-2 file; None if they are not a NIfTI header."""
    if len(header) < 4:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            datatype, bitpix = struct.unpack(order + "hh", header[70:74])
            dims = struct.unpack(order + "8h", header[40:56])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            minimum_offset = 352
            break
        if size == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(order + "hh", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = int(struct.unpack(order + "q", header[168:176])[0])
            minimum_offset = 544
            break
    else:
        return None
    rank = int(dims[0])
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:rank + 1]):
        return None  # a header SimpleITK will refuse with its own message
    voxels = int(np.prod([int(d) for d in dims[1:rank + 1]], dtype=np.int64))
    return NiftiLayout(voxel_offset=max(offset, minimum_offset), voxel_bytes=voxels * int(bitpix) // 8,
                       datatype=int(datatype), byte_order=order)


def _open_data(path: Path, compressed: bool) -> BinaryIO:
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _gzip_stated_size(path: Path) -> int:
    """The uncompressed size modulo 2**32 that a complete gzip file states in its last 4 bytes."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]


def _decompressed_size(path: Path, what: str, expected: int) -> int:
    """Bytes of the whole decompressed stream (all gzip members); InputError if it is truncated or damaged."""
    total = 0
    decompressor = zlib.decompressobj(wbits=31)
    member_open = False
    try:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(_CHUNK_BYTES)
                if not chunk:
                    break
                while chunk:
                    member_open = True
                    total += len(decompressor.decompress(chunk))
                    if not decompressor.eof:
                        break
                    chunk, decompressor, member_open = decompressor.unused_data, zlib.decompressobj(wbits=31), False
                    if not chunk.strip(b"\x00"):   # zero padding after the last member
                        chunk = b""
    except zlib.error as error:
        raise InputError(f"is a damaged {what}: its gzip stream cannot be decompressed ({error})", path=str(path),
                         fix="copy or export the file again") from None
    if member_open:
        raise InputError(f"is a truncated {what}: its gzip stream stops after {total:,} of the {expected:,} "
                         "bytes its header promises", path=str(path),
                         fix="copy or export the file again and check it is complete (the same size as the "
                             "original)")
    return total


def check_nifti_file(path: Path, what: str) -> None:
    """Refuse a NIfTI file that lacks voxels its header promises, or whose float voxels are NaN or infinite.

    Cost: for ``.nii.gz``, the header and the last 4 bytes (the size the gzip
    stream states); the whole stream is decompressed only when that size
    disagrees with the header (to tell a truncated file from a multi-member
    one) or when the voxels are floats (to look for NaN).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        what: ``"image"`` or ``"label map"``, for the message.

    Raises:
        InputError: truncated or damaged file, or NaN / infinite voxels.
    """
    compressed = _is_gzip(path)
    try:
        with _open_data(path, compressed) as handle:
            layout = _nifti_layout(handle.read(544))
    except (OSError, EOFError, zlib.error):
        return  # not readable as NIfTI at all: SimpleITK's reader gives the message
    if layout is None:
        return
    kind = f"{'compressed ' if compressed else ''}NIfTI {what}"
    if compressed:
        if _gzip_stated_size(path) != layout.expected_size % (1 << 32):
            size = _decompressed_size(path, kind, layout.expected_size)
            if size < layout.expected_size:
                _raise_short(path, kind, size, layout)
    else:
        size = os.path.getsize(path)
        if size < layout.expected_size:
            _raise_short(path, kind, size, layout)
    if layout.datatype in _FLOAT_DATATYPES:
        bad, total = _count_non_finite(path, compressed, layout)
        if bad:
            raise InputError(f"has {bad} of {total} voxels that are NaN or infinite", path=str(path),
                             fix="replace them with a valid value (for a CT, e.g. -1024 HU, air; for a label "
                                 "map, 0) before using the file, e.g. with numpy.nan_to_num")


def _raise_short(path: Path, kind: str, size: int, layout: NiftiLayout) -> None:
    missing = layout.expected_size - size
    share = 100.0 * missing / max(layout.voxel_bytes, 1)
    raise InputError(f"is a truncated {kind}: its header promises {layout.expected_size:,} bytes but the file "
                     f"holds {size:,} ({share:.0f} % of the voxels are missing)", path=str(path),
                     fix="copy or export the file again and check it is complete (the same size as the original)")


def _count_non_finite(path: Path, compressed: bool, layout: NiftiLayout) -> tuple:
    """``(non-finite voxels, voxels)`` of a float NIfTI file, read in chunks."""
    dtype = np.dtype(_FLOAT_DATATYPES[layout.datatype]).newbyteorder(layout.byte_order)
    item = dtype.itemsize
    bad = 0
    remaining = layout.voxel_bytes
    carry = b""
    with _open_data(path, compressed) as handle:
        handle.seek(layout.voxel_offset)
        while remaining > 0:
            block = handle.read(min(_CHUNK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            block = carry + block
            usable = len(block) - len(block) % item
            carry = block[usable:]
            values = np.frombuffer(block[:usable], dtype=dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    return bad, layout.voxel_bytes // item


# --------------------------------------------------------------------------- DICOM series

def unreadable_dicom_files(folder: Path, series_files: Sequence[str]) -> List[str]:
    """Files of ``folder`` that look like DICOM (``DICM`` marker or a ``.dcm`` name) but belong to no series.

    GDCM leaves out a file it cannot parse (e.g. truncated), silently.
    """
    listed = {os.path.realpath(f) for f in series_files}
    unreadable = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if not os.path.isfile(full) or os.path.realpath(full) in listed or entry.upper() == "DICOMDIR":
            continue
        with open(full, "rb") as handle:
            marker = handle.read(132)[128:132]
        if marker == b"DICM" or entry.lower().endswith((".dcm", ".ima")):
            unreadable.append(entry)
    return unreadable


def check_slice_spacing(folder: Path, files: Sequence[str], positions: Sequence[Sequence[float]],
                        normal: Sequence[float]) -> None:
    """Refuse a series whose slices are not evenly spaced along ``normal``, naming the widest odd gap.

    Args:
        folder: the series folder, named in the message.
        files: the slice files in stacking order.
        positions: each file's Image Position (Patient), mm.
        normal: unit vector across the slices (the third column of the direction).
    """
    if len(files) < 3:
        return
    heights = np.asarray(positions, dtype=float) @ np.asarray(normal, dtype=float)
    gaps = np.diff(heights)
    typical = float(np.median(gaps))
    if typical == 0:
        raise InputError("holds several slices at the same position; it is not one 3D series", path=str(folder),
                         fix="put each series in its own folder")
    deviation = np.abs(gaps - typical)
    worst = int(np.argmax(deviation))
    if deviation[worst] <= SLICE_SPACING_TOLERANCE * abs(typical):
        return
    odd = int(np.count_nonzero(deviation > SLICE_SPACING_TOLERANCE * abs(typical)))
    raise InputError(
        f"holds a DICOM series with uneven slice spacing: most slices are {abs(typical):g} mm apart, but "
        f"{os.path.basename(files[worst])} (at {heights[worst]:g} mm) and {os.path.basename(files[worst + 1])} "
        f"(at {heights[worst + 1]:g} mm) are {abs(gaps[worst]):g} mm apart"
        + (f" ({odd} uneven gaps in all)" if odd > 1 else ""),
        path=str(folder),
        fix="if slices are missing, export the complete series again; if the spacing really varies, resample "
            "the series onto a uniform grid (e.g. in 3D Slicer: Resample Scalar Volume) and give that file")
