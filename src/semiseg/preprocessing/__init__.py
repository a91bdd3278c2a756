"""Preprocessing: intensity clipping, resampling, foreground cropping, normalisation.

Small pure functions (:mod:`.intensity`, :mod:`.resampling`, :mod:`.cropping`,
:mod:`.orientation`) composed by :func:`semiseg.preprocessing.pipeline.preprocess_case`, one
case per call. Cases already preprocessed by the community (LA 2018 ``mri_norm2.h5``) are
converted by :func:`semiseg.preprocessing.community.convert_community_case`.
"""

from semiseg.preprocessing.community import convert_community_case
from semiseg.preprocessing.pipeline import PreprocessingParams, preprocess_case

__all__ = ["PreprocessingParams", "convert_community_case", "preprocess_case"]
