"""Engine options, validated once, shared by the offline API, the service and the CLI.

``EngineArgs`` also declares its command-line flags, once, for every command
that builds an engine (``pagedgen serve``, ``bench offline``, ``bench serve
--launch``, a torchrun worker rank): ``add_cli_args`` adds them to a parser,
``from_cli_args`` reads them back, and ``to_cli_flags`` renders options as
``pagedgen serve`` flags again. Each flag is ``--`` plus the field's name with
dashes; the booleans, on by default, are switched off by ``--no-`` plus the
flag (``--no-enable-prefix-caching``, ``--no-async-scheduling``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

from backends.base import AUTO_DTYPE, DTYPES as BACKEND_DTYPES
from backends.registry import BACKEND_NAMES
from scheduler.scheduler import SCHEDULING_POLICIES

DTYPES = (AUTO_DTYPE, *BACKEND_DTYPES)  # "auto": the backend's choice (float32 on cpu, bfloat16 on metal and cuda)
DEFAULT_KV_CACHE_MEMORY = 1 << 30       # 1 GiB of KV cache on the CPU when nothing is said
CUDA_GRAPH_MODES = ("none", "piecewise", "full")
# auto: keep a checkpoint's quantized weights (GGUF Q4_0/Q4_1/Q5/Q8_0/K-quants, MLX affine) where the
# backend multiplies them natively (backends.registry.keeps_quantized); none: dequantize to float32.
QUANTIZATION_MODES = ("auto", "none")

# Size suffixes of parse_bytes: decimal (kB, MB...) and binary (K, KiB, M, MiB...), any case.
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """ "2GiB", "512MiB", "1.5G" (binary), "500MB" (decimal) or plain bytes; an argparse type."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None            # None: the embedded default (SmolLM2-135M-Instruct GGUF)
    backend: str = "auto"               # auto | cpu | cuda | metal
    dtype: str = AUTO_DTYPE             # compute and KV cache dtype; auto: the backend's (the engine reports which)
    kv_cache_memory: int | None = None  # bytes for the KV cache; default DEFAULT_KV_CACHE_MEMORY
    num_kv_blocks: int | None = None    # explicit block count, overrides kv_cache_memory
    max_num_seqs: int = 256             # running requests per step at most
    max_num_batched_tokens: int = 2048  # tokens per step at most (chunked prefill beyond)
    max_model_len: int | None = None    # context limit; default the model's
    block_size: int = 16                # tokens per KV block
    seed: int = 0                       # seed of unseeded sampling
    enable_prefix_caching: bool = True
    max_queue: int | None = None        # waiting requests at most (async engine); None: unbounded
    max_prompt_tokens: int | None = None  # prompt tokens per request at most; None: max_model_len - 1
    num_threads: int | None = None      # CPU threads for the cpu backend; None: all cores
    tensor_parallel_size: int = 1       # ranks the model is split over (worker processes; backends/tp)
    gpu_memory_utilization: float = 0.9  # cuda, metal: share of GPU memory this engine may use (KV cache sized from it)
    cuda_graph_mode: str = "full"       # cuda: none | piecewise | full
    scheduling_policy: str = "fcfs"     # fcfs | priority: the waiting queue's order (vLLM's --scheduling-policy)
    default_time_limit_ms: int | None = None  # time limit of requests that set none; None: unlimited
    quantization: str = "auto"          # auto | none: keep the file's quantized weights where the backend can
    async_scheduling: bool = True       # lay out step t+1 while step t runs, where the backend can (metal)

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
        optional_positive = ("kv_cache_memory", "num_kv_blocks", "max_model_len", "num_threads", "max_prompt_tokens")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise ValueError(f"max_queue must be a non-negative integer, got {self.max_queue!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.default_time_limit_ms is not None and (not isinstance(self.default_time_limit_ms, int)
                                                       or self.default_time_limit_ms < 1):
            raise ValueError(f"default_time_limit_ms must be a positive integer, got {self.default_time_limit_ms!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)} (auto: keep the "
                             f"checkpoint's quantized weights where the backend has kernels; none: dequantize "
                             f"to float32), got {self.quantization!r}")
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cuda_graph_mode not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph_mode must be one of {', '.join(CUDA_GRAPH_MODES)}, "
                             f"got {self.cuda_graph_mode!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    # -- the command line ----------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                     exclude: Iterable[str] = ()) -> None:
        """Add a flag per option to ``parser`` (a parser or an argument group), dest = the field name.

        ``exclude`` leaves out the options a command declares otherwise
        (``bench``'s ``--seed`` is its dataset's); ``from_cli_args`` then
        reads them from the namespace where present, else the field default.
        """
        exclude = set(exclude)
        unknown = exclude - set(cls.field_names())
        if unknown:
            raise ValueError(f"not EngineArgs fields: {', '.join(sorted(unknown))}")
        for name in cls.field_names():
            if name in exclude:
                continue
            flag = _FLAGS[name]
            if name in _SWITCHES:
                parser.add_argument(_SWITCHES[name], dest=name, action="store_false", help=flag.help)
                continue
            parser.add_argument(_flag_name(name), dest=name, type=flag.type, choices=flag.choices,
                                default=_cli_default(name), help=flag.help)

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> EngineArgs:
        """The options a parsed command line holds (its other attributes are ignored); validates them."""
        given = vars(namespace)
        return cls(**{name: given[name] for name in cls.field_names() if name in given})

    def to_cli_flags(self, *, exclude: Iterable[str] = ()) -> list[str]:
        """These options as ``pagedgen serve`` flags: those that differ from the command line's defaults.

        ``EngineArgs.from_cli_args(parser.parse_args(flags))`` on a parser of
        ``add_cli_args`` gives these options back (the ``exclude``d ones aside).
        """
        flags = []
        for name in self.field_names():
            value = getattr(self, name)
            if name in exclude or value is None or value == _cli_default(name):
                continue
            if name in _SWITCHES:
                flags.append(_SWITCHES[name])
            else:
                flags += [_flag_name(name), str(value)]
        return flags


_FIELD_DEFAULT = object()               # a _Flag's default: the dataclass field's


@dataclass(frozen=True)
class _Flag:
    """How one ``EngineArgs`` field reads on the command line."""

    help: str                                  # the --help text
    type: Callable[[str], Any] | None = None   # argparse's type; None: the text as given
    choices: tuple[str, ...] | None = None     # the values argparse accepts; None: any (EngineArgs validates)
    default: Any = _FIELD_DEFAULT              # the command line's default where it is not the field's


_FLAGS: dict[str, _Flag] = {
    "model": _Flag("a .gguf file or a local Hugging Face model directory "
                   "(default: embedded SmolLM2-135M-Instruct)"),
    "backend": _Flag("device backend", choices=BACKEND_NAMES),
    "dtype": _Flag("compute and KV cache dtype; auto: float32 on cpu, bfloat16 on metal and cuda "
                   "(float16 on CUDA GPUs without native bfloat16)", choices=DTYPES),
    "kv_cache_memory": _Flag("memory for the KV cache, e.g. 2GiB, 512MiB or bytes "
                             "(default: the engine's, 1GiB on CPU)", type=parse_bytes),
    "num_kv_blocks": _Flag("explicit KV block count (overrides --kv-cache-memory)", type=int),
    "max_num_seqs": _Flag("running requests per step at most", type=int),
    "max_num_batched_tokens": _Flag("tokens per step at most", type=int),
    "max_model_len": _Flag("context limit per request (default: the model's)", type=int),
    "block_size": _Flag("tokens per KV cache block", type=int),
    "seed": _Flag("seed of unseeded sampling", type=int),
    "enable_prefix_caching": _Flag("disable automatic prefix caching"),
    "max_queue": _Flag("waiting requests at most; more get RESOURCE_EXHAUSTED", type=int, default=1024),
    "max_prompt_tokens": _Flag("prompt tokens per request at most; longer prompts get INVALID_ARGUMENT "
                               "(default: the context, max-model-len - 1)", type=int),
    "num_threads": _Flag("CPU threads of the cpu backend (default: all cores)", type=int),
    "tensor_parallel_size": _Flag("split the model over N ranks (worker processes over torch.distributed; "
                                  "threads shared)", type=int),
    "gpu_memory_utilization": _Flag("cuda, metal: share of GPU memory (metal: of Metal's recommended working "
                                    "set) the engine may use; the KV cache gets what the model and a step leave", type=float),
    "cuda_graph_mode": _Flag("cuda: full graphs for decode steps, piecewise graphs around eager attention, "
                             "or none", choices=CUDA_GRAPH_MODES),
    "scheduling_policy": _Flag("order of the waiting queue: fcfs (arrival) or priority (each request's priority, "
                               "lower first; ties by arrival); a non-zero priority under fcfs is INVALID_ARGUMENT",
                               choices=SCHEDULING_POLICIES),
    "default_time_limit_ms": _Flag("time limit of requests that set no time_limit_ms: past it a completion ends "
                                   "with finish reason time_limit and the text so far (default: none)", type=int),
    "async_scheduling": _Flag("lay out and submit the next decode step before the current one's tokens reach the "
                              "host, so the host's scheduling, detokenizing and streaming overlap the device "
                              "(metal; other backends step synchronously); this flag turns it off"),
    "quantization": _Flag("auto: keep a quantized checkpoint's weights quantized where the backend has kernels "
                          "(metal, cuda; GGUF Q4_0/Q4_1/Q5/Q8_0/Q4_K/Q5_K/Q6_K, MLX affine); none: dequantize "
                          "them to float32 (the cpu backend always does)", choices=QUANTIZATION_MODES),
}


# The boolean options (on by default) and the flag that switches each off.
_SWITCHES = {"enable_prefix_caching": "--no-enable-prefix-caching", "async_scheduling": "--no-async-scheduling"}


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_default(name: str) -> Any:
    """A field's default on the command line: its ``_Flag.default`` where set, else the dataclass default."""
    flag = _FLAGS[name]
    if flag.default is not _FIELD_DEFAULT:
        return flag.default
    return next(f.default for f in fields(EngineArgs) if f.name == name)
