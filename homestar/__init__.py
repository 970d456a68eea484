"""homestar: train GPT models larger than the GPU's memory, with a terminal app on top."""

__version__ = "0.1.0"
