"""Aftermath: train one MatFormer language model across a network of unequal machines."""

__version__ = "0.1.0"
