"""The native cpu kernels for the tests that exercise them directly (``backends/cpu/native``).

``needs_cc`` skips a module where no C compiler is on PATH (the cpu backend
then runs its torch path); the ``kernel`` and ``ops`` fixtures, imported by
those modules, fail loudly when a compiler is there but the build failed;
``randn`` gives their seeded inputs.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from backends.cpu import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler: the cpu backend uses its torch path")


def randn(*shape, seed=0):
    """A seeded standard-normal float32 tensor of ``shape``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kernel():
    """The paged decode-attention kernel (``native.decode_attention()``)."""
    k = native.decode_attention()
    assert k is not None, "a C compiler is on PATH but the kernels did not build (see the log)"
    return k


@pytest.fixture(scope="module")
def ops():
    """The fused decode operators (``native.decode_ops()``)."""
    o = native.decode_ops()
    assert o is not None, "a C compiler is on PATH but the kernels did not build (see the log)"
    return o
