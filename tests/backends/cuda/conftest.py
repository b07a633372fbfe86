"""Triton kernels run natively on a CUDA GPU, else on CPU tensors under the interpreter.

``TRITON_INTERPRET`` must be set before triton compiles (decorates) the
kernels, so it is set here, before any test module imports them.
"""

from __future__ import annotations

import os

import pytest
import torch

NATIVE = torch.cuda.is_available()
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if NATIVE else "cpu"
# the interpreter mishandles bfloat16 dots: bfloat16 is tested on a GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if NATIVE else [])


@pytest.fixture
def device() -> str:
    return DEVICE
