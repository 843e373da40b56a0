"""Fixtures shared by the native-path tests: the native library and a running attnd.

An attnd to test against comes from, in order: $ATTND_TARGET (e.g. unix:///tmp/attnd.sock,
what tests/python/run.sh passes), else one started here from $ATTND_BINARY, else from the
build folder next to the native library (<build>/server/attnd). `backend` picks the backend a
started attnd runs (cpu for the native tests, cuda for the torch tests).
"""

import os
import pathlib
import subprocess
import tempfile
import time

import pytest

from attnd_client import native

MODEL_FLAGS = ["--num_layers=2", "--num_qo_heads=8", "--num_kv_heads=2", "--head_dim=128",
               "--dtype=bf16", "--page_size=16", "--pages_per_device=2048"]


def native_library_or_skip():
    path = native.find_library()
    if path is None:
        pytest.skip("the native library libattnd_c.so is absent (build it: "
                    "scripts/build.sh attnd_c, or set ATTND_NATIVE_LIB)")
    return path


def _attnd_binary(lib_path):
    binary = os.environ.get("ATTND_BINARY")
    if binary:
        return binary
    guess = pathlib.Path(lib_path).resolve().parents[2] / "server" / "attnd"
    return str(guess) if guess.is_file() else None


class _Server:
    """An attnd started for the tests, on a Unix socket of its own; stopped with SIGTERM."""

    def __init__(self, binary, backend, extra_flags=()):
        self._dir = tempfile.TemporaryDirectory(prefix="attnd-pytest-")
        sock = os.path.join(self._dir.name, "attnd.sock")
        self.target = f"unix://{sock}"
        self._log = open(os.path.join(self._dir.name, "attnd.log"), "w+")
        self._proc = subprocess.Popen(
            [binary, f"--backend={backend}", f"--unix_socket={sock}", "--metrics_port=0",
             *MODEL_FLAGS, *extra_flags], stderr=self._log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                log = self._log.read()[-2000:]
                self.stop()
                raise RuntimeError(f"attnd ({binary}, {backend}) did not start:\n{log}")
            time.sleep(0.05)

    def stop(self):
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        self._dir.cleanup()


def attnd_target(request, backend, extra_flags=()):
    """A target to connect to: $ATTND_TARGET, or an attnd started for this session (with
    extra_flags after the model's, e.g. --devices=0,1)."""
    target = os.environ.get("ATTND_TARGET")
    if target:
        return target
    binary = _attnd_binary(native_library_or_skip())
    if binary is None:
        pytest.fail("no attnd to test against: set ATTND_TARGET to a running one, or "
                    "ATTND_BINARY to the attnd executable")
    server = _Server(binary, backend, extra_flags)
    request.addfinalizer(server.stop)
    return server.target


@pytest.fixture(scope="session")
def native_lib():
    return native_library_or_skip()


@pytest.fixture(scope="session")
def cpu_target(request, native_lib):
    return attnd_target(request, "cpu")
