"""Export archlab checkpoints to other ecosystems (Hugging Face transformers)."""

from .hf import EXPORTABLE, FORMS, NotExportable, export_hf, hf_form

__all__ = ["EXPORTABLE", "FORMS", "NotExportable", "export_hf", "hf_form"]
