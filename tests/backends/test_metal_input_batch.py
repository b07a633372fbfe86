"""The metal backend's attention metadata from the persistent batch equals the one from the scheduler's lists."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends.input_batch import InputBatch                                     # noqa: E402
from backends.metal.attention import build_attention_metadata, metadata_from_inputs   # noqa: E402
from tests.backends.test_input_batch import BS, SCENARIOS, reference, scenario_run   # noqa: E402


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(mx.array_equal(a, b).item())


def assert_same_metadata(old, new) -> None:
    assert _same(old.slot_mapping, new.slot_mapping)
    assert _same(old.token_context_lens, new.token_context_lens)
    assert _same(old.restore_order, new.restore_order)
    assert (old.decode is None) == (new.decode is None)
    if old.decode is not None:
        for name in ("rows", "slots", "mask"):
            assert _same(getattr(old.decode, name), getattr(new.decode, name)), name
    assert len(old.prefills) == len(new.prefills)
    for p, q in zip(old.prefills, new.prefills):
        assert (p.query_start, p.query_end, p.context_len, p.key_start) == (q.query_start, q.query_end,
                                                                           q.context_len, q.key_start)
        assert _same(p.slots, q.slots) and _same(p.mask, q.mask)


@pytest.mark.parametrize("case", SCENARIOS)
@pytest.mark.parametrize("window", [None, 8])
def test_every_scheduler_step_gives_the_metadata_of_the_lists(case, window):
    batch = InputBatch(BS, index_dtype=np.int32)
    steps = 0
    for _, out in scenario_run(case, seed=2):
        if out.is_empty:
            continue
        step = batch.prepare(out)
        ref = reference(out)
        old = build_attention_metadata([len(r.token_ids) for r in out.scheduled],
                                       [r.num_computed_tokens for r in out.scheduled],
                                       [list(r.block_table) for r in out.scheduled], ref["slots"], BS)
        new = metadata_from_inputs(step, BS)
        if window is not None:
            old, new = old.windowed(window), new.windowed(window)
        assert_same_metadata(old, new)
        steps += 1
    assert steps > 3
