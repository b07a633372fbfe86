"""A request as the scheduler sees it: token ids, progress and status.

The scheduler knows nothing of text or tensors. A request is a growing list
of token ids (prompt, then sampled outputs) of which ``num_computed_tokens``
already have their K/V in the cache; every step computes some of the rest.
"""

from __future__ import annotations

import enum
import hashlib
import time
from typing import Any

import numpy as np


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"              # back in the waiting queue, its blocks freed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_TIME_LIMIT = "time_limit"    # its time limit passed: ended with what it had, not an error
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "time_limit", "error")


def hash_block_tokens(parent_hash: bytes | None, token_ids: list[int], extra_key: bytes = b"") -> bytes:
    """Hash of one full block, chained over its parent block's hash.

    SHA-256 over (parent hash, extra key, token ids): two blocks share a hash
    only if they hold the same tokens after the same prefix under the same
    extra key (e.g. a tenant's cache salt), collisions aside.
    """
    h = hashlib.sha256()
    h.update(parent_hash or b"\x00" * 32)
    h.update(len(extra_key).to_bytes(4, "little"))
    h.update(extra_key)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class Request:
    """Scheduling state of one sequence (one completion of a prompt).

    ``sampling_params`` is opaque here except for the stop fields of
    ``scheduler.stop.StopParams`` (None: EOS and the context limit only).
    ``priority`` orders the waiting queue under the priority policy (lower
    first); ``num_prompt_logprobs`` (top-k per prompt position, None: none)
    asks the backend for the logprob of every prompt token after the first.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
        block_size: int,
        *,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        num_prompt_logprobs: int | None = None,
    ):
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if num_prompt_logprobs is not None and (not isinstance(num_prompt_logprobs, int) or num_prompt_logprobs < 0):
            raise ValueError(f"num_prompt_logprobs must be None or a non-negative integer, got {num_prompt_logprobs!r}")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.extra_key = cache_salt.encode() if cache_salt else b""
        self.priority = priority                        # lower runs first (priority policy only)
        self.num_prompt_logprobs = num_prompt_logprobs  # top-k per prompt position; None: no prompt logprobs

        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1          # prompt tokens found in the prefix cache, set on first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None  # the stop token id that ended it; None for EOS, length or abort
        self.block_hashes: list[bytes] = []  # one per full block of all_token_ids
        self._update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and are not all computed yet: no token
        was sampled (the step that computes the prompt's end samples one), so
        a request preempted later takes prefix-cache hits again."""
        return self.num_prompt_logprobs is not None and not self.output_token_ids

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        tokens = self.all_token_ids
        tokens.append(token_id)
        if len(tokens) % self.block_size == 0:
            self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        bs = self.block_size
        for i in range(len(self.block_hashes), self.num_tokens // bs):
            parent = self.block_hashes[i - 1] if i else None
            self.block_hashes.append(hash_block_tokens(parent, self.all_token_ids[i * bs:(i + 1) * bs], self.extra_key))

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
