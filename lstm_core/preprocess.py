"""A drawing or an uploaded photo -> what an MNIST digit looks like, and the model's reading of it.

MNIST digits were made by scaling each digit to fit a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing it in a 28x28 field so that its centre of mass is at the centre. We do the
same, after turning the input into white ink on black.

    digit = from_upload(png_bytes)            # or from_canvas(rgba array)
    if digit.empty: ...                       # nothing drawn: prompt, don't predict
    result = predict(model, config, digit)    # probabilities; a recurrent model's per-row beliefs and gates
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu
from .config import TrainConfig
from .data import model_input, normalize
from .gates import last_layer

MAX_PIXELS = 40_000_000       # refuse larger images before decoding them (decompression bombs)
INK_THRESHOLD = 0.15          # ink is brighter than this fraction of the peak (above paper texture and noise)
MIN_INK_PIXELS = 4            # fewer ink pixels than this is an empty drawing


class ImageError(ValueError):
    """An upload that is not a usable image; the message says why."""


@dataclass(frozen=True)
class Digit:
    image: torch.Tensor      # (28, 28) float in [0, 1], white ink on black, MNIST-centred
    empty: bool              # no ink found: nothing to predict
    inverted: bool           # the input was dark ink on light paper and was inverted


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> float (H, W) in [0, 1]; transparency is composited on black."""
    a = np.asarray(pixels)
    if a.ndim == 2:
        return a.astype(np.float32) / 255
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"expected a grayscale, RGB or RGBA image, got an array of shape {a.shape}")
    rgb = a[..., :3].astype(np.float32) / 255
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if a.shape[2] == 4:
        gray = gray * (a[..., 3].astype(np.float32) / 255)
    return gray


def light_background(gray: np.ndarray) -> bool:
    """Dark ink on light paper? Judged by the image's border, where the paper is."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(border)) > 0.5


def mnist_like(gray: np.ndarray, invert: bool | None = None) -> Digit:
    """Grayscale in [0, 1] of any size -> a 28x28 MNIST-like digit (see the module docstring)."""
    if gray.size == 0:
        return Digit(torch.zeros(28, 28), True, False)
    inverted = light_background(gray) if invert is None else invert
    ink = torch.from_numpy(np.ascontiguousarray(1 - gray if inverted else gray, dtype=np.float32))
    ink = (ink - ink.min()).clamp_(min=0)
    peak = ink.max()
    mask = ink > INK_THRESHOLD * max(float(peak), 1e-6)
    if float(peak) < 0.1 or int(mask.sum()) < MIN_INK_PIXELS:
        return Digit(torch.zeros(28, 28), True, inverted)
    ink = ink / peak                                                   # full contrast, as MNIST's strokes
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    crop = crop * (crop > INK_THRESHOLD)                               # paper texture outside the strokes
    h, w = crop.shape
    scale = 20 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(crop[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    small = small.clamp_(0, 1)
    # centre of mass to where MNIST has it: pixel (14, 14) of the 28x28 field (measured: 14.00 +- 0.29)
    total = small.sum()
    ys = torch.arange(size[0], dtype=torch.float32)
    xs = torch.arange(size[1], dtype=torch.float32)
    cy = float((small.sum(1) * ys).sum() / total)
    cx = float((small.sum(0) * xs).sum() / total)
    top = int(round(14 - cy))
    left = int(round(14 - cx))
    top = min(max(top, 0), 28 - size[0])
    left = min(max(left, 0), 28 - size[1])
    out = torch.zeros(28, 28)
    out[top:top + size[0], left:left + size[1]] = small
    return Digit(out, False, inverted)


def from_canvas(rgba: np.ndarray | None) -> Digit:
    """The canvas's RGBA image data (white strokes on black or transparent)."""
    if rgba is None:
        return Digit(torch.zeros(28, 28), True, False)
    return mnist_like(to_gray(rgba), invert=False)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> grayscale float (H, W) in [0, 1]; refuses non-images, corrupt files and images
    whose header declares more than `max_pixels` pixels (before decoding them)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("the file is empty")
    try:
        image = Image.open(io.BytesIO(data))          # reads the header only
    except UnidentifiedImageError:
        raise ImageError("this file is not an image PIL can read (PNG, JPEG, GIF, BMP, TIFF, WebP ...)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"the image declares far too many pixels; the limit is {max_pixels:,} pixels") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"cannot read the image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            # transparent paper is white paper here (photos and scans are dark ink on light paper)
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    except Exception as exc:  # noqa: BLE001 - truncated and corrupt files fail here, in many ways
        raise ImageError(f"the image is corrupt or truncated: {exc}") from None
    return gray


def from_upload(data: bytes) -> Digit:
    return mnist_like(decode_image(data))


@dataclass(frozen=True)
class Prediction:
    probabilities: list[float]            # 10 class probabilities
    digit: int
    confidence: float
    steps: list[list[float]] | None       # (T, 10) probabilities after each step (unidirectional models)
    hidden: list[list[float]] | None      # (T, D*H) last-layer activations (recurrent models)
    # the last layer's gates, name -> (T, D*H) (gates.last_layer): an LSTM's input, forget and output gates
    # and cell state, a GRU's reset and update gates; None for a plain RNN and a CNN, which have none
    gates: dict[str, list[list[float]]] | None = None


@torch.inference_mode()
def predict(model: torch.nn.Module, config: TrainConfig, digit: Digit, details: bool = True,
            gates: bool = False) -> Prediction:
    """Class probabilities for one digit; with `details`, a recurrent model's belief and hidden state per
    step, and with `gates` too its last layer's gates (an LSTM's or a GRU's: a plain RNN has none)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        cpu.accelerate(model)
    x = model_input(normalize(digit.image.to(device))[None], config)              # (1, T, F) or (1, 1, 28, 28)
    steps = hidden = values = None
    if details and config.arch == "lstm":
        states = model.hidden_states(x)                                          # (1, T, D*H), one pass
        probs = model.logits_from_states(states).softmax(1)[0]
        hidden = states[0].float().cpu().tolist()
        if not config.bidirectional:
            steps = model.logits_per_step(states).softmax(2)[0].float().cpu().tolist()
        layer = last_layer(model.recurrent, x, states) if gates else None     # from the states: no second pass
        if layer is not None:
            stacked = torch.stack(list(layer.values.values()))[:, 0].cpu().tolist()   # one copy off the device
            values = dict(zip(layer.values, stacked))
    else:
        probs = model(x).softmax(1)[0]
    p = probs.float().cpu()
    return Prediction(p.tolist(), int(p.argmax()), float(p.max()), steps, hidden, values)
