"""Publishing into the real tritonserver under faults, and hundreds of versions in a row.

Each fault test checks that Triton never serves a half-written or rejected version and
that the previous version keeps serving: its versions stay READY, and a request without
a version is answered by the previous latest version with that model's own scores.
The faults are injected by replacing one publisher step (a crash before the rename, a
runner Triton cannot load, a runner that answers wrong scores); Triton itself is real.
While each publish runs, a thread sends requests without a version, as the scorer does,
to see what live traffic gets. The churn test publishes 200 versions and compares
latency and Triton's memory at the start and at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import trainer.export as export
from camoe.apps import stack_up
from camoe.clients.triton import InferenceServerException, TritonClient
from camoe.settings import ROOT, Settings
from camoe.sim.traffic import World
from camoe.stack import triton as triton_stack
from camoe.stack.process import stop_pid
from camoe.stack.stack import Endpoints, Stack
from trainer.export import Batch, Publisher, PublishError, serving_scores, versions
from trainer.model import build_served_camoe
from trainer.train import fit
from trainer.versions import keep_served, set_aside

MODEL = "camoe_publishing"  # the fault tests' model
CHURN_MODEL = "camoe_churn"  # the churn test's own model, so its numbers start at 1
CHURN_VERSIONS = 200
WINDOW = 20  # versions measured at the start and at the end of the churn
LATENCY_CALLS = 50
# Measured over 200 versions on this 2-core box with other tests running: latency ratio
# 1.06 (1.93 -> 2.05 ms), memory growth 1.8 MiB (~10 KiB a version). A leak must beat
# that by far: with stubs left running (no pruning, every version loaded) 16 versions
# gave a 684 MiB growth; one 756 KiB model.onnx kept per version is ~130 MiB over 180
# versions, and 32 MiB catches anything above ~180 KiB a version.
LATENCY_RATIO = 1.5
UNLOAD_S = 1.5
MEMORY_GROWTH_MIB = 32
ATOL = 1e-5  # as the publisher's own parity tolerance


def _add_model(repo: Path, name: str) -> Path:
    """A model of its own in ``repo`` (the camoe config renamed), so the tests of other
    modules keep their version numbers."""
    config = (ROOT / "model_repo" / "camoe" / "config.pbtxt").read_text()
    target = repo / name
    target.mkdir(parents=True)
    (target / "config.pbtxt").write_text(re.sub(r'name: "camoe"', f'name: "{name}"', config))
    return target


def _shift(model: nn.Module, delta: float) -> nn.Module:
    """A copy whose towers' output biases are moved by ``delta``: a different version."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in shifted.named_parameters():
            if re.fullmatch(r".*towers\.\d+\._out\.bias", name):
                parameter += delta
    return shifted


@dataclass
class Served:
    """The fault tests' model: what is published, and which torch model each version is."""

    repo: Path
    model_dir: Path
    client: TritonClient
    check: Batch
    models: dict[int, nn.Module] = field(default_factory=dict)

    @property
    def staging(self) -> Path:
        return export.default_staging(self.repo) / self.model_dir.name

    def staged(self) -> list[Path]:
        return sorted(self.staging.iterdir()) if self.staging.exists() else []

    def publish(self, model: nn.Module) -> int:
        version = Publisher(self.repo, self.model_dir.name, self.client).publish(model, self.check)
        self.models[version] = model
        return version

    def assert_serves(self, ready: list[int]) -> None:
        """Exactly ``ready`` is on disk and READY, and each answers with its model's scores;
        a request without a version gets the latest of them."""
        assert versions(self.model_dir) == ready
        assert self.client.ready_versions() == ready
        scores, version = self.client.infer(*self.check)
        assert version == str(ready[-1])
        expected = serving_scores(self.models[ready[-1]], self.check)
        np.testing.assert_allclose(scores, expected, atol=ATOL)
        for older in ready[:-1]:
            scores, _ = self.client.infer(*self.check, version=older)
            np.testing.assert_allclose(
                scores, serving_scores(self.models[older], self.check), atol=ATOL
            )


class LiveTraffic:
    """Requests without a version, as the scorer sends them, sent from a thread while a
    publish runs: which version answered each, with which scores, and any errors."""

    def __init__(self, served: Served) -> None:
        self._client = TritonClient(served.client.url, served.client.model, timeout_s=30.0)
        self._check = served.check
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.answers: list[tuple[str, np.ndarray]] = []
        self.errors: list[str] = []

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                scores, version = self._client.infer(*self._check)
                self.answers.append((version, scores))
            except InferenceServerException as error:
                self.errors.append(str(error))
            self._done.wait(0.005)  # leave the two cores to the publish

    def __enter__(self) -> LiveTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(60)
        self._client.close()

    def assert_only(self, version: int, model: nn.Module) -> None:
        """Every request was answered, by ``version``, with ``model``'s scores."""
        assert self.answers, "no request completed while publishing"
        assert self.errors == []
        expected = serving_scores(model, self._check)
        for answered, scores in self.answers:
            assert answered == str(version)
            np.testing.assert_allclose(scores, expected, atol=ATOL)


@pytest.fixture(scope="module")
def trained(services: tuple[Settings, Endpoints]) -> tuple[nn.Module, Batch]:
    """One trained model (each version is a shifted copy) and the check batch."""
    settings, _ = services
    history = World(settings.simulator).history(800)
    model = build_served_camoe(settings)
    fit(model, history, epochs=1)
    model.eval()
    n = 64
    return model, (history["categorical"][:n], history["numeric"][:n], history["format"][:n])


@pytest.fixture(scope="module")
def served(
    services: tuple[Settings, Endpoints], trained: tuple[nn.Module, Batch]
) -> Iterator[Served]:
    """The fault tests' model with two good versions serving."""
    settings, endpoints = services
    repo = Path(settings.triton.model_repo)
    model_dir = _add_model(repo, MODEL)
    # Loads reinitialise both versions' Python stubs: allow far more than a 2-core box needs.
    client = TritonClient(endpoints.triton, MODEL, timeout_s=30.0)
    model, check = trained
    state = Served(repo, model_dir, client, check)
    assert state.publish(_shift(model, 0.0)) == 1
    assert state.publish(_shift(model, 0.1)) == 2
    yield state
    client.close()


# --- a. a crash between writing and renaming ------------------------------------------

CRASHING_PUBLISH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    import numpy as np
    import torch

    from camoe.clients.triton import TritonClient
    from trainer.export import Publisher

    # Dies for real where the rename would be: the staging folder is written and checked.
    Publisher._commit = staticmethod(lambda folder, target: os._exit(1))
    repo, name, url, model_file, check_file = sys.argv[1:]
    model = torch.load(model_file, weights_only=False)
    with np.load(check_file) as arrays:
        check = (arrays["categorical"], arrays["numeric"], arrays["format"])
    Publisher(Path(repo), name, TritonClient(url, name)).publish(model, check)
    sys.exit(0)
    """
)


def test_crash_before_the_rename_leaves_only_staging_and_previous_serves(served, tmp_path):
    ready = versions(served.model_dir)
    crashed = _shift(served.models[ready[-1]], 0.05)
    torch.save(crashed, tmp_path / "model.pt")
    categorical, numeric, fmt = served.check
    np.savez(tmp_path / "check.npz", categorical=categorical, numeric=numeric, format=fmt)

    with LiveTraffic(served) as traffic:
        process = subprocess.run(
            [
                sys.executable,
                "-c",
                CRASHING_PUBLISH,
                str(served.repo),
                MODEL,
                served.client.url,
                str(tmp_path / "model.pt"),
                str(tmp_path / "check.npz"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert process.returncode == 1, process.stderr[-3000:]

    # What the crash left: one complete-looking version in staging, named for the next number.
    (staged,) = served.staged()
    assert staged.name.startswith(f"{ready[-1] + 1}-")
    assert (staged / "model.py").read_bytes() == export.RUNNER.read_bytes()
    session = ort.InferenceSession(str(staged / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"categorical": categorical, "numeric": numeric, "format": fmt.reshape(-1, 1)}
    np.testing.assert_allclose(
        session.run(["pctr"], feed)[0].reshape(-1), serving_scores(crashed, served.check), atol=ATOL
    )

    # A reload sees nothing of it: staging is no model version.
    with LiveTraffic(served) as reloading:
        served.client.load()
    traffic.assert_only(ready[-1], served.models[ready[-1]])
    reloading.assert_only(ready[-1], served.models[ready[-1]])
    served.assert_serves(ready)
    assert ready[-1] + 1 not in served.client.version_states()
    listed = served.client._client.get_model_repository_index(as_json=True).get("models", [])
    assert not [m["name"] for m in listed if m["name"].startswith(".")], listed

    # The next publisher clears staging, and its publish takes the next number and serves.
    Publisher(served.repo, MODEL, served.client)
    assert served.staged() == []
    after = _shift(crashed, 0.05)
    assert served.publish(after) == ready[-1] + 1
    assert served.staged() == []
    served.assert_serves([ready[-1], ready[-1] + 1])


# --- b. a NaN model -------------------------------------------------------------------


def test_nan_model_never_reaches_the_repository(served):
    ready = versions(served.model_dir)
    index = served.client.version_states()
    broken = _shift(served.models[ready[-1]], 0.05)
    with torch.no_grad():
        # Every row passes through the shared experts, so one NaN weight spoils every score.
        next(broken.model.shared.parameters()).view(-1)[0] = float("nan")
    assert np.isnan(serving_scores(broken, served.check)).all()

    with LiveTraffic(served) as traffic, pytest.raises(PublishError, match="not finite"):
        Publisher(served.repo, MODEL, served.client).publish(broken, served.check)
    traffic.assert_only(ready[-1], served.models[ready[-1]])

    assert served.staged() == []
    assert served.client.version_states() == index  # Triton was never asked to load anything
    served.assert_serves(ready)


# --- c. a version Triton cannot load --------------------------------------------------


class RecordingClient(TritonClient):
    """The real client, recording each load's error and the READY versions right after."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(url, model, timeout_s=30.0)
        self.loads: list[tuple[str | None, list[int]]] = []

    def load(self) -> None:
        try:
            super().load()
        except InferenceServerException as error:
            self.loads.append((str(error), self.ready_versions()))
            raise
        self.loads.append((None, self.ready_versions()))


def _runner(tmp_path: Path, old: str, new: str) -> Path:
    """The real runner with one edit; fails if the edit no longer applies."""
    text = export.RUNNER.read_text()
    assert old in text, f"{old!r} is no longer in {export.RUNNER}"
    path = tmp_path / "model.py"
    path.write_text(text.replace(old, new, 1))
    return path


def test_unloadable_version_is_removed_and_previous_serves(served, tmp_path, monkeypatch):
    ready = versions(served.model_dir)
    rejected = ready[-1] + 1
    # Fine for the in-process onnxruntime check (the ONNX file is good); fails in Triton.
    unloadable = _runner(
        tmp_path,
        "    def initialize(self, args):\n",
        "    def initialize(self, args):\n        raise RuntimeError('deliberately unloadable')\n",
    )
    client = RecordingClient(served.client.url, MODEL)
    candidate = _shift(served.models[ready[-1]], 0.05)
    with monkeypatch.context() as patch, LiveTraffic(served) as traffic:
        patch.setattr(export, "RUNNER", unloadable)
        with pytest.raises(PublishError, match=f"version {rejected} rejected"):
            Publisher(served.repo, MODEL, client).publish(candidate, served.check)
    traffic.assert_only(ready[-1], served.models[ready[-1]])

    # It fails in its trial, loaded as a model of its own: the served model is never
    # reloaded, no version folder appears, and the versions loaded before stay READY.
    assert client.loads == []
    assert rejected not in served.client.version_states()
    assert served.staged() == []
    served.assert_serves(ready)
    client.close()

    # The number is free again: a good version takes it and serves (no stale state).
    assert served.publish(candidate) == rejected
    served.assert_serves([ready[-1], rejected])


# --- d. Triton answers other scores than the model --------------------------------------


def test_triton_parity_failure_is_rolled_back(served, tmp_path, monkeypatch):
    ready = versions(served.model_dir)
    wrong = _runner(
        tmp_path,
        "self.session.run([self.output], feed)[0]",
        "(self.session.run([self.output], feed)[0] + 0.5)",
    )
    candidate = _shift(served.models[ready[-1]], 0.05)
    with monkeypatch.context() as patch, LiveTraffic(served) as traffic:
        patch.setattr(export, "RUNNER", wrong)
        with pytest.raises(PublishError, match=r"parity check failed: max \|triton - torch\|"):
            Publisher(served.repo, MODEL, served.client).publish(candidate, served.check)

    assert served.staged() == []
    served.assert_serves(ready)

    # It failed in its trial, as a model of its own: live traffic only ever got the
    # previous version, with its scores.
    previous = serving_scores(served.models[ready[-1]], served.check)
    assert traffic.answers and traffic.errors == []
    for answered, scores in traffic.answers:
        assert answered == str(ready[-1]), f"live traffic reached version {answered}"
        np.testing.assert_allclose(scores, previous, atol=ATOL)


# --- churn ----------------------------------------------------------------------------


def _triton_pid(endpoints: Endpoints, repo: Path) -> int:
    """The test's tritonserver: the stack's record, else the one serving ``repo``."""
    if "triton" in endpoints.pids:
        return endpoints.pids["triton"]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                command[0].endswith(b"tritonserver")
                and f"--model-repository={repo}".encode() in command
            ):
                return int(entry.name)
    pytest.skip("the test's tritonserver is not a local process: no memory to measure")


def _tree_rss(root: int) -> tuple[int, int]:
    """(RSS in bytes of ``root`` and all its descendants, number of processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent pid is the 2nd field after the parenthesised command name.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended while we looked
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
        count += 1
    return total, count


def _latency_ms(client: TritonClient, check: Batch, version: int) -> float:
    """Median of LATENCY_CALLS unversioned infers of the 64-row check batch, in ms."""
    times = []
    for _ in range(LATENCY_CALLS):
        started = time.perf_counter()
        _, served = client.infer(*check)
        times.append((time.perf_counter() - started) * 1000)
        assert served == str(version)
    return statistics.median(times)


@pytest.mark.timeout(1500)
def test_churn_of_many_versions_does_not_grow_latency_or_memory(services, trained):
    settings, endpoints = services
    repo = Path(settings.triton.model_repo)
    model_dir = _add_model(repo, CHURN_MODEL)
    client = TritonClient(endpoints.triton, CHURN_MODEL, timeout_s=30.0)
    pid = _triton_pid(endpoints, repo)
    model, check = trained
    publisher = Publisher(repo, CHURN_MODEL, client)
    steps: dict[str, list[float]] = {}  # where a publish spends its time

    samples: dict[str, dict[str, list[float]]] = {
        "first": {"latency_ms": [], "rss_mib": [], "processes": []},
        "last": {"latency_ms": [], "rss_mib": [], "processes": []},
    }
    publish_s = []
    started = time.monotonic()
    for n in range(1, CHURN_VERSIONS + 1):
        version = _shift(model, 0.001 * n)
        began = time.perf_counter()
        assert publisher.publish(version, check) == n
        publish_s.append(time.perf_counter() - began)
        for step, seconds in publisher.steps.items():
            steps.setdefault(step, []).append(seconds)
        assert versions(model_dir) == ([n - 1, n] if n > 1 else [1])  # pruned to two
        window = "first" if n <= WINDOW else "last" if n > CHURN_VERSIONS - WINDOW else None
        if window is not None:
            scores, served = client.infer(*check)
            assert served == str(n)
            np.testing.assert_allclose(scores, serving_scores(version, check), atol=ATOL)
            # Loading n unloads n - 2, whose stub takes about a second to exit: measure the
            # serving version, not that exit.
            time.sleep(UNLOAD_S)
            rss, processes = _tree_rss(pid)
            samples[window]["latency_ms"].append(_latency_ms(client, check, n))
            samples[window]["rss_mib"].append(rss / 2**20)
            samples[window]["processes"].append(processes)
    elapsed = time.monotonic() - started
    assert client.ready_versions() == [CHURN_VERSIONS - 1, CHURN_VERSIONS]
    assert not (repo / ".staging").exists() or not any((repo / ".staging").iterdir())
    client.close()

    # The lowest median of each window: a burst from a concurrent test on this 2-core box
    # raises some medians, a leak raises all of them.
    latency = {w: min(s["latency_ms"]) for w, s in samples.items()}
    rss = {w: statistics.median(s["rss_mib"]) for w, s in samples.items()}
    figures = {
        "versions": CHURN_VERSIONS,
        "elapsed_s": round(elapsed, 1),
        "publish_s_median": round(statistics.median(publish_s), 3),
        **{f"{step}_s_median": round(statistics.median(s), 3) for step, s in steps.items()},
        "latency_ms_first": round(latency["first"], 3),
        "latency_ms_last": round(latency["last"], 3),
        "latency_ratio": round(latency["last"] / latency["first"], 3),
        "rss_mib_first": round(rss["first"], 1),
        "rss_mib_last": round(rss["last"], 1),
        "rss_growth_mib": round(rss["last"] - rss["first"], 1),
        # A stub still exiting may show once; a leak raises even the fewest at the end.
        "processes_first": max(samples["first"]["processes"]),
        "processes_last": min(samples["last"]["processes"]),
        "samples": samples,
    }
    print("\nchurn:", json.dumps({k: v for k, v in figures.items() if k != "samples"}))
    if os.environ.get("CAMOE_CHURN_OUT"):
        Path(os.environ["CAMOE_CHURN_OUT"]).write_text(json.dumps(figures, indent=2))

    assert figures["latency_ratio"] < LATENCY_RATIO
    assert figures["rss_growth_mib"] < MEMORY_GROWTH_MIB
    # No stub left behind per version: as many processes at the end as at the start.
    assert figures["processes_last"] <= figures["processes_first"]


# --- e. the model repository's disk full ----------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (we are root), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_rejects_the_candidate_in_one_line_and_previous_serves(
    services, trained, small_disk, tmp_path
):
    """The repository (and so its staging folder) on a small filesystem that fills up: the
    candidate is rejected with one line saying so, nothing half-written is left, and the
    version before it serves; with space again, the next one is published."""
    settings, _ = services
    model, check = trained
    repo = small_disk / "model_repo"
    model_dir = _add_model(repo, "camoe_disk")
    pid, grpc, _ = triton_stack.start_server(
        repo, tmp_path / "triton.log", settings.stack.startup_timeout_s, load=[]
    )
    client = TritonClient(grpc, "camoe_disk", timeout_s=30.0)
    try:
        publisher = Publisher(repo, "camoe_disk", client)
        assert publisher.publish(model, check) == 1
        ballast = small_disk / "ballast"
        free = os.statvfs(small_disk)
        ballast.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 200 * 1024))

        with pytest.raises(PublishError) as rejected:
            publisher.publish(_shift(model, 0.1), check)
        message = str(rejected.value)
        assert "\n" not in message
        assert message.startswith("version 2 rejected before publishing: no space left on")
        assert versions(model_dir) == [1] and client.ready_versions() == [1]
        assert list(publisher.staging.iterdir()) == []  # nothing half-written
        assert not (repo / "camoe_disk-candidate").exists()
        scores, served_by = client.infer(*check)
        assert served_by == "1"
        np.testing.assert_allclose(scores, serving_scores(model, check), atol=ATOL)

        ballast.unlink()
        assert publisher.publish(_shift(model, 0.1), check) == 2
        assert client.ready_versions() == [1, 2]
    finally:
        client.close()
        stop_pid(pid)


# --- f. Triton restarted with a newest version that cannot load -------------------------


def test_a_version_that_cannot_load_after_a_restart_is_set_aside_and_the_last_good_serves(
    services, trained, tmp_path, caplog
):
    """Triton killed, the newest version's file corrupted meanwhile, Triton started again:
    the model loads no version. The trainer's turn (``keep_served``) moves that version
    out of the repository, the one before serves, and the next publish takes a new number;
    with every version unable to load (the environment at fault) nothing is moved."""
    settings, _ = services
    model, check = trained
    repo = tmp_path / "model_repo"
    model_dir = _add_model(repo, "camoe_restart")
    log_path, timeout = tmp_path / "triton.log", settings.stack.startup_timeout_s
    pid, grpc, _ = triton_stack.start_server(repo, log_path, timeout, load=[])
    client = TritonClient(grpc, "camoe_restart", timeout_s=30.0)
    try:
        publisher = Publisher(repo, "camoe_restart", client)
        assert publisher.publish(model, check) == 1
        assert publisher.publish(_shift(model, 0.1), check) == 2
        stop_pid(pid)
        (model_dir / "2" / "model.onnx").write_bytes(b"not an onnx graph")
        port = int(grpc.rsplit(":", 1)[1])
        pid, grpc, _ = triton_stack.start_server(
            repo, log_path, timeout, load=["camoe_restart"], grpc_port=port
        )
        assert client.ready_versions() == []  # the newest cannot load, so neither loads

        with caplog.at_level(logging.WARNING, logger="trainer.versions"):
            assert keep_served(client, model_dir, publisher.broken) is None
        assert client.ready_versions() == [1] and versions(model_dir) == [1]
        assert set_aside(publisher.broken) == [2]
        (line,) = [r.getMessage() for r in caplog.records if r.name == "trainer.versions"]
        assert "version(s) 2 moved to" in line and "version 1 serves" in line
        scores, served_by = client.infer(*check)
        assert served_by == "1"
        np.testing.assert_allclose(scores, serving_scores(model, check), atol=ATOL)

        assert publisher.publish(_shift(model, 0.2), check) == 3  # never 2 again
        assert client.ready_versions() == [1, 3]

        # Every version broken (say, the runtime itself): not a version's fault.
        for version in (1, 3):
            (model_dir / str(version) / "model.onnx").write_bytes(b"not an onnx graph")
        client.unload()
        assert keep_served(client, model_dir, publisher.broken) is None
        assert versions(model_dir) == [1, 3] and set_aside(publisher.broken) == [2]
    finally:
        client.close()
        stop_pid(pid)


def test_stack_up_serves_the_newest_version_that_loads(services, trained, tmp_path):
    """Triton started on a repository whose newest version cannot load (a corrupt file):
    ``camoe stack up`` sets it aside and the version before it serves."""
    settings, _ = services
    model, check = trained
    repo = tmp_path / "model_repo"
    model_dir = _add_model(repo, "camoe_stack")
    own = settings.model_copy(
        update={
            "stack": settings.stack.model_copy(update={"state_dir": tmp_path / "stack"}),
            "triton": settings.triton.model_copy(
                update={
                    "url": None,
                    "http_url": None,
                    "model_repo": repo,
                    "model_name": "camoe_stack",
                }
            ),
        }
    )
    stack = Stack(own)
    try:
        endpoints = stack_up(own, ("triton",))
        client = TritonClient(endpoints.triton or "", "camoe_stack", timeout_s=30.0)
        publisher = Publisher(repo, "camoe_stack", client)
        assert [publisher.publish(model, check) for _ in range(2)] == [1, 2]
        client.close()
        stack.down()
        (model_dir / "2" / "model.onnx").write_bytes(b"not an onnx graph")

        endpoints = stack_up(own, ("triton",))
        client = TritonClient(endpoints.triton or "", "camoe_stack", timeout_s=30.0)
        assert client.ready_versions() == [1]
        assert set_aside(publisher.broken) == [2]
        client.close()
    finally:
        stack.down()
