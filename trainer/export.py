"""Publishes model versions into the Triton model repository, safely.

A version is exported into a staging folder and renamed into ``<repo>/<model>/<n>/`` in
one atomic step, so Triton never sees a half-written version. Then Triton loads it
explicitly (loads are serialised by a lock), the new version answers a warm-up request,
and its scores must equal the trainer's own forward pass; otherwise the version folder
is removed and Triton reloads, so the previous version keeps serving.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.triton import TritonClient
from trainer.model import ServingModel

log = logging.getLogger(__name__)

# The Python-backend runner, copied into each version folder as Triton expects it.
RUNNER = Path(__file__).parent / "triton_model.py"
_LOAD_LOCK = threading.Lock()


class PublishError(Exception):
    """A version was rejected (export, load or parity failed); the previous one serves."""


def export_onnx(model: nn.Module, path: Path, n_categorical: int, n_numeric: int) -> None:
    """Writes the serving graph (categorical, numeric, format -> pctr) as ONNX, batch dynamic."""
    serving = ServingModel(model).eval()
    example = (
        torch.zeros(2, n_categorical, dtype=torch.int64),
        torch.zeros(2, n_numeric),
        torch.zeros(2, 1, dtype=torch.int64),
    )
    batch = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports this graph in ~0.5 s where
        # the dynamo exporter takes ~10 s; publishing often makes that matter.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            serving,
            example,
            str(path),
            input_names=["categorical", "numeric", "format"],
            output_names=["pctr"],
            dynamo=False,
            opset_version=17,
            dynamic_axes={"categorical": batch, "numeric": batch, "format": batch, "pctr": batch},
        )


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


class Publisher:
    """Writes, loads, checks and prunes versions of one model.

    Args:
        model_repo: the Triton model repository.
        model_name: folder and ``name:`` of the model.
        client: Triton client; None writes versions without loading them.
        keep: versions kept on disk (the policy keeps two loaded: new and rollback).
    """

    def __init__(
        self, model_repo: Path, model_name: str, client: TritonClient | None, keep: int = 2
    ) -> None:
        self.model_dir = Path(model_repo) / model_name
        self.staging = Path(model_repo) / ".staging"
        self.client = client
        self.keep = keep

    def next_version(self) -> int:
        existing = versions(self.model_dir)
        return (existing[-1] + 1) if existing else 1

    def publish(self, model: nn.Module, check: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """Exports ``model`` as the next version and makes Triton serve it.

        ``check`` is a (categorical, numeric, format) batch for warm-up and parity.
        """
        version = self.next_version()
        categorical, numeric, fmt = check
        self.staging.mkdir(parents=True, exist_ok=True)
        folder = self.staging / f"{version}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            export_onnx(model, folder / "model.onnx", categorical.shape[1], numeric.shape[1])
            shutil.copy2(RUNNER, folder / "model.py")
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise PublishError(f"version {version} could not be exported: {error}") from error
        target = self.model_dir / str(version)
        folder.rename(target)  # atomic: Triton sees all of the version or none of it
        if self.client is not None:
            try:
                self._load_and_check(self.client, model, version, categorical, numeric, fmt)
            except Exception as error:
                shutil.rmtree(target, ignore_errors=True)
                with _LOAD_LOCK:
                    self.client.load()  # back to the previous versions
                raise PublishError(f"version {version} rejected: {error}") from error
        self._prune()
        return version

    @staticmethod
    def _load_and_check(
        client: TritonClient,
        model: nn.Module,
        version: int,
        categorical: np.ndarray,
        numeric: np.ndarray,
        fmt: np.ndarray,
    ) -> None:
        started = time.monotonic()
        with _LOAD_LOCK:
            client.load()
        if version not in client.ready_versions():
            raise PublishError(f"Triton did not make version {version} ready")
        served, _ = client.infer(categorical, numeric, fmt, version=version)
        with torch.no_grad():
            expected = (
                ServingModel(model)
                .eval()(
                    torch.from_numpy(categorical),
                    torch.from_numpy(numeric),
                    torch.from_numpy(fmt.reshape(-1, 1)),
                )
                .numpy()
                .reshape(-1)
            )
        gap = float(np.max(np.abs(served - expected)))
        if not np.isfinite(served).all() or gap > 1e-5:
            raise PublishError(f"parity check failed: max |triton - torch| = {gap:.2e}")
        log.info("version %d serving (load + check %.2fs)", version, time.monotonic() - started)

    def _prune(self) -> None:
        for old in versions(self.model_dir)[: -self.keep]:
            shutil.rmtree(self.model_dir / str(old), ignore_errors=True)
