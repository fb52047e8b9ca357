"""CAMoE: a modality-aware mixture-of-experts multi-task CTR model (after Verma et al.,
KDD 2025, https://arxiv.org/abs/2506.18735; reconstruction in shared/PAPER.md).

    x = InputEncoder(categorical, numeric)                       # (B, D)
    shared experts E_s(x), one expert pool per modality group E_g(x)   # each (B, H)
    task t (one per ad format) in group g(t):
        h_t = Gate_t(x, [E_s(x); E_{g(t)}(x)])                   # (B, H)
        logit_t = Tower_t(h_t)                                   # (B, 1)

Training uses adaptive loss masking (``masked_bce``): a sample's loss reaches only its
own format's tower, and each task's loss is averaged over its own samples.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from camoe.features import FORMATS, FeatureLayout
from camoe.settings import Settings
from trainer.modules import Calibrated, Expert, Gate, InputEncoder, Tower


class CAMoE(nn.Module):
    """Multi-task CTR model with shared and per-modality-group expert pools.

    Args:
        cardinalities: categorical vocabulary sizes (index 0 = unknown).
        n_numeric: number of numeric features.
        formats: task names, one tower each, in format-index order.
        groups: modality groups, lists of format names (each format in exactly one).
        embedding_dim, cross_layers, expert_hidden, shared_experts,
        experts_per_group, tower_hidden: sizes, as in ``ModelSettings``.

    Shapes: categorical (B, C) int64, numeric (B, N) float32 -> logits (B, T).
    """

    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        formats: list[str],
        groups: list[list[str]],
        embedding_dim: int = 8,
        cross_layers: int = 2,
        expert_hidden: list[int] | None = None,
        shared_experts: int = 2,
        experts_per_group: int = 2,
        tower_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        grouped = sorted(f for g in groups for f in g)
        if grouped != sorted(formats):
            raise ValueError(f"groups {groups} must cover each format of {formats} exactly once")
        expert_hidden = expert_hidden or [64, 32]
        tower_hidden = tower_hidden or [16]
        self.formats = list(formats)
        self.encoder = InputEncoder(cardinalities, n_numeric, embedding_dim)
        width = self.encoder.out_features

        def pool(n: int) -> nn.ModuleList:
            return nn.ModuleList(Expert(width, cross_layers, expert_hidden) for _ in range(n))

        self.shared = pool(shared_experts)
        self.group_experts = nn.ModuleList(pool(experts_per_group) for _ in groups)
        self._task_group = [next(i for i, g in enumerate(groups) if f in g) for f in formats]
        n_gate = shared_experts + experts_per_group
        self.gates = nn.ModuleList(Gate(width, n_gate) for _ in formats)
        hidden = expert_hidden[-1]
        self.towers = nn.ModuleList(Tower(hidden, tower_hidden) for _ in formats)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x = self.encoder(categorical, numeric)  # (B, D)
        shared = [e(x) for e in self.shared]  # S x (B, H)
        groups = [[e(x) for e in pool] for pool in self.group_experts]  # G x E x (B, H)
        logits = []
        for task, (gate, tower) in enumerate(zip(self.gates, self.towers, strict=True)):
            experts = torch.stack(shared + groups[self._task_group[task]], dim=1)  # (B, S+E, H)
            logits.append(tower(gate(x, experts)))  # (B, 1)
        return torch.cat(logits, dim=1)  # (B, T)


def select_task(logits: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
    """Each sample's own format's logit: logits (B, T), fmt (B,) -> (B,)."""
    return logits.gather(1, fmt.view(-1, 1)).squeeze(1)


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fmt: torch.Tensor,
    task_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    off_task_weight: float = 0.0,
) -> torch.Tensor:
    """Adaptive loss masking: ``L = sum_t w_t * mean_{i: fmt_i = t} BCE(y_i, p_t(x_i))``.

    A sample contributes only to its own format's tower; each task is averaged over its
    own (unmasked) samples, so a rare format is not drowned by audio; tasks absent from
    the batch contribute nothing. With ``sample_weights`` (importance weights of sampled
    negatives) each task's mean is the weighted mean, an unbiased estimate of the loss
    over the events before sampling. With ``off_task_weight`` a above 0 the mask is soft:
    other formats' samples reach a tower too, each weighing a (1: no masking).

    Shapes: logits (B, T), labels (B,) float, fmt (B,) int64, sample_weights (B,) -> scalar.
    """
    n_tasks = logits.shape[1]
    own = F.one_hot(fmt, n_tasks).to(logits.dtype)  # (B, T)
    mask = own + off_task_weight * (1 - own) if off_task_weight else own
    if sample_weights is not None:
        mask = mask * sample_weights.view(-1, 1)
    target = labels.view(-1, 1).expand_as(logits)  # (B, T)
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask
    counts = mask.sum(dim=0)  # (T,)
    per_task = losses.sum(dim=0) / counts.clamp_min(1e-12)  # (T,)
    weights = task_weights if task_weights is not None else torch.ones_like(per_task)
    return (weights * per_task * (counts > 0)).sum()


def fake_negative_weights(
    logits: torch.Tensor, labels: torch.Tensor, fmt: torch.Tensor, fake_negative: torch.Tensor
) -> torch.Tensor:
    """Importance weights of fake-negative weighting (Ktena et al., RecSys 2019,
    arXiv 1907.06558), for ``masked_bce``'s ``sample_weights``.

    A stream that shows every impression once as a negative and every click once more as
    a positive has a click rate ``q = p / (1 + p)`` where the true one is ``p``. Weighting
    its positives by ``1 + p`` and its negatives by ``(1 - p)(1 + p)``, with ``p`` the
    model's own pCTR held constant, turns that stream's BCE into an unbiased estimate of
    the BCE of the true one. Rows not from that stream (``fake_negative`` False) get 1.

    Shapes: logits (B, T), labels (B,) float, fmt (B,) int64, fake_negative (B,) bool
    -> (B,).
    """
    p = torch.sigmoid(select_task(logits.detach(), fmt))  # (B,)
    weights = torch.where(labels > 0, 1 + p, (1 - p) * (1 + p))
    return torch.where(fake_negative, weights, torch.ones_like(weights))


def observed_pctr(p: torch.Tensor, fake_negative: torch.Tensor) -> torch.Tensor:
    """The click rate a fake-negative stream shows for true pCTR ``p``: ``p / (1 + p)``
    where ``fake_negative``, else ``p``; what the trainer's metrics compare its labels with.

    Shapes: p (B,), fake_negative (B,) bool -> (B,).
    """
    return torch.where(fake_negative, p / (1 + p), p)


class ServingModel(nn.Module):
    """What Triton serves: calibrated pCTR of each candidate's own format's tower.

    Shapes: categorical (B, C) int64, numeric (B, N) float32, format (B, 1) int64
    -> pctr (B, 1) float32.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, categorical: torch.Tensor, numeric: torch.Tensor, fmt: torch.Tensor
    ) -> torch.Tensor:
        logits = self.model(categorical, numeric)  # (B, T)
        return torch.sigmoid(logits.gather(1, fmt))  # (B, 1)


def validate_batch(
    categorical: torch.Tensor, numeric: torch.Tensor, fmt: torch.Tensor, n_tasks: int
) -> None:
    """Raises ValueError with one clear line for inputs that would give a wrong score."""
    if categorical.dtype != torch.int64 or fmt.dtype != torch.int64:
        raise ValueError(
            f"categorical and format must be int64, got {categorical.dtype} and {fmt.dtype}"
        )
    if numeric.dtype != torch.float32:
        raise ValueError(f"numeric features must be float32, got {numeric.dtype}")
    if not torch.isfinite(numeric).all():
        raise ValueError("numeric features contain NaN or inf: replace them before scoring")
    if fmt.numel() and (fmt.min() < 0 or fmt.max() >= n_tasks):
        raise ValueError(f"format index out of range [0, {n_tasks})")


def build_camoe(settings: Settings) -> CAMoE:
    """CAMoE sized for the feature layout; constructor keywords are ``settings.model``'s keys."""
    layout = FeatureLayout(settings.features.n_campaigns)
    return CAMoE(
        cardinalities=[f.cardinality for f in layout.categorical],
        n_numeric=layout.n_numeric,
        formats=list(FORMATS),
        **settings.model.model_dump(),
    )


def build_served_camoe(settings: Settings) -> Calibrated:
    """What the system trains and serves: CAMoE under its per-format calibration."""
    return Calibrated(build_camoe(settings), len(FORMATS))
