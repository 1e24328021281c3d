"""Model families. Each file holds one family: parallel forward, recurrent step and state allocation."""

from ssmlm.models.base import LanguageModel
from ssmlm.models.pretrained import load_pretrained_mamba

__all__ = ["LanguageModel", "load_pretrained_mamba"]
