"""Unit tests of the ONNX export and the version publisher (trainer/export.py), with no
Triton server (client=None) and onnxruntime standing in for it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import trainer.export as export
from camoe.features import FORMATS, FeatureLayout
from camoe.settings import ROOT, Settings
from trainer.export import (
    Publisher,
    PublishError,
    PublishHeld,
    default_staging,
    export_onnx,
    versions,
)
from trainer.model import ServingModel, build_camoe
from trainer.versions import PIN, Pin, VersionState, read_record, table, write_json

SETTINGS = Settings()
LAYOUT = FeatureLayout(SETTINGS.features.n_campaigns)
MODEL_DIR = ROOT / "model_repo" / "camoe"
CONFIG = MODEL_DIR / "config.pbtxt"
RUNNER = export.RUNNER


def _batch(n, seed):
    """(categorical int64, numeric float32, format int64 (n, 1)) numpy arrays; categorical
    values include negative and out-of-vocabulary ones, which the model maps to 0."""
    rng = np.random.default_rng(seed)
    cards = np.array([f.cardinality for f in LAYOUT.categorical])
    categorical = rng.integers(-2, cards + 2, size=(n, LAYOUT.n_categorical)).astype(np.int64)
    numeric = (rng.normal(size=(n, LAYOUT.n_numeric)) * 3 + 1).astype(np.float32)
    fmt = rng.integers(0, len(FORMATS), size=(n, 1)).astype(np.int64)
    return categorical, numeric, fmt


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_camoe(SETTINGS)
    # non-trivial standardisation buffers, which the exported graph must carry
    model.encoder.fit(torch.randn(256, LAYOUT.n_numeric) * 2 + 0.5)
    return model.eval()


def _torch_pctr(model, categorical, numeric, fmt):
    with torch.no_grad():
        return (
            ServingModel(model)
            .eval()(torch.from_numpy(categorical), torch.from_numpy(numeric), torch.from_numpy(fmt))
            .numpy()
        )


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --- export_onnx --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, LAYOUT.n_categorical, LAYOUT.n_numeric)
    return path


def test_export_onnx_io_names_and_dynamic_batch(onnx_path):
    session = _session(onnx_path)
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["categorical", "numeric", "format"]
    assert inputs["categorical"].type == "tensor(int64)"
    assert inputs["numeric"].type == "tensor(float)"
    assert inputs["format"].type == "tensor(int64)"
    assert inputs["categorical"].shape[1:] == [LAYOUT.n_categorical]
    assert inputs["numeric"].shape[1:] == [LAYOUT.n_numeric]
    assert inputs["format"].shape[1:] == [1]
    assert [o.name for o in session.get_outputs()] == ["pctr"]
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        assert isinstance(arg.shape[0], str), f"{arg.name}: batch axis is not dynamic"


@pytest.mark.parametrize("n", [7, 1])
def test_export_onnx_matches_serving_model(model, onnx_path, n):
    categorical, numeric, fmt = _batch(n, seed=n)
    (served,) = _session(onnx_path).run(
        ["pctr"], {"categorical": categorical, "numeric": numeric, "format": fmt}
    )
    expected = _torch_pctr(model, categorical, numeric, fmt)
    assert served.shape == expected.shape == (n, 1)
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    assert ((served > 0) & (served < 1)).all()


# --- Publisher ----------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "camoe").mkdir()
    shutil.copy2(CONFIG, tmp_path / "camoe" / "config.pbtxt")
    return tmp_path


def _check_batch():
    categorical, numeric, fmt = _batch(8, seed=3)
    return categorical, numeric, fmt.reshape(-1)


def test_publish_versions_atomically_and_keeps_newest_two(model, repo, monkeypatch):
    publisher = Publisher(model_repo=repo, model_name="camoe", client=None, keep=2)
    model_dir, staging = repo / "camoe", default_staging(repo) / "camoe"
    assert publisher.next_version() == 1

    real_export = export.export_onnx
    exported_to = []

    def spying_export(model, path, *args, **kwargs):
        # The file is written in staging; the version folder does not exist yet.
        assert staging in path.parents
        assert not (model_dir / str(publisher.next_version())).exists()
        exported_to.append(path)
        real_export(model, path, *args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", spying_export)

    expected_after = {1: [1], 2: [1, 2], 3: [2, 3]}
    for version, kept in expected_after.items():
        assert publisher.publish(model, _check_batch()) == version
        assert versions(model_dir) == kept
        for v in kept:
            folder = model_dir / str(v)
            assert sorted(p.name for p in folder.iterdir()) == [
                "model.onnx",
                "model.py",
                "version.json",
            ]
            assert (folder / "model.py").read_bytes() == RUNNER.read_bytes()
            assert read_record(folder)["version"] == v
        assert list(staging.iterdir()) == [], "leftover in staging"
        assert [p.name for p in repo.iterdir()] == ["camoe"], "only the model in the repository"
        assert publisher.next_version() == version + 1
    assert len(exported_to) == 3

    # the repository's own files are untouched and the published graph runs
    assert (model_dir / "config.pbtxt").read_bytes() == CONFIG.read_bytes()
    categorical, numeric, fmt = _batch(5, seed=9)
    (served,) = _session(model_dir / "3" / "model.onnx").run(
        ["pctr"], {"categorical": categorical, "numeric": numeric, "format": fmt}
    )
    np.testing.assert_allclose(
        served, _torch_pctr(model, categorical, numeric, fmt), rtol=0, atol=1e-5
    )


def test_next_version_is_max_plus_one(repo):
    publisher = Publisher(model_repo=repo, model_name="camoe", client=None)
    assert publisher.next_version() == 1
    for name in ["2", "7", "3"]:
        (repo / "camoe" / name).mkdir()
    (repo / "camoe" / "notes").mkdir()  # not a version
    (repo / "camoe" / "12").write_text("a file, not a version folder")
    assert versions(repo / "camoe") == [2, 3, 7]
    assert publisher.next_version() == 8


def test_failed_export_raises_publish_error_and_cleans_staging(model, repo, monkeypatch):
    def broken_export(model, path, *args, **kwargs):
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export, "export_onnx", broken_export)
    publisher = Publisher(model_repo=repo, model_name="camoe", client=None)
    try:
        with pytest.raises(PublishError):
            publisher.publish(model, _check_batch())
    finally:
        assert versions(repo / "camoe") == []
    assert list((default_staging(repo) / "camoe").iterdir()) == []


def test_staging_on_another_filesystem_is_refused_with_the_setting_to_change(repo):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == repo.stat().st_dev:
        pytest.skip("no second filesystem here")
    with pytest.raises(PublishError, match=r"triton\.staging_dir"):
        Publisher(repo, "camoe", client=None, staging=other / f"camoe-test-{os.getpid()}")
    shutil.rmtree(other / f"camoe-test-{os.getpid()}", ignore_errors=True)


# --- config.pbtxt -------------------------------------------------------------------------


def _dims(config, name):
    match = re.search(rf'name:\s*"{name}"[^}}]*?dims:\s*\[\s*([\d\s,-]+?)\s*\]', config)
    assert match, f"no dims for {name} in config.pbtxt"
    return [int(d) for d in match.group(1).split(",")]


@pytest.mark.parametrize("path", [CONFIG, CONFIG.parent / "configs" / "gpu.pbtxt"])
def test_config_pbtxt_matches_feature_layout(path):
    config = path.read_text()
    assert _dims(config, "categorical") == [LAYOUT.n_categorical]
    assert _dims(config, "numeric") == [LAYOUT.n_numeric]
    assert _dims(config, "format") == [1]
    assert _dims(config, "pctr") == [1]
    assert re.search(rf'^name:\s*"{SETTINGS.triton.model_name}"', config, re.MULTILINE)


def test_a_pinned_model_is_not_published(model, repo):
    publisher = Publisher(model_repo=repo, model_name="camoe", client=None)
    assert publisher.publish(model, _check_batch()) == 1
    write_json(repo / "camoe" / PIN, {"version": 1, "reason": "pin", "at_ms": 0})
    with pytest.raises(PublishHeld, match=r"pinned version 1 .*camoe models resume"):
        publisher.publish(model, _check_batch())
    assert versions(repo / "camoe") == [1]
    assert list(publisher.staging.iterdir()) == []


def test_the_versions_table_shows_the_pin_and_each_versions_record():
    record = {
        "exported_at_ms": 1_764_820_000_000,
        "examples_trained": 12_345,
        "metrics": {"audio_auc_pr": 0.0551, "video_auc_pr": 0.2, "audio_ece": 0.004},
        "clicks_learned": 321,
        "first_click_ms": 1_764_819_990_000,
        "last_click_ms": 1_764_819_999_000,
    }
    states = [
        VersionState(3, True, "READY", False, {}),
        VersionState(4, True, "READY", True, record),
        VersionState(5, True, "", False, {}),
    ]
    lines = table(states, Pin(4, "rollback", 1_764_820_100_000))
    assert lines[0].startswith("pinned: version 4 (rollback at 2025-12-04 03:48:20 UTC)")
    header, newest, pinned, oldest = lines[1:]
    assert header.split()[:4] == ["version", "disk", "triton", "serving"]
    assert newest.split() == ["5", "yes", "-", "-", "-", "-/-/-", "-/-/-", "-"]
    assert pinned.split() == [
        "4", "yes", "READY", "*", "2025-12-04", "03:46:40", "12,345", "0.055/0.200/-",
        "0.004/-/-", "321", "(03:46:30", "to", "03:46:39)",
    ]  # fmt: skip
    assert oldest.split()[:3] == ["3", "yes", "READY"]
