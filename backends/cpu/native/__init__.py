"""Native CPU kernels, compiled on first use with the system C compiler.

``decode_attention()`` returns the paged decode-attention kernel of
``paged_decode_attention.c`` (float32, reads the cache in place through the
block tables, and can write the step's new K/V first); ``decode_ops()`` the
small-batch GEMM and fused elementwise operators of ``decode_ops.c``
(``ops.DecodeOps``), with ``decode_layer.c``'s whole decoder layer in one
call (``layer.py``). Each is None when it cannot be built here (no C
compiler, a compiler error, ``PAGEDGEN_CPU_KERNELS=0``); the cpu backend
then keeps its pure-torch path, which computes the same thing.

The sources are built together into one shared library, once per source
text, compiler and CPU (it is compiled with ``-march=native``), into
``$PAGEDGEN_CACHE_DIR/kernels`` and loaded with ctypes; a call releases the
GIL while it runs. OpenMP resolves
to the runtime torch has already loaded (same soname), so the kernels and
torch share one thread pool.

Where there is no compiler (the CPU container image), or the compiler fails,
the library may come prebuilt: ``build_portable(dir)`` compiles the same
sources for a portable target (x86-64: ``x86-64-v3``, i.e. AVX2, FMA, F16C,
BMI1/2; aarch64: ``armv8-a``; with ``wide=True`` x86-64's ``x86-64-v4``,
AVX-512, which the loader prefers where the CPU has it) into ``pagedgen_cpu-<key>-<target>.so``, the
key hashing the sources and flags, and the loader takes that file from
``PAGEDGEN_CPU_KERNELS_DIR`` (default ``$PAGEDGEN_CACHE_DIR/kernels``) only
if its name matches these sources (a stale library is never loaded) and this
CPU shows every feature the target needs in ``/proc/cpuinfo`` (else it logs
which are missing and the torch path runs: never an illegal instruction). A
compiler, when there is one, still builds for ``-march=native``: the native
build is the faster one, so a prebuilt file is only the fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

from common import envs

if TYPE_CHECKING:
    from backends.cpu.native.ops import DecodeOps

log = structlog.get_logger(__name__)

_SOURCES = tuple(Path(__file__).with_name(name)
                 for name in ("paged_decode_attention.c", "decode_ops.c", "decode_layer.c", "gemm.c"))
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Portable builds: platform.machine() -> (the -march, the /proc/cpuinfo flags a CPU needs to run that code).
# x86-64-v3 as GCC and clang define it (v1 + v2 + v3 features; ``pni`` is SSE3, ``abm`` LZCNT), but for
# ``syscall``, an instruction compiled C never contains. Every armv8-a CPU runs armv8-a code.
PORTABLE_TARGETS: dict[str, tuple[str, frozenset[str]]] = {
    "x86_64": ("x86-64-v3", frozenset({
        "cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2",
        "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
        "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})),
    "aarch64": ("armv8-a", frozenset()),
}
# A wider portable build next to the baseline, taken where the CPU has its features (the batched GEMM and
# decode attention run 16-wide there): x86-64-v4 as GCC and clang define it (v3 + AVX-512 F/BW/CD/DQ/VL).
WIDE_TARGETS: dict[str, tuple[str, frozenset[str]]] = {
    "x86_64": ("x86-64-v4", PORTABLE_TARGETS["x86_64"][1] | frozenset({
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
}
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
_lock = threading.Lock()
_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpuinfo_flags_line() -> str:
    """The first ``flags`` (x86) or ``Features`` (arm) line of /proc/cpuinfo; "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo names them, or None where it cannot be read."""
    line = _cpuinfo_flags_line()
    return frozenset(line.partition(":")[2].split()) if line else None


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    return f"{platform.machine()}|{platform.processor()}|{_cpuinfo_flags_line()}"


def _machine() -> str:
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def _portable_flags(march: str) -> tuple[str, ...]:
    return ("-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC")


def prebuilt_name(sources: tuple[Path, ...] = _SOURCES, machine: str | None = None, wide: bool = False) -> str | None:
    """The file name of the portable library of ``sources`` for ``machine`` (this one by default):
    ``pagedgen_cpu-<key>-<march>.so``, the key hashing the sources and the flags; None for a machine
    without a portable target (``wide``: without a wide one, ``WIDE_TARGETS``)."""
    entry = (WIDE_TARGETS if wide else PORTABLE_TARGETS).get(machine or _machine())
    if entry is None:
        return None
    flags = _portable_flags(entry[0])
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in sources), " ".join(flags).encode()])).hexdigest()[:16]
    return f"pagedgen_cpu-{key}-{entry[0]}.so"


def prebuilt_dir() -> Path:
    """Where prebuilt libraries are looked for: ``PAGEDGEN_CPU_KERNELS_DIR``, else ``$PAGEDGEN_CACHE_DIR/kernels``."""
    configured = envs.get_str("PAGEDGEN_CPU_KERNELS_DIR")
    return Path(configured).expanduser() if configured else envs.cache_dir() / "kernels"


def _compile(compiler: str, flags: tuple[str, ...], sources: tuple[Path, ...], target: Path) -> None:
    """Compile ``sources`` into ``target`` (written whole or not at all)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-o", str(built), *map(str, sources), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)              # atomic: concurrent builders agree on the file


def _build(compiler: str, sources: tuple[Path, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in sources), version.encode(),
                                     " ".join(_FLAGS).encode(), _cpu_signature().encode()])).hexdigest()[:16]
    target = envs.cache_dir() / "kernels" / f"pagedgen_cpu-{key}.so"
    if target.exists():
        return target
    _compile(compiler, _FLAGS, sources, target)
    log.info("cpu_kernel_built", path=str(target))
    return target


def build_portable(out_dir: str | Path, compiler: str | None = None, sources: tuple[Path, ...] = _SOURCES,
                   wide: bool = False) -> Path:
    """Compile ``sources`` for this machine's portable target (``wide``: its wide one, ``WIDE_TARGETS``)
    into ``out_dir``/``prebuilt_name()``, for hosts without a compiler (the container image's build stage
    runs this for both); returns the file's path. Raises RuntimeError where there is no compiler, no such
    target for this machine, or the build fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc, clang) on PATH and CC unset")
    machine = _machine()
    targets = WIDE_TARGETS if wide else PORTABLE_TARGETS
    name = prebuilt_name(sources, machine, wide)
    if name is None:
        raise RuntimeError(f"no {'wide ' if wide else ''}portable target for {machine!r} "
                           f"(known: {', '.join(targets)})")
    target = Path(out_dir) / name
    _compile(compiler, _portable_flags(targets[machine][0]), sources, target)
    log.info("cpu_kernel_built", path=str(target), target=targets[machine][0])
    return target


def _open_prebuilt(why: str, sources: tuple[Path, ...], wide: bool) -> tuple[ctypes.CDLL | None, str, str]:
    """One portable library of ``sources`` from ``prebuilt_dir()`` (``wide``: the ``WIDE_TARGETS`` one):
    ``(library, target, path)`` where it is there and this CPU can run it, else ``(None, target, the
    reason to log)``; ``why``: why there is no native build."""
    machine = _machine()
    name = prebuilt_name(sources, machine, wide)
    if name is None:
        return None, "", f"{why}; no {'wide ' if wide else ''}portable target for {machine!r}"
    march, needed = (WIDE_TARGETS if wide else PORTABLE_TARGETS)[machine]
    path = prebuilt_dir() / name
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob(f"pagedgen_cpu-*-{march}.so")) if path.parent.is_dir() else []
        stale = f" ({', '.join(others)}: built from other sources)" if others else ""
        return None, march, f"{why}; no prebuilt library for these sources at {path}{stale}"
    flags = _cpu_flags() if needed else frozenset()
    missing = sorted(needed - flags) if flags is not None else ["(cannot read /proc/cpuinfo)"]
    if missing:
        return None, march, (f"{why}; this CPU lacks {', '.join(missing)}, which the prebuilt {march} library "
                             f"{path} needs")
    try:
        return ctypes.CDLL(str(path)), march, str(path)
    except OSError as e:
        return None, march, f"{why}; cannot load {path}: {e}"[:1000]


def _load_prebuilt(why: str, sources: tuple[Path, ...] = _SOURCES) -> ctypes.CDLL | None:
    """The portable library of ``sources`` from ``prebuilt_dir()`` where this CPU can run it, else None;
    ``why``: why there is no native build. The wide one first, where there is one and this CPU runs it
    (passed over without a word otherwise), then the baseline. Either way it is logged (once per process,
    by ``_compiled``)."""
    for wide in (True, False):
        library, march, detail = _open_prebuilt(why, sources, wide)
        if library is not None:
            log.info("cpu_kernel_prebuilt_loaded", path=detail, target=march, why=why)
            return library
    log.warning("cpu_kernel_unavailable", reason=detail, fallback="torch attention and operators")
    return None


def rows_of_heads(t: torch.Tensor, rows: int, heads: int, head_dim: int) -> bool:
    """``t`` is float32 ``[rows, heads, head_dim]`` with each row's heads contiguous (rows may be strided)."""
    return (t.dtype == torch.float32 and tuple(t.shape) == (rows, heads, head_dim) and t.stride(2) == 1
            and t.stride(1) == head_dim and t.stride(0) >= heads * head_dim)


class DecodeAttentionKernel:
    """ctypes binding of ``pagedgen_decode_attention_f32``."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.pagedgen_decode_attention_f32
        self._fn.argtypes = [_ptr, _ptr, _ptr, _i64, _ptr, _i32, _ptr, _i32, _i32, _i32, _i32, _i32,
                             ctypes.c_float, _i32, ctypes.c_float, _ptr, _i32, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i32]
        self._fn.restype = ctypes.c_int
        limits = [_i32(), _i32(), _i32()]
        library.pagedgen_decode_attention_limits(*(ctypes.byref(x) for x in limits))
        self.max_group, self.max_head_dim, self.max_block_size = (x.value for x in limits)

    def supports(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
        return (num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= self.max_group
                and head_dim <= self.max_head_dim and head_dim % 8 == 0 and block_size <= self.max_block_size)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None, num_threads: int | None = None,
                 window: int | None = None, softcap: float | None = None,
                 new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``q`` ``[n, H, D]`` float32 -> ``[n, H, D]``; caches ``[NB, bs, Hkv, D]``;
        ``block_tables`` ``[n, max_blocks]`` int32; ``context_lens`` ``[n]`` int32.

        ``q``'s rows may be strided (heads of each row contiguous: a view of a
        fused QKV buffer); ``out`` (written in place and returned) must be contiguous.

        ``window``: each query sees only its last ``window`` positions;
        ``softcap``: scores become ``softcap * tanh(s / softcap)``.
        ``new_kv``: ``(k, v, slots)``, the step's new rows ``[T, Hkv, D]`` (rows may be strided, like
        ``q``'s) and their cache slots ``[T]`` int64, written into the caches before anyone attends
        (``write_kv_cache_ref``)."""
        n, num_heads, head_dim = q.shape
        num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
        if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != head_dim \
                or q.stride(0) < num_heads * head_dim:
            raise ValueError(f"q must be a float32 [n, H, D] tensor with contiguous rows, got {q.dtype} strides "
                             f"{q.stride()}")
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous float32 tensor")
        if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
            raise ValueError("block_tables and context_lens must be int32")
        if (cache_dim != head_dim or v_cache.shape != k_cache.shape or block_tables.dim() != 2
                or block_tables.shape[0] != n or context_lens.shape != (n,)):
            raise ValueError("inconsistent shapes for paged decode attention")
        block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)                                   # [n, H, D]
        elif out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 {tuple(q.shape)} tensor, got {tuple(out.shape)}")
        k_ptr = v_ptr = slot_ptr = None
        k_stride = v_stride = num_new = 0
        if new_kv is not None:
            k_new, v_new, slots = new_kv
            num_new = slots.shape[0]
            if not rows_of_heads(k_new, num_new, num_kv_heads, head_dim) \
                    or not rows_of_heads(v_new, num_new, num_kv_heads, head_dim):
                raise ValueError(f"new k and v must be float32 [{num_new}, {num_kv_heads}, {head_dim}] with "
                                 f"contiguous rows, got {tuple(k_new.shape)} strides {k_new.stride()} and "
                                 f"{tuple(v_new.shape)} strides {v_new.stride()}")
            if slots.dtype != torch.int64 or slots.dim() != 1 or not slots.is_contiguous():
                raise ValueError("slots must be a contiguous [T] int64 tensor")
            k_ptr, v_ptr, slot_ptr = k_new.data_ptr(), v_new.data_ptr(), slots.data_ptr()
            k_stride, v_stride = k_new.stride(0), v_new.stride(0)
        status = self._fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks, block_tables.data_ptr(),
                          block_tables.shape[1], context_lens.data_ptr(), n, num_heads, num_kv_heads,
                          head_dim, block_size, scale, window or 0, softcap or 0.0, out.data_ptr(),
                          num_threads or torch.get_num_threads(), q.stride(0), k_ptr, k_stride, v_ptr, v_stride,
                          slot_ptr, num_new)
        if status == -2:
            raise ValueError(f"paged decode attention: a context length, block id or slot is out of range "
                             f"({num_blocks} blocks of {block_size}, {block_tables.shape[1]} table columns)")
        if status != 0:
            raise ValueError(f"paged decode attention does not support heads={num_heads}, "
                             f"kv_heads={num_kv_heads}, head_dim={head_dim}, block_size={block_size}")
        return out


def _library() -> ctypes.CDLL | None:
    """The compiled library of every kernel, or None where it is switched off or cannot be built."""
    return _compiled() if envs.get_bool("PAGEDGEN_CPU_KERNELS") else None


@lru_cache(maxsize=1)
def _compiled() -> ctypes.CDLL | None:
    """The library built from ``_SOURCES`` for this CPU (once per process); without a compiler, or where
    the build fails, the prebuilt portable one (``_load_prebuilt``); else None (logged once)."""
    compiler = _compiler()
    if compiler is None:
        return _load_prebuilt("no C compiler (cc, gcc, clang) on PATH")
    try:
        with _lock:
            path = _build(compiler, _SOURCES)
        return ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return _load_prebuilt(str(e)[:500])


@lru_cache(maxsize=1)
def decode_attention() -> DecodeAttentionKernel | None:
    """The compiled attention kernel, or None where it cannot be built (logged once)."""
    library = _library()
    return None if library is None else DecodeAttentionKernel(library)


@lru_cache(maxsize=1)
def decode_ops() -> "DecodeOps | None":
    """The compiled small-batch operators (``ops.DecodeOps``), or None where they cannot be built (logged once)."""
    from backends.cpu.native.ops import DecodeOps

    library = _library()
    return None if library is None else DecodeOps(library)
