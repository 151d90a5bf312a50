"""Single-device model code, built from the torch-free `ModelSpec`."""

from aiinfra.models.llama import Transformer, apply_rotary, initial_values, model_from_state_dict, rotary_tables
from aiinfra.models.sampling import sample

__all__ = ["Transformer", "apply_rotary", "initial_values", "model_from_state_dict", "rotary_tables", "sample"]
