"""Networks: the V-Net backbone with its segmentation, aleatoric and projection heads."""

from semiseg.networks.vnet import AleatoricHead, ProjectionHead, SegmentationNet, VNet

__all__ = ["AleatoricHead", "ProjectionHead", "SegmentationNet", "VNet"]
