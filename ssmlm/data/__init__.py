"""Data: tokenizers, text readers, windowed loaders, Lightning data modules and downloads."""

from ssmlm.data.datamodule import ByteDataModule, CharDataModule, TokenDataModule
from ssmlm.data.tokenizers import ByteTokenizer, CharTokenizer, tokenizer_from_dict

__all__ = ["ByteDataModule", "ByteTokenizer", "CharDataModule", "CharTokenizer", "TokenDataModule",
           "tokenizer_from_dict"]
