"""Baselines CAMoE must beat, on the same inputs (PAPER.md).

Every model maps (categorical (B, C), numeric (B, N)) to logits (B, T), one column per
task, and names each sample's task with ``task_index``: the ad format for all models but
the content-based one, whose tasks are content types. A sample is scored by its own
task's column.
"""

from __future__ import annotations

import torch
from torch import nn

from camoe.features import CONTENT_TYPES
from trainer.modules import MLP, CrossNet, Expert, Gate, InputEncoder, Tower

CONTENT_TYPE_COLUMN = 1  # position of content_type in the categorical layout


class GlobalDCN(nn.Module):
    """One DCN-v2 for every format (format is an input feature): the one-size-fits-all model.

    Shapes: categorical (B, C), numeric (B, N) -> logits (B, T), all columns equal.
    """

    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        n_tasks: int,
        embedding_dim: int = 8,
        cross_layers: int = 2,
        hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = InputEncoder(cardinalities, n_numeric, embedding_dim)
        width = self.encoder.out_features
        self._cross = CrossNet(width, cross_layers)
        self._head = Tower(width, hidden or [64, 32])
        self._n_tasks = n_tasks

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x = self.encoder(categorical, numeric)  # (B, D)
        logit = self._head(self._cross(x))  # (B, 1)
        return logit.expand(-1, self._n_tasks)  # (B, T)


class SingleTaskDCN(nn.Module):
    """An independent DCN-v2 per format, each trained on its own format only.

    Shapes: categorical (B, C), numeric (B, N) -> logits (B, T).
    """

    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        n_tasks: int,
        embedding_dim: int = 8,
        cross_layers: int = 2,
        hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.nets = nn.ModuleList(
            GlobalDCN(cardinalities, n_numeric, 1, embedding_dim, cross_layers, hidden)
            for _ in range(n_tasks)
        )

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(categorical, numeric) for net in self.nets], dim=1)  # (B, T)


class SharedBottom(nn.Module):
    """A shared MLP bottom and one tower per task.

    Shapes: categorical (B, C), numeric (B, N) -> logits (B, T).
    """

    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        n_tasks: int,
        embedding_dim: int = 8,
        hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = InputEncoder(cardinalities, n_numeric, embedding_dim)
        self._bottom = MLP(self.encoder.out_features, hidden or [64, 32])
        tower_hidden = tower_hidden or [16]
        self._towers = nn.ModuleList(
            Tower(self._bottom.out_features, tower_hidden) for _ in range(n_tasks)
        )

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        shared = self._bottom(self.encoder(categorical, numeric))  # (B, H)
        return torch.cat([tower(shared) for tower in self._towers], dim=1)  # (B, T)


class MMoE(nn.Module):
    """Multi-gate mixture of MLP experts (Ma et al., KDD 2018), one gate and tower per task.

    Shapes: categorical (B, C), numeric (B, N) -> logits (B, T).
    """

    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        n_tasks: int,
        embedding_dim: int = 8,
        num_experts: int = 6,
        expert_hidden: list[int] | None = None,
        tower_hidden: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = InputEncoder(cardinalities, n_numeric, embedding_dim)
        width = self.encoder.out_features
        expert_hidden = expert_hidden or [64, 32]
        tower_hidden = tower_hidden or [16]
        self._experts = nn.ModuleList(Expert(width, 0, expert_hidden) for _ in range(num_experts))
        self._gates = nn.ModuleList(Gate(width, num_experts) for _ in range(n_tasks))
        self._towers = nn.ModuleList(Tower(expert_hidden[-1], tower_hidden) for _ in range(n_tasks))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x = self.encoder(categorical, numeric)  # (B, D)
        experts = torch.stack([e(x) for e in self._experts], dim=1)  # (B, E, H)
        return torch.cat(
            [
                tower(gate(x, experts))
                for gate, tower in zip(self._gates, self._towers, strict=True)
            ],
            dim=1,
        )  # (B, T)


class ContentMMoE(MMoE):
    """Content-based multi-task baseline: MMoE whose tasks are content types
    (music, podcast, audiobook), not ad modalities.

    Build it with ``n_tasks=len(CONTENT_TYPES)``.

    Shapes: categorical (B, C), numeric (B, N) -> logits (B, len(CONTENT_TYPES)).
    """

    @staticmethod
    def task_index(categorical: torch.Tensor, fmt: torch.Tensor) -> torch.Tensor:
        """Content type -> task (B,); unknown content types (index 0 or out of range) count
        as music, as the input encoder treats them as unknown."""
        del fmt
        content = categorical[:, CONTENT_TYPE_COLUMN]
        known = (content >= 1) & (content <= len(CONTENT_TYPES))
        return torch.where(known, content - 1, torch.zeros_like(content))
