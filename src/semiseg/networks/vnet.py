"""V-Net in the UA-MT layout, with the method's aleatoric and projection heads.

Backbone: widths w-2w-4w-8w-16w (w = ``base_filters``, 16 in the paper), 3x3x3 conv blocks
of 1/2/3/3/3 convs in the encoder and 3/3/2/1 in the decoder, each conv followed by batch
norm and ReLU; stride-2 2x2x2 convs down, stride-2 transposed convs up; skips added;
Dropout3d(p) after the bottleneck and after the last decoder block (training only). Input
sides must be divisible by 16. About 9.45 M parameters at w = 16 for 2 classes (backbone
+ segmentation head).

Shapes: input (B, in_channels, X, Y, Z); features (B, w, X, Y, Z); logits (B, C, X, Y, Z).

The last decoder block's output is returned twice: ``decoder_features`` before the last
Dropout3d (what the PCL anchors, the prototype update and the prototype estimation use, so
that training-mode anchors and eval-mode prototypes are the same kind of feature) and
``features`` after it (what the heads see; equal to ``decoder_features`` in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from semiseg.precision import full_precision


def _conv_block(n_convs: int, cin: int, cout: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class VNet(nn.Module):
    """V-Net backbone: (B, in_channels, X, Y, Z) -> features (B, base_filters, X, Y, Z)."""

    def __init__(self, in_channels: int = 1, base_filters: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        w = base_filters
        self.enc1, self.down1 = _conv_block(1, in_channels, w), _down(w, 2 * w)
        self.enc2, self.down2 = _conv_block(2, 2 * w, 2 * w), _down(2 * w, 4 * w)
        self.enc3, self.down3 = _conv_block(3, 4 * w, 4 * w), _down(4 * w, 8 * w)
        self.enc4, self.down4 = _conv_block(3, 8 * w, 8 * w), _down(8 * w, 16 * w)
        self.enc5, self.up5 = _conv_block(3, 16 * w, 16 * w), _up(16 * w, 8 * w)
        self.dec6, self.up6 = _conv_block(3, 8 * w, 8 * w), _up(8 * w, 4 * w)
        self.dec7, self.up7 = _conv_block(3, 4 * w, 4 * w), _up(4 * w, 2 * w)
        self.dec8, self.up8 = _conv_block(2, 2 * w, 2 * w), _up(2 * w, w)
        self.dec9 = _conv_block(1, w, w)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.out_channels = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features after the last Dropout3d, (B, w, X, Y, Z)."""
        return self.dropout(self.decode(x))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Last decoder features before the last Dropout3d, (B, w, X, Y, Z).

        The bottleneck's Dropout3d still applies in training mode; in eval mode (no
        dropout) this equals :meth:`forward`.
        """
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"V-Net input sides must be divisible by 16, got {tuple(x.shape[2:])}")
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.dropout(self.enc5(self.down4(x4)))
        x6 = self.dec6(self.up5(x5) + x4)
        x7 = self.dec7(self.up6(x6) + x3)
        x8 = self.dec8(self.up7(x7) + x2)
        return self.dec9(self.up8(x8) + x1)


class AleatoricHead(nn.Module):
    """Three 1x1x1 branches: logit mean (C), rank-r covariance factor (C*r), positive diagonal (C).

    :meth:`distribution` turns them into a ``LowRankMultivariateNormal`` over the flattened
    logits of each crop (event size C*X*Y*Z, Eq. 5); :meth:`sample` draws S samples
    antithetically (S/2 reparameterised draws mirrored about the mean).
    """

    def __init__(self, in_channels: int, num_classes: int, rank: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_classes, self.rank, self.eps = num_classes, rank, eps
        # The three branches as one 1x1x1 conv (one pass over the features), split after.
        self.branches = nn.Conv3d(in_channels, num_classes * (rank + 2), 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (B, C, X, Y, Z), factor (B, C*r, X, Y, Z), diagonal (B, C, X, Y, Z))."""
        c, r = self.num_classes, self.rank
        mean, factor, log_diag = torch.split(self.branches(features), [c, c * r, c], dim=1)
        diag = torch.exp(log_diag.float().clamp(-20, 10)) + self.eps
        return mean, factor, diag

    @staticmethod
    def _flatten(mean: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor, rank: int, num_classes: int):
        b = mean.shape[0]
        loc = mean.float().reshape(b, -1)
        # factor (B, C*r, X, Y, Z) -> (B, C, r, V) -> (B, C*V, r), matching loc's (C, V) order.
        w = factor.float().reshape(b, num_classes, rank, -1).permute(0, 1, 3, 2).reshape(b, -1, rank)
        return loc, w, diag.float().reshape(b, -1)

    def distribution(self, mean: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor) -> LowRankMultivariateNormal:
        """``LowRankMultivariateNormal`` over the flattened (C, X, Y, Z) logits of each crop (float32).

        Building it factorises the r x r capacitance matrix (for ``log_prob``/``entropy``);
        :meth:`sample` does not need that and draws the same samples without it.
        """
        loc, w, d = self._flatten(mean, factor, diag, self.rank, self.num_classes)
        return LowRankMultivariateNormal(loc, w, d, validate_args=False)

    def sample(self, mean: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Antithetic reparameterised logit samples, (S, B, C, X, Y, Z) float32.

        S/2 draws ``loc + W eps_W + sqrt(D) eps_D`` (exactly
        ``LowRankMultivariateNormal.rsample``'s formula and random-number order), each
        mirrored about the mean (``2 loc - g``).
        """
        if num_samples < 2 or num_samples % 2:
            raise ValueError(f"antithetic sampling needs an even number of samples >= 2, got {num_samples}")
        with full_precision():  # float32 samples under AMP, as the losses that take them
            return self._sample(mean, factor, diag, num_samples)

    def _sample(self, mean: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor, num_samples: int) -> torch.Tensor:
        b, c, r = mean.shape[0], self.num_classes, self.rank
        loc = mean.float().reshape(b, c, -1)  # (B, C, V)
        w = factor.float().reshape(b, c, r, -1)  # (B, C, r, V): W[b, c*V + v, k] = w[b, c, k, v]
        half = num_samples // 2
        # Same random numbers, in the same order, as LowRankMultivariateNormal.rsample.
        eps_w = torch.randn((half, b, r), dtype=loc.dtype, device=loc.device)
        eps_d = torch.randn((half, b, c * loc.shape[-1]), dtype=loc.dtype, device=loc.device).view(half, b, c, -1)
        draws = loc + torch.einsum("bckv,hbk->hbcv", w, eps_w) + diag.float().reshape(b, c, -1).sqrt() * eps_d
        samples = torch.cat([draws, 2 * loc - draws], dim=0)
        return samples.reshape(num_samples, *mean.shape)


class ProjectionHead(nn.Module):
    """Three 1x1x1 convs (BN + ReLU after the first two), unit L2 norm over channels."""

    def __init__(self, in_channels: int, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, channels, 1), nn.BatchNorm3d(channels), nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 1), nn.BatchNorm3d(channels), nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net(features).float()  # float32 under AMP: a float16 sum of squares can overflow
        # Unit L2 norm over channels (as F.normalize, eps 1e-12), in fewer passes over memory.
        return z * torch.rsqrt((z * z).sum(1, keepdim=True).clamp_min(1e-24))


@dataclass
class NetOutput:
    """What :class:`SegmentationNet` returns; absent heads give None."""

    logits: torch.Tensor  # (B, C, X, Y, Z): the segmentation logits (= the aleatoric mean)
    features: torch.Tensor  # (B, w, X, Y, Z): last decoder features after the last Dropout3d (the heads' input)
    decoder_features: torch.Tensor  # (B, w, X, Y, Z): the same before that dropout (PCL, prototypes)
    cov_factor: torch.Tensor | None = None
    cov_diag: torch.Tensor | None = None


class SegmentationNet(nn.Module):
    """V-Net + heads. The aleatoric head's mean branch is the segmentation head.

    With ``aleatoric=False`` only the mean branch (a 1x1x1 conv, the plain V-Net's output
    layer) is built; ``projection`` adds the BCL projection head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_filters: int = 16,
        dropout: float = 0.5,
        aleatoric: bool = True,
        rank: int = 8,
        projection: bool = True,
        projection_channels: int = 16,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels, "num_classes": num_classes, "base_filters": base_filters,
            "dropout": dropout, "aleatoric": aleatoric, "rank": rank, "projection": projection,
            "projection_channels": projection_channels,
        }
        self.backbone = VNet(in_channels, base_filters, dropout)
        self.aleatoric = AleatoricHead(base_filters, num_classes, rank) if aleatoric else None
        self.seg_head = None if aleatoric else nn.Conv3d(base_filters, num_classes, 1)
        self.projection = ProjectionHead(base_filters, projection_channels) if projection else None

    def forward(self, x: torch.Tensor, heads: bool = True) -> NetOutput:
        """``heads=False`` skips the covariance branches (inference). Projections: :meth:`project`.

        Input (B, in_channels, X, Y, Z); the heads run on the features after the last
        Dropout3d, and ``decoder_features`` holds them before it (see the module docstring).
        """
        decoded = self.backbone.decode(x)
        feats = self.backbone.dropout(decoded)
        if self.aleatoric is None:
            return NetOutput(self.seg_head(feats), feats, decoded)
        mean, factor, diag = self.aleatoric(feats)
        if not heads:
            return NetOutput(mean, feats, decoded)
        return NetOutput(mean, feats, decoded, factor, diag)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm projection-head embeddings (B, P, X, Y, Z) of decoder features (B, w, X, Y, Z).

        Separate from :meth:`forward` so that it runs only on the crops BCL uses (the
        labelled ones; batch-norm statistics over those).
        """
        if self.projection is None:
            raise ValueError("this network has no projection head")
        return self.projection(features)

    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Projection-head embeddings (n, P) of n voxels' decoder features (n, w).

        The head is per voxel (1x1x1 convs), so this equals :meth:`project` at those voxels,
        except that batch norm takes its statistics over the n voxels given.
        """
        if self.projection is None:
            raise ValueError("this network has no projection head")
        n, w = rows.shape
        out = self.projection(rows.T.reshape(1, w, n, 1, 1))
        return out.reshape(out.shape[1], n).T

    def sample_logits(self, out: NetOutput, num_samples: int) -> torch.Tensor:
        """(S, B, C, X, Y, Z) antithetic logit samples of a forward pass's distribution."""
        if self.aleatoric is None or out.cov_factor is None:
            raise ValueError("this network has no aleatoric head (or it was skipped)")
        return self.aleatoric.sample(out.logits, out.cov_factor, out.cov_diag, num_samples)
