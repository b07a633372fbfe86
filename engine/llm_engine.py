"""The synchronous engine: add requests, step, abort.

``step()`` is the whole loop body: schedule → execute → update → detokenize
and stop → emit. It runs on one thread (the caller's, or the async engine's
loop thread); nothing here is thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count

import structlog

from backends.base import Backend, create_backend, resolve_backend_name
from engine.args import DEFAULT_KV_CACHE_MEMORY, EngineArgs
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from engine.model_loader import LoadedModel, load_model
from engine.output_processor import CompletionState, OutputProcessor, RequestState, StopChecker
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig

log = structlog.get_logger(__name__)


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


class LLMEngine:
    def __init__(self, args: EngineArgs, *, loaded: LoadedModel | None = None, backend: Backend | None = None):
        self.args = args
        t0 = time.perf_counter()
        self.model = loaded or load_model(args.model)
        self.tokenizer = self.model.tokenizer
        self.model_config = self.model.config
        self.max_model_len = min(args.max_model_len or self.model.max_model_len, self.model.max_model_len)
        self.backend_name = backend.name if backend else resolve_backend_name(args.backend)
        device_options = {}
        if self.backend_name == "cuda":
            device_options = dict(gpu_memory_utilization=args.gpu_memory_utilization,
                                  cuda_graph_mode=args.cuda_graph_mode, max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len)
        self.backend = backend or create_backend(
            self.backend_name, self.model_config, self.model.weights, dtype=args.dtype, seed=args.seed,
            num_threads=args.num_threads, eos_token_ids=tuple(self.tokenizer.eos_token_ids), **device_options,
            tensor_parallel_size=args.tensor_parallel_size,
        )
        self.model.weights = {}                      # the backend holds its own copy now
        kv_memory = args.kv_cache_memory
        if kv_memory is None and args.num_kv_blocks is None and hasattr(self.backend, "profile_kv_cache_memory"):
            kv_memory = self.backend.profile_kv_cache_memory(args.block_size)   # GPU: from gpu_memory_utilization
        num_blocks = args.num_kv_blocks or self.backend.num_blocks_for_memory(
            DEFAULT_KV_CACHE_MEMORY if kv_memory is None else kv_memory, args.block_size)
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for a single KV block")
        self.backend.allocate_kv_cache(num_blocks, args.block_size)
        self.scheduler = Scheduler(SchedulerConfig(
            num_kv_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=args.enable_prefix_caching,
        ))
        self.output = OutputProcessor(StopChecker(
            frozenset(self.tokenizer.eos_token_ids), self.scheduler.config.max_tokens_per_request))
        self._seq_ids = count()
        self.num_steps = 0
        log.info("engine_ready", model=self.model.name, backend=self.backend_name, dtype=args.dtype,
                 num_kv_blocks=num_blocks, block_size=args.block_size, max_model_len=self.max_model_len,
                 load_s=round(time.perf_counter() - t0, 2))

    # -- requests ---------------------------------------------------------------

    def tokenize_input(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None) -> list[int]:
        """Prompt token ids from exactly one of text, token ids or chat messages."""
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
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be a SamplingParams")
        vocab = self.tokenizer.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}")
        ids = self.tokenize_input(prompt, prompt_token_ids, messages)
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
        for c in completions:
            self.scheduler.add_request(Request(c.seq_id, ids, c.params, self.args.block_size,
                                               arrival_time=arrival, cache_salt=cache_salt))
        self.output.add(state)
        return state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; returns its last (finished) output, or None if unknown."""
        state = self.output.states.get(request_id)
        if state is None:
            return None
        self.scheduler.finish_requests([c.seq_id for c in state.completions], RequestStatus.FINISHED_ABORTED)
        self.output.abort(state)
        out = self.output.make_delta(state)
        self.output.remove(state)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.states)

    def check_health(self) -> None:
        """Raise if the backend reports it cannot serve (e.g. a worker process
        died); backends without ``check_health`` are always healthy."""
        check = getattr(self.backend, "check_health", None)
        if check is not None:
            check()

    # -- the loop body -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns a delta output for every request that changed."""
        sched = self.scheduler.schedule()
        if sched.is_empty and not (sched.finished_request_ids or sched.preempted_request_ids):
            return []
        scheduled_at = time.time()
        try:
            result = self.backend.execute(sched)
        except EngineDeadError:
            raise                    # fatal (e.g. a tensor-parallel rank died): the engine stops
        except Exception as e:  # noqa: BLE001 - a device failure fails this step's requests only
            raise self._fail_step(sched, e) from e
        self.num_steps += 1
        now = time.time()
        for sr in sched.scheduled:
            state, _ = self.output.by_seq[sr.request_id]
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = scheduled_at
                state.num_cached_tokens = max(0, self.scheduler.requests[sr.request_id].num_cached_tokens)
        changed: dict[str, RequestState] = {}
        finished_seqs = []
        for request in self.scheduler.update_from_output(sched, result):
            state = self.output.process_token(request.request_id, request.output_token_ids[-1],
                                              result.logprobs.get(request.request_id), now)
            changed[state.request_id] = state
            _, c = self.output.by_seq[request.request_id]
            if c.finish_reason is not None:
                finished_seqs.append((request.request_id, c.finish_reason))
        for seq_id, reason in finished_seqs:
            status = RequestStatus.FINISHED_LENGTH if reason == "length" else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish_requests([seq_id], status)
        outputs = []
        for state in changed.values():
            out = self.output.make_delta(state, now)
            if out.finished:
                self.output.remove(state)
            outputs.append(out)
        return outputs

    def _fail_step(self, sched, cause: BaseException) -> StepFailedError:
        seq_ids = [sr.request_id for sr in sched.scheduled]
        parents = {self.output.by_seq[s][0].request_id for s in seq_ids if s in self.output.by_seq}
        log.error("step_failed", num_requests=len(parents), error=repr(cause))
        for rid in parents:
            state = self.output.states[rid]
            self.scheduler.finish_requests([c.seq_id for c in state.completions], RequestStatus.FINISHED_ERROR)
            self.output.remove(state)
        # Blocks written by the failed step may hold garbage: forget their hashes.
        self.scheduler.kv.reset_prefix_cache()
        self.scheduler.report_again(sched)
        return StepFailedError(sorted(parents), cause)

    def get_stats(self) -> EngineStats:
        kv = self.scheduler.kv
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=kv.num_blocks, kv_blocks_free=kv.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
        )

    def shutdown(self) -> None:
        self.backend.shutdown()


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
