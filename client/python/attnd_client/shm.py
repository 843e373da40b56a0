"""POSIX shared memory a client fills with tensors and registers as a host region."""

import mmap
import os
import secrets

import numpy as np

from . import tensors

_SHM_DIR = "/dev/shm"  # where Linux keeps shm_open objects; the server opens the same name


class SharedMemoryRegion:
    """One POSIX shared-memory object, created exclusively and unlinked on close.

    Its `key` ("/name") is what RegisterHostRegion takes as shm_key. Used as a context manager
    or closed explicitly; unregister the region on the server first.
    """

    def __init__(self, size, key=None):
        if size <= 0:
            raise ValueError("size must be > 0")
        key = key or f"/attnd-py-{os.getpid()}-{secrets.token_hex(8)}"
        if not key.startswith("/") or "/" in key[1:] or len(key) < 2:
            raise ValueError(f"shm key must be '/' followed by a name without '/', got {key!r}")
        self.key = key
        self.size = int(size)
        self._path = _SHM_DIR + key
        # O_EXCL: never silently share memory with whoever already owns the name.
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._mmap = mmap.mmap(fd, self.size)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)

    @property
    def buf(self):
        return memoryview(self._mmap)

    def array(self, offset, np_dtype, count):
        """A numpy view of `count` elements of np_dtype at byte `offset`."""
        return np.frombuffer(self._mmap, dtype=np_dtype, count=int(count), offset=int(offset))

    def write(self, offset, dtype, values):
        """Writes float values at `offset` as pb.DType `dtype`."""
        stored = tensors.encode(np.ravel(values), dtype)
        self.array(offset, stored.dtype, stored.size)[:] = stored

    def read(self, offset, dtype, shape):
        """Reads a float32 array of `shape` stored as pb.DType `dtype` at `offset`."""
        count = int(np.prod(shape))
        np_dtype = np.float32 if dtype == tensors.DTYPE_FLOAT32 else np.uint16
        return tensors.decode(self.array(offset, np_dtype, count), dtype).reshape(shape)

    def fill(self, offset, nbytes, byte):
        """Sets nbytes bytes at offset to `byte` (0xff poisons outputs: NaN in every dtype)."""
        self.array(offset, np.uint8, nbytes)[:] = byte

    def close(self):
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            pass  # numpy views still alive; the mapping goes when they do
        self._mmap = None
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_mmap", None) is not None:
            self.close()
