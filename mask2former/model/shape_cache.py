"""Memoisation of the constant tensors that depend only on feature-map sizes.

Position embeddings, reference points, window index maps and shift masks are the same for every
forward pass at a given input size; computing them once saves hundreds of small operations per
pass. While tracing (ONNX export) or compiling, the function runs uncached so its operations are
recorded from the traced sizes.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
CACHE_SIZE = 64  # entries per function: sizes seen during multi-scale training stay cached


def shape_cached(fn: F) -> F:
    """Cache ``fn`` (arguments: ints, tuples, devices, dtypes) unless tracing or compiling.

    Cached tensors are created outside inference mode, so a tensor first built under
    ``torch.inference_mode`` can later be used by autograd. Callers must not modify them in place.
    """

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def cached(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return cached(*args, **kwargs)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
