"""One rank's share of the model: the cpu backend over a shard, wired to the group.

The same code runs on the driver (rank 0, in the engine process) and in every
worker, so all ranks issue the same collectives in the same order. A rank
holds its shard of the weights (``sharding.shard_config``) and its shard of
the paged KV cache: ``num_kv_heads / world_size`` heads per layer, the same
number of blocks as every other rank (the scheduler's block ids mean the same
slots everywhere).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from backends.cpu.backend import CPUBackend
from backends.tp.comm import TPGroup
from model.config import ModelConfig
from scheduler.output import ScheduledRequest, SchedulerOutput


def vocab_parallel_embedding(input_ids: torch.Tensor, weight: torch.Tensor, *, vocab_start: int,
                             all_reduce) -> torch.Tensor:
    """Embedding lookup over a vocabulary shard: rows ``vocab_start ..`` of the table.

    Ids outside the shard read row 0 and are zeroed, so after the all-reduce
    every token carries exactly the one row its owner rank looked up.
    """
    local = input_ids - vocab_start                                              # [T]
    outside = (local < 0) | (local >= weight.shape[0])                           # [T]
    x = F.embedding(local.masked_fill(outside, 0), weight)                       # [T, hidden]
    x.masked_fill_(outside[:, None], 0.0)
    return all_reduce(x)                                                         # [T, hidden]


def model_inputs_only(scheduler_output: SchedulerOutput) -> SchedulerOutput:
    """What the workers need of a step: tokens, positions and cache slots, no sampling state.

    Sampling params and the prompt / output histories stay on the driver,
    which alone samples; this keeps each step's message small.
    """
    return SchedulerOutput(
        scheduled=[ScheduledRequest(r.request_id, r.token_ids, r.num_computed_tokens, r.block_table,
                                    r.slot_mapping, None, r.needs_sample)
                   for r in scheduler_output.scheduled],
        block_size=scheduler_output.block_size,
        finished_request_ids=scheduler_output.finished_request_ids,     # the workers' input batches free rows
        preempted_request_ids=scheduler_output.preempted_request_ids,
    )


class RankRunner:
    """Runs this rank's shard for each step; the driver gets the full logits back."""

    def __init__(self, shard: ModelConfig, weights: dict[str, np.ndarray], group: TPGroup, *,
                 vocab_size: int, dtype: str = "float32", num_threads: int | None = None) -> None:
        self.group = group
        self.vocab_size = vocab_size                                             # unpadded, of the whole model
        self.backend = CPUBackend(shard, weights, dtype=dtype, num_threads=num_threads)
        model = self.backend.model
        model.all_reduce = group.all_reduce
        model.embedding = partial(vocab_parallel_embedding, vocab_start=group.rank * shard.vocab_size,
                                  all_reduce=group.all_reduce)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.backend.allocate_kv_cache(num_blocks, block_size)

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs on this rank (its KV heads only)."""
        return self.backend.kv_block_bytes(block_size)

    def run(self, step: SchedulerOutput) -> torch.Tensor | None:
        """This rank's part of the step; float32 logits ``[N, vocab]`` on the driver, else None."""
        logits = self.backend.compute_logits(step)                               # [N, V_r]
        if not any(r.needs_sample for r in step.scheduled):
            return None
        full = self.group.gather_to_driver(logits)                               # [N, world * V_r] on rank 0
        return None if full is None else full[:, : self.vocab_size]              # [N, V]

    def shutdown(self) -> None:
        self.backend.shutdown()
