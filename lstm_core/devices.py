"""Which devices torch can train on here, what they are good at, and turning a config's `device` into a
torch.device.

    resolve_device("auto")                                  # cuda:N, mps or cpu
    amp_policy("auto", "cuda", (9, 0), "lstm")              # AmpPolicy(dtype=float16, grad_scaler=True, ...)
"""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    name: str        # what TrainConfig.device accepts: "cpu", "cuda:0", "mps"
    label: str       # what a person reads: "NVIDIA A100 (40.0 GiB, compute capability 8.0)"
    bf16: bool       # whether bf16 autocast runs natively (fast) here, not emulated
    amp: str         # what amp=auto does here, in a few words


# -- mixed precision ---------------------------------------------------------------------------
# cuDNN's LSTM runs in fp16 under CUDA autocast whatever dtype autocast was asked for: torch's autocast
# wrapper for _cudnn_rnn casts its inputs and weights to half (aten/src/ATen/cudnn/AutocastRNN.cpp), and
# cuDNN has no bf16 RNN in torch. tests/test_cuda.py checks this on every GPU it runs on.
CUDNN_LSTM_AUTOCAST_DTYPE = torch.float16
TENSOR_CORES = (7, 0)   # Volta: fp16 tensor cores; before it, fp16 is slow on most cards (1/64 rate on GeForce Pascal)
NATIVE_BF16 = (8, 0)    # Ampere: bf16 tensor cores; before it, bf16 is emulated in fp32 (torch.cuda.is_bf16_supported
                        # says True there too, since it counts emulation)


def lstm_leaves_autocast(device_type: str, dtype: torch.dtype, cpu_bf16: bool = False) -> bool:
    """Whether the LSTM layers run in fp32 outside autocast to `dtype`, the one rule that the amp policy and
    the model's forward share: under CUDA bf16, cuDNN's LSTM would compute in fp16 with no loss scaling
    (CUDNN_LSTM_AUTOCAST_DTYPE), and oneDNN has no reduced-precision LSTM on CPUs without AVX-512 BF16 or
    AMX (it raises)."""
    if device_type == "cuda":
        return dtype == torch.bfloat16 and CUDNN_LSTM_AUTOCAST_DTYPE != torch.bfloat16
    return device_type == "cpu" and not cpu_bf16


@dataclass(frozen=True)
class AmpPolicy:
    dtype: torch.dtype | None      # autocast dtype; None = fp32 (TF32 matmuls on CUDA)
    grad_scaler: bool              # loss scaling, needed whenever any layer computes in fp16
    lstm_dtype: torch.dtype        # what the LSTM layers really compute in
    lstm_outside_autocast: bool    # run the LSTM in fp32 outside autocast (a bf16 run that must not become fp16)
    note: str                      # a person's summary: "fp16 autocast with loss scaling"


class AmpUnsupported(ConfigError):
    """A mixed-precision mode this device cannot run well; the message says which mode to use instead."""


def amp_policy(amp: str, device_type: str, capability: tuple[int, int] | None = None, arch: str = "lstm",
               cpu_bf16: bool = False, gpu_name: str = "this GPU") -> AmpPolicy:
    """The mixed-precision policy of config.amp on a device: a pure function of the device's properties.

    CUDA, amp=auto: from Volta (7.0) on, LSTMs train in fp16 with loss scaling (cuDNN's LSTM only has fp16
    as reduced precision) and the CNN in bf16 from Ampere (8.0) on, fp16 with loss scaling before it; older
    GPUs stay in fp32. amp=bf16 needs native bf16 (8.0+): the LSTM layers then run in fp32 (TF32) outside
    autocast rather than silently in fp16 without loss scaling. CPU: amp=auto is fp32; amp=bf16 autocasts
    (the LSTM in bf16 only where the CPU has bf16 instructions). Never fp16 without a GradScaler."""
    fp32 = AmpPolicy(None, False, torch.float32, False, "fp32")
    if amp == "off":
        return AmpPolicy(None, False, torch.float32, False, "fp32 (TF32 matmuls)" if device_type == "cuda" else "fp32")
    if device_type != "cuda":
        if amp == "bf16":
            outside = lstm_leaves_autocast(device_type, torch.bfloat16, cpu_bf16)
            return AmpPolicy(torch.bfloat16, False, torch.float32 if outside else torch.bfloat16, outside,
                             "bf16 autocast" + (", LSTM in fp32" if outside else ""))
        return fp32
    cc = tuple(capability or (0, 0))
    if amp == "bf16":
        if cc < NATIVE_BF16:
            raise AmpUnsupported(f"amp=bf16 needs native bf16 (compute capability 8.0 or newer); {gpu_name} is "
                                 f"{cc[0]}.{cc[1]}, where bf16 is emulated and slow: use amp=auto (fp16 with loss "
                                 "scaling) or amp=off")
        if arch == "lstm" and lstm_leaves_autocast("cuda", torch.bfloat16):
            return AmpPolicy(torch.bfloat16, False, torch.float32, True, "bf16 autocast, LSTM in fp32 (TF32)")
        return AmpPolicy(torch.bfloat16, False, torch.bfloat16, False, "bf16 autocast")
    if cc < TENSOR_CORES:
        return AmpPolicy(None, False, torch.float32, False, "fp32 (no tensor cores)")
    if arch == "cnn" and cc >= NATIVE_BF16:
        return AmpPolicy(torch.bfloat16, False, torch.bfloat16, False, "bf16 autocast")
    return AmpPolicy(torch.float16, True, torch.float16, False, "fp16 autocast with loss scaling")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def policy_for(amp: str, device: torch.device, arch: str = "lstm") -> AmpPolicy:
    """amp_policy for a real device present here."""
    if device.type == "cuda":
        return amp_policy(amp, "cuda", cuda_capability(device), arch, gpu_name=torch.cuda.get_device_name(device))
    return amp_policy(amp, device.type, None, arch, cpu_bf16=cpu_has_bf16())


# -- the devices -------------------------------------------------------------------------------
def available_devices() -> list[DeviceInfo]:
    """Every device present, CUDA GPUs first (with name, memory and compute capability), then MPS, then the CPU."""
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cc = (props.major, props.minor)
            found.append(DeviceInfo(
                f"cuda:{i}", f"{props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {cc[0]}.{cc[1]})",
                cc >= NATIVE_BF16, amp_summary(cc)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append(DeviceInfo("mps", "Apple GPU (MPS)", False, "fp32"))
    found.append(DeviceInfo("cpu", f"CPU ({torch.get_num_threads()} threads)", cpu_has_bf16(), "fp32"))
    return found


def amp_summary(capability: tuple[int, int]) -> str:
    """What amp=auto does on a GPU of this compute capability, LSTM and CNN together, for a person."""
    lstm = amp_policy("auto", "cuda", capability, "lstm").note
    cnn = amp_policy("auto", "cuda", capability, "cnn").note
    return lstm if lstm == cnn else f"LSTM: {lstm}; CNN: {cnn}"


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo, read once; "" where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    flags = cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cuda_devices() -> list[str]:
    """The CUDA GPUs present, as device names: ["cuda:0", "cuda:1"]."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def candidate_devices(name: str) -> list[str]:
    """The devices a config's `device` may train on here, in order of preference: 'auto' on a host with
    GPUs is any of them (the first free one is taken), a named device only itself. Raises RuntimeError
    for a device that is absent."""
    if name == "auto" and torch.cuda.is_available():
        return cuda_devices()
    return [str(resolve_device(name))]


def resolve_device(name: str) -> torch.device:
    """'auto' becomes the current CUDA GPU, then mps, then cpu; a named device that is absent is a clear error."""
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



def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else what platform knows."""
    for line in cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(folder: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of the checkout this code runs from, with "-dirty" when files differ from it; None outside
    a git checkout (an installed wheel) or without git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=folder,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What a run needs recorded to be reproduced and compared fairly: the software versions, the
    processor it trained on and the code's commit."""
    gpu = device.type == "cuda"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "optuna": version_of("optuna"), "lstm_studio": version_of("lstm-studio"),
            "platform": platform.platform(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if gpu else None,
            "gpu_capability": ".".join(map(str, cuda_capability(device))) if gpu else None,
            "device": str(device), "git_commit": git_commit()}
