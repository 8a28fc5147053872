"""Data: sources -> tokenizers -> token files (prepare) -> random windows (loader).

Public API (the data contract): :func:`prepare_dataset`, :func:`resolve_data`,
:func:`load_meta`, :class:`TokenDataset`, :func:`load_tokenizer`, :class:`TextTokenizer`.
"""

from .loader import TokenDataset
from .prepare import load_meta, prepare_dataset, resolve_data
from .tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "TextTokenizer",
    "TokenDataset",
    "load_meta",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_data",
]
