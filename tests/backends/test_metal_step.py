"""The metal backend's step: the forward pass starts with ``mx.async_eval``, the sampling plan is built on the
host while it runs, and a decode step synchronises with the host once (greedy, seeded and unseeded draws,
penalties, logprobs)."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")

import backends.plan_sampler as plan_sampler  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama"))
    return LLM(path, backend="metal", dtype="float32", num_kv_blocks=64)


def _flatten(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten(a))
        elif isinstance(a, dict):
            out.extend(_flatten(list(a.values())))
        elif isinstance(a, mx.array):
            out.append(a)
    return out


class SyncSpy:
    """Counts host synchronisations: ``mx.eval`` calls, and ``tolist`` / ``item`` on arrays no ``mx.eval`` covered."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        self.evaluated: set[int] = set()
        self.keep: list = []                        # evaluated arrays stay alive so their ids stay unique
        real_eval, real_async = mx.eval, mx.async_eval
        real_tolist, real_item = mx.array.tolist, mx.array.item

        def eval_(*args):
            self.events.append("eval")
            arrays = _flatten(args)
            self.keep.extend(arrays)
            self.evaluated.update(id(a) for a in arrays)
            return real_eval(*args)

        def async_eval(*args):
            self.events.append("async_eval")
            return real_async(*args)

        def host(real, name):
            def read(a, *args):
                if id(a) not in self.evaluated:
                    self.events.append(name)
                return real(a, *args)
            return read

        monkeypatch.setattr(mx, "eval", eval_)
        monkeypatch.setattr(mx, "async_eval", async_eval)
        monkeypatch.setattr(mx.array, "tolist", host(real_tolist, "tolist"))
        monkeypatch.setattr(mx.array, "item", host(real_item, "item"))
        real_plan = plan_sampler.SamplingPlan.from_rows
        monkeypatch.setattr(plan_sampler.SamplingPlan, "from_rows",
                            staticmethod(lambda *a: self.events.append("plan") or real_plan(*a)))

    def reset(self) -> None:
        self.events.clear()
        self.evaluated.clear()
        self.keep.clear()

    @property
    def syncs(self) -> int:
        return sum(e in ("eval", "tolist", "item") for e in self.events)


PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True),
    "unseeded_min_p": SamplingParams(temperature=1.0, min_p=0.05, max_tokens=6, ignore_eos=True),
    "penalised_logprobs": SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                                         logprobs=3, max_tokens=6, ignore_eos=True),
}


def test_a_decode_step_synchronises_once(llm, monkeypatch):
    engine = llm.engine
    for i, (name, params) in enumerate(PARAMS.items()):
        engine.add_request(f"{name}-{i}", prompt_token_ids=[5 + i, 17, 33, 41, 9], sampling_params=params)
    engine.step()                                            # the prefill step
    spy = SyncSpy(monkeypatch)
    sched_sizes: list[int] = []
    real_execute = engine.backend.execute

    def execute(sched):
        sched_sizes.extend(len(r.token_ids) for r in sched.scheduled)
        return real_execute(sched)

    monkeypatch.setattr(engine.backend, "execute", execute)
    decode_steps = 0
    while engine.has_unfinished_requests():
        spy.reset()
        sched_sizes.clear()
        engine.step()
        if sched_sizes and all(n == 1 for n in sched_sizes):
            decode_steps += 1
            assert spy.syncs <= 1, spy.events
            # the forward pass is launched before the host builds the sampling plan
            assert spy.events.index("async_eval") < spy.events.index("plan"), spy.events
    assert decode_steps >= 4


def test_the_pipelined_step_keeps_the_tokens_of_a_blocking_one(llm):
    """Seeded sampling is reproducible and greedy is deterministic through the lazy sampler."""
    prompts = [[5, 17, 33, 41, 9], [8, 8, 8, 1]]
    params = [PARAMS["seeded"], PARAMS["greedy"]]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert first == again and all(len(t) == 6 for t in first)
