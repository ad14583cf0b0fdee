"""Automatic mask generation (SAM 2's SAM2AutomaticMaskGenerator), vectorised in numpy/OpenCV."""

from .generator import AutoMaskGenerator, GenerationResult, MaskRecord
from .params import GeneratorParams

__all__ = ["AutoMaskGenerator", "GenerationResult", "GeneratorParams", "MaskRecord"]
