"""Data: sources -> tokenizers -> token files (prepare) -> random windows (loader).

Public API (the data contract): :func:`prepare_dataset`, :func:`resolve_data`,
:func:`load_meta`, :func:`load_baselines`, :func:`compute_baselines`,
:class:`TokenDataset`, :func:`load_tokenizer`, :class:`TextTokenizer`.
"""

from .baselines import compute_baselines
from .folder import load_baselines
from .loader import TokenDataset
from .prepare import load_meta, prepare_dataset, resolve_data
from .tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "TextTokenizer",
    "TokenDataset",
    "compute_baselines",
    "load_baselines",
    "load_meta",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_data",
]
