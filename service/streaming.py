"""Coalescing of a request's delta outputs while the client is slow to take them.

When the engine steps faster than gRPC writes (small models, fast GPUs,
many streams), deltas queue up behind each write.
``AsyncEngine.generate_batches`` hands the servicer everything that arrived
since the last message, and ``merge_deltas`` folds it into one output, so a
backlog costs one message, not one per token. With no backlog it changes
nothing.
"""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """One delta output equal to ``outputs`` (consecutive deltas of one request) in turn."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for out in outputs:
        for c in out.outputs:
            into = merged.get(c.index)
            if into is None:
                merged[c.index] = CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                                   c.stop_reason, None if c.logprobs is None else list(c.logprobs))
                continue
            into.text += c.text
            into.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                into.logprobs = (into.logprobs or []) + list(c.logprobs)
            into.finish_reason, into.stop_reason = c.finish_reason, c.stop_reason
    last = outputs[-1]
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, list(merged.values()),
                         last.finished, last.num_cached_tokens, last.metrics,
                         emitted_time=outputs[0].emitted_time,     # the oldest delta's: it waited longest
                         prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None),
                                              None))
