"""The cuda backend: the shared Llama model on a GPU with Triton kernels and CUDA graphs.

Life (see ``backends/base.py``):

1. construction loads the fused weights onto the device (bfloat16 by
   default, float16 where the GPU has no native bfloat16: ``default_dtype``;
   float32 too), the step buffers and the sampler;
2. ``profile_kv_cache_memory()`` (called by the engine when no explicit KV
   size is given) runs a worst-case step, captures the piecewise graphs or a
   trial full graph, and returns the bytes ``gpu_memory_utilization`` leaves
   for the KV cache (``backends.cuda.memory``);
3. ``allocate_kv_cache`` allocates ``[num_blocks, block_size, Hkv, D]`` K and
   V per layer, on a GPU sets the float32 matmul precision (``allow_tf32``)
   and runs ``warm_up`` (every attention variant compiled: one per KV split
   count, and the prefill tile), then captures the graphs of
   ``cuda_graph_mode`` that are not captured yet (full graphs read the
   cache, so they come after it);
4. ``execute``: the dispatcher (``backends.cuda.graphs``) picks a full-graph
   replay, piecewise replays around eager attention, or an eager step; the
   sampler runs on the device and syncs once per step (``tolist``).

With ``device="cpu"`` (tests, under ``TRITON_INTERPRET=1``) the same code
runs without memory profiling, graphs replayed eagerly (``EagerGraph``).
"""

from __future__ import annotations

import numpy as np
import structlog
import torch

from backends.cuda.attention import DEFAULT_BLOCK_N, TritonAttention, TritonAttentionMetadata
from backends.cuda.inputs import PinnedStaging, upload_full_step, upload_step
from backends.cuda.graphs import (CUDA_GRAPH_MODES, CapturedGraph, EagerGraph, GraphDispatcher, capture_graphs,
                                  graph_batch_sizes, piecewise_token_sizes)
from backends.cuda.kernels.paged_attention import AttentionPlan, block_shape, choose_num_splits
from backends.cuda.kernels.quant_matmul import SUPPORTED_BITS as QUANT_BITS
from backends.cuda.memory import kv_block_bytes, kv_cache_bytes, num_kv_blocks
from backends.cuda.model import CUDAModel, StepBuffers
from backends.sampler import Sampler
from backends.torch_model.weights import ModelWeights, load_weights
from model.config import ModelConfig
from backends.base import Backend, BackendOptions, run_step
from backends.input_batch import InputBatch, StepInputs
from backends.cpu.backend import TORCH_LOGIT_ROWS
from scheduler.output import SchedulerOutput, StepResult

log = structlog.get_logger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def weights_to(weights: ModelWeights, device: torch.device) -> ModelWeights:
    """``weights`` with every tensor on ``device`` (a tied LM head stays tied)."""
    tied = weights.lm_head is weights.embed
    for layer in weights.layers:
        for name, t in vars(layer).items():
            if t is not None:
                setattr(layer, name, t.to(device))
    weights.embed = weights.embed.to(device)
    weights.final_norm = weights.final_norm.to(device)
    weights.lm_head = weights.embed if tied else weights.lm_head.to(device)
    return weights


class CUDABackend(Backend):
    """``Backend`` on an NVIDIA (or ROCm) GPU."""

    name = "cuda"

    def __init__(self, model_config: ModelConfig, weights: dict[str, np.ndarray] | ModelWeights,
                 dtype: str = "bfloat16", seed: int = 0,
                 eos_token_ids: tuple[int, ...] = (), gpu_memory_utilization: float = 0.9,
                 cuda_graph_mode: str = "full", max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, device: str = "cuda") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if cuda_graph_mode not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph_mode must be one of {', '.join(CUDA_GRAPH_MODES)}, got {cuda_graph_mode!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("the cuda backend needs a CUDA GPU (torch.cuda.is_available() is False)")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self._torch_dtype = DTYPES[dtype]
        self.model_config = model_config
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cuda_graph_mode = cuda_graph_mode
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len or model_config.max_position_embeddings
        c = model_config
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 1
        self.attention = TritonAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                         num_sms=self.num_sms, block_n=DEFAULT_BLOCK_N)
        if not isinstance(weights, ModelWeights):
            weights = load_weights(c, weights, self._torch_dtype, keep_quantized=QUANT_BITS)   # 4/8-bit stay packed
        self.model = CUDAModel(c, weights_to(weights, self.device), self.attention)
        self.full_sizes = graph_batch_sizes(max_num_seqs) if cuda_graph_mode == "full" else []
        self.buffers = StepBuffers.allocate(c, max(max_num_batched_tokens, max_num_seqs, *self.full_sizes),
                                            self._torch_dtype, self.device)
        self.sampler = Sampler(eos_token_ids or c.eos_token_ids, seed=seed, device=self.device)
        self.piecewise_sizes = piecewise_token_sizes(max_num_seqs, max_num_batched_tokens) \
            if cuda_graph_mode == "piecewise" else []
        self.dispatcher = GraphDispatcher(cuda_graph_mode, self.full_sizes, self.piecewise_sizes)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.num_blocks = 0
        self.capture_stats = None                       # CaptureStats once graphs are captured
        self._pool = None
        self._full_graphs: dict[int, CapturedGraph | EagerGraph] = {}       # decode batch -> graph
        self._piece_graphs: dict[int, list[CapturedGraph | EagerGraph]] = {}  # tokens -> graph per piece
        self._static = None                             # full-graph metadata buffers

    # -- KV cache sizing ---------------------------------------------------------

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs across all layers (K and V)."""
        c = self.model_config
        return kv_block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim,
                              torch.empty((), dtype=self._torch_dtype).element_size())

    def num_blocks_for_memory(self, memory_bytes: int, block_size: int) -> int:
        """How many KV blocks fit ``memory_bytes``."""
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        return num_kv_blocks(memory_bytes, self.kv_block_bytes(block_size))

    def profile_kv_cache_memory(self, block_size: int = 16) -> int:
        """Bytes ``gpu_memory_utilization`` leaves for the KV cache after a worst-case step and the graphs."""
        if self.device.type != "cuda":
            raise RuntimeError("memory profiling needs a CUDA device")
        from backends.cuda.profiling import profile_memory

        self._set_matmul_precision()                      # before the piecewise graphs capture GEMMs
        profile = profile_memory(self, block_size)
        budget = kv_cache_bytes(profile, self.gpu_memory_utilization)
        log.info("cuda_memory_profiled", total_gib=round(profile.total / 2**30, 2),
                 peak_torch_gib=round(profile.peak_torch / 2**30, 2), non_torch_gib=round(profile.non_torch / 2**30, 2),
                 graph_gib=round(profile.graph_bytes / 2**30, 3),
                 kv_cache_gib=round(budget / 2**30, 2), gpu_memory_utilization=self.gpu_memory_utilization)
        return budget

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """K and V ``[num_blocks, block_size, Hkv, D]`` per layer; then the graphs of the mode."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        c = self.model_config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self._torch_dtype, device=self.device),
                           torch.zeros(shape, dtype=self._torch_dtype, device=self.device))
                          for _ in range(c.num_hidden_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._static = None
        self.input_batch = InputBatch(block_size, max_reqs=self.max_num_seqs,      # persistent step inputs
                                      max_blocks=-(-self.max_model_len // block_size),
                                      max_tokens=self.buffers.max_tokens, index_dtype=np.int32)
        self._staging = PinnedStaging(self.device, 6 * self.buffers.max_tokens + 2 * self.max_num_seqs
                                      + self.max_num_seqs * -(-self.max_model_len // block_size))
        if self.device.type == "cuda":
            self._set_matmul_precision()
            self.warm_up()
        self.capture()

    # float32 GEMMs may run on TF32 tensor cores (10-bit mantissa); set False before
    # profiling / allocating the cache for IEEE float32 (the parity tests do)
    allow_tf32 = True

    def _set_matmul_precision(self) -> None:
        """Apply ``allow_tf32`` to torch's float32 matmuls (a process-wide torch setting)."""
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):                       # torch >= 2.9
            matmul.fp32_precision = "tf32" if self.allow_tf32 else "ieee"
        else:
            matmul.allow_tf32 = self.allow_tf32

    def warm_up(self) -> None:
        """Run one eager step per attention variant (a decode per KV split count, a prefill), writing nothing.

        Each split count is its own compiled kernel: without this the first
        request whose context needs one would wait for Triton to compile it
        (the norms, rotary and cache-write kernels compile on the way). Every
        slot is -1 (``warmup_metadata``), so the cache is left as it was.
        Then every quantized-GEMM tile config and MoE block height
        (``CUDAModel.warm_up_kernels``), which these steps do not all reach.
        """
        if not self.kv_caches:
            raise RuntimeError("warm_up needs the KV cache: call allocate_kv_cache first")
        first_row = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for metadata in self.attention.warmup_metadata(self.max_model_len, self.block_size, self.device):
                buf = self.buffers.sized(int(metadata.slot_mapping.shape[0]))
                self.model.forward(buf, self.kv_caches, metadata, first_row)
            self.model.warm_up_kernels(self.buffers.max_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA graphs ---------------------------------------------------------------

    def capture(self) -> None:
        """Capture the graphs of ``cuda_graph_mode`` not captured yet (logs time and memory)."""
        if self.cuda_graph_mode == "none":
            return
        if self.cuda_graph_mode == "full" and not self.kv_caches:
            raise RuntimeError("full CUDA graphs need the KV cache: call allocate_kv_cache first")
        sizes = self.full_sizes if self.cuda_graph_mode == "full" else self.piecewise_sizes
        done = self._full_graphs if self.cuda_graph_mode == "full" else self._piece_graphs
        todo = [s for s in sizes if s not in done]
        if not todo:
            return
        capture_one = self._capture_full if self.cuda_graph_mode == "full" else self._capture_pieces
        stats = self.capture_sizes(todo, capture_one)
        self.capture_stats = stats
        log.info("cuda_graphs_captured", mode=self.cuda_graph_mode, sizes=len(todo), graphs=stats.num_graphs,
                 seconds=round(stats.seconds, 2), memory_mib=round(stats.memory_bytes / 2**20, 1))

    def capture_sizes(self, sizes, capture_one):
        """Capture ``sizes`` with ``capture_one`` in the shared pool; returns ``CaptureStats``."""
        on_gpu = self.device.type == "cuda"
        if self._pool is None and on_gpu:
            self._pool = torch.cuda.graph_pool_handle()

        def used() -> int:
            if not on_gpu:
                return 0
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free

        sync = (lambda: torch.cuda.synchronize(self.device)) if on_gpu else (lambda: None)
        with torch.inference_mode():                      # like the steps that replay them
            stats = capture_graphs(sizes, capture_one, sync, used,
                                   release_cached=torch.cuda.empty_cache if on_gpu else None)
        if self.cuda_graph_mode == "piecewise":
            stats.num_graphs *= self.model.num_pieces
        return stats

    def _graph(self, fn):
        """A CUDA graph of ``fn`` on a GPU; its eager stand-in on CPU (see ``backends.cuda.graphs``)."""
        if self.device.type == "cuda":
            return CapturedGraph(fn, self._pool, self.device)
        return EagerGraph(fn)

    def _static_buffers(self) -> dict[str, torch.Tensor]:
        if self._static is None:
            batch = max(self.full_sizes)
            max_blocks = -(-self.max_model_len // max(1, self.block_size))
            arange = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
            self._static = {
                "slot_mapping": torch.full((batch,), -1, dtype=torch.int32, device=self.device),
                "context_lens": torch.zeros(batch, dtype=torch.int32, device=self.device),
                "block_tables": torch.zeros((batch, max_blocks), dtype=torch.int32, device=self.device),
                "arange": arange,
                "logits_indices": arange[:batch].long(),
            }
        return self._static

    def _full_metadata(self, batch: int) -> TritonAttentionMetadata:
        s = self._static_buffers()
        block_m, block_q = block_shape(self.attention.num_group, 1)
        splits = choose_num_splits(batch, self.model_config.num_key_value_heads, self.max_model_len,
                                   self.attention.block_n, self.num_sms)
        plan = AttentionPlan(s["arange"][:batch], s["arange"][:batch], block_m, block_q, self.attention.block_n, splits)
        return TritonAttentionMetadata(s["slot_mapping"][:batch], s["block_tables"][:batch], s["context_lens"][:batch],
                                       s["arange"][: batch + 1], plan)

    def _capture_full(self, batch: int, kv_caches=None) -> None:
        kv_caches = kv_caches or self.kv_caches
        buf = self.buffers.sized(batch)
        metadata = self._full_metadata(batch)
        indices = self._static_buffers()["logits_indices"][:batch]
        self._full_graphs[batch] = self._graph(lambda: self.model.forward(buf, kv_caches, metadata, indices))

    def _capture_pieces(self, num_tokens: int) -> None:
        buf = self.buffers.sized(num_tokens)
        self._piece_graphs[num_tokens] = [self._graph(lambda i=i: self.model.run_piece(i, buf))
                                          for i in range(self.model.num_pieces)]

    def release_graphs(self) -> None:
        """Drop every captured graph and its pool."""
        self._full_graphs.clear()
        self._piece_graphs.clear()
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # -- steps ---------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        """Run one step: write new K/V, attend, sample where ``needs_sample``."""
        return run_step(scheduler_output, self.sampler.drop, self.compute_logits, self.sampler.sample_rows,
                        TORCH_LOGIT_ROWS)

    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False) -> torch.Tensor:
        """Float32 logits ``[N, V]`` of the requests that sample (every token with ``all_tokens``).

        After a full-graph replay this is a view of the graph's static output,
        valid until the next step: clone it to keep it.
        """
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache must be called before execute")
        if scheduler_output.block_size != self.block_size:
            raise ValueError(f"step block_size {scheduler_output.block_size} != cache block_size {self.block_size}")
        step = self.input_batch.prepare(scheduler_output, all_tokens)    # persistent rows, numpy step arrays
        num_tokens, num_reqs = step.num_tokens, step.num_reqs
        if num_tokens > self.buffers.max_tokens:
            raise ValueError(f"step of {num_tokens} tokens exceeds max_num_batched_tokens={self.buffers.max_tokens}")
        choice = self.dispatcher.choose(num_tokens, num_reqs, num_tokens == num_reqs)
        with torch.inference_mode():
            if choice.kind == "full":
                logits = self._replay_full(step, choice.size)                            # [B, V]
                rows = step.logits_indices
                return logits[torch.from_numpy(rows.astype(np.int64)).to(self.device)] if len(rows) < num_reqs \
                    else logits[:num_reqs]
            ids, positions, rows, metadata = upload_step(self._staging, step, self.attention)
            buf = self.buffers.sized(num_tokens)
            buf.input_ids.copy_(ids)
            buf.positions.copy_(positions)
            runner = None
            if choice.kind == "piecewise":
                graphs = self._piece_graphs[choice.size]
                runner = lambda i, _buf: graphs[i].replay()                             # noqa: E731
            return self.model.forward(buf, self.kv_caches, metadata, rows, runner)      # [N, V]

    def _replay_full(self, step: StepInputs, batch: int) -> torch.Tensor:
        """Fill the static inputs of the ``batch`` graph with this decode step and replay it; ``[B, V]``."""
        n = step.num_reqs
        width = max(1, int(step.num_blocks.max()))
        s = self._static_buffers()
        if width > s["block_tables"].shape[1]:
            raise ValueError(f"block table of {width} blocks exceeds max_model_len={self.max_model_len}")
        ids, positions, slots, context_lens, tables = upload_full_step(self._staging, step, batch)
        buf = self.buffers.sized(batch)
        buf.input_ids.copy_(ids)
        buf.positions.copy_(positions)
        s["slot_mapping"][:batch].copy_(slots)
        s["context_lens"][:batch].copy_(context_lens)
        s["block_tables"][:n, :width].copy_(tables)
        return self._full_graphs[batch].replay()                                       # [B, V]

    def shutdown(self) -> None:
        """Release the graphs, the KV cache and the weights."""
        self._full_graphs.clear()
        self._piece_graphs.clear()
        self.kv_caches = []
        self.model = None
        self.sampler.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def default_dtype() -> str:
    """What ``dtype="auto"`` means here: bfloat16 where the GPU computes it natively (Ampere on), else float16.

    Without a GPU (the tests that run this backend on the CPU under
    ``TRITON_INTERPRET=1``) it is float32, as on the cpu backend.
    """
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def create(model_config: ModelConfig, weights: dict[str, np.ndarray], options: BackendOptions) -> CUDABackend:
    """The registry's factory (``backends.registry``): the GPU options, ``dtype="auto"`` as ``default_dtype()``."""
    dtype = default_dtype() if options.dtype == "auto" else options.dtype
    return CUDABackend(model_config, weights, dtype=dtype, seed=options.seed, eos_token_ids=options.eos_token_ids,
                       gpu_memory_utilization=options.gpu_memory_utilization,
                       cuda_graph_mode=options.cuda_graph_mode, max_num_seqs=options.max_num_seqs,
                       max_num_batched_tokens=options.max_num_batched_tokens, max_model_len=options.max_model_len)
