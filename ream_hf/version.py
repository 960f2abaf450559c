"""The package's version, in a module of its own so that any module can record it without importing the package's
`__init__` (which imports transformers' quantizer registry)."""

__version__ = "0.1.0"
