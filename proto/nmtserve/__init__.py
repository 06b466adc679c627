"""nmtserve's shared, torch-free core: the model bundle format, configuration helpers and the command line."""

__version__ = "0.1.0"
