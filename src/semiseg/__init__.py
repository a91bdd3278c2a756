"""semiseg: two-stage semi-supervised 3D medical image segmentation pipeline.

Stages live in sub-packages: :mod:`semiseg.io` (raw readers, HDF5 case files),
:mod:`semiseg.data` (synthetic demo data), :mod:`semiseg.preprocessing`,
:mod:`semiseg.splits`, :mod:`semiseg.datasets` and :mod:`semiseg.config`.
"""

__version__ = "0.1.0"
