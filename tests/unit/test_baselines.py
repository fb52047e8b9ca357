"""Unit tests of the benchmark's model zoo (bench.quality.MODELS, trainer/baselines.py) and
of the training losses that go with it (trainer.train.loss_fn). CPU only, no services."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from camoe.bench.quality import MODELS, dataset_for
from camoe.features import CONTENT_TYPES, FORMATS, FeatureLayout
from camoe.settings import Settings
from camoe.sim.traffic import World
from trainer.baselines import ContentMMoE, GlobalDCN, SingleTaskDCN
from trainer.model import CAMoE
from trainer.train import fit, loss_fn

SETTINGS = Settings()
SIMULATED = dataset_for(SETTINGS, "simulator")
LAYOUT = FeatureLayout(SETTINGS.features.n_campaigns)
CARDS = [f.cardinality for f in LAYOUT.categorical]
AUDIO, VIDEO, DISPLAY = (FORMATS.index(f) for f in ("audio", "video", "display"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _build(name: str) -> nn.Module:
    return MODELS[name].build(SETTINGS, SIMULATED)


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(categorical (n, C) int64 within each vocabulary, numeric (n, N) float32)."""
    generator = torch.Generator().manual_seed(seed)
    categorical = torch.stack(
        [torch.randint(0, c, (n,), generator=generator) for c in CARDS], dim=1
    )
    numeric = torch.randn(n, LAYOUT.n_numeric, generator=generator)
    return categorical, numeric


def _grad_norm(module: nn.Module) -> float:
    """Sum of |grad| over the module's parameters (a missing grad counts as zero)."""
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# --- every model of the benchmark --------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_finite_logits_per_task(name):
    model = _build(name).eval()
    categorical, numeric = _batch(32)
    with torch.no_grad():
        logits = model(categorical, numeric)
    assert logits.shape == (32, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_has_a_loss_kind_that_loss_fn_accepts(name):
    model = _build(name)
    categorical, numeric = _batch(16)
    task = torch.randint(0, 3, (16,))
    labels = torch.randint(0, 2, (16,)).float()
    value = loss_fn(MODELS[name].loss, model(categorical, numeric), labels, task)
    assert value.ndim == 0 and torch.isfinite(value)


def test_global_dcn_scores_every_format_alike():
    model = _build("dcn_global").eval()
    assert isinstance(model, GlobalDCN)
    categorical, numeric = _batch(64)
    with torch.no_grad():
        logits = model(categorical, numeric)
    assert torch.equal(logits, logits[:, :1].expand_as(logits))


# --- ContentMMoE ----------------------------------------------------------------------------


def test_content_mmoe_has_one_task_per_content_type():
    model = _build("content_mmoe").eval()
    assert isinstance(model, ContentMMoE)
    categorical, numeric = _batch(8)
    with torch.no_grad():
        assert model(categorical, numeric).shape == (8, len(CONTENT_TYPES))


def test_content_mmoe_task_is_content_type_with_unknown_folded_into_music():
    categorical, _ = _batch(4)
    categorical[:, 1] = torch.tensor([1, 2, 3, 0])  # music, podcast, audiobook, unknown
    fmt = torch.tensor([AUDIO, VIDEO, DISPLAY, AUDIO])  # must not matter
    task = ContentMMoE.task_index(categorical, fmt)
    assert task.tolist() == [0, 1, 2, 0]
    # the format column plays no part
    other = categorical.clone()
    other[:, 0] = torch.tensor([3, 2, 1, 0])
    assert ContentMMoE.task_index(other, fmt.flip(0)).tolist() == [0, 1, 2, 0]


def test_content_mmoe_task_of_an_out_of_vocabulary_content_type_is_music():
    categorical, _ = _batch(2)
    categorical[:, 1] = torch.tensor([len(CONTENT_TYPES) + 1, 99])
    task = ContentMMoE.task_index(categorical, torch.zeros(2, dtype=torch.int64))
    assert task.tolist() == [0, 0]


# --- CAMoE ablations ------------------------------------------------------------------------


def test_camoe_no_grouping_has_one_pool_with_the_same_expert_budget():
    model = _build("camoe_no_grouping")
    reference = _build("camoe")
    assert isinstance(model, CAMoE)
    m = SETTINGS.model
    assert len(model.group_experts) == 1
    assert len(model.group_experts[0]) == m.experts_per_group * 2
    assert len(model.shared) == m.shared_experts
    # the same total number of experts as CAMoE with its two modality groups
    total = len(model.shared) + sum(len(pool) for pool in model.group_experts)
    reference_total = len(reference.shared) + sum(len(pool) for pool in reference.group_experts)
    assert total == reference_total


def test_camoe_no_dcn_experts_have_no_cross_layers():
    model = _build("camoe_no_dcn")
    experts = [*model.shared, *(e for pool in model.group_experts for e in pool)]
    assert experts
    for expert in experts:
        assert isinstance(expert._cross, nn.Identity)
    # and the full CAMoE does have them
    full = _build("camoe")
    assert not isinstance(full.shared[0]._cross, nn.Identity)


# --- loss_fn --------------------------------------------------------------------------------


def test_pooled_loss_is_bce_over_each_samples_own_column():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 3, generator=generator) * 2
    labels = torch.randint(0, 2, (50,), generator=generator).float()
    task = torch.randint(0, 3, (50,), generator=generator)
    own = torch.stack([logits[i, task[i]] for i in range(50)])
    expected = F.binary_cross_entropy_with_logits(own, labels)
    torch.testing.assert_close(loss_fn("pooled", logits, labels, task), expected)


def test_all_tasks_loss_is_bce_of_every_column_against_the_label():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 3, generator=generator)
    labels = torch.randint(0, 2, (20,), generator=generator).float()
    task = torch.zeros(20, dtype=torch.int64)
    expected = torch.stack(
        [F.binary_cross_entropy_with_logits(logits[:, t], labels) for t in range(3)]
    ).mean()
    torch.testing.assert_close(loss_fn("all_tasks", logits, labels, task), expected)


def _audio_only_tower_grads(kind: str) -> list[float]:
    model = _build("camoe")
    categorical, numeric = _batch(64, seed=3)
    task = torch.full((64,), AUDIO)
    labels = torch.tensor([1.0, 0.0]).repeat(32)
    loss_fn(kind, model(categorical, numeric), labels, task).backward()
    return [_grad_norm(tower) for tower in model.towers]


def test_all_tasks_loss_trains_every_tower_on_audio_only_samples():
    grads = _audio_only_tower_grads("all_tasks")
    assert all(g > 0 for g in grads), grads


def test_masked_loss_trains_only_the_audio_tower_on_audio_only_samples():
    grads = _audio_only_tower_grads("masked")
    assert grads[AUDIO] > 0
    assert grads[VIDEO] == 0.0
    assert grads[DISPLAY] == 0.0


def test_loss_fn_rejects_an_unknown_kind():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_fn("focal", logits, torch.zeros(2), torch.zeros(2, dtype=torch.int64))


# --- SingleTaskDCN --------------------------------------------------------------------------


def test_single_task_dcn_video_samples_train_only_the_video_net():
    model = _build("dcn_single_task")
    assert isinstance(model, SingleTaskDCN)
    categorical, numeric = _batch(64, seed=4)
    task = torch.full((64,), VIDEO)
    labels = torch.tensor([0.0, 1.0]).repeat(32)
    loss_fn("masked", model(categorical, numeric), labels, task).backward()
    assert _grad_norm(model.nets[VIDEO]) > 0
    assert _grad_norm(model.nets[AUDIO]) == 0.0
    assert _grad_norm(model.nets[DISPLAY]) == 0.0


def test_single_task_dcn_encoder_fit_standardises_every_net():
    model = _build("dcn_single_task")
    data = World(SETTINGS.simulator).history(300)
    fit(model, data, epochs=1)
    state = model.state_dict()
    numeric = torch.from_numpy(data["numeric"])
    for k in range(len(FORMATS)):
        torch.testing.assert_close(state[f"nets.{k}.encoder._mean"], numeric.mean(dim=0))
