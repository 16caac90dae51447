"""Shields (purifiers), detectors and the shielded pipeline."""

from .base import (REJECT, AutoencoderPurifier, Detector, InputError, Purifier, Shielded,
                   predict, validate_images)

__all__ = ["REJECT", "AutoencoderPurifier", "Detector", "InputError", "Purifier", "Shielded",
           "predict", "validate_images"]
