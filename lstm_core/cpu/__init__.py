"""Everything that exists only for CPU speed, behind a few calls; the rest of lstm_core speaks plain torch.

    from lstm_core import cpu
    cpu.prepare_process()                        # a training process on the CPU, once: denormals
    model = cpu.accelerate(build_model(config))  # its nn.LSTM layers now run in the C++ kernel
    x = cpu.batch_images(images, idx, u, spans, MEAN, STD)   # a batch in one pass; None without the kernel

The kernel (lstm_cpu.cpp, built and loaded by kernel.py) computes nn.LSTM's maths in fp32 with each thread
taking its share of the batch through every step and layer, dropout between layers included (lstm.py),
and builds augmented batches. Where it cannot be built (no C++ compiler) or is switched off
(LSTM_STUDIO_FUSED=0), every call here leaves torch's own ops in charge: accelerate() changes nothing,
batch_images() returns None. Results are the same either way up to float rounding (tests/test_cpu.py
holds the kernel to nn.LSTM's outputs and gradients and to torch's batches); only the speed differs.
What is here is what measured at least 5% of a training step (README, "Figures").

    available()         whether the kernel is built here
    accelerate(model)   route a model's nn.LSTM layers through the kernel, in place
    prepare_process()   flush denormal floats to zero on every CPU thread
    batch_images(...)   data.batch_input's indexing, augmentation and normalisation in one pass
    enable(on)          switch the kernel's LSTM off (and on) in this process: bench's fp32-torch rows
    gemm_seconds(...)   the kernel's GEMMs alone for one layer: bench's ceiling
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernel
from .lstm import LSTM, enable

__all__ = ["available", "accelerate", "prepare_process", "batch_images", "enable", "gemm_seconds"]


def available() -> bool:
    """Whether the kernel is built here (built on the first call that needs it)."""
    return kernel.load() is not None


def accelerate(model: nn.Module) -> nn.Module:
    """`model` with its nn.LSTM layers computed by the kernel wherever it applies (CPU, fp32, no autocast;
    nn.LSTM's own forward elsewhere). In place: each layer keeps its parameters, state_dict and results
    and only changes class (to lstm.LSTM, a subclass), so calling it again, or on a model that later moves
    to a GPU, is harmless. Returns the model."""
    if available():
        for module in model.modules():
            if type(module) is nn.LSTM:
                module.__class__ = LSTM
    return model


def prepare_process() -> None:
    """Set up this process for training on the CPU (train.prepare calls it)."""
    flush_denormals()


def flush_denormals() -> bool:
    """Treat denormal floats as zero on all of torch's CPU threads: the vanishing gradients of long
    sequences are denormal, and x86 CPUs compute on them ~100x slower. True if the pool's threads are set."""
    torch.set_flush_denormal(True)                                  # this thread
    return kernel.load().flush_denormals() if available() else False  # and the pool's


def batch_images(images: torch.Tensor, idx: torch.Tensor, u: torch.Tensor | None, spans: list[float],
                 mean: float, std: float) -> torch.Tensor | None:
    """uint8 images[idx] (CPU, (N, 28, 28)) -> normalised floats (B, 28, 28), each moved by its own affine
    map when u (B, 5) is given (data.warp's maths: u scaled by spans, bilinear, black fill), in one pass.
    None where the kernel is not built: the caller then uses torch's ops."""
    module = kernel.load()
    return None if module is None else module.batch_images(images, idx, u, spans, mean, std)


def gemm_seconds(batch: int, steps: int, inputs: int, hidden: int, need_dx: bool, repeats: int = 3) -> float:
    """Seconds per forward + backward of one LSTM layer in the kernel's GEMMs alone (its calls, shapes and
    threads, without the gate loops). Needs the kernel (available())."""
    return kernel.load().gemm_seconds(batch, steps, inputs, hidden, need_dx, repeats)
