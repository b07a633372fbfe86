"""A scripted stand-in for ``AsyncEngine``: the service's plumbing (errors,
cancellation, health, drain, auth) tested without a model.

It "generates" the characters of the prompt reversed, one token per step
(token id = code point), ``step_s`` apart, and records what the service did
with each request.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field

from engine.model_info import ModelInfo
from common.errors import EngineDeadError, EngineShutdownError, InvalidRequestError
from engine.llm_engine import EngineStats
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from scheduler.output import Logprobs


class FakeTokenizer:
    vocab_size = 0x110000
    eos_token_ids = (0,)

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


@dataclass
class FakeEngine:
    step_s: float = 0.0
    fail_with: BaseException | None = None      # raised before the first output
    fail_after: int | None = None               # raise fail_after_error after this many tokens
    fail_after_error: BaseException | None = None   # default: EngineDeadError (the engine dies)
    num_generate_calls: int = 0
    is_dead: bool = False
    dead_error: BaseException | None = None
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    deadlines: dict[str, float | None] = field(default_factory=dict)
    draining: bool = False
    model_info: ModelInfo = ModelInfo("fake", 128, 0x110000, (0,), 16, 64, "cpu", "float32")

    def get_stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, 64, 64 - 2 * len(self.running), 0, 0, 0)

    async def run_tokenizer(self, fn, *args):
        return fn(*args)

    async def generate_batches(self, request_id: str, **kwargs):
        async with aclosing(self.generate(request_id, **kwargs)) as outs:
            async for out in outs:
                yield [out]

    async def generate(self, request_id: str, *, prompt=None, prompt_token_ids=None, messages=None,
                       sampling_params: SamplingParams | None = None, cache_salt=None, deadline=None):
        self.num_generate_calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        if self.draining:
            raise EngineShutdownError("draining")
        params = sampling_params or SamplingParams()
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages)
        else:
            ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt)
        if params.max_tokens is not None and params.max_tokens > 100:
            raise InvalidRequestError("max_tokens is too large for the fake")
        self.running.add(request_id)
        self.deadlines[request_id] = deadline
        out_ids = list(reversed(ids))[: params.max_tokens or len(ids)]
        done = False
        try:
            for i, t in enumerate(out_ids):
                await asyncio.sleep(self.step_s)
                if self.fail_after is not None and i >= self.fail_after:
                    if self.fail_after_error is not None:
                        raise self.fail_after_error
                    self.is_dead, self.dead_error = True, RuntimeError("boom")
                    raise EngineDeadError("engine is not serving: boom")
                last = i == len(out_ids) - 1
                lps = None if params.logprobs is None else [Logprobs(t, -0.5, 1, [(t, -0.5)] * params.logprobs)]
                outs = [CompletionOutput(k, chr(t), [t], "length" if last else None, None, lps)
                        for k in range(params.n)]
                yield RequestOutput(request_id, prompt, list(ids), outs, finished=last, num_cached_tokens=3)
            done = True
        finally:
            self.running.discard(request_id)
            (self.finished if done else self.aborted).append(request_id)

    def abort(self, request_id: str) -> None:
        pass

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        end = asyncio.get_running_loop().time() + timeout
        while self.running and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.01)
        return not self.running

    def shutdown(self) -> None:
        pass
