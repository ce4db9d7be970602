"""Metrics over every sample of a set: loss, accuracy, macro and per-class precision/recall/F1,
the 10x10 confusion matrix and the misclassified samples.

    metrics = evaluate(model, splits.test_x, splits.test_y, config)   # a JSON-ready dict
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import cpu
from .config import TrainConfig
from .data import batch_input

NUM_CLASSES = 10


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, config: TrainConfig,
                   batch_size: int = 1000, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 images (N, 28, 28) on the model's device -> fp32 logits (N, 10), every sample included."""
    if images.device.type == "cpu":
        cpu.accelerate(model)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):       # the last, partial batch counts too
        idx = torch.arange(start, min(start + batch_size, len(images)), device=images.device)
        with autocast(images.device, amp_dtype):
            out.append(model(batch_input(images, idx, config)).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, NUM_CLASSES, device=images.device)


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) counts; rows are true labels, columns predictions."""
    flat = y_true.long().cpu() * num_classes + y_pred.long().cpu()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Accuracy, macro and per-class precision/recall/F1 from a confusion matrix.
    A class never predicted has precision 0 (and so does its F1), as scikit-learn's zero_division=0."""
    cm = cm.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    total = cm.sum().item()
    return {
        "accuracy": tp.sum().item() / total if total else 0.0,
        "macro_precision": precision.mean().item(),
        "macro_recall": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        "per_class": [{"digit": d, "precision": precision[d].item(), "recall": recall[d].item(),
                       "f1": f1[d].item(), "support": int(actual[d].item())} for d in range(len(cm))],
    }


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
             detailed: bool = True, batch_size: int = 1000, amp_dtype: torch.dtype | None = None) -> dict:
    """Loss (mean over samples), accuracy and error; with `detailed`, also the confusion matrix,
    precision/recall/F1 and the misclassified samples (index, true, predicted, confidence)."""
    logits = predict_logits(model, images, config, batch_size, amp_dtype)
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / max(len(labels), 1)
    pred = logits.argmax(1)
    correct = (pred == labels).sum().item()
    result = {"loss": loss, "accuracy": correct / max(len(labels), 1),
              "error": 1 - correct / max(len(labels), 1), "n": len(labels)}
    if not detailed:
        return result
    cm = confusion_matrix(labels, pred)
    result.update(metrics_from_confusion(cm))
    result["confusion_matrix"] = cm.tolist()
    confidence = logits.softmax(1).max(1).values
    wrong = (pred != labels).nonzero().squeeze(1).cpu()
    result["misclassified"] = [
        {"index": int(i), "true": int(t), "pred": int(p), "confidence": round(float(c), 4)}
        for i, t, p, c in zip(wrong.tolist(), labels.cpu()[wrong].tolist(), pred.cpu()[wrong].tolist(),
                              confidence.cpu()[wrong].tolist())]
    return result
