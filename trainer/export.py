"""Publishes model versions into the Triton model repository, safely.

1. A version is exported into a staging folder, and the exported file itself is run
   (onnxruntime, in process) on a check batch: its scores must be finite and equal the
   trainer's forward pass. A version that fails never reaches the repository.
2. Triton tries it first as a model of its own (``<model>-candidate``, loaded
   explicitly, answering the check batch with the same scores, then unloaded): requests
   for ``<model>`` go to its newest version, so a version must pass in Triton before it
   becomes the newest one.
3. It is renamed into ``<repo>/<model>/<n>/`` in one atomic step, so Triton never sees a
   half-written version. The staging folder is outside the repository Triton serves (so
   its index never lists it) and on the same filesystem (so the rename is atomic). A
   crash before the rename leaves only a staging folder, which the next publisher
   clears.
4. Triton loads it (loads are serialised by a lock) and it is warmed up with the check
   batch; a failed load removes the version folder and reloads, so the previous version
   keeps serving.

While an operator has pinned a version (trainer/versions.py), nothing is published: a
publish raises PublishHeld before it starts, or, pinned meanwhile, removes its version
before loading it.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from camoe.clients.triton import InferenceServerException, TritonClient
from trainer.model import ServingModel
from trainer.versions import (
    RECORD,
    Pin,
    broken_dir,
    default_staging,
    load_served,
    read_pin,
    serving_lock,
    set_aside,
    versions,
    write_json,
)

log = logging.getLogger(__name__)

# The Python-backend runner, copied into each version folder as Triton expects it.
RUNNER = Path(__file__).parent / "triton_model.py"
_LOAD_LOCK = threading.Lock()
PARITY_TOLERANCE = 1e-5
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # categorical, numeric, format


class PublishError(Exception):
    """A version was rejected (export, load or parity failed); the previous one serves."""


class PublishHeld(PublishError):
    """An operator's pin holds publishing (``camoe models resume`` lifts it)."""

    def __init__(self, pin: Pin) -> None:
        super().__init__(
            f"publishing is held: an operator pinned version {pin.version} ({pin.reason}); "
            "`camoe models resume` lets new versions serve"
        )
        self.pin = pin


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


def serving_scores(model: nn.Module, check: Batch) -> np.ndarray:
    """What the served graph must answer for ``check``: the trainer's own forward, (B,)."""
    categorical, numeric, fmt = check
    with torch.no_grad():
        pctr = ServingModel(model).eval()(
            torch.from_numpy(categorical),
            torch.from_numpy(numeric),
            torch.from_numpy(fmt.reshape(-1, 1)),
        )
    return pctr.numpy().reshape(-1)


def _check_parity(where: str, served: np.ndarray, expected: np.ndarray) -> None:
    if not np.isfinite(expected).all():
        raise PublishError("the model's own scores are not finite")
    if not np.isfinite(served).all():
        raise PublishError(f"{where} returned scores that are not finite")
    gap = float(np.max(np.abs(served - expected)))
    if gap > PARITY_TOLERANCE:
        raise PublishError(f"parity check failed: max |{where} - torch| = {gap:.2e}")


class Publisher:
    """Writes, loads, checks and prunes versions of one model.

    Args:
        model_repo: the Triton model repository.
        model_name: folder and ``name:`` of the model.
        client: Triton client; None writes versions without loading them.
        keep: versions kept on disk (the policy keeps two loaded: new and rollback).
        staging: where versions are written before their rename (``triton.staging_dir``;
            None: ``default_staging``); this model's own folder under it is used.

    ``steps`` holds the seconds each step of the last publish took: ``write`` (export and
    the onnxruntime check), ``trial``, ``rename``, ``load`` (load and check in Triton).
    """

    def __init__(
        self,
        model_repo: Path,
        model_name: str,
        client: TritonClient | None,
        keep: int = 2,
        staging: Path | None = None,
    ) -> None:
        self.model_dir = Path(model_repo) / model_name
        self.staging = Path(staging or default_staging(Path(model_repo))) / model_name
        self.broken = broken_dir(Path(model_repo), model_name, staging)
        self.client = client
        self.keep = keep
        self.steps: dict[str, float] = {}
        # Left by a publisher that died before its rename; one publisher per model.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        if self.staging.stat().st_dev != self.model_dir.stat().st_dev:
            raise PublishError(
                f"the staging folder {self.staging} is on another filesystem than the model "
                f"folder {self.model_dir}, so versions cannot be renamed into place "
                "atomically: set triton.staging_dir to a folder on the repository's filesystem"
            )

    def next_version(self) -> int:
        return max(versions(self.model_dir) + set_aside(self.broken), default=0) + 1

    def publish(self, model: nn.Module, check: Batch, record: dict[str, Any] | None = None) -> int:
        """Exports ``model`` as the next version and makes Triton serve it.

        ``check`` is a (categorical, numeric, format) batch for warm-up and parity;
        ``record`` what the version's ``version.json`` says of it beside its number and
        export time (trainer/versions.py).
        """
        self.steps = {}
        started = time.perf_counter()
        pin = read_pin(self.model_dir)
        if pin is not None:
            raise PublishHeld(pin)
        version = self.next_version()
        expected = serving_scores(model, check)
        self.staging.mkdir(parents=True, exist_ok=True)  # removed meanwhile: written again
        folder = self.staging / f"{version}-{uuid.uuid4().hex[:8]}"
        try:
            with self._step("write"):
                folder.mkdir()
                self._write(model, folder, check, expected)
                exported_at_ms = int(time.time() * 1000)
                record = {"version": version, "exported_at_ms": exported_at_ms, **(record or {})}
                write_json(folder / RECORD, record)
            if self.client is not None:
                with self._step("trial"):
                    self._trial(self.client, folder, check, expected)
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise PublishError(
                f"version {version} rejected before publishing: {self._why(error)}"
            ) from error
        target = self.model_dir / str(version)
        with self._step("rename"):
            self._commit(folder, target)
        if self.client is not None:
            try:
                with self._step("load"):
                    self._load_and_check(self.client, version, check, expected)
            except PublishHeld:
                shutil.rmtree(target, ignore_errors=True)  # never loaded: the pin serves on
                raise
            except Exception as error:
                self._roll_back(self.client, target, error)
                raise PublishError(f"version {version} rejected: {error}") from error
        self._prune()
        log.info(
            "version %d serving, published in %.2fs (%s)",
            version,
            time.perf_counter() - started,
            ", ".join(f"{step} {seconds:.2f}s" for step, seconds in self.steps.items()),
        )
        return version

    def _why(self, error: Exception) -> str:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return (
                f"no space left on the filesystem of {self.model_dir}: free some there (a "
                "version takes about a megabyte, twice while it is staged and tried)"
            )
        return str(error)

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = time.perf_counter() - started

    @staticmethod
    def _write(model: nn.Module, folder: Path, check: Batch, expected: np.ndarray) -> None:
        """Exports into the staging ``folder`` and checks the exported file there."""
        categorical, numeric, fmt = check
        export_onnx(model, folder / "model.onnx", categorical.shape[1], numeric.shape[1])
        shutil.copy2(RUNNER, folder / "model.py")
        session = ort.InferenceSession(
            str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        feed = {"categorical": categorical, "numeric": numeric, "format": fmt.reshape(-1, 1)}
        _check_parity("onnxruntime", session.run(["pctr"], feed)[0].reshape(-1), expected)

    def _trial(
        self, client: TritonClient, folder: Path, check: Batch, expected: np.ndarray
    ) -> None:
        """Triton loads the staged version as ``<model>-candidate`` version 1 and must answer
        ``check`` with the expected scores; the candidate model is unloaded either way."""
        name = f"{self.model_dir.name}-candidate"
        trial_dir = self.model_dir.parent / name
        shutil.rmtree(trial_dir, ignore_errors=True)
        (trial_dir / "1").mkdir(parents=True)
        config = (self.model_dir / "config.pbtxt").read_text()
        (trial_dir / "config.pbtxt").write_text(
            re.sub(r'name:\s*"[^"]*"', f'name: "{name}"', config, count=1)
        )
        for file in folder.iterdir():
            shutil.copy2(file, trial_dir / "1" / file.name)
        trial = TritonClient(client.url, name, client.timeout_s)
        try:
            with _LOAD_LOCK:
                trial.load()
            served, _ = trial.infer(*check)
            _check_parity("triton", served, expected)
        finally:
            try:
                with _LOAD_LOCK:
                    trial.unload()
            except InferenceServerException as error:  # not loaded: nothing to unload
                log.warning("unloading %s: %s", name, error)
            trial.close()
            shutil.rmtree(trial_dir, ignore_errors=True)

    @staticmethod
    def _commit(folder: Path, target: Path) -> None:
        folder.rename(target)  # atomic: Triton sees all of the version or none of it

    def _load_and_check(
        self, client: TritonClient, version: int, check: Batch, expected: np.ndarray
    ) -> None:
        with serving_lock(self.model_dir), _LOAD_LOCK:
            pin = read_pin(self.model_dir)  # pinned since the publish began
            if pin is not None:
                raise PublishHeld(pin)
            client.load()
        if version not in client.ready_versions():
            raise PublishError(f"Triton did not make version {version} ready")
        served, _ = client.infer(*check, version=version)  # also warms the new instance up
        _check_parity("triton", served, expected)

    def _roll_back(self, client: TritonClient, target: Path, error: Exception) -> None:
        """Removes the version and reloads, so the previous versions (or a pin) serve."""
        try:
            shutil.rmtree(target)
            with serving_lock(self.model_dir), _LOAD_LOCK:
                load_served(client, self.model_dir, self.broken)
        except Exception as failure:
            raise PublishError(
                f"version {target.name} failed ({error}) and so did its roll-back ({failure}): "
                f"remove {target} and reload the model"
            ) from failure

    def _prune(self) -> None:
        for old in versions(self.model_dir)[: -self.keep]:
            shutil.rmtree(self.model_dir / str(old), ignore_errors=True)
