"""Compile kernel variants ahead of time for a CUDA target, without a GPU, and read ptxas's verdict.

``compile_variant`` turns a ``KernelLaunch`` (``kernels.variants``) into the
signature Triton's JIT would derive from its arguments (tensors: pointers
aligned to 16 bytes; integers: constant when equal to 1, marked divisible
by 16 when they are, unless the kernel does not specialise on them; floats:
fp32), compiles it with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
(sm_90a, what an H100/H200 runs) and parses the log of the ptxas that ships
in the triton wheel: registers per thread, spill stores and loads, stack
frame. A spill means a variant runs from local memory: the check fails on it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import time
import warnings
from dataclasses import dataclass

import torch

from backends.cuda.kernels.launch import KernelLaunch

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class CompiledVariant:
    """What ptxas reported for one variant (per thread)."""

    name: str                  # the variant's name
    registers: int             # registers per thread (255 is the cap)
    spill_stores: int          # bytes spilled to local memory
    spill_loads: int           # bytes read back from spills
    stack_bytes: int           # stack frame
    shared_bytes: int          # shared memory per program
    num_warps: int             # warps per program
    seconds: float             # compile time

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@functools.lru_cache(maxsize=None)
def jit_function(kernel):
    """The ``JITFunction`` behind ``kernel`` (rebuilt from the source under ``TRITON_INTERPRET=1``, once)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    options = {k: v for k, v in getattr(kernel, "kwargs", {}).items()
               if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    return JITFunction(kernel.fn, **options)


def signature(launch: KernelLaunch) -> tuple[object, dict, dict, dict]:
    """``(jit_fn, signature, constexprs, attrs)`` for ``ASTSource``, as the JIT specialises ``launch``."""
    fn = jit_function(launch.kernel)
    constexprs = {k: v for k, v in launch.meta.items() if k not in LAUNCH_OPTIONS}
    sig, attrs, args = {}, {}, iter(launch.args)
    for i, param in enumerate(fn.params):
        name = fn.arg_names[i]
        if param.is_constexpr:
            if name not in constexprs:
                raise ValueError(f"{fn.__name__}: constexpr {name} missing from the launch")
            sig[name] = "constexpr"
            continue
        value = next(args)
        specialise = not param.do_not_specialize
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if specialise and value == 1:
                sig[name], constexprs[name] = "constexpr", 1
                continue
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
            if specialise and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    if next(args, None) is not None:
        raise ValueError(f"{fn.__name__}: more arguments than parameters")
    return fn, sig, constexprs, attrs


def variant_key(launch: KernelLaunch) -> tuple:
    """What makes a compiled form: kernel, argument types and specialisations, constexprs, warps and stages."""
    fn, sig, constexprs, attrs = signature(launch)
    return (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
            tuple(launch.meta.get(k) for k in LAUNCH_OPTIONS))


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """``(registers, stack, spill stores, spill loads)`` from ``ptxas -v`` output of one kernel."""
    registers, spills = _REGISTERS.search(log), _SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register/spill report in the ptxas log:\n{log}")
    stack, stores, loads = map(int, spills.groups())
    return int(registers.group(1)), stack, stores, loads


def compile_variant(name: str, launch: KernelLaunch, capability: int = 90) -> CompiledVariant:
    """Compile ``launch``'s variant for ``capability`` (90: sm_90a) and read ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, constexprs, attrs = signature(launch)
    options = {k: launch.meta[k] for k in LAUNCH_OPTIONS if k in launch.meta}
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log = True          # ptxas's -v report is printed to stdout
        knobs.compilation.always_compile = True     # a cached binary would print nothing
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                                      options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    registers, stack, stores, loads = parse_ptxas_log(log.getvalue())
    return CompiledVariant(name=name, registers=registers, spill_stores=stores, spill_loads=loads, stack_bytes=stack,
                           shared_bytes=int(compiled.metadata.shared), num_warps=options.get("num_warps", 4),
                           seconds=time.perf_counter() - t0)


def ptxas_available() -> bool:
    """Whether the installed triton carries the NVIDIA backend and its ptxas (no GPU needed)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return bool(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - any failure means: cannot compile for CUDA here
        return False
