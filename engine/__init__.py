"""Request lifecycle: the offline ``LLM`` API, the engines, sampling params, outputs."""

from engine.args import EngineArgs
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # Heavy pieces load on first use, so `import engine` stays cheap.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]
