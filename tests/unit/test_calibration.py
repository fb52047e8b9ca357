"""Unit tests of the per-task Platt calibration (trainer.modules.Calibrated, platt_scaling,
trainer.train.calibrate) and of its ONNX export. CPU only, no services."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from camoe.features import FORMATS, FeatureLayout
from camoe.settings import Settings
from trainer.export import export_onnx
from trainer.metrics import ece
from trainer.model import ServingModel, build_camoe
from trainer.modules import Calibrated, platt_scaling
from trainer.train import calibrate

SETTINGS = Settings()
LAYOUT = FeatureLayout(SETTINGS.features.n_campaigns)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- platt_scaling --------------------------------------------------------------------------


def test_platt_scaling_recovers_known_scale_and_bias():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=generator) * 1.5
    y = torch.bernoulli(torch.sigmoid(0.5 * x - 1.0), generator=generator)
    fitted = platt_scaling(x, y)
    assert fitted is not None
    a, b = fitted
    assert a == pytest.approx(0.5, abs=0.1)
    assert b == pytest.approx(-1.0, abs=0.1)


@pytest.mark.parametrize(
    "labels",
    [
        [0.0] * 10,  # no positives
        [1.0] + [0.0] * 9,  # one positive
        [1.0] * 10,  # no negatives
        [0.0] + [1.0] * 9,  # one negative
    ],
)
def test_platt_scaling_needs_two_samples_of_each_class(labels):
    logits = torch.linspace(-2, 2, len(labels))
    assert platt_scaling(logits, torch.tensor(labels)) is None


def test_platt_scaling_fits_with_exactly_two_of_each_class():
    logits = torch.tensor([-2.0, -1.0, 1.0, 0.5])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert platt_scaling(logits, labels) is not None


# --- Calibrated -----------------------------------------------------------------------------


class Scaled(nn.Module):
    """A stand-in CTR model: logits (B, 3) = factor * the first three numeric features."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.ones(1))  # so the wrapped model has a parameter

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return self.factor * self.weight * numeric[:, : len(FORMATS)]


def _scale_bias(model: Calibrated) -> tuple[list[float], list[float]]:
    state = model.state_dict()
    return state["_scale"].tolist(), state["_bias"].tolist()


def test_calibrated_starts_as_the_identity():
    model = Calibrated(Scaled(1.0), len(FORMATS))
    numeric = torch.randn(8, 4)
    categorical = torch.zeros(8, 2, dtype=torch.int64)
    torch.testing.assert_close(model(categorical, numeric), numeric[:, :3])
    assert _scale_bias(model) == ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])


def test_calibrated_fit_only_moves_tasks_present():
    generator = torch.Generator().manual_seed(1)
    n = 4000
    logits = torch.randn(n, generator=generator) * 2
    task = torch.tensor([0, 2]).repeat(n // 2)  # no task 1 in the data
    labels = torch.bernoulli(torch.sigmoid(0.3 * logits - 0.5), generator=generator)
    model = Calibrated(Scaled(1.0), len(FORMATS))
    model.fit(logits, labels, task)
    scale, bias = _scale_bias(model)
    assert (scale[1], bias[1]) == (1.0, 0.0)
    for t in (0, 2):
        assert scale[t] == pytest.approx(0.3, abs=0.15)
        assert bias[t] == pytest.approx(-0.5, abs=0.2)


def test_calibrated_fit_keeps_identity_for_a_task_with_one_positive():
    logits = torch.linspace(-3, 3, 40)
    labels = torch.zeros(40)
    labels[0] = 1.0  # task 0 has a single positive
    labels[21:30] = 1.0  # task 1 has plenty
    task = torch.tensor([0] * 20 + [1] * 20)
    model = Calibrated(Scaled(1.0), len(FORMATS))
    model.fit(logits, labels, task)
    scale, bias = _scale_bias(model)
    assert (scale[0], bias[0]) == (1.0, 0.0)
    assert (scale[2], bias[2]) == (1.0, 0.0)
    assert (scale[1], bias[1]) != (1.0, 0.0)


def test_calibration_buffers_are_state_but_not_parameters():
    model = Calibrated(build_camoe(SETTINGS), len(FORMATS))
    names = {name for name, _ in model.named_parameters()}
    assert not any(name in {"_scale", "_bias"} for name in names)
    assert names == {f"model.{name}" for name, _ in model.model.named_parameters()}
    ids = {id(p) for p in model.parameters()}
    buffers = dict(model.named_buffers())
    assert id(buffers["_scale"]) not in ids and id(buffers["_bias"]) not in ids
    assert {"_scale", "_bias"} <= set(model.state_dict())
    # a state_dict round trip carries the fitted values
    buffers["_scale"].fill_(0.25)
    buffers["_bias"].fill_(-1.5)
    copy = Calibrated(build_camoe(SETTINGS), len(FORMATS))
    copy.load_state_dict(model.state_dict())
    assert _scale_bias(copy) == ([0.25] * 3, [-1.5] * 3)


def test_optimising_the_model_leaves_calibration_alone():
    model = Calibrated(Scaled(1.0), len(FORMATS))
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    numeric = torch.randn(16, 4)
    loss = model(torch.zeros(16, 1, dtype=torch.int64), numeric).sum()
    loss.backward()
    optimiser.step()
    assert _scale_bias(model) == ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])


def _overconfident_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Labels drawn from sigmoid(x_t - 1.5) where x_t is numeric column t, t = format."""
    rng = np.random.default_rng(seed)
    numeric = rng.normal(size=(n, 4)).astype(np.float32)
    fmt = rng.integers(0, len(FORMATS), size=n).astype(np.int64)
    true_logit = numeric[np.arange(n), fmt] - 1.5
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    return {
        "categorical": np.zeros((n, 2), dtype=np.int64),
        "numeric": numeric,
        "format": fmt,
        "label": labels,
    }


def _own_probability(model: nn.Module, data: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(data["categorical"]), torch.from_numpy(data["numeric"]))
    own = logits.gather(1, torch.from_numpy(data["format"]).view(-1, 1)).view(-1)
    return torch.sigmoid(own).numpy()


def test_calibrating_an_overconfident_model_reduces_ece_on_fresh_data():
    model = Calibrated(Scaled(3.0), len(FORMATS)).eval()  # logits 3x too large, no bias
    fresh = _overconfident_data(20_000, seed=1)
    before = ece(_own_probability(model, fresh), fresh["label"])
    calibrate(model, _overconfident_data(20_000, seed=0))
    after = ece(_own_probability(model, fresh), fresh["label"])
    assert before > 0.05  # the stand-in really is miscalibrated
    assert after < before / 3
    scale, bias = _scale_bias(model)
    for t in range(len(FORMATS)):
        assert scale[t] == pytest.approx(1 / 3, abs=0.05)
        assert bias[t] == pytest.approx(-1.5, abs=0.2)


# --- export ---------------------------------------------------------------------------------


def test_calibrated_serving_model_exports_to_onnx_with_parity(tmp_path):
    inner = build_camoe(SETTINGS)
    inner.encoder.fit(torch.randn(256, LAYOUT.n_numeric) * 2 + 0.5)
    model = Calibrated(inner, len(FORMATS)).eval()
    buffers = dict(model.named_buffers())
    buffers["_scale"].copy_(torch.tensor([0.5, 2.0, 1.5]))
    buffers["_bias"].copy_(torch.tensor([-1.0, 0.25, -3.0]))
    path = tmp_path / "model.onnx"
    export_onnx(model, path, LAYOUT.n_categorical, LAYOUT.n_numeric)

    rng = np.random.default_rng(0)
    cards = np.array([f.cardinality for f in LAYOUT.categorical])
    n = 37
    categorical = rng.integers(0, cards, size=(n, LAYOUT.n_categorical)).astype(np.int64)
    numeric = rng.normal(size=(n, LAYOUT.n_numeric)).astype(np.float32)
    fmt = rng.integers(0, len(FORMATS), size=(n, 1)).astype(np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"categorical": categorical, "numeric": numeric, "format": fmt})
    with torch.no_grad():
        expected = (
            ServingModel(model)
            .eval()(torch.from_numpy(categorical), torch.from_numpy(numeric), torch.from_numpy(fmt))
            .numpy()
        )
    assert served.shape == (n, 1)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    # the calibration is in the graph: the uncalibrated model scores differently
    with torch.no_grad():
        raw = ServingModel(inner)(
            torch.from_numpy(categorical), torch.from_numpy(numeric), torch.from_numpy(fmt)
        ).numpy()
    assert np.abs(served - raw).max() > 1e-3
