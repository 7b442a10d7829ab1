"""Data for training: token shards for pretraining (``text``)."""

from lmforge.corpus import expand_inputs, iter_documents, text_pieces
from lmforge.data.text import (
    TokenShards,
    prepare_corpus,
    tokenizer_sha256,
)

__all__ = [
    "TokenShards",
    "expand_inputs",
    "iter_documents",
    "prepare_corpus",
    "text_pieces",
    "tokenizer_sha256",
]
