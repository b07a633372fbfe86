"""Decode throughput at batch 32 with a JSON schema against the same run unconstrained.

    .venv/bin/python scripts/bench_structured_output.py [--model PATH] [--batch 32] [--max-tokens 32] [--rounds 2]

The schema keeps every request running to max_tokens (a string of at least
400 characters), so both runs decode the same number of tokens at a full
batch; rounds alternate (free, constrained) to even out a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import time

from engine.args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "minLength": 400}},
          "required": ["title"], "additionalProperties": False}


def run(engine: LLMEngine, batch: int, max_tokens: int, so: StructuredOutputsParams | None, tag: str) -> float:
    """Generated tokens per second of ``batch`` requests (temperature 1, seeded)."""
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt=f"Write a JSON object about topic number {i}:",
                           sampling_params=SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                                          ignore_eos=True, structured_outputs=so))
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += sum(len(c.token_ids) for c in out.outputs)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    engine = LLMEngine(EngineArgs(model=a.model, max_num_seqs=a.batch, enable_prefix_caching=False))
    so = StructuredOutputsParams(json=SCHEMA)
    run(engine, 2, 2, so, "warmup")                    # compiles the schema, builds the tokenizer info
    free, constrained = [], []
    for r in range(a.rounds):
        free.append(run(engine, a.batch, a.max_tokens, None, f"free{r}"))
        constrained.append(run(engine, a.batch, a.max_tokens, so, f"json{r}"))
    best_free, best_json = max(free), max(constrained)
    print(json.dumps({"batch": a.batch, "max_tokens": a.max_tokens, "free_tok_s": [round(x, 1) for x in free],
                      "json_schema_tok_s": [round(x, 1) for x in constrained],
                      "slowdown_pct": round(100 * (1 - best_json / best_free), 1)}))


if __name__ == "__main__":
    main()
