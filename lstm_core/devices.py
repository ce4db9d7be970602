"""Which devices torch can train on here, and turning a config's `device` into a torch.device."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    name: str        # what TrainConfig.device accepts: "cpu", "cuda:0", "mps"
    label: str       # what a person reads: "NVIDIA A100 (40.0 GiB)"
    bf16: bool       # whether bf16 autocast is fast here


def available_devices() -> list[DeviceInfo]:
    """Every device present, CUDA GPUs first (with name and memory), then MPS, then the CPU."""
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(DeviceInfo(f"cuda:{i}", f"{props.name} ({props.total_memory / 2**30:.1f} GiB)",
                                    torch.cuda.is_bf16_supported()))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append(DeviceInfo("mps", "Apple GPU (MPS)", False))
    found.append(DeviceInfo("cpu", f"CPU ({torch.get_num_threads()} threads)", cpu_has_bf16()))
    return found


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """'auto' becomes cuda, then mps, then cpu; a named device that is absent is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} was asked for, but only {torch.cuda.device_count()} "
                               "CUDA GPU(s) are present")
        if device.index is None:  # name the GPU: "cuda" and "cuda:0" must be one device everywhere
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for, but Apple's MPS backend is not available here")
    return device


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS, which made every
    training step fault in its tensors' pages afresh (torch's CPU allocator does not cache). This is what
    PyTorch's CPU tuning guide gets from jemalloc or tcmalloc. Training processes call it; True if set."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):   # not glibc (macOS, Windows, musl without mallopt)
        return False
