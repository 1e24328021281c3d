"""Model families on one mixer contract (:mod:`ssmlm.models.blocks`): each family file holds its mixer (parallel
forward, recurrent step and state allocation side by side) and its language model, a :class:`BackboneLM`."""

from ssmlm.models.base import LanguageModel
from ssmlm.models.blocks import BackboneLM, Block, Mixer
from ssmlm.models.pretrained import load_pretrained_mamba

__all__ = ["BackboneLM", "Block", "LanguageModel", "Mixer", "load_pretrained_mamba"]
