"""Unit tests of CAMoE, its loss and its input checks (trainer/model.py), and the offline
fit (trainer/train.py). CPU only, no services."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from camoe.features import FORMATS, FeatureLayout
from camoe.settings import Settings
from camoe.sim.traffic import World
from trainer.model import (
    CAMoE,
    build_camoe,
    fake_negative_weights,
    masked_bce,
    observed_pctr,
    select_task,
    validate_batch,
)
from trainer.train import fit

SETTINGS = Settings()
LAYOUT = FeatureLayout(SETTINGS.features.n_campaigns)
N_TASKS = len(FORMATS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(n, fmt=None, seed=0):
    """A valid random (categorical, numeric, format, labels) batch."""
    g = torch.Generator().manual_seed(seed)
    cards = torch.tensor([f.cardinality for f in LAYOUT.categorical])
    categorical = (torch.rand(n, LAYOUT.n_categorical, generator=g) * cards).long()
    numeric = torch.randn(n, LAYOUT.n_numeric, generator=g)
    if fmt is None:
        formats = torch.randint(0, N_TASKS, (n,), generator=g)
    else:
        formats = torch.full((n,), fmt, dtype=torch.int64)
    labels = (torch.arange(n) % 2).float()  # both classes, so every gradient can move
    return categorical, numeric, formats, labels


@pytest.fixture
def model():
    return build_camoe(SETTINGS)


# --- forward / select_task ----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
def test_forward_shape(model, n):
    categorical, numeric, _, _ = _batch(n)
    logits = model(categorical, numeric)
    assert logits.shape == (n, N_TASKS)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_build_camoe_follows_settings(model):
    assert model.formats == list(FORMATS)
    assert len(model.towers) == N_TASKS
    assert len(model.gates) == N_TASKS
    assert len(model.shared) == SETTINGS.model.shared_experts
    assert len(model.group_experts) == len(SETTINGS.model.groups)
    assert all(len(pool) == SETTINGS.model.experts_per_group for pool in model.group_experts)


def test_select_task_picks_each_samples_own_format():
    logits = torch.arange(12, dtype=torch.float32).view(4, 3)
    fmt = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(select_task(logits, fmt), torch.tensor([0.0, 5.0, 7.0, 11.0]))
    torch.testing.assert_close(select_task(logits, fmt), logits[torch.arange(4), fmt])


# --- masked_bce ---------------------------------------------------------------------------


def _bce(logit, label):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def _manual_masked_bce(logits, labels, fmt, weights=None):
    total = 0.0
    for t in range(logits.shape[1]):
        rows = [i for i in range(len(fmt)) if int(fmt[i]) == t]
        if not rows:
            continue
        mean = sum(_bce(float(logits[i, t]), float(labels[i])) for i in rows) / len(rows)
        total += (1.0 if weights is None else float(weights[t])) * mean
    return total


def test_masked_bce_matches_manual_per_task_mean_sum():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 3, generator=g) * 2
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.float32)
    fmt = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 2, 2])  # unequal task sizes
    expected = _manual_masked_bce(logits, labels, fmt)
    assert float(masked_bce(logits, labels, fmt)) == pytest.approx(expected, rel=1e-5)

    weights = torch.tensor([0.5, 2.0, 1.5])
    expected = _manual_masked_bce(logits, labels, fmt, weights)
    assert float(masked_bce(logits, labels, fmt, weights)) == pytest.approx(expected, rel=1e-5)


def test_sample_weights_count_a_sample_as_that_many_copies():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, generator=g)
    labels = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.float32)
    fmt = torch.tensor([0, 0, 1, 1, 2, 2])
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0])
    copies = torch.repeat_interleave(torch.arange(6), weights.long())
    expected = masked_bce(logits[copies], labels[copies], fmt[copies])
    weighted = masked_bce(logits, labels, fmt, sample_weights=weights)
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)


def test_importance_weights_undo_negative_sampling():
    # A constant model trained on every positive and a tenth of the negatives, each kept
    # negative weighted 10, learns the base rate; unweighted, it learns the sampled rate.
    rng = np.random.default_rng(3)
    y = (rng.random(200_000) < 0.02).astype(np.float32)
    kept = (y == 1) | (rng.random(len(y)) < 0.1)
    labels = torch.from_numpy(y[kept])
    fmt = torch.zeros(len(labels), dtype=torch.int64)
    for weights, rate in ((torch.where(labels == 1, 1.0, 10.0), 0.02), (None, y[kept].mean())):
        bias = torch.zeros(1, 1, requires_grad=True)
        optimiser = torch.optim.Adam([bias], lr=0.05)
        for _ in range(400):
            loss = masked_bce(bias.expand(len(labels), 1), labels, fmt, sample_weights=weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert float(torch.sigmoid(bias.detach())) == pytest.approx(rate, rel=0.05)


def test_fake_negative_weighting_learns_the_true_click_rate():
    # Every impression once as a negative, every click (rate 0.05) once more as a positive:
    # a constant model with fake-negative weights learns 0.05; unweighted, 0.05 / 1.05.
    rng = np.random.default_rng(4)
    clicks = int((rng.random(100_000) < 0.05).sum())
    labels = torch.cat([torch.zeros(100_000), torch.ones(clicks)])
    fmt = torch.zeros(len(labels), dtype=torch.int64)
    fake = torch.ones(len(labels), dtype=torch.bool)
    rate = clicks / 100_000
    for weighted, expected in ((True, rate), (False, rate / (1 + rate))):
        bias = torch.zeros(1, 1, requires_grad=True)
        optimiser = torch.optim.Adam([bias], lr=0.05)
        for _ in range(400):
            logits = bias.expand(len(labels), 1)
            weights = fake_negative_weights(logits, labels, fmt, fake) if weighted else None
            loss = masked_bce(logits, labels, fmt, sample_weights=weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert float(torch.sigmoid(bias.detach())) == pytest.approx(expected, rel=0.02)


def test_fake_negative_weights_leave_other_rows_at_one():
    logits = torch.tensor([[0.0], [0.0], [0.0]])
    labels = torch.tensor([1.0, 0.0, 1.0])
    fake = torch.tensor([True, True, False])
    weights = fake_negative_weights(logits, labels, torch.zeros(3, dtype=torch.int64), fake)
    assert weights.tolist() == pytest.approx([1.5, 0.75, 1.0])
    p = torch.tensor([0.25, 0.25])
    assert observed_pctr(p, torch.tensor([True, False])).tolist() == pytest.approx([0.2, 0.25])


def test_masked_bce_is_not_the_pooled_mean():
    # A rare task is averaged over its own samples, not diluted by the common one.
    logits = torch.zeros(4, 3)
    labels = torch.zeros(4)
    fmt = torch.tensor([0, 0, 0, 1])
    assert float(masked_bce(logits, labels, fmt)) == pytest.approx(2 * math.log(2), rel=1e-6)


def test_masked_bce_absent_tasks_contribute_nothing():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, generator=g).requires_grad_()
    labels = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.float32)
    fmt = torch.tensor([0, 0, 2, 2, 2, 0])  # no task 1
    loss = masked_bce(logits, labels, fmt)
    expected = _manual_masked_bce(logits.detach(), labels, fmt)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)

    # Changing the absent task's column (even to extreme values) leaves the loss unchanged.
    other = logits.detach().clone()
    other[:, 1] = torch.tensor([50.0, -50.0, 1e4, -1e4, 0.0, 3.0])
    assert float(masked_bce(other, labels, fmt)) == pytest.approx(expected, rel=1e-6)

    loss.backward()
    assert torch.equal(logits.grad[:, 1], torch.zeros(6))
    # each present sample's gradient only lands on its own column
    mask = torch.nn.functional.one_hot(fmt, 3).bool()
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum())))
    assert (logits.grad[mask] != 0).all()


def test_masked_bce_single_task_batch_is_that_tasks_mean():
    logits = torch.tensor([[0.3, -1.0, 2.0], [-0.7, 0.1, 0.0]])
    labels = torch.tensor([1.0, 0.0])
    fmt = torch.tensor([1, 1])
    expected = (_bce(-1.0, 1.0) + _bce(0.1, 0.0)) / 2
    assert float(masked_bce(logits, labels, fmt)) == pytest.approx(expected, rel=1e-5)


# --- adaptive loss masking through the model -----------------------------------------------


def _group_of(fmt_name):
    return next(i for i, g in enumerate(SETTINGS.model.groups) if fmt_name in g)


def _grads(module):
    return [p.grad for p in module.parameters()]


def _all_zero(module):
    return all(g is None or not g.any() for g in _grads(module))


def _some_nonzero(module):
    return any(g is not None and g.any() for g in _grads(module))


def _backward_on(model, fmt_name, n=32):
    categorical, numeric, fmt, labels = _batch(n, fmt=FORMATS.index(fmt_name))
    model.zero_grad(set_to_none=True)
    masked_bce(model(categorical, numeric), labels, fmt).backward()


def test_default_groups():
    assert SETTINGS.model.groups == [["audio", "display"], ["video"]]


def test_video_only_batch_trains_only_the_video_tower(model):
    _backward_on(model, "video")
    video = FORMATS.index("video")
    for task, name in enumerate(FORMATS):
        if task == video:
            assert _some_nonzero(model.towers[task]), name
            assert _some_nonzero(model.gates[task]), name
        else:
            assert _all_zero(model.towers[task]), name
            assert _all_zero(model.gates[task]), name
    # the video group's experts learn; the audio/display group's do not
    assert _some_nonzero(model.group_experts[_group_of("video")])
    assert _all_zero(model.group_experts[_group_of("audio")])
    assert _some_nonzero(model.shared)
    assert _some_nonzero(model.encoder)


def test_audio_only_batch_leaves_video_group_experts_untouched(model):
    _backward_on(model, "audio")
    video_group = _group_of("video")
    audio_group = _group_of("audio")
    assert video_group != audio_group
    assert _all_zero(model.group_experts[video_group])
    assert _some_nonzero(model.group_experts[audio_group])
    assert _some_nonzero(model.towers[FORMATS.index("audio")])
    assert _all_zero(model.towers[FORMATS.index("video")])
    assert _all_zero(model.towers[FORMATS.index("display")])
    assert _some_nonzero(model.shared)


# --- validate_batch -----------------------------------------------------------------------


def test_validate_batch_accepts_a_good_batch():
    categorical, numeric, fmt, _ = _batch(4)
    validate_batch(categorical, numeric, fmt, N_TASKS)
    validate_batch(categorical[:0], numeric[:0], fmt[:0], N_TASKS)  # empty is fine


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, n, f: (c.float(), n, f), "int64"),
        (lambda c, n, f: (c.int(), n, f), "int64"),
        (lambda c, n, f: (c, n, f.int()), "int64"),
        (lambda c, n, f: (c, n.double(), f), "float32"),
        (lambda c, n, f: (c, n.half(), f), "float32"),
        (lambda c, n, f: (c, torch.where(torch.eye(4, n.shape[1]).bool(), np.nan, n), f), "NaN"),
        (lambda c, n, f: (c, torch.where(torch.eye(4, n.shape[1]).bool(), np.inf, n), f), "inf"),
        (lambda c, n, f: (c, n, torch.tensor([0, 1, 2, 3])), "range"),
        (lambda c, n, f: (c, n, torch.tensor([0, -1, 2, 1])), "range"),
    ],
)
def test_validate_batch_rejects(change, message):
    categorical, numeric, fmt, _ = _batch(4)
    with pytest.raises(ValueError, match=message):
        validate_batch(*change(categorical, numeric, fmt), N_TASKS)


# --- constructor --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups",
    [
        [["audio", "display"]],  # video missing
        [["audio", "display"], ["video", "audio"]],  # audio twice
        [["audio", "display"], ["video"], ["podcast"]],  # unknown format
        [],
    ],
)
def test_camoe_rejects_groups_that_do_not_cover_the_formats(groups):
    with pytest.raises(ValueError, match="groups"):
        CAMoE([4, 5], n_numeric=3, formats=list(FORMATS), groups=groups)


def test_camoe_accepts_any_partition():
    model = CAMoE([4, 5], n_numeric=3, formats=list(FORMATS), groups=[["video"], FORMATS[::2]])
    out = model(torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 3))
    assert out.shape == (2, N_TASKS)


# --- offline fit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history():
    return World(SETTINGS.simulator).history(600)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_fit_on_simulated_history(history):
    model = build_camoe(SETTINGS)
    losses = fit(model, history, epochs=2, batch_size=256)
    assert len(losses) == 2
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert not model.training
    assert not any(m.training for m in model.modules())
    # the standardisation was fitted on this data and frozen into the model
    numeric = torch.as_tensor(history["numeric"])
    torch.testing.assert_close(model.encoder.state_dict()["_mean"], numeric.mean(dim=0))
    with torch.no_grad():
        logits = model(torch.as_tensor(history["categorical"]), numeric)
    assert torch.isfinite(logits).all()


def test_soft_masking_lets_other_formats_reach_a_tower_with_their_weight():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    fmt = torch.tensor([0, 0, 1, 1, 2, 2])
    assert float(masked_bce(logits, labels, fmt, off_task_weight=0.0)) == pytest.approx(
        float(masked_bce(logits, labels, fmt))
    )
    # Weight 1: every tower's loss is its mean over every sample.
    every = F.binary_cross_entropy_with_logits(
        logits, labels.view(-1, 1).expand_as(logits), reduction="none"
    ).mean(dim=0)
    soft = masked_bce(logits, labels, fmt, off_task_weight=1.0)
    assert float(soft) == pytest.approx(float(every.sum()), rel=1e-6)
    # Between: tower 0 sees its 2 samples at 1 and the other 4 at 0.5.
    tower_0 = torch.tensor([1.0, 0.0, 0.0])
    half = masked_bce(logits, labels, fmt, task_weights=tower_0, off_task_weight=0.5)
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], labels, reduction="none")
    expected = (bce[:2].sum() + 0.5 * bce[2:].sum()) / (2 + 0.5 * 4)
    assert float(half) == pytest.approx(float(expected), rel=1e-6)
