"""Building and loading the C++ kernel, lstm_cpu.cpp, once per process.

    module = load()          # the compiled extension, or None where it cannot be built (no C++ compiler)

It is compiled once per CPU model, torch version and source (about 30 s, by `make` at setup or on first use)
into torch's extension cache, ~/.cache/torch_extensions. LSTM_STUDIO_FUSED=0 leaves it unbuilt, so
everything runs in torch's own ops.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from ..devices import cpuinfo

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("lstm_cpu.cpp")
_lock = threading.Lock()
_state: dict = {}      # "kernel": the module or None once load() has run; "error": why it is None


def flags() -> list[str]:
    """The compiler flags: the CPU at hand's widest vectors (the kernel's loops pick them at compile time)."""
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return flags


def build_name(source: bytes | None = None) -> str:
    """One build per CPU model, torch and kernel source: -march=native code must not reach a different CPU,
    and two checkouts of different versions on one machine keep a build each instead of rebuilding over each
    other's at every start (torch's cache keys a build by its name alone)."""
    cpu = next((line for line in cpuinfo().splitlines() if line.startswith("flags")), "") or platform.processor()
    source = SOURCE.read_bytes() if source is None else source
    key = hashlib.sha1(f"{cpu}|{torch.__version__}|{platform.machine()}|{' '.join(flags())}|".encode() + source)
    return f"lstm_studio_cpu_{key.hexdigest()[:10]}"


def load():
    """The compiled kernel module, or None when it cannot be built here (then torch's ops are used)."""
    if "kernel" not in _state:
        with _lock:
            if "kernel" not in _state:
                _state["kernel"] = None
                if os.environ.get("LSTM_STUDIO_FUSED", "1") == "0":
                    _state["error"] = "switched off by LSTM_STUDIO_FUSED=0"
                else:
                    try:
                        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA" noise
                        from torch.utils import cpp_extension
                        _state["kernel"] = cpp_extension.load(build_name(), [str(SOURCE)], extra_cflags=flags())
                    except Exception as exc:  # noqa: BLE001 - no compiler, no OpenMP: fall back, say why once
                        lines = str(exc).strip().splitlines() or [""]
                        _state["error"] = next((line for line in lines if "error" in line.lower()), lines[-1])[:300]
                        log.warning("CPU kernel unavailable, using torch's own ops (%s)", _state["error"])
    return _state["kernel"]


def error() -> str | None:
    """Why load() returned None, in one line (None when it was not tried or worked)."""
    return _state.get("error")
