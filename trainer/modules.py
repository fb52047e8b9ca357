"""Small torch building blocks of CAMoE and its baselines."""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    r"""DCN-v2 cross network (Wang et al. 2021, https://arxiv.org/abs/2008.13535).

    .. math:: x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l

    Args:
        in_features: width of the input.
        num_layers: number of cross layers.

    Example::

        cross = CrossNet(in_features=16, num_layers=2)
        y = cross(torch.randn(8, 16))  # (8, 16)

    Shapes: input (B, N) -> output (B, N).
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        self._layers = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0  # (B, N)
        for layer in self._layers:
            x = x0 * layer(x) + x  # (B, N)
        return x


class MLP(nn.Module):
    """Linear + ReLU layers.

    Args:
        in_features: width of the input.
        layer_sizes: width of each layer; the last is the output width.

    Example::

        mlp = MLP(16, [32, 8])
        y = mlp(torch.randn(4, 16))  # (4, 8)

    Shapes: input (B, N) -> output (B, layer_sizes[-1]).
    """

    def __init__(self, in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in layer_sizes:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        self._net = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)


class Tower(nn.Module):
    """A task's head: an MLP, then one logit.

    Shapes: input (B, N) -> logit (B, 1).

    Example::

        tower = Tower(32, hidden=[16])
        logit = tower(torch.randn(4, 32))  # (4, 1)
    """

    def __init__(self, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        self._mlp = MLP(in_features, hidden)
        self._out = nn.Linear(self._mlp.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self._mlp(x))


class Expert(nn.Module):
    """A CAMoE expert: a DCN-v2 cross block followed by an MLP (cross block optional,
    for the "without DCN" ablation).

    Shapes: input (B, N) -> output (B, hidden[-1]).

    Example::

        expert = Expert(16, cross_layers=2, hidden=[32, 8])
        y = expert(torch.randn(4, 16))  # (4, 8)
    """

    def __init__(self, in_features: int, cross_layers: int, hidden: list[int]) -> None:
        super().__init__()
        self._cross = CrossNet(in_features, cross_layers) if cross_layers > 0 else nn.Identity()
        self._mlp = MLP(in_features, hidden)
        self.out_features = self._mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp(self._cross(x))


class Gate(nn.Module):
    """Softmax gate that mixes expert outputs for one task.

    Shapes: x (B, N), experts (B, E, H) -> (B, H).

    Example::

        gate = Gate(16, num_experts=3)
        y = gate(torch.randn(4, 16), torch.randn(4, 3, 8))  # (4, 8)
    """

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self._logits = nn.Linear(in_features, num_experts)

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self._logits(x), dim=-1).unsqueeze(-1)  # (B, E, 1)
        return (weights * experts).sum(dim=1)  # (B, H)


class InputEncoder(nn.Module):
    """Embeds categorical features and standardises numeric ones.

    Categorical indices outside ``[0, cardinality)`` map to 0, the documented "unknown"
    index, so a stray value never crashes serving. Numeric features are standardised
    with statistics fitted once (``fit``) and stored as buffers, so the exported model
    carries them.

    Args:
        cardinalities: size of each categorical vocabulary (index 0 = unknown).
        n_numeric: number of numeric features.
        embedding_dim: width of each embedding.

    Shapes: categorical (B, C) int64, numeric (B, N) float32 -> (B, C * D + N).
    """

    def __init__(self, cardinalities: list[int], n_numeric: int, embedding_dim: int) -> None:
        super().__init__()
        self._embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in cardinalities)
        self.register_buffer("_cardinality", torch.tensor(cardinalities, dtype=torch.int64))
        self.register_buffer("_mean", torch.zeros(n_numeric))
        self.register_buffer("_std", torch.ones(n_numeric))
        self.out_features = len(cardinalities) * embedding_dim + n_numeric

    @torch.no_grad()
    def fit(self, numeric: torch.Tensor) -> None:
        self._mean.copy_(numeric.mean(dim=0))
        std = numeric.std(dim=0, correction=0)
        # A feature constant in the fitting data (stream counters are all 0 in simulated
        # history) keeps unit scale: dividing by ~0 would blow its first live values up.
        self._std.copy_(torch.where(std < 1e-3, torch.ones_like(std), std))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        known = (categorical >= 0) & (categorical < self._cardinality)  # (B, C)
        categorical = torch.where(known, categorical, torch.zeros_like(categorical))
        embedded = [emb(categorical[:, i]) for i, emb in enumerate(self._embeddings)]  # C x (B, D)
        scaled = (numeric - self._mean) / self._std  # (B, N)
        return torch.cat([*embedded, scaled], dim=1)


class Calibrated(nn.Module):
    """Per-task Platt scaling on top of any multi-task CTR model: ``a_t * logit_t + b_t``.

    ``a`` and ``b`` are buffers, fitted on held-out data by ``fit`` and then frozen, so
    training the wrapped model never moves them and the export carries them.

    Shapes: categorical (B, C), numeric (B, N) -> calibrated logits (B, T).

    Example::

        calibrated = Calibrated(model, num_tasks=3)
        logits = calibrated(categorical, numeric)  # (B, 3)
    """

    def __init__(self, model: nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("_scale", torch.ones(num_tasks))
        self.register_buffer("_bias", torch.zeros(num_tasks))

    def task_index(self, categorical: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
        inner = getattr(self.model, "task_index", None)
        return inner(categorical, fmt) if inner is not None else fmt

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return self.model(categorical, numeric) * self._scale + self._bias  # (B, T)

    @torch.no_grad()
    def raw_logits(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return self.model(categorical, numeric)

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor) -> None:
        """Fits (a_t, b_t) per task by logistic regression of labels on the raw logits.

        Args:
            logits: raw logits of each sample's own task (B,).
            labels: 0/1 labels (B,).
            task: each sample's task index (B,).
        """
        for t in range(len(self._scale)):
            mask = task == t
            fitted = platt_scaling(logits[mask].detach(), labels[mask])
            if fitted is not None:
                self._scale[t], self._bias[t] = fitted


def platt_scaling(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float] | None:
    """(a, b) minimising BCE(sigmoid(a * logit + b), label); None when a class has < 2
    samples or the fit diverges (the caller keeps the identity)."""
    if int(labels.sum()) < 2 or int((1 - labels).sum()) < 2:
        return None
    params = torch.tensor([1.0, 0.0], requires_grad=True)
    optimiser = torch.optim.LBFGS([params], lr=0.5, max_iter=100)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            params[0] * logits + params[1], labels
        )
        loss.backward()
        return loss

    optimiser.step(closure)
    if not torch.isfinite(params).all():
        return None
    return float(params[0].detach()), float(params[1].detach())
