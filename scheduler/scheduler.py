"""Continuous batching: which tokens of which requests run in the next step.

Each step has a budget of ``max_num_batched_tokens`` tokens and at most
``max_num_seqs`` running requests. Running requests go first (a decode costs
one token, an unfinished prefill continues with as many tokens as the budget
allows: chunked prefill), then waiting requests in arrival order. When the
pool runs out of blocks the youngest running request is preempted: its blocks
are freed and it goes back to the head of the waiting queue, to be recomputed
(mostly from the prefix cache) when there is room again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import ScheduledRequest, SchedulerOutput, StepResult
from scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_kv_blocks: int                      # blocks in the pool
    block_size: int = 16                    # tokens per block
    max_num_seqs: int = 256                 # running requests at most
    max_num_batched_tokens: int = 2048      # tokens per step at most
    max_model_len: int = 8192               # prompt + output tokens of one request at most
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_tokens_per_request(self) -> int:
        """Tokens one request may hold: the context limit, or the whole cache if smaller."""
        return min(self.max_model_len, self.num_kv_blocks * self.block_size)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()

    # -- requests in and out -------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        limit = self.config.max_tokens_per_request
        if request.num_tokens >= limit:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; this engine holds at most {limit - 1} prompt tokens "
                f"per request (max_model_len={self.config.max_model_len}, "
                f"KV cache={self.config.num_kv_blocks * self.config.block_size} tokens)"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """End requests (stopped, length, aborted, failed) and free their blocks."""
        assert status.is_finished
        done = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self.kv.free(request)
            request.status = status
            self._finished_ids.add(rid)
            done.append(request)
        return done

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- one step ---------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}           # request id -> new tokens, in layout order
        preempted_now = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_now = True
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1

        while (self.waiting and budget > 0 and not preempted_now
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            hits, num_cached = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new

        out = SchedulerOutput(
            scheduled=[self._scheduled_request(self.requests[rid], n) for rid, n in scheduled.items()],
            block_size=self.config.block_size,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=self._preempted_ids,
        )
        self._finished_ids, self._preempted_ids = set(), set()
        return out

    def report_again(self, out: SchedulerOutput) -> None:
        """The backend never ran ``out``: tell it at the next step which
        requests finished or were preempted before, so it drops their state."""
        self._finished_ids |= out.finished_request_ids
        self._preempted_ids |= out.preempted_request_ids

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self._preempted_ids.add(request.request_id)
        self.num_preemptions += 1

    def _scheduled_request(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        bs = self.config.block_size
        block_table = self.kv.get_block_ids(request.request_id)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:start + num_new],
            num_computed_tokens=start,
            block_table=block_table,
            slot_mapping=[block_table[p // bs] * bs + p % bs for p in range(start, start + num_new)],
            sampling_params=request.sampling_params,
            needs_sample=start + num_new == request.num_tokens,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
        )

    def update_from_output(self, scheduler_output: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance the scheduled requests; returns those that got a new token."""
        updated = []
        for sr in scheduler_output.scheduled:
            request = self.requests.get(sr.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += len(sr.token_ids)
            token = result.sampled_token_ids.get(sr.request_id)
            if token is not None:
                request.append_output_token(token)
                updated.append(request)
        return updated
