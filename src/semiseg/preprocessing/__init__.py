"""Preprocessing: intensity clipping, resampling, foreground cropping, normalisation.

Small pure functions (:mod:`.intensity`, :mod:`.resampling`, :mod:`.cropping`) composed by
:func:`semiseg.preprocessing.pipeline.preprocess_case`, one case per call.
"""

from semiseg.preprocessing.pipeline import PreprocessingParams, preprocess_case

__all__ = ["PreprocessingParams", "preprocess_case"]
