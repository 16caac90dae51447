"""Classifiers, autoencoders and the name registry."""

from .autoencoders import ConvAutoencoder, UNetAutoencoder
from .classifiers import Classifier, Normalize
from .registry import MODELS, ModelSpec, create_model, list_models

__all__ = ["Classifier", "ConvAutoencoder", "MODELS", "ModelSpec", "Normalize", "UNetAutoencoder",
           "create_model", "list_models"]
