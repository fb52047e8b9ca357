"""The served model's versions as an operator sees and steers them (``camoe models``).

Each version folder holds the version's record, ``version.json``: when it was exported,
how many examples it had trained on, its live quality per format and the quality gate's
figures, and the clicks it was the first version to learn.

An operator pins one version (``pin N``, or ``rollback`` to the version before the one
serving): ``pin.json`` in the model's folder says so, and Triton serves that version
alone, loaded with the repository's configuration and ``version_policy: specific``. While
a pin stands, the trainer goes on learning but publishes nothing, and puts the pin back
if Triton has restarted without it. ``resume`` removes the pin: Triton serves the newest
versions again, and the trainer's next turn publishes.

Every load of the model (the publisher's, a pin's, a resume's) happens under one lock, a
``flock`` on the model's folder, so a publish in flight never undoes a pin.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camoe.clients.triton import InferenceServerException, TritonClient, repository_config

log = logging.getLogger(__name__)

RECORD = "version.json"
PIN = "pin.json"


class VersionsError(Exception):
    """An operator's request cannot be carried out; the message says what to do."""


def versions(model_dir: Path) -> list[int]:
    """The version numbers on disk, oldest first."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def default_staging(model_repo: Path) -> Path:
    """Where versions are staged unless configured: ``.<repo>-staging`` beside the
    repository, so outside what Triton serves and, in practice, on its filesystem."""
    model_repo = Path(model_repo).resolve()
    return model_repo.parent / f".{model_repo.name}-staging"


def broken_dir(model_repo: Path, model_name: str, staging: Path | None = None) -> Path:
    """Where a model's versions that could not load are kept (``load_served``):
    ``.broken/<model>`` in the staging folder (``triton.staging_dir``)."""
    return Path(staging or default_staging(Path(model_repo))) / ".broken" / model_name


def set_aside(broken: Path) -> list[int]:
    """The versions ``load_served`` moved into ``broken`` (folders ``<version>-<ms>``): their
    numbers are never given to another version."""
    if not broken.is_dir():
        return []
    return sorted(int(p.name.split("-")[0]) for p in broken.iterdir() if p.name[0].isdigit())


@dataclass(frozen=True)
class Pin:
    """An operator's pin: the one version Triton serves until ``resume``."""

    version: int
    reason: str  # "pin" or "rollback"
    at_ms: int


def read_pin(model_dir: Path) -> Pin | None:
    try:
        return Pin(**json.loads((model_dir / PIN).read_text()))
    except FileNotFoundError:
        return None


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Writes ``value`` to ``path`` whole or not at all (a temporary file renamed)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def read_record(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / RECORD).read_text()))
    except FileNotFoundError:
        return {}


@contextmanager
def serving_lock(model_dir: Path) -> Iterator[None]:
    """Held around every load of the model: one at a time, across processes."""
    fd = os.open(model_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_served(client: TritonClient, model_dir: Path, broken: Path | None = None) -> None:
    """(Re)loads the model as it should serve: the pinned version alone if one is pinned,
    else the newest versions that config.pbtxt's policy names. Call under serving_lock.

    With ``broken`` (a folder on the repository's filesystem: the publisher's), newest
    versions that cannot load even alone (a corrupt folder) are moved out of the
    repository into it, kept there for a look, and the versions left serve: one such
    version must neither keep the model down nor fail every later publish. When no
    version loads alone, the fault is not a version's (the environment, the
    configuration): nothing is moved and the load's error is raised."""
    pin = read_pin(model_dir)
    if pin is not None:
        client.load({**repository_config(model_dir), **_only(pin.version)})
        return
    try:
        client.load()
    except InferenceServerException as error:
        if broken is None:
            raise
        _set_aside_unloadable(client, model_dir, broken, error)


def _only(version: int) -> dict[str, Any]:
    return {"version_policy": {"specific": {"versions": [version]}}}


def _set_aside_unloadable(
    client: TritonClient, model_dir: Path, broken: Path, error: InferenceServerException
) -> None:
    config = repository_config(model_dir)
    unloadable = []
    for version in reversed(versions(model_dir)):
        try:
            client.load({**config, **_only(version)})
        except InferenceServerException:
            unloadable.append(version)
        else:
            serving = version
            break
    else:
        raise error  # none loads alone: not a version's fault
    broken.mkdir(parents=True, exist_ok=True)
    for version in unloadable:
        os.replace(model_dir / str(version), broken / f"{version}-{int(time.time() * 1000)}")
    try:
        client.load()  # the policy's versions, the unloadable ones gone
    except InferenceServerException:
        client.load({**config, **_only(serving)})  # an older one fails as well: this alone
    log.warning(
        "%s: %s could not load (%s); version %d serves",
        model_dir.name,
        f"version(s) {', '.join(map(str, unloadable))} moved to {broken}: they"
        if unloadable
        else "an older version of the policy",
        str(error).splitlines()[0][:200],
        serving,
    )


def keep_served(
    client: TritonClient | None, model_dir: Path, broken: Path | None = None
) -> Pin | None:
    """The pin, if one stands (None when nothing is pinned), after making sure Triton (if
    any, and reachable) serves what it should: a restarted Triton forgets pins, and can
    find a newest version that cannot load (``load_served`` sets it aside)."""
    pin = read_pin(model_dir)
    if client is None:
        return pin
    try:
        ready = client.ready_versions()
        if (ready != [pin.version]) if pin is not None else (not ready and versions(model_dir)):
            with serving_lock(model_dir):
                load_served(client, model_dir, broken)
    except InferenceServerException:
        pass  # Triton down: the caller's next turn tries again; the publish reports it
    return pin


@dataclass(frozen=True)
class VersionState:
    """One version: on disk, in Triton, its record, and whether it is the one serving."""

    version: int
    on_disk: bool
    triton: str  # Triton's state of it, "" when Triton does not list it
    serving: bool  # what a request without a version gets
    record: dict[str, Any]


class ModelVersions:
    """The versions of one model in a Triton model repository, and the operator's pin.

    Args:
        model_repo: the repository Triton serves (``triton.model_repo``).
        model_name: the model's folder and name.
        client: a client of the Triton that serves the repository.

    Raises VersionsError, with what to do, when the repository has no such model or
    Triton does not answer.
    """

    def __init__(self, model_repo: Path, model_name: str, client: TritonClient) -> None:
        self.model_dir = Path(model_repo) / model_name
        if not (self.model_dir / "config.pbtxt").is_file():
            raise VersionsError(
                f"the model repository {model_repo} has no model {model_name!r}: set "
                "triton.model_repo (CAMOE_TRITON__MODEL_REPO) to the repository the trainer "
                "publishes into"
            )
        self.client = client
        try:
            live = client.live()
        except InferenceServerException:
            live = False
        if not live:
            raise VersionsError(
                f"Triton is not reachable at {client.url}: start the stack (`camoe stack up`) "
                "or point TRITON_URL at the server that serves the model repository"
            )

    @property
    def pin(self) -> Pin | None:
        return read_pin(self.model_dir)

    def list(self) -> list[VersionState]:
        """Every version on disk or known to Triton, oldest first."""
        on_disk = versions(self.model_dir)
        states = self.client.version_states()
        ready = [v for v, state in states.items() if state == "READY"]
        serving = max(ready, default=None)
        return [
            VersionState(
                version=v,
                on_disk=v in on_disk,
                triton=states.get(v, ""),
                serving=v == serving,
                record=read_record(self.model_dir / str(v)),
            )
            for v in sorted({*on_disk, *states})
        ]

    def serving(self) -> int | None:
        """The version a request without a version gets."""
        return max(self.client.ready_versions(), default=None)

    def pin_version(self, version: int, reason: str = "pin") -> Pin:
        """Serves ``version`` alone, now, and holds the trainer's versions until resume."""
        on_disk = versions(self.model_dir)
        if version not in on_disk:
            raise VersionsError(
                f"version {version} is not in {self.model_dir} (on disk: "
                f"{', '.join(map(str, on_disk)) or 'none'}): pin one of those"
            )
        previous = self.pin
        pin = Pin(version, reason, int(time.time() * 1000))
        with serving_lock(self.model_dir):
            write_json(self.model_dir / PIN, pin.__dict__)
            try:
                load_served(self.client, self.model_dir)
                ready = self.client.ready_versions()
            except InferenceServerException as error:
                ready, failure = [], str(error)
            else:
                failure = f"Triton serves {ready or 'nothing'}"
            if ready != [version]:
                self._restore(previous)
                raise VersionsError(
                    f"Triton could not serve version {version} ({failure}); the versions "
                    "before the pin serve again: check its folder and Triton's log"
                )
        return pin

    def rollback(self) -> Pin:
        """Pins the newest version on disk older than the one serving."""
        serving = self.serving()
        if serving is None:
            raise VersionsError("Triton serves no version of the model: nothing to roll back")
        older = [v for v in versions(self.model_dir) if v < serving]
        if not older:
            raise VersionsError(
                f"no version older than {serving} is on disk to roll back to (the trainer keeps "
                "trainer.keep_versions of them)"
            )
        return self.pin_version(older[-1], reason="rollback")

    def resume(self) -> Pin | None:
        """Removes the pin (returned; None if there was none): the newest versions serve
        again and the trainer publishes at its next turn."""
        pin = self.pin
        if pin is not None:
            with serving_lock(self.model_dir):
                self._restore(None)
        return pin

    def _restore(self, pin: Pin | None) -> None:
        """Puts back ``pin`` (None: no pin) and loads accordingly; under serving_lock."""
        if pin is None:
            (self.model_dir / PIN).unlink(missing_ok=True)
        else:
            write_json(self.model_dir / PIN, pin.__dict__)
        load_served(self.client, self.model_dir)


def _utc(ms: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "-" if ms is None else time.strftime(fmt, time.gmtime(ms / 1000))


def _per_format(metrics: dict[str, float], name: str) -> str:
    values = [metrics.get(f"{fmt}_{name}") for fmt in ("audio", "video", "display")]
    return "/".join("-" if v is None else f"{v:.3f}" for v in values)


def table(states: list[VersionState], pin: Pin | None) -> list[str]:
    """``camoe models list``'s lines: the pin, then one row per version."""
    lines = []
    if pin is not None:
        lines.append(
            f"pinned: version {pin.version} ({pin.reason} at {_utc(pin.at_ms)} UTC); new versions "
            "wait for `camoe models resume`"
        )
    rows = [
        (
            "version",
            "disk",
            "triton",
            "serving",
            "exported (UTC)",
            "examples",
            "AUC-PR a/v/d",
            "ECE a/v/d",
            "clicks first learned",
        )
    ]
    for s in reversed(states):
        r = s.record
        clicks = r.get("clicks_learned")
        first, last = r.get("first_click_ms"), r.get("last_click_ms")
        rows.append(
            (
                str(s.version),
                "yes" if s.on_disk else "no",
                s.triton or "-",
                "*" if s.serving else "",
                _utc(r.get("exported_at_ms")),
                f"{r['examples_trained']:,}" if "examples_trained" in r else "-",
                _per_format(r.get("metrics", {}), "auc_pr"),
                _per_format(r.get("metrics", {}), "ece"),
                "-"
                if not clicks
                else f"{clicks:,} ({_utc(first, '%H:%M:%S')} to {_utc(last, '%H:%M:%S')})",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines
