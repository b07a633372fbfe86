"""Builders for scheduler tests: requests and managers with plain ints."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from scheduler.kv_cache_manager import KVCacheManager
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig

_ids = count()


@dataclass(frozen=True)
class StopFields:
    """Just the sampling-param fields the scheduler reads (scheduler.stop.StopParams)."""

    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()


def make_request(num_tokens: int = 10, *, block_size: int = 16, token_ids: list[int] | None = None,
                 request_id: str | None = None, cache_salt: str | None = None,
                 sampling_params: StopFields | None = None) -> Request:
    ids = token_ids if token_ids is not None else [1000 + next(_ids) % 1000 + i for i in range(num_tokens)]
    return Request(request_id or f"req-{next(_ids)}", ids, sampling_params=sampling_params, block_size=block_size,
                   cache_salt=cache_salt)


def make_manager(num_blocks: int = 10, block_size: int = 16, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)


def make_scheduler(num_blocks: int = 100, **kwargs) -> Scheduler:
    return Scheduler(SchedulerConfig(num_kv_blocks=num_blocks, **kwargs))
