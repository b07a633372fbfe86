"""How big each section of the GPU check is: ``quick`` (4 minutes), ``full`` (8) and ``dry-run`` (CPU)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CheckPlan:
    """Sizes and limits of one run of the check."""

    name: str                                     # "quick", "full" or "dry-run"
    device: str                                   # "cuda"; "cpu" for the dry run (Triton interpreter)
    dtype: str                                    # model dtype of (d)-(h)
    time_limit_s: float                           # the whole run; sections that no longer fit are skipped
    test_args: tuple[str, ...]                    # pytest arguments of (a), after the test directory
    test_timeout_s: float                         # (a) at most
    attention_heads: tuple[int, int, int]         # (query heads, KV heads, head_dim) of (b) and (c)
    decode_cases: tuple[tuple[int, int], ...]     # (batch, context) of (b)
    prefill_cases: tuple[tuple[int, int], ...]    # (requests, prompt length) of (c)
    timed_iters: int                              # launches per timing in (b), (c) and (i)
    quant_bits: tuple[int, ...]                   # (i): code widths timed
    quant_shapes: tuple[tuple[int, int], ...]     # (i): weight shapes N x K
    quant_tokens: tuple[int, ...]                 # (i): rows of activations (decode batch sizes)
    quant_group: int                              # (i) and the 4-bit run of (f): values per scale
    quant_mode: str | None                        # (f): graph mode of the 4-bit-weight run (None: none)
    model: str                                    # "llama-3.1-8b" or "tiny" (models.SPECS)
    modes: tuple[str, ...]                        # cuda_graph_mode values of (d)-(h)
    parity_requests: int                          # (e): sequences
    parity_prompt_len: int                        # (e): prompt tokens of each
    parity_decode_steps: int                      # (e): teacher-forced decode steps after the prefill
    num_requests: int                             # (f): requests per mode
    prompt_lens: tuple[int, int]                  # (f): prompt length range (inclusive)
    output_lens: tuple[int, int]                  # (f): output length range (inclusive)
    hf_requests: int                              # (f): the first this many run through HF generate()
    hf_batch_size: int                            # (f): HF static batch
    max_num_seqs: int                             # engine options of (d)-(h)
    max_num_batched_tokens: int
    max_model_len: int
    gpu_memory_utilization: float
    num_kv_blocks: int | None                     # None: sized from gpu_memory_utilization (a GPU)
    serve_backend: str                            # (g): "cuda"; "cpu" in the dry run
    serve_timeout_s: float                        # (g): start to SERVING at most

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        if not set(self.modes) <= {"none", "piecewise", "full"} or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of none, piecewise, full: {self.modes}")
        if self.hf_requests > self.num_requests or min(self.prompt_lens + self.output_lens) < 1:
            raise ValueError("hf_requests must be <= num_requests and lengths >= 1")
        if self.parity_prompt_len + self.parity_decode_steps > self.max_model_len:
            raise ValueError("parity sequences must fit max_model_len")
        if self.quant_mode is not None and self.quant_mode not in self.modes:
            raise ValueError(f"quant_mode {self.quant_mode!r} must be one of the modes {self.modes}")


FULL = CheckPlan(
    name="full", device="cuda", dtype="bfloat16", time_limit_s=470.0,
    test_args=("-m", "not slow"), test_timeout_s=150.0,
    attention_heads=(32, 8, 128),
    decode_cases=((1, 32768), (8, 8192), (64, 2048), (256, 1024)),
    prefill_cases=((8, 1024), (4, 4096), (1, 16384)), timed_iters=10,
    quant_bits=(4, 8), quant_shapes=((6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)),
    quant_tokens=(1, 4, 16), quant_group=32, quant_mode="full",
    model="llama-3.1-8b", modes=("none", "piecewise", "full"),
    parity_requests=4, parity_prompt_len=64, parity_decode_steps=16,
    num_requests=256, prompt_lens=(128, 512), output_lens=(128, 256), hf_requests=128, hf_batch_size=64,
    max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=4096, gpu_memory_utilization=0.9,
    num_kv_blocks=None, serve_backend="cuda", serve_timeout_s=120.0,
)

QUICK = replace(
    FULL, name="quick", time_limit_s=230.0,
    test_args=("-m", "not slow", "--ignore=tests/backends/cuda/test_aot_compile.py"), test_timeout_s=75.0,
    decode_cases=((1, 32768), (64, 2048)), prefill_cases=((4, 4096),), quant_tokens=(1, 16),
    modes=("none", "full"), num_requests=256, output_lens=(64, 128), hf_requests=64,
)

DRY_RUN = CheckPlan(
    name="dry-run", device="cpu", dtype="float32", time_limit_s=900.0,
    test_args=("--collect-only", "-q"), test_timeout_s=240.0,
    attention_heads=(4, 2, 16), decode_cases=((2, 64),), prefill_cases=((1, 32),), timed_iters=1,
    quant_bits=(4,), quant_shapes=((96, 64),), quant_tokens=(1, 3), quant_group=32, quant_mode="full",
    model="tiny", modes=("none", "piecewise", "full"),
    parity_requests=2, parity_prompt_len=12, parity_decode_steps=2,
    num_requests=3, prompt_lens=(4, 8), output_lens=(2, 3), hf_requests=2, hf_batch_size=2,
    max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, gpu_memory_utilization=0.9,
    num_kv_blocks=64, serve_backend="cpu", serve_timeout_s=180.0,
)

PLANS = {p.name: p for p in (FULL, QUICK, DRY_RUN)}
