"""The offline batch API, modelled on vLLM's ``LLM``.

    from engine import LLM, SamplingParams
    llm = LLM()                                     # embedded default model
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from itertools import count

from engine.args import EngineArgs
from engine.llm_engine import LLMEngine, StepFailedError, failed_error
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        """Load ``model`` (None: the embedded default); kwargs are ``EngineArgs`` fields.

        ``dtype`` defaults to "auto", the backend's choice; ``llm.engine.dtype`` says which it took.
        ``quantization="auto"`` keeps a quantized checkpoint quantized where the backend has kernels
        (``"none"`` dequantizes it); ``llm.engine.weight_format`` says how the weights are held.
        """
        unknown = set(kwargs) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        inputs = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        return self._run(inputs, sampling_params, use_tqdm)

    def chat(self, conversations: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate a reply to each conversation (a list of {role, content}) with the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([{"messages": list(c)} for c in conversations], sampling_params, use_tqdm)

    def _run(self, inputs: list[dict], sampling_params, use_tqdm: bool | None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(inputs)
        else:
            params = list(sampling_params)
            if len(params) != len(inputs):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(inputs)} prompts")
        ids = []
        try:
            for inp, p in zip(inputs, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, sampling_params=p, **inp)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._collect(ids, use_tqdm)

    def _collect(self, ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        acc: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
        prompt_logprobs: dict[str, list] = {}          # sent in one delta, kept for the final output
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        bar = None
        if show and len(ids) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while len(finals) < len(ids):
                try:
                    step_outputs = self.engine.step()
                except StepFailedError as e:
                    raise failed_error(e.request_ids[0], e) from e
                for out in step_outputs:
                    self._accumulate(acc[out.request_id], out)
                    if out.prompt_logprobs is not None:
                        prompt_logprobs[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        out.outputs = [acc[out.request_id][i] for i in sorted(acc[out.request_id])]
                        out.prompt_logprobs = prompt_logprobs.get(out.request_id)
                        finals[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in finals:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finals[rid] for rid in ids]

    @staticmethod
    def _accumulate(acc: dict[int, CompletionOutput], out: RequestOutput) -> None:
        for d in out.outputs:
            c = acc.get(d.index)
            if c is None:
                acc[d.index] = CompletionOutput(d.index, d.text, list(d.token_ids), d.finish_reason, d.stop_reason,
                                                None if d.logprobs is None else list(d.logprobs))
                continue
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                c.logprobs = (c.logprobs or []) + d.logprobs
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason

    def get_stats(self):
        return self.engine.get_stats()
