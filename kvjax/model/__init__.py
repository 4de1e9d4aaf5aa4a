"""The decoder model and its parameter containers."""

from kvjax.model.model import Model, abstract_params, from_flat_params, random_params, to_flat_params
from kvjax.model.transformer import Transformer, forward

__all__ = ["Model", "Transformer", "abstract_params", "forward", "from_flat_params",
           "random_params", "to_flat_params"]
