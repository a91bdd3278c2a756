"""Per-class feature statistics (prototypes) with the running update of Eq. 13.

``update`` merges a chunk's count, mean and (population) covariance into the running ones:
``mu = (N mu + n m) / (N + n)``, ``Sigma = (N Sigma + n S) / (N + n) + N n (mu - m)(mu - m)^T / (N + n)^2``,
accumulated in float64 (with autocast off), so streaming any number of chunks gives the statistics of all the
features together, in memory independent of the volume size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from semiseg.io.atomic import atomic_path
from semiseg.precision import full_precision


class PrototypeStatistics:
    """Running per-class mean (C, F), population covariance (C, F, F) and count (C,)."""

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        if num_classes < 1 or feature_dim < 1:
            raise ValueError("num_classes and feature_dim must be >= 1")
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        self._count = torch.zeros(num_classes, dtype=torch.float64)
        self._mean = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self._cov = torch.zeros(num_classes, feature_dim, feature_dim, dtype=torch.float64)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge ``features`` (N, F) with class ``labels`` (N,) (Eq. 13). Labels outside 0..C-1 are ignored.

        Each class's chunk count, mean and covariance are computed in float64 on the
        features' device (a GPU in stage-2 training: only C x F x F numbers travel to the
        CPU, not the N x F features) and merged into the running statistics on the CPU.
        """
        f = torch.as_tensor(features).detach()
        y = torch.as_tensor(labels).detach().to(f.device).long().reshape(-1)
        if f.ndim != 2 or f.shape[1] != self.feature_dim or f.shape[0] != y.shape[0]:
            raise ValueError(f"expected features (N, {self.feature_dim}) and labels (N,), got {tuple(f.shape)} and {tuple(y.shape)}")
        with full_precision():  # float64 throughout, also under AMP
            f = f.to(torch.float64)
            for c in range(self.num_classes):
                fc = f[y == c]
                n = fc.shape[0]
                if n == 0:
                    continue
                m = fc.mean(0)
                d = fc - m
                self._merge(c, n, m.cpu(), (d.T @ d / n).cpu())

    def _merge(self, c: int, n: int, m: torch.Tensor, s: torch.Tensor) -> None:
        """Merge a chunk of ``n`` features of class ``c`` with mean ``m`` (F,) and covariance ``s`` (F, F)."""
        big_n = self._count[c]
        total = big_n + n
        delta = self._mean[c] - m
        self._cov[c] = (big_n * self._cov[c] + n * s) / total + (big_n * n) * torch.outer(delta, delta) / total**2
        self._mean[c] = (big_n * self._mean[c] + n * m) / total
        self._count[c] = total

    @property
    def mean(self) -> torch.Tensor:
        """(C, F) float64 class means."""
        return self._mean.clone()

    @property
    def cov(self) -> torch.Tensor:
        """(C, F, F) float64 population covariances (divided by N)."""
        return self._cov.clone()

    @property
    def count(self) -> torch.Tensor:
        """(C,) float64 number of features seen per class."""
        return self._count.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self._count.clone(), "mean": self._mean.clone(), "cov": self._cov.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("count", "mean", "cov"):
            if tuple(state[key].shape) != tuple(getattr(self, f"_{key}").shape):
                raise ValueError(f"prototype {key} has shape {tuple(state[key].shape)}, expected {tuple(getattr(self, f'_{key}').shape)}")
        self._count, self._mean, self._cov = (state[k].to(torch.float64).clone() for k in ("count", "mean", "cov"))

    def save(self, path: str | Path, **metadata) -> None:
        """Write one ``.npz`` file atomically (count, mean, cov and string metadata)."""
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, count=self._count.numpy(), mean=self._mean.numpy(), cov=self._cov.numpy(),
                     **{f"meta_{k}": np.asarray(str(v)) for k, v in metadata.items()})

    @classmethod
    def load(cls, path: str | Path) -> PrototypeStatistics:
        with np.load(path) as data:
            mean = torch.from_numpy(data["mean"])
            stats = cls(mean.shape[0], mean.shape[1])
            stats.load_state_dict({"count": torch.from_numpy(data["count"]), "mean": mean, "cov": torch.from_numpy(data["cov"])})
        return stats
