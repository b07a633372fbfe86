"""The synchronous engine: add requests, step, abort.

``step()`` is the whole loop body: end the requests past their time limit →
schedule → execute → update (the scheduler ends requests on EOS, stop ids and
length) → detokenize and find stop strings → emit; with async scheduling
(``engine.pipeline``) the next step already runs while the host does the
last three. Time limits live here, not
in the async engine's loop, so that the offline API keeps them too. It runs on one thread (the caller's, or the async engine's
loop thread); nothing here is thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import structlog

from backends.base import Backend, BackendOptions
from backends.registry import BACKEND_NAMES, create_backend, keeps_quantized, resolve_backend_name
from engine.args import DEFAULT_KV_CACHE_MEMORY, EngineArgs
from engine.detokenizer import IncrementalDetokenizer
from common.errors import DuplicateRequestError, InvalidRequestError, RequestFailedError
from engine.model_loader import LoadedModel, load_model
from engine.output_processor import CompletionState, OutputProcessor, RequestState
from engine.outputs import RequestMetrics, RequestOutput
from engine.pipeline import StepPipeline
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputs
from model.weights.quant import QuantizedTensor, dequantize_all
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig

log = structlog.get_logger(__name__)


# The output's finish_reason for a request the scheduler ended on its token ids.
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length"}
# The output's finish_reason for a request ended from outside the scheduler.
_END_REASONS = {RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_TIME_LIMIT: "time_limit"}


class StepFailedError(Exception):
    """A backend step raised; the requests it ran were failed and freed."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"model step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int          # blocks with no owner, cached or not
    num_preemptions: int
    prefix_cache_queries: int    # tokens
    prefix_cache_hits: int       # tokens
    num_waiting_prompt_tokens: int = 0   # tokens the waiting sequences must prefill (recompute, if preempted)
    num_running_tokens: int = 0          # tokens held by the running sequences (prompt plus output so far)
    device_memory_active_bytes: int = 0  # the backend's allocator: bytes held now (0: the backend reports none)
    device_memory_peak_bytes: int = 0    # the backend's allocator: the most held at once since start


class LLMEngine:
    def __init__(self, args: EngineArgs, *, loaded: LoadedModel | None = None, backend: Backend | None = None):
        self.args = args
        t0 = time.perf_counter()
        self.backend_name = backend.name if backend else resolve_backend_name(args.backend)
        # --quantization auto: quantized checkpoints stay quantized where the backend multiplies them natively.
        keep_quantized = (args.quantization == "auto" and self.backend_name in BACKEND_NAMES
                          and keeps_quantized(self.backend_name, args.tensor_parallel_size))
        self.model = loaded or load_model(args.model, keep_quantized=keep_quantized)
        if not keep_quantized and any(isinstance(w, QuantizedTensor) for w in self.model.weights.values()):
            self.model.weights = dequantize_all(self.model.weights)   # a caller's quantized load, for a float backend
        self.weight_format = self.model.weight_format  # "float32" until the backend's dtype is known (below)
        self.tokenizer = self.model.tokenizer
        self.model_config = self.model.config
        self.max_model_len = min(args.max_model_len or self.model.max_model_len, self.model.max_model_len)
        options = BackendOptions(           # every backend's options; its factory picks those it uses
            dtype=args.dtype, seed=args.seed, num_threads=args.num_threads,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids), max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, cuda_graph_mode=args.cuda_graph_mode,
            tensor_parallel_size=args.tensor_parallel_size,
        )
        self.backend = backend or create_backend(self.backend_name, self.model_config, self.model.weights, options)
        self.dtype = self.backend.dtype              # what dtype="auto" resolved to (the backend's choice)
        if self.weight_format == "float32":          # dense weights are held in the compute dtype
            self.weight_format = self.dtype
        log.info("weights_loaded", model=self.model.name, backend=self.backend_name, weight_format=self.weight_format,
                 weight_bytes=resident_weight_bytes(self.backend, self.model.weights, self.dtype),
                 file_bytes=_file_bytes(self.model.path))
        self.model.weights = {}                      # the backend holds its own copy now
        kv_memory = args.kv_cache_memory
        if kv_memory is None and args.num_kv_blocks is None:
            kv_memory = self.backend.profile_kv_cache_memory(args.block_size)   # GPU: from gpu_memory_utilization
        num_blocks = args.num_kv_blocks or self.backend.num_blocks_for_memory(
            DEFAULT_KV_CACHE_MEMORY if kv_memory is None else kv_memory, args.block_size)
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for a single KV block")
        self.backend.allocate_kv_cache(num_blocks, args.block_size)
        self.scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching, eos_token_ids=frozenset(self.tokenizer.eos_token_ids),
            policy=args.scheduling_policy,
        ))
        self._time_limits: dict[str, float] = {}     # request id -> time.time() at which it ends with "time_limit"
        self.output = OutputProcessor()
        self.structured = StructuredOutputs(                                    # grammar matchers per sequence
            self.tokenizer.hf, max(self.tokenizer.vocab_size, self.model_config.vocab_size),
            tuple(self.tokenizer.eos_token_ids))
        self._seq_ids = count()
        self.num_steps = 0
        self.pipeline = StepPipeline(self, args.async_scheduling)   # steps, ahead where the backend can
        memory = self.backend.memory_stats()
        log.info("engine_ready", model=self.model.name, backend=self.backend_name, dtype=self.dtype,
                 num_kv_blocks=num_blocks, block_size=args.block_size, max_model_len=self.max_model_len,
                 load_s=round(time.perf_counter() - t0, 2),
                 **{f"memory_{k}_mib": v >> 20 for k, v in memory.items() if k in ("active", "peak")})

    # -- requests ---------------------------------------------------------------

    def tokenize_input(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None, truncate_prompt_tokens: int | None = None) -> list[int]:
        """Prompt token ids from exactly one of text, token ids or chat messages;
        with ``truncate_prompt_tokens``, only the last that many of them."""
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_token_ids or messages")
        ids = list(prompt_token_ids) if prompt_token_ids is not None else encode_prompt(self.tokenizer, prompt, messages)
        if not ids:
            raise InvalidRequestError("prompt must not be empty")
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt_token_ids contains {bad!r}, outside the vocabulary [0, {vocab})")
        limit = self.scheduler.config.max_tokens_per_request
        if truncate_prompt_tokens is not None:
            if truncate_prompt_tokens > limit - 1:
                raise InvalidRequestError(
                    f"truncate_prompt_tokens is {truncate_prompt_tokens}, but this engine allows at most "
                    f"{limit - 1} prompt tokens (max_model_len={self.max_model_len}); ask for fewer")
            ids = ids[-truncate_prompt_tokens:]
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens, but this engine allows at most {limit - 1} "
                f"(max_model_len={self.max_model_len}); shorten the prompt")
        cap = self.args.max_prompt_tokens
        if cap is not None and len(ids) > cap:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens, but this server accepts at most {cap} "
                                      f"(max_prompt_tokens, pagedgen serve --max-prompt-tokens); shorten the prompt")
        return ids

    def add_request(self, request_id: str, *, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    messages: list[dict] | None = None, sampling_params: SamplingParams | None = None,
                    cache_salt: str | None = None, arrival_time: float | None = None,
                    prompt_text: str | None = None) -> RequestState:
        """Validate and queue one request (``n`` sequences). Raises InvalidRequestError.

        ``prompt_text``: the text ``prompt_token_ids`` were encoded from, when
        the caller tokenized it (``AsyncEngine`` does), reported back as the
        outputs' ``prompt``."""
        if request_id in self.output.states:
            raise DuplicateRequestError(f"request_id {request_id!r} is already in use by a request in flight; "
                                        "pick another id or wait for that request to finish")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams")
        vocab = self.tokenizer.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias token ids must be below the vocabulary size {vocab}, "
                                      f"got {max(params.logit_bias)}")
        if params.priority != 0 and self.scheduler.config.policy == "fcfs":
            raise InvalidRequestError(f"priority is {params.priority}, but this server schedules first come first "
                                      "served (--scheduling-policy fcfs); leave priority at 0 or start it with "
                                      "--scheduling-policy priority")
        grammar = self.structured.compile(params.structured_outputs) if params.structured_outputs else None
        ids = self.tokenize_input(prompt, prompt_token_ids, messages, params.truncate_prompt_tokens)
        arrival = time.time() if arrival_time is None else arrival_time
        completions = []
        for i in range(params.n):
            child = params.for_child(i) if params.n > 1 else params
            completions.append(CompletionState(
                index=i, seq_id=f"{next(self._seq_ids)}", params=child,
                detok=IncrementalDetokenizer(self.tokenizer.hf, skip_special_tokens=child.skip_special_tokens,
                                             stop=child.stop, include_stop_str_in_output=child.include_stop_str_in_output),
                logprobs=[] if child.logprobs is not None else None))
        state = RequestState(request_id, prompt if prompt is not None else prompt_text, ids, params, completions,
                             RequestMetrics(arrival))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]               # the first prompt token has no logprob
        for c in completions:
            self.scheduler.add_request(Request(          # the first completion alone computes the prompt logprobs
                c.seq_id, ids, c.params, self.args.block_size, arrival_time=arrival, cache_salt=cache_salt,
                priority=params.priority, num_prompt_logprobs=params.prompt_logprobs if c.index == 0 else None))
            if grammar is not None:
                self.structured.add(c.seq_id, grammar)
        self.output.add(state)
        time_limit_ms = params.time_limit_ms or self.args.default_time_limit_ms
        if time_limit_ms is not None:
            self._time_limits[request_id] = arrival + time_limit_ms / 1000
        return state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; returns its last (finished) output, or None if unknown."""
        return self._end_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _end_request(self, request_id: str, status: RequestStatus) -> RequestOutput | None:
        """End a request from outside the scheduler (an abort, its time limit) with
        what it has; its running completions get the finish reason of ``status``."""
        state = self.output.states.get(request_id)
        if state is None:
            return None
        self.scheduler.finish_requests([c.seq_id for c in state.completions], status)
        self.output.abort(state, _END_REASONS[status])
        out = self.output.make_delta(state)
        self._remove(state)
        return out

    def _remove(self, state: RequestState) -> None:
        self.output.remove(state)
        self._time_limits.pop(state.request_id, None)

    def expire_time_limits(self, now: float | None = None) -> list[RequestOutput]:
        """End the requests past their time limit; their last outputs, finished with "time_limit"."""
        if not self._time_limits:
            return []
        now = time.time() if now is None else now
        expired = [rid for rid, end in self._time_limits.items() if end <= now]
        return [out for rid in expired if (out := self._end_request(rid, RequestStatus.FINISHED_TIME_LIMIT))]

    def has_unfinished_requests(self) -> bool:
        """A request is unfinished, or a step is still in flight (the next ``step`` takes it)."""
        return bool(self.output.states) or self.pipeline.inflight is not None

    def check_health(self) -> None:
        """Raise if the backend reports it cannot serve (e.g. a worker process
        died); ``Backend.check_health`` is always healthy unless a backend says otherwise."""
        self.backend.check_health()

    # -- the loop body -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a delta output for every request that changed
        (those that passed their time limit first). With async scheduling the
        step whose outputs come back may have been laid out by the previous
        call, and the next one is already running (``engine.pipeline``)."""
        expired = self.expire_time_limits()
        done = self.pipeline.run()
        if done is None:
            return expired
        sched, result, scheduled_at = done
        self.num_steps += 1
        return expired + self._complete(sched, result, scheduled_at)

    def _complete(self, sched, result, scheduled_at: float) -> list[RequestOutput]:
        """Take a step's result: update the scheduler (EOS, stop ids, length), detokenize, stop strings, deltas."""
        now = time.time()
        for sr in sched.scheduled:                       # (an ahead step's request may have ended since)
            seq, request = self.output.by_seq.get(sr.request_id), self.scheduler.requests.get(sr.request_id)
            if seq is not None and request is not None and seq[0].metrics.first_scheduled_time is None:
                seq[0].metrics.first_scheduled_time = scheduled_at
                seq[0].num_cached_tokens = max(0, request.num_cached_tokens)
        changed: dict[str, RequestState] = {}
        for sr in sched.scheduled:
            lps = result.prompt_logprobs.get(sr.request_id)
            if lps is not None:
                self.output.process_prompt_logprobs(sr.request_id, sr.num_computed_tokens + 1, lps)
        stopped_by_string = []
        for request in self.scheduler.update_from_output(sched, result):   # EOS, stop ids, length: already ended
            reason = _FINISH_REASONS.get(request.status)
            grammar_done = reason is None and self.structured.accept(request.request_id, request.output_token_ids[-1])
            state = self.output.process_token(request.request_id, request.output_token_ids[-1],
                                              result.logprobs.get(request.request_id), now,
                                              reason, request.stop_reason)
            changed[state.request_id] = state
            _, c = self.output.by_seq[request.request_id]
            if grammar_done and c.finish_reason is None:   # the grammar is complete: ended below like a stop string
                c.finish_reason = "stop"
                c.detok.finish()
            if c.finish_reason is not None and not request.is_finished:
                stopped_by_string.append(request.request_id)
        self.scheduler.finish_requests(stopped_by_string, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for state in changed.values():
            out = self.output.make_delta(state, now)
            if out.finished:
                self._remove(state)
            outputs.append(out)
        return outputs

    def _fail_step(self, scheds, cause: BaseException) -> StepFailedError:
        """Fail and free the requests of ``scheds`` (the steps in flight when a step failed)."""
        seq_ids = [sr.request_id for sched in scheds for sr in sched.scheduled]
        parents = {self.output.by_seq[s][0].request_id for s in seq_ids if s in self.output.by_seq}
        log.error("step_failed", num_requests=len(parents), error=repr(cause))
        for rid in parents:
            state = self.output.states[rid]
            self.scheduler.finish_requests([c.seq_id for c in state.completions], RequestStatus.FINISHED_ERROR)
            self._remove(state)
        # Blocks written by the failed step may hold garbage: forget their hashes.
        self.scheduler.kv.reset_prefix_cache()
        for sched in scheds:
            self.scheduler.report_again(sched)
        return StepFailedError(sorted(parents), cause)

    def get_stats(self) -> EngineStats:
        kv = self.scheduler.kv
        memory = self.backend.memory_stats()
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=kv.num_blocks, kv_blocks_free=kv.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            num_waiting_prompt_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting),
            num_running_tokens=sum(r.num_tokens for r in self.scheduler.running),
            device_memory_active_bytes=memory.get("active", 0), device_memory_peak_bytes=memory.get("peak", 0),
        )

    def shutdown(self) -> None:
        self.pipeline.drain()
        self.backend.shutdown()


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resident_weight_bytes(backend: Backend, weights: dict, dtype: str) -> int:
    """The weight bytes ``backend`` holds: its own ``weight_bytes`` where it reports one, else
    ``weights`` as it holds them (quantized tensors packed, the rest in ``dtype``)."""
    reported = getattr(backend, "weight_bytes", None)
    if isinstance(reported, int) and reported > 0:
        return reported
    size = _DTYPE_BYTES.get(dtype, 4)
    return sum(int(w.nbytes) if isinstance(w, QuantizedTensor) else int(w.size) * size for w in weights.values())


def _file_bytes(path) -> int:
    """Bytes of the model's file or directory of files on disk (the weight memory's yardstick)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def encode_prompt(tokenizer, prompt: str | None, messages: list[dict] | None) -> list[int]:
    """The token ids of a text prompt, or of chat messages through the chat
    template; what the caller must fix raises InvalidRequestError."""
    try:
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError("prompt must be a string")
            return tokenizer.encode(prompt)
        return tokenizer.apply_chat_template(messages)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidRequestError(str(e)) from e


def failed_error(request_id: str, err: StepFailedError) -> RequestFailedError:
    return RequestFailedError(request_id, f"model step failed: {err.cause!r}")
