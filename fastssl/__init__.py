"""fastssl: self-supervised image pre-training built around a GPU input pipeline."""

__version__ = "0.1.0"
