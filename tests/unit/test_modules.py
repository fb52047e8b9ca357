"""Unit tests of the torch building blocks in trainer/modules.py (CPU only, no services)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.modules import MLP, CrossNet, Expert, Gate, InputEncoder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- CrossNet ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_crossnet_keeps_shape(num_layers):
    cross = CrossNet(in_features=16, num_layers=num_layers)
    assert cross(torch.randn(8, 16)).shape == (8, 16)


def test_crossnet_one_layer_matches_formula_by_hand():
    cross = CrossNet(in_features=4, num_layers=1)
    state = cross.state_dict()
    weight, bias = state["_layers.0.weight"], state["_layers.0.bias"]  # (N, N), (N,)
    x0 = torch.randn(3, 4)

    # x1 = x0 * (W x0 + b) + x0, written out element by element.
    expected = torch.empty(3, 4)
    for b in range(3):
        for i in range(4):
            wx = sum(float(weight[i, j]) * float(x0[b, j]) for j in range(4)) + float(bias[i])
            expected[b, i] = float(x0[b, i]) * wx + float(x0[b, i])

    with torch.no_grad():
        actual = cross(x0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_crossnet_two_layers_feed_x0_into_every_layer():
    cross = CrossNet(in_features=5, num_layers=2)
    state = cross.state_dict()
    layers = [(state[f"_layers.{i}.weight"], state[f"_layers.{i}.bias"]) for i in range(2)]
    x0 = torch.randn(6, 5)
    x = x0
    for weight, bias in layers:
        x = x0 * (x @ weight.T + bias) + x
    with torch.no_grad():
        torch.testing.assert_close(cross(x0), x)


# --- MLP / Expert -------------------------------------------------------------------------


def test_mlp_shape_and_out_features():
    mlp = MLP(16, [32, 8])
    assert mlp.out_features == 8
    y = mlp(torch.randn(4, 16))
    assert y.shape == (4, 8)
    assert (y >= 0).all()  # ends with ReLU


def test_mlp_without_layers_is_identity_width():
    mlp = MLP(16, [])
    assert mlp.out_features == 16
    x = torch.randn(2, 16)
    torch.testing.assert_close(mlp(x), x)


@pytest.mark.parametrize("cross_layers", [0, 2])
def test_expert_shape(cross_layers):
    expert = Expert(16, cross_layers=cross_layers, hidden=[32, 8])
    assert expert.out_features == 8
    assert expert(torch.randn(4, 16)).shape == (4, 8)


# --- Gate ---------------------------------------------------------------------------------


def test_gate_shape():
    gate = Gate(16, num_experts=3)
    assert gate(torch.randn(4, 16), torch.randn(4, 3, 8)).shape == (4, 8)


def test_gate_mixing_identical_experts_returns_that_expert():
    gate = Gate(16, num_experts=5)
    x = torch.randn(7, 16) * 10  # large logits: still a convex combination
    expert = torch.randn(7, 8)
    experts = expert.unsqueeze(1).expand(7, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(gate(x, experts), expert, rtol=1e-5, atol=1e-5)


def test_gate_weights_are_a_probability_vector():
    # With expert e's output equal to the e-th unit vector, the gate returns its weights.
    n = 4
    gate = Gate(16, num_experts=n)
    experts = torch.eye(n).unsqueeze(0).expand(9, n, n)  # (B, E, H=E)
    with torch.no_grad():
        weights = gate(torch.randn(9, 16), experts)  # (B, E)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(9))


# --- InputEncoder -------------------------------------------------------------------------

CARDS = [3, 5, 2]


def _encoder(n_numeric=2, dim=4):
    return InputEncoder(CARDS, n_numeric=n_numeric, embedding_dim=dim)


def test_input_encoder_shape():
    enc = _encoder()
    assert enc.out_features == len(CARDS) * 4 + 2
    categorical = torch.tensor([[1, 2, 1], [0, 4, 0]], dtype=torch.int64)
    assert enc(categorical, torch.randn(2, 2)).shape == (2, enc.out_features)


@pytest.mark.parametrize("bad", [-1, -100, "card", 1000])
def test_input_encoder_maps_out_of_range_to_unknown(bad):
    enc = _encoder()
    numeric = torch.randn(1, 2).expand(len(CARDS), 2)
    zero = torch.zeros(len(CARDS), len(CARDS), dtype=torch.int64)
    stray = zero.clone()
    for column, card in enumerate(CARDS):
        # row `column` carries the stray value in that column only
        stray[column, column] = card if bad == "card" else bad
    with torch.no_grad():
        torch.testing.assert_close(enc(stray, numeric), enc(zero, numeric))


def test_input_encoder_keeps_in_range_indices():
    enc = _encoder()
    numeric = torch.zeros(2, 2)
    last = torch.tensor([[c - 1 for c in CARDS]], dtype=torch.int64)
    zero = torch.zeros(1, len(CARDS), dtype=torch.int64)
    with torch.no_grad():
        out = enc(torch.cat([last, zero]), numeric)
    for column in range(len(CARDS)):
        block = slice(column * 4, (column + 1) * 4)
        assert not torch.equal(out[0, block], out[1, block])


def test_input_encoder_standardises_with_fitted_mean_std():
    enc = _encoder(n_numeric=3)
    data = torch.randn(500, 3) * torch.tensor([3.0, 0.5, 10.0]) + torch.tensor([5.0, -2.0, 100.0])
    enc.fit(data)
    mean, std = data.mean(dim=0), data.std(dim=0, correction=0)
    torch.testing.assert_close(enc.state_dict()["_mean"], mean)
    torch.testing.assert_close(enc.state_dict()["_std"], std)

    categorical = torch.zeros(500, len(CARDS), dtype=torch.int64)
    with torch.no_grad():
        scaled = enc(categorical, data)[:, -3:]
    torch.testing.assert_close(scaled, (data - mean) / std)
    torch.testing.assert_close(scaled.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.std(dim=0, correction=0), torch.ones(3), atol=1e-5, rtol=0)

    # New inputs use the frozen statistics, not their own.
    fresh = torch.tensor([[5.0, -2.0, 100.0]])
    with torch.no_grad():
        out = enc(categorical[:1], fresh)[:, -3:]
    torch.testing.assert_close(out, (fresh - mean) / std)


def test_input_encoder_unfitted_is_identity_on_numerics():
    enc = _encoder()
    numeric = torch.randn(4, 2)
    with torch.no_grad():
        out = enc(torch.zeros(4, len(CARDS), dtype=torch.int64), numeric)
    torch.testing.assert_close(out[:, -2:], numeric)


def test_input_encoder_constant_column_stays_finite():
    enc = _encoder()
    data = torch.cat([torch.full((10, 1), 3.0), torch.randn(10, 1)], dim=1)
    enc.fit(data)
    with torch.no_grad():
        out = enc(torch.zeros(10, len(CARDS), dtype=torch.int64), data)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_input_encoder_fit_on_one_row_stays_finite():
    enc = _encoder()
    enc.fit(torch.tensor([[1.0, 2.0]]))
    with torch.no_grad():
        out = enc(torch.zeros(1, len(CARDS), dtype=torch.int64), torch.tensor([[1.0, 2.0]]))
    assert torch.isfinite(out).all()


def test_a_feature_constant_when_fitted_keeps_unit_scale():
    """Counters are 0 throughout simulated history and grow live: their first live values
    must stay ordinary inputs, not be divided by ~0."""
    encoder = InputEncoder([3], n_numeric=2, embedding_dim=2)
    history = torch.stack([torch.randn(500) * 4 + 1, torch.zeros(500)], dim=1)
    encoder.fit(history)
    live = torch.tensor([[1.0, math.log1p(120.0)]])
    scaled = encoder(torch.zeros(1, 1, dtype=torch.int64), live)[0, -2:].detach()
    assert scaled[1] == pytest.approx(math.log1p(120.0))
    assert abs(float(scaled[0])) < 0.2  # the varying feature is standardised as before
