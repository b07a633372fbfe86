"""The backend registry: names to lazy-import factories.

Each entry is ``"module:callable"``; the module is imported only when its
backend is created, so a device framework (torch's CUDA runtime, triton,
mlx) loads only when selected, and importing this module loads none of
them. Every factory has one signature::

    create(model_config: ModelConfig, weights: dict[str, np.ndarray], options: BackendOptions) -> Backend

and picks from ``options`` what its backend uses (``backends.base.BackendOptions``
says why one neutral options object). With ``options.tensor_parallel_size``
above 1, ``create_backend`` takes the device's tensor-parallel factory from
``_TP_REGISTRY`` instead (``backends/tp``; only the cpu backend has one so far).

``keeps_quantized`` says which backends multiply group-quantized weights
(``model.weights.quant.QuantizedTensor``) natively; the engine hands every
other backend float32 arrays (``--quantization``).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from typing import TYPE_CHECKING

from backends.base import Backend, BackendOptions

if TYPE_CHECKING:
    import numpy as np

    from model.config import ModelConfig

# name -> "module:factory" of the backend on one device.
_REGISTRY = {
    "cpu": "backends.cpu.backend:create",
    "cuda": "backends.cuda.backend:create",
    "metal": "backends.metal.backend:create",
}
# device name -> "module:factory" of its tensor-parallel backend (tensor_parallel_size > 1).
_TP_REGISTRY = {
    "cpu": "backends.tp.executor:create",
}

BACKEND_NAMES = ("auto", *_REGISTRY)

# Whether the cuda backend is handed QuantizedTensor weights (its W4A16/W8A16 Triton GEMM,
# backends/cuda/kernels/quant_matmul.py); False gives it float32 arrays, as before the kernel.
CUDA_KEEPS_QUANTIZED = True
# name -> whether the backend's model runs QuantizedTensor weights (the others get them dequantized).
_KEEPS_QUANTIZED = {
    "cpu": False,                    # the float32 oracle (issue #18: no measured faster quantized path here)
    "cuda": CUDA_KEEPS_QUANTIZED,
    "metal": True,                   # mx.quantized_matmul (backends/metal/weights.py)
}


def _check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")


def resolve_backend_name(name: str) -> str:
    """Map ``auto`` to the best backend available on this machine (cuda, then metal, then cpu)."""
    _check_name(name)
    if name != "auto":
        return name
    try:
        import torch

        if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
            if importlib.util.find_spec("backends.cuda.backend") is not None:
                return "cuda"
    except ImportError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        if importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("backends.metal.backend"):
            return "metal"
    return "cpu"


def keeps_quantized(name: str, tensor_parallel_size: int = 1) -> bool:
    """Whether backend ``name`` (not ``auto``) takes a checkpoint's quantized weights as they are.

    Tensor parallelism shards float arrays (``backends/tp``), so it never does.
    """
    _check_name(name)
    if name == "auto":
        raise ValueError("resolve backend 'auto' with resolve_backend_name before asking what it keeps")
    return tensor_parallel_size == 1 and _KEEPS_QUANTIZED[name]


def create_backend(name: str, model_config: ModelConfig, weights: dict[str, np.ndarray],
                   options: BackendOptions | None = None) -> Backend:
    """Import and construct the backend ``name`` (a name from ``resolve_backend_name``, not ``auto``).

    With ``options.tensor_parallel_size`` > 1 the model is split over that
    many ranks of device ``name`` (its entry in ``_TP_REGISTRY``).
    """
    options = options or BackendOptions()
    _check_name(name)
    if name == "auto":
        raise ValueError("resolve backend 'auto' with resolve_backend_name before creating it")
    target = _REGISTRY[name]
    if options.tensor_parallel_size > 1:
        target = _TP_REGISTRY.get(name)
        if target is None:
            raise ValueError(f"tensor parallelism runs on the cpu backend (gloo) so far, not {name!r}; "
                             f"see the README for the GPU (NCCL) plan")
    module_name, factory = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"backend {name!r} is not available here: {e}") from e
    return getattr(module, factory)(model_config, weights, options)
