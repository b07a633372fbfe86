"""Continuous batching: which tokens of which requests run in the next step.

Each step has a budget of ``max_num_batched_tokens`` tokens and at most
``max_num_seqs`` running requests. Running requests go first (a decode costs
one token, an unfinished prefill continues with as many tokens as the budget
allows: chunked prefill), then waiting requests in queue order. When the
pool runs out of blocks a running request is preempted: its blocks are freed
and it goes back to the waiting queue, to be recomputed (mostly from the
prefix cache) when there is room again.

Two policies (``SchedulerConfig.policy``, vLLM's ``--scheduling-policy``):

- ``fcfs``: the queue is in arrival order; the victim is the youngest running
  request and goes back to the head of the queue.
- ``priority``: the queue is ordered by ``(Request.priority, arrival)``, lower
  first, ties first come first served; the victim is the lowest-priority
  (largest value), youngest running request, and goes back to its place by
  that order. Admission never preempts: a high-priority request overtakes the
  waiting ones, not the running ones.

A request asking for prompt logprobs takes no prefix-cache hits until its
prompt is computed: every prompt position must produce its logits.

With async scheduling the engine lays out step t+1 while step t runs on the
device (``schedule_ahead``): the requests of a step in which every request
samples get one token each, the one step t samples for them (still unknown),
at the position after step t's; ``update_from_output`` of step t then of step
t+1 advance ``num_computed_tokens`` as for any two steps. An ahead step never
preempts and never admits.

The scheduler also ends requests on their token ids (EOS, stop ids, length;
``scheduler.stop``) as it takes each step's sampled tokens, freeing their
blocks at once; stop strings need text and are the engine's to report back
through ``finish_requests``.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import count

from scheduler.kv_cache_manager import KVCacheManager, cdiv
from scheduler.output import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput, StepResult
from scheduler.request import Request, RequestStatus
from scheduler.stop import check_stop


# The scheduling policies (vLLM's names): arrival order, or Request.priority first.
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    num_kv_blocks: int                      # blocks in the pool
    block_size: int = 16                    # tokens per block
    max_num_seqs: int = 256                 # running requests at most
    max_num_batched_tokens: int = 2048      # tokens per step at most
    max_model_len: int = 8192               # prompt + output tokens of one request at most
    enable_prefix_caching: bool = True
    eos_token_ids: frozenset[int] = frozenset()   # tokens that end a request unless its params say ignore_eos
    policy: str = "fcfs"                    # one of SCHEDULING_POLICIES: queue order and preemption victim

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "eos_token_ids", frozenset(self.eos_token_ids))   # accept any iterable
        bad = [t for t in self.eos_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"eos_token_ids must hold non-negative token ids, got {bad[0]!r}")

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
        self._arrivals = count()                      # admission order: breaks priority ties first come first served
        self._order: dict[str, tuple[int, int]] = {}  # request id -> (priority, arrival), priority policy only

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
        if self.config.policy == "priority":
            self._order[request.request_id] = (request.priority, next(self._arrivals))
            self._enqueue(request)
        else:
            self.waiting.append(request)

    def _enqueue(self, request: Request) -> None:
        """Insert into the priority-ordered waiting queue, after its equals."""
        keys = [self._order[r.request_id] for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, self._order[request.request_id]), request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (a stop string, an abort, a failed step)
        and free their blocks; ids already finished are skipped."""
        assert status.is_finished
        done = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self._finish(request, status)
                done.append(request)
        return done

    def _finish(self, request: Request, status: RequestStatus) -> None:
        del self.requests[request.request_id]
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        self._order.pop(request.request_id, None)
        request.status = status
        self._finished_ids.add(request.request_id)

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

        running, allocate = self.running, self.kv.allocate_slots
        is_running = RequestStatus.RUNNING
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_new = len(request.all_token_ids) - request.num_computed_tokens
            if num_new > budget:
                num_new = budget
            while allocate(request, num_new) is None:
                j = self._victim_index()
                victim = self.running.pop(j)
                if j < i:                        # a request scheduled earlier in this step
                    i -= 1
                self._preempt(victim)
                preempted_now = True
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id)
                if victim is request:
                    break
            if request.status is not is_running:
                break
            scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1

        while (self.waiting and budget > 0 and not preempted_now
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            hits, num_cached = ([], 0) if request.needs_prompt_logprobs else self.kv.get_computed_blocks(request)
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
            scheduled=self._scheduled_requests(scheduled),
            block_size=self.config.block_size,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=self._preempted_ids,
        )
        self._finished_ids, self._preempted_ids = set(), set()
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev`` (the step in flight, not yet given to ``update_from_output``).

        Each request of ``prev`` that still runs gets one token: the one
        ``prev`` samples for it (``PLACEHOLDER_TOKEN_ID`` here: unknown), at
        the position after ``prev``'s, with a slot for it; a request that
        surely ends with that token (``max_tokens``, the context limit) is
        left out. Returns None, changing nothing, when no request is left or
        the pool is short of blocks for them (an ahead step never preempts:
        the caller steps synchronously instead). Blocks are hashed only from
        known tokens (``Request.block_hashes``), never the pending ones.
        """
        bs, limit, running = self.config.block_size, self.config.max_tokens_per_request, RequestStatus.RUNNING
        block_ids = self.kv.live_block_ids
        picked: list[tuple[Request, int]] = []
        num_needed = 0
        for sr in prev.scheduled:
            request = self.requests.get(sr.request_id)
            if request is None or request.status is not running:
                continue                                      # ended (stop string, abort) since prev was laid out
            if not sr.needs_sample:
                raise ValueError(f"request {sr.request_id!r} does not sample in the previous step: nothing to go "
                                 "ahead with")
            position = sr.num_computed_tokens + len(sr.token_ids)        # the pending token's
            if position != request.num_tokens:
                raise ValueError(f"request {sr.request_id!r} holds {request.num_tokens} tokens, the previous step "
                                 f"samples the one at {position}: schedule ahead of the step in flight only")
            params = request.sampling_params
            max_tokens = getattr(params, "max_tokens", None)
            if (max_tokens is not None and request.num_output_tokens + 1 >= max_tokens) or position + 1 >= limit:
                continue                                      # the pending token ends it for length
            num_needed += max(0, cdiv(position + 1, bs) - len(block_ids[request.request_id]))
            picked.append((request, position))
        if not picked or num_needed > self.kv.num_free_blocks:
            return None
        scheduled = []
        for request, position in picked:
            rid = request.request_id
            if self.kv.allocate_slots(request, position + 1 - request.num_computed_tokens) is None:
                raise AssertionError(f"allocate_slots failed for {rid!r} after the free blocks were counted")
            scheduled.append(ScheduledRequest(
                rid, [PLACEHOLDER_TOKEN_ID], position, block_ids[rid], None, request.sampling_params, True,
                request.prompt_token_ids, request.output_token_ids, None, None, bs))
        out = SchedulerOutput(scheduled, bs, self._finished_ids, self._preempted_ids, ahead=True)
        self._finished_ids, self._preempted_ids = set(), set()
        return out

    def report_again(self, out: SchedulerOutput) -> None:
        """The backend never ran ``out``: tell it at the next step which
        requests finished or were preempted before, so it drops their state."""
        self._finished_ids |= out.finished_request_ids
        self._preempted_ids |= out.preempted_request_ids

    def _victim_index(self) -> int:
        """Index in ``running`` of the request to preempt: the youngest (fcfs),
        or the lowest-priority, youngest one (priority)."""
        if self.config.policy == "priority":
            return max(range(len(self.running)), key=lambda j: self._order[self.running[j].request_id])
        return len(self.running) - 1

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        if self.config.policy == "priority":
            self._enqueue(request)
        else:
            self.waiting.appendleft(request)
        self._preempted_ids.add(request.request_id)
        self.num_preemptions += 1

    def _scheduled_requests(self, scheduled: dict[str, int]) -> list[ScheduledRequest]:
        """The step's requests, in layout order: token ids sliced, the live block list by reference
        (``scheduler.output``), slot mappings left to be derived; no per-token work."""
        requests, block_ids, bs = self.requests, self.kv.live_block_ids, self.config.block_size
        out = []
        for rid, num_new in scheduled.items():
            request = requests[rid]
            start = request.num_computed_tokens
            end = start + num_new
            num_prompt_logprobs = None
            if request.num_prompt_logprobs is not None and request.needs_prompt_logprobs \
                    and start < request.num_prompt_tokens - 1:
                num_prompt_logprobs = request.num_prompt_logprobs
            out.append(ScheduledRequest(
                rid, request.all_token_ids[start:end], start, block_ids[rid], None, request.sampling_params,
                end == len(request.all_token_ids), request.prompt_token_ids, request.output_token_ids,
                num_prompt_logprobs, None, bs))
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance the scheduled requests and apply the token-level stops.

        Returns the requests that got a new token, in layout order. Those the
        token ended (``scheduler.stop``) are already out of the scheduler,
        their blocks freed: status FINISHED_STOPPED (``stop_reason``: the stop
        token id, None for EOS) or FINISHED_LENGTH."""
        updated = []
        requests, sampled = self.requests, result.sampled_token_ids
        running = RequestStatus.RUNNING
        eos, limit = self.config.eos_token_ids, self.config.max_tokens_per_request
        for sr in scheduler_output.scheduled:
            request = requests.get(sr.request_id)
            if request is None or request.status is not running:
                continue
            request.num_computed_tokens += len(sr.token_ids)
            token = sampled.get(sr.request_id)
            if token is None:
                continue
            request.append_output_token(token)
            updated.append(request)
            stop = check_stop(request, eos, limit)
            if stop is not None:
                status, request.stop_reason = stop
                self._finish(request, status)
        return updated
