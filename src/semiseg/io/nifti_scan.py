"""A streaming integrity scan of NIfTI files, for what ITK's reader does not report.

ITK reads a truncated ``.nii.gz`` without an error (the missing voxels come out as
zeros) and turns NaN voxels of float NIfTI images into 0. :func:`scan_nifti` reads the
file once in chunks (constant memory) and reports both, so a bad case fails instead of
being preprocessed from silently wrong data.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: NIfTI datatype code -> NumPy dtype (without byte order).
DTYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8",
    32: "c8", 1792: "c16", 128: "u1", 2304: "u1",
}
CHUNK = 1 << 23


class NiftiScanError(ValueError):
    """The file is not a complete NIfTI file."""


@dataclass(frozen=True)
class NiftiScan:
    """What the scan found: voxel count, data bytes read and non-finite voxels."""

    voxels: int
    data_bytes: int
    non_finite: int


def is_nifti(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _header(head: bytes) -> tuple[str, int, int, int]:
    """(byte order, datatype, bitpix, vox_offset, voxels) from a NIfTI-1 or -2 header."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            vox_offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if size == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            vox_offset = int(struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        raise NiftiScanError("not a NIfTI file (bad header size)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise NiftiScanError(f"bad NIfTI header (dim[0] = {ndim})")
    voxels = int(np.prod([max(1, int(d)) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return order, int(datatype), int(bitpix), vox_offset, voxels


def scan_nifti(path: str | Path) -> NiftiScan:
    """Read a ``.nii`` / ``.nii.gz`` file in chunks; check completeness and finiteness.

    Raises :class:`NiftiScanError` for a bad header, a damaged or truncated gzip stream,
    or fewer data bytes than the header promises.
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
            if len(head) < 348:
                raise NiftiScanError("file ends inside the NIfTI header (truncated)")
            order, datatype, bitpix, vox_offset, voxels = _header(head)
            expected = voxels * bitpix // 8
            buf = head[vox_offset:] if vox_offset < len(head) else b""
            if vox_offset > len(head):
                skipped = fh.read(vox_offset - len(head))
                if len(skipped) < vox_offset - len(head):
                    raise NiftiScanError("file ends before the image data (truncated)")
            kind = DTYPES.get(datatype)
            is_float = kind is not None and kind[0] in "fc"
            dtype = np.dtype(order + kind) if is_float else None
            got = 0
            non_finite = 0
            carry = b""
            while True:
                data = buf if buf else fh.read(CHUNK)
                buf = b""
                if not data:
                    break
                got += len(data)
                if dtype is not None:
                    data = carry + data
                    usable = len(data) - len(data) % dtype.itemsize
                    arr = np.frombuffer(data[:usable], dtype=dtype)
                    if got > expected:  # ignore trailing bytes past the image data
                        extra = (got - expected) // dtype.itemsize
                        arr = arr[: max(0, arr.size - extra)]
                    non_finite += int(arr.size - np.count_nonzero(np.isfinite(arr)))
                    carry = data[usable:]
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise NiftiScanError(f"damaged or truncated gzip stream ({exc})") from exc
    if got < expected:
        raise NiftiScanError(f"file holds {got} of the {expected} bytes of image data its header declares (truncated)")
    return NiftiScan(voxels=voxels, data_bytes=got, non_finite=non_finite)
