"""Offline training: the fit and calibration that make version 1 (and the quality
benchmark's models), and saving and loading weights. The incremental trainer that keeps
learning from the stream is trainer/online.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from camoe.features import FORMATS
from camoe.settings import Settings
from trainer.model import build_served_camoe, masked_bce, select_task, validate_batch
from trainer.modules import Calibrated, InputEncoder

log = logging.getLogger(__name__)


def to_tensors(
    categorical: np.ndarray, numeric: np.ndarray, fmt: np.ndarray, labels: np.ndarray
) -> tuple[torch.Tensor, ...]:
    tensors = (
        torch.as_tensor(categorical, dtype=torch.int64),
        torch.as_tensor(numeric, dtype=torch.float32),
        torch.as_tensor(fmt, dtype=torch.int64),
        torch.as_tensor(labels, dtype=torch.float32),
    )
    validate_batch(tensors[0], tensors[1], tensors[2], len(FORMATS))
    return tensors


LossKind = Literal["masked", "pooled", "all_tasks"]


def task_of(model: nn.Module, categorical: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Each sample's task: its format, unless the model defines tasks otherwise."""
    task_index = getattr(model, "task_index", None)
    return task_index(categorical, fmt) if task_index is not None else fmt


def loss_fn(
    kind: LossKind,
    logits: torch.Tensor,
    labels: torch.Tensor,
    task: torch.Tensor,
    off_task_weight: float = 0.0,
) -> torch.Tensor:
    """``masked``: adaptive loss masking (CAMoE; soft with ``off_task_weight``, see
    ``masked_bce``); ``pooled``: one BCE over every sample's own column (one-size-fits-all);
    ``all_tasks``: every sample trains every tower (the "without masking" ablation)."""
    if kind == "masked":
        return masked_bce(logits, labels, task, off_task_weight=off_task_weight)
    if kind == "pooled":
        return F.binary_cross_entropy_with_logits(select_task(logits, task), labels)
    if kind == "all_tasks":
        return F.binary_cross_entropy_with_logits(logits, labels.view(-1, 1).expand_as(logits))
    raise ValueError(f"unknown loss {kind!r}; choose masked, pooled or all_tasks")


def fit(
    model: nn.Module,
    data: dict[str, np.ndarray],
    epochs: int = 2,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    seed: int = 0,
    loss: LossKind = "masked",
    off_task_weight: float = 0.0,
) -> list[float]:
    """Fits the model offline on simulated history; returns the loss per epoch.

    The numeric standardisation is fitted on this data first and then frozen.
    ``off_task_weight``: see ``masked_bce``.
    """
    categorical, numeric, fmt, labels = to_tensors(
        data["categorical"], data["numeric"], data["format"], data["label"]
    )
    task = task_of(model, categorical, fmt)
    for module in model.modules():  # every input encoder (a single-task model has several)
        if isinstance(module, InputEncoder):
            module.fit(numeric)
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            logits = model(categorical[index], numeric[index])
            value = loss_fn(loss, logits, labels[index], task[index], off_task_weight)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            total += value.item() * len(index)
        losses.append(total / len(order))
        log.info("offline fit epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses


def pretrain(settings: Settings, history: dict[str, np.ndarray]) -> Calibrated:
    """Version 1: the served CAMoE fitted offline on ``history`` (time-ordered), its
    newest tenth held out to fit the calibration."""
    held_out = len(history["label"]) // 10
    model = build_served_camoe(settings)
    fit(
        model,
        {k: v[:-held_out] for k, v in history.items()},
        epochs=2,
        batch_size=settings.trainer.pretrain_batch_size,
        learning_rate=settings.trainer.pretrain_learning_rate,
    )
    calibrate(model, {k: v[-held_out:] for k, v in history.items()})
    return model


def calibrate(model: Calibrated, data: dict[str, np.ndarray]) -> None:
    """Fits the per-task Platt calibration on held-out data (the model itself is frozen)."""
    categorical = torch.from_numpy(data["categorical"])
    task = task_of(model, categorical, torch.from_numpy(data["format"]))
    raw = model.raw_logits(categorical, torch.from_numpy(data["numeric"]))
    model.fit(raw.gather(1, task.view(-1, 1)).view(-1), torch.from_numpy(data["label"]), task)


def load_model(settings: Settings, path: Path) -> Calibrated | None:
    """The served model's weights from ``path``; None when absent or made for another
    model shape (then the caller trains afresh)."""
    if not path.exists():
        return None
    model = build_served_camoe(settings)
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except (RuntimeError, ValueError) as error:
        log.warning("%s does not fit the current model (%s)", path, str(error).splitlines()[0])
        return None
    return model.eval()


def save_model(model: nn.Module, path: Path) -> None:
    """Saves weights atomically (write, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
