"""IDX file parsing (the MNIST / Fashion-MNIST format), vectorized: numpy.frombuffer, no loops.

Format (LeCun et al.): two zero bytes, a type code, the number of dimensions ``d``, then ``d``
big-endian uint32 sizes, then the data in C order, big-endian. Gzipped files are read
transparently.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import torch

from .fetch import DataError

logger = logging.getLogger(__name__)

__all__ = ["IDX_DTYPES", "parse_idx", "read_idx", "read_idx_tensor"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code -> numpy dtype (big-endian as stored)."""


def parse_idx(data: bytes | bytearray | memoryview, what: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes into an array in native byte order.

    For uint8 data the result is a zero-copy view of ``data`` (writable iff ``data`` is).

    Raises:
        DataError: bad magic, unknown type code, or a size that disagrees with the header.
    """
    buf = memoryview(data)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DataError(f"{what} is not an IDX file (bad magic bytes)")
    code, ndim = buf[2], buf[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{what}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{what}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    expected = header + count * dtype.itemsize
    if len(buf) != expected:
        raise DataError(
            f"{what}: size {len(buf)} bytes does not match its header "
            f"(shape {dims}, {dtype} -> {expected} bytes); the file is truncated or corrupted"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a writable numpy array."""
    p = Path(path)
    with open(p, "rb", buffering=0) as f:
        magic = f.read(2)
        if magic == b"\x1f\x8b":
            f.seek(0)
            with gzip.GzipFile(fileobj=f) as gz:
                buf = bytearray(gz.read())
        else:
            size = p.stat().st_size
            buf = bytearray(size)
            f.seek(0)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != size:
                raise DataError(f"{p}: short read ({got} of {size} bytes)")
    return parse_idx(buf, what=str(p))


def read_idx_tensor(path: str | Path) -> torch.Tensor:
    """Read an IDX file into a CPU tensor of the matching dtype (zero-copy for uint8)."""
    return torch.from_numpy(read_idx(path))
