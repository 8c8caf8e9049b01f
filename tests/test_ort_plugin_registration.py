"""RegisterCustomOps of libfxshift_ort against a fake onnxruntime that serves an older C API than the
plugin's headers: registration must fail with a status naming both versions, never return success
with nothing registered.

Only ctypes is needed (no torch, no onnxruntime, no conftest), so native/ort/run_asan_tests.sh style
runs (`--noconftest`, LD_PRELOAD of the sanitizer runtimes) can include it. The plugin is
$FXSHIFT_ORT_PLUGIN when set, else fxshift.onnx.library_path().
"""
import ctypes
import os
import re

import pytest

SERVED = 16  # the fake runtime's newest API version (onnxruntime 1.16, older than any header the plugin accepts)
RUNTIME_VERSION = b"1.16.3"


def _plugin_path() -> str:
    path = os.environ.get("FXSHIFT_ORT_PLUGIN")
    if path:
        return path
    try:
        from fxshift.onnx import library_path
        return str(library_path())
    except Exception as exc:  # noqa: BLE001 - any failure means "not built"
        pytest.skip(f"libfxshift_ort not available: {exc}")


GetApi = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
GetVersionString = ctypes.CFUNCTYPE(ctypes.c_void_p)
CreateStatus = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)


class OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", GetApi), ("GetVersionString", GetVersionString)]


class FakeRuntime:
    """An OrtApiBase serving API versions 1..`served`; its OrtApi has only CreateStatus (the first
    entry of every version), so any other call the plugin makes crashes the test."""

    STATUS = 0x5157  # the fake OrtStatus* handed back

    def __init__(self, served: int):
        self.requested: list[int] = []
        self.statuses: list[tuple[int, str]] = []
        self._version = ctypes.create_string_buffer(RUNTIME_VERSION)
        self._create_status = CreateStatus(self._on_create_status)
        self._api = (ctypes.c_void_p * 512)()  # the real OrtApi has a few hundred entries
        self._api[0] = ctypes.cast(self._create_status, ctypes.c_void_p)
        self._get_api = GetApi(lambda v: self._on_get_api(v, served))
        self._get_version = GetVersionString(lambda: ctypes.addressof(self._version))
        self.base = OrtApiBase(self._get_api, self._get_version)

    def _on_get_api(self, version: int, served: int):
        self.requested.append(version)
        return ctypes.addressof(self._api) if 1 <= version <= served else None

    def _on_create_status(self, code: int, msg: bytes):
        self.statuses.append((code, msg.decode()))
        return self.STATUS


def _register(runtime: FakeRuntime):
    lib = ctypes.CDLL(_plugin_path())
    fn = lib.RegisterCustomOps
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(OrtApiBase)]
    fn.restype = ctypes.c_void_p
    return fn(None, ctypes.byref(runtime.base))


def test_older_onnxruntime_gets_an_error_naming_both_versions():
    runtime = FakeRuntime(SERVED)
    status = _register(runtime)
    assert status == FakeRuntime.STATUS, "RegisterCustomOps reported success on a runtime it cannot use"
    assert len(runtime.statuses) == 1
    code, msg = runtime.statuses[0]
    assert code == 1  # ORT_FAIL
    header = int(re.search(r"built against onnxruntime API version (\d+)", msg).group(1))
    assert header == runtime.requested[0] > SERVED  # asked for its own headers' version first
    assert RUNTIME_VERSION.decode() in msg and f"API version {SERVED} at most" in msg
    assert "upgrade onnxruntime" in msg


def test_runtime_serving_no_version_is_not_called_further():
    runtime = FakeRuntime(0)
    assert _register(runtime) is None  # nothing can create a status: no crash, nothing registered
    assert runtime.statuses == [] and runtime.requested[-1] == 1
