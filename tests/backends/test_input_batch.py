"""The persistent input batch: rows change only where a block list did, and every step equals the old lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.cpu.attention import build_attention_metadata, metadata_from_inputs
from backends.input_batch import InputBatch, attention_inputs
from engine.sampling_params import SamplingParams
from scheduler.output import ScheduledRequest, SchedulerOutput, StepResult
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def request(rid: str, table: list[int], num_computed: int, num_new: int, needs_sample: bool = True):
    ids = list(range(100 + num_computed, 100 + num_computed + num_new))
    return ScheduledRequest(rid, ids, num_computed, table, None, GREEDY, needs_sample, block_size=BS)


def reference(out: SchedulerOutput) -> dict[str, list]:
    """The old per-step construction: Python lists from every request's block table."""
    positions, slots, ids, ends = [], [], [], []
    for r in out.scheduled:
        ps = list(range(r.num_computed_tokens, r.num_computed_tokens + len(r.token_ids)))
        positions += ps
        slots += [r.block_table[p // BS] * BS + p % BS for p in ps]
        ids += r.token_ids
        ends.append(len(ids))
    return {"positions": positions, "slots": slots, "ids": ids,
            "logits": [e - 1 for e, r in zip(ends, out.scheduled) if r.needs_sample],
            "tables": [list(r.block_table[: -(-(r.num_computed_tokens + len(r.token_ids)) // BS)])
                       for r in out.scheduled]}


def assert_matches_reference(step, out: SchedulerOutput) -> None:
    ref = reference(out)
    assert step.token_ids.tolist() == ref["ids"]
    assert step.positions.tolist() == ref["positions"]
    assert step.slot_mapping.tolist() == ref["slots"]
    assert step.logits_indices.tolist() == ref["logits"]
    tables = step.tables()
    for i, table in enumerate(ref["tables"]):
        assert tables[i, : len(table)].tolist() == table and not tables[i, len(table):].any()


def test_slot_mapping_equals_the_reference_formula_for_mixed_steps():
    rng = np.random.default_rng(0)
    batch = InputBatch(BS, max_reqs=2, max_blocks=2, max_tokens=4)          # everything must grow
    for _ in range(20):
        scheduled = []
        for i in range(int(rng.integers(1, 7))):
            num_computed, num_new = int(rng.integers(0, 30)), int(rng.integers(1, 12))
            table = rng.permutation(200)[: -(-(num_computed + num_new) // BS) + int(rng.integers(0, 3))].tolist()
            scheduled.append(request(f"r{i}", table, num_computed, num_new, bool(rng.integers(0, 2))))
        out = SchedulerOutput(scheduled, BS)
        assert_matches_reference(batch.prepare(out), out)


def test_rows_are_written_only_when_a_request_gains_a_block_or_joins():
    batch = InputBatch(BS)
    a, b = [3, 7], [5]
    batch.prepare(SchedulerOutput([request("a", a, 5, 1), request("b", b, 2, 1)], BS))
    assert batch.num_row_writes == 2                                          # both joined
    batch.prepare(SchedulerOutput([request("a", a, 6, 1), request("b", b, 3, 1)], BS))
    assert batch.num_row_writes == 2                                          # same lists, same lengths
    b.append(9)                                                               # b's next token opens a block
    step = batch.prepare(SchedulerOutput([request("a", a, 7, 1), request("b", b, 4, 1)], BS))
    assert batch.num_row_writes == 3 and step.slot_mapping.tolist() == [7 * BS + 3, 9 * BS]
    assert batch.block_tables[batch.row_of("b"), :2].tolist() == [5, 9]


def test_join_leave_and_reorder_keep_rows_and_reuse_freed_ones():
    batch = InputBatch(BS)
    a, b, c = [1], [2], [3]
    batch.prepare(SchedulerOutput([request("a", a, 0, 2), request("b", b, 0, 3)], BS))
    row_a, row_b = batch.row_of("a"), batch.row_of("b")
    step = batch.prepare(SchedulerOutput([request("b", b, 3, 1), request("a", a, 2, 1)], BS))   # reordered
    assert (batch.row_of("a"), batch.row_of("b")) == (row_a, row_b) and batch.num_row_writes == 2
    assert step.rows.tolist() == [row_b, row_a] and step.slot_mapping.tolist() == [2 * BS + 3, 1 * BS + 2]
    out = SchedulerOutput([request("c", c, 0, 1)], BS, finished_request_ids={"a"})
    step = batch.prepare(out)
    assert batch.row_of("a") is None and batch.row_of("c") == row_a            # the freed row, zeroed past c's
    assert batch.block_tables[row_a, 0] == 3 and batch.num_rows_in_use == 2
    assert_matches_reference(step, out)


def test_least_recently_scheduled_row_is_evicted_when_nobody_reports_finished():
    batch = InputBatch(BS, max_reqs=2)
    for i in range(6):                                                        # a new request every step
        out = SchedulerOutput([request("keep", [0, 1], 4, 1), request(f"n{i}", [10 + i], 0, 2)], BS)
        assert_matches_reference(batch.prepare(out), out)
    assert batch.num_rows_in_use == 2 and batch.block_tables.shape[0] == 2 and batch.row_of("keep") is not None
    out = SchedulerOutput([request(f"m{i}", [20 + i], 0, 1) for i in range(5)], BS)   # more than the rows
    assert_matches_reference(batch.prepare(out), out)
    assert batch.block_tables.shape[0] >= 5


def test_bad_steps_raise_value_errors():
    batch = InputBatch(BS)
    with pytest.raises(ValueError, match="cannot hold"):
        batch.prepare(SchedulerOutput([request("a", [0], 4, 1)], BS))
    with pytest.raises(ValueError, match="at least one new token"):
        batch.prepare(SchedulerOutput([request("b", [0], 0, 0)], BS))
    with pytest.raises(ValueError, match="block_size"):
        batch.prepare(SchedulerOutput([request("c", [0], 0, 1)], BS + 1))


def scheduler_run(num_blocks: int, budget: int, prompts: list[list[int]], late: list[list[int]] = ()):
    """Drive a real scheduler; yield every step's output (sampled token: 7) until all requests end."""
    sched = Scheduler(SchedulerConfig(num_kv_blocks=num_blocks, block_size=BS, max_num_seqs=8,
                                      max_num_batched_tokens=budget, max_model_len=128))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.add_request(Request(f"r{i}", p, params, BS))
    steps = 0
    while sched.has_unfinished_requests():
        if steps == 3:
            for i, p in enumerate(late):
                sched.add_request(Request(f"late{i}", p, params, BS))
        out = sched.schedule()
        yield sched, out
        sched.update_from_output(out, StepResult({r.request_id: 7 for r in out.scheduled if r.needs_sample}))
        steps += 1


SCENARIOS = ["chunked", "preempted", "prefix_cached"]


def scenario_run(case: str, seed: int = 1):
    """``scheduler_run`` of one scenario: chunked prefill, a pool small enough to preempt, or shared prefixes."""
    rng = np.random.default_rng(seed)
    prompt = lambda n: rng.integers(0, 50, n).tolist()                          # noqa: E731
    shared = prompt(17)
    num_blocks, budget, prompts, late = {
        "chunked": (200, 10, [prompt(23), prompt(9), prompt(31)], []),
        "preempted": (14, 64, [prompt(11), prompt(10), prompt(9)], []),
        "prefix_cached": (200, 64, [shared + prompt(3)], [shared + prompt(5), shared[:9] + prompt(2)]),
    }[case]
    return scheduler_run(num_blocks, budget, prompts, late)


@pytest.mark.parametrize("case", SCENARIOS)
def test_every_scheduler_step_equals_the_old_per_step_construction(case):
    batch = InputBatch(BS)
    seen_preempted = 0
    for sched, out in scenario_run(case):
        if out.is_empty:
            continue
        seen_preempted += len(out.preempted_request_ids)
        step = batch.prepare(out)
        assert_matches_reference(step, out)
        for r in out.scheduled:                                               # live lists, not copies
            assert r.block_table is sched.kv.block_ids(r.request_id)
        for r, row in zip(out.scheduled, step.rows.tolist()):
            n = len(r.block_table)
            assert batch.block_tables[row, :n].tolist() == sched.kv.get_block_ids(r.request_id)
        # the cpu attention metadata from the persistent batch equals the one from the lists
        ref = reference(out)
        lists = [list(r.block_table) for r in out.scheduled]
        for native in (False, True):
            old = build_attention_metadata([len(r.token_ids) for r in out.scheduled],
                                           [r.num_computed_tokens for r in out.scheduled], lists, ref["slots"], BS,
                                           max_gather_tokens=16, native_decode=native)
            new = metadata_from_inputs(step, BS, max_gather_tokens=16, native_decode=native)
            assert_same_metadata(old, new)
    if case == "preempted":
        assert seen_preempted > 0
    if case == "prefix_cached":
        assert sched.kv.prefix_cache_hits > 0


def assert_same_metadata(old, new) -> None:
    assert torch.equal(old.slot_mapping, new.slot_mapping)
    assert (old.native_decode is None) == (new.native_decode is None)
    if old.native_decode is not None:
        for name in ("rows", "block_tables", "context_lens"):
            assert torch.equal(getattr(old.native_decode, name), getattr(new.native_decode, name)), name
    assert len(old.decode_groups) == len(new.decode_groups)
    for g, h in zip(old.decode_groups, new.decode_groups):
        assert g.num_blocks == h.num_blocks and torch.equal(g.rows, h.rows) and torch.equal(g.block_ids, h.block_ids)
        assert torch.equal(g.mask, h.mask)
    assert len(old.prefills) == len(new.prefills)
    for p, q in zip(old.prefills, new.prefills):
        assert (p.query_start, p.query_end, p.context_len, p.key_start) == (q.query_start, q.query_end,
                                                                           q.context_len, q.key_start)
        assert (p.block_ids is None and q.block_ids is None) or torch.equal(p.block_ids, q.block_ids)


def test_preempted_request_is_readmitted_with_a_new_list_and_its_row_rewritten():
    batch = InputBatch(BS)
    readmitted = False
    lists: dict[str, list[int]] = {}                 # request id -> the block list it was last scheduled with
    rng = np.random.default_rng(2)
    for sched, out in scheduler_run(14, 64, [rng.integers(0, 50, n).tolist() for n in (11, 10, 9)]):
        before = batch.num_row_writes
        if not out.is_empty:
            assert_matches_reference(batch.prepare(out), out)
        for rid in out.preempted_request_ids:                 # never rescheduled in the step that preempts it
            assert batch.row_of(rid) is None
        for r in out.scheduled:
            if r.request_id in lists and lists[r.request_id] is not r.block_table:
                readmitted = True
                assert batch.num_row_writes > before
            lists[r.request_id] = r.block_table
    assert readmitted


def test_attention_inputs_keep_given_slots_for_warm_up_steps():
    step = attention_inputs([2], [0], [[5]], [-1, -1], BS)
    assert step.slot_mapping.tolist() == [-1, -1] and step.tables().tolist() == [[5]]
    assert step.context_lens.tolist() == [2] and step.query_start_locs.tolist() == [0, 2]
