"""csreft: Compositional Subspace Representation Fine-tuning for frozen causal LMs."""

from .base_models import DEFAULT_MODEL, find_decoder_layers, load_base
from .config import CSReftConfig
from .edits import SubspaceEdits
from .model import CSReftModel, CSReftOutput, get_csreft_model
from .router import Router

__version__ = "0.1.0"

__all__ = [
    "CSReftConfig",
    "CSReftModel",
    "CSReftOutput",
    "DEFAULT_MODEL",
    "Router",
    "SubspaceEdits",
    "find_decoder_layers",
    "get_csreft_model",
    "load_base",
]
