"""Self-supervised methods. Each registers a builder `build(cfg: Config) -> Method` in METHODS."""

from fastssl.methods.base import METHODS, LossOutput, Method, build_method

__all__ = ["METHODS", "LossOutput", "Method", "build_method"]
