"""The persistent input batch: block tables kept across steps, the step's arrays filled by numpy.

Every backend needs the same per-step inputs: the flattened token ids, their
positions and cache slots, each request's query length, context length and
block table. Rebuilding them from the scheduler's lists costs a Python copy
of every block of every request per step (256 requests x 4k tokens: 65k ints
a step). ``InputBatch`` keeps one row per request instead::

    block_tables   [max_reqs, max_blocks] int32    row of request r: its block ids, 0 past them
    rows           request id -> row               assigned on first sight, freed on finish / preemption

and a step touches a row only where the request's block list changed: the
scheduler passes its live, append-only list by reference
(``scheduler.output``), so an unchanged list (same object, same length) costs
an identity check, a grown one writes its new tail, a new object (a request
re-admitted after preemption, or a hand-made step) rewrites the row. Rows of
finished and preempted requests are freed; when none is free the least
recently scheduled row is evicted (callers that never report finished
requests, like tensor-parallel workers, stay bounded), and the table grows
only when a single step holds more requests than it has rows.

Everything else is vectorised from those rows (``StepInputs``)::

    query_start_locs = [0, cumsum(query_lens)]                          [R + 1]
    positions[t]     = num_computed[r] + t - query_start_locs[r]        [T]   (r: the request of token t)
    slot_mapping[t]  = block_tables[row[r], positions[t] // B] * B + positions[t] % B

The arrays of ``StepInputs`` are views of buffers reused every step (valid
until the next ``prepare``); framework-neutral numpy, turned into torch or MLX
tensors by each backend.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from backends.base import step_requests
from scheduler.output import SchedulerOutput


class StepInputs(NamedTuple):
    """One step's inputs in token order (views valid until the next ``InputBatch.prepare``)."""

    token_ids: np.ndarray          # [T] index dtype: tokens whose K/V the step computes
    positions: np.ndarray          # [T] index dtype
    slot_mapping: np.ndarray       # [T] index dtype: cache slot of each token
    query_lens: np.ndarray         # [R] index dtype: new tokens per request
    num_computed: np.ndarray       # [R] index dtype: tokens already cached per request
    context_lens: np.ndarray       # [R] index dtype: num_computed + query_lens
    query_start_locs: np.ndarray   # [R + 1] index dtype: first row of each request, then T
    num_blocks: np.ndarray         # [R] index dtype: blocks each request's context spans
    rows: np.ndarray               # [R] intp: each request's row of block_tables
    block_tables: np.ndarray       # [max_reqs, max_blocks] int32: the persistent table (index with rows)
    num_written: np.ndarray        # [max_reqs]: blocks written in each row (0 past them)
    logits_indices: np.ndarray     # [N] index dtype: rows whose logits are kept (last token of each sampling
    #                                request, or every token with all_tokens)

    @property
    def num_reqs(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def tables(self, requests: np.ndarray | None = None, width: int | None = None) -> np.ndarray:
        """``[n, width]`` int32 block tables of ``requests`` (indices into this step, default all).

        Zero past each request's ``num_blocks``; ``width`` defaults to their
        largest ``num_blocks``. A fresh contiguous array.
        """
        rows, num_blocks = self.rows, self.num_blocks
        if requests is not None:
            rows, num_blocks = rows[requests], num_blocks[requests]
        if width is None:
            width = int(num_blocks.max()) if len(num_blocks) else 0
        out = self.block_tables[rows, :width]                                  # [n, W]
        if (self.num_written[rows] > num_blocks).any():   # a list longer than its context (hand-made steps)
            out *= np.arange(width)[None, :] < num_blocks[:, None]
        return out


class InputBatch:
    """Per-request block-table rows kept across steps, and the step arrays (see the module docstring).

    ``max_reqs`` / ``max_blocks`` / ``max_tokens`` size the buffers up front
    (a backend that knows ``max_num_seqs``, ``max_model_len`` and
    ``max_num_batched_tokens`` passes them); every buffer grows by doubling
    when a step needs more. ``index_dtype`` is the dtype of the step arrays
    (int64 for torch indexing on CPU, int32 for the GPU kernels); the block
    table is int32.
    """

    def __init__(self, block_size: int, max_reqs: int = 16, max_blocks: int = 16, max_tokens: int = 256,
                 index_dtype: type = np.int64) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if min(max_reqs, max_blocks, max_tokens) < 1:
            raise ValueError("max_reqs, max_blocks and max_tokens must be >= 1")
        self.block_size = block_size
        self.index_dtype = np.dtype(index_dtype)
        self.block_tables = np.zeros((max_reqs, max_blocks), dtype=np.int32)    # [max_reqs, max_blocks]
        self.num_written = np.zeros(max_reqs, dtype=np.int64)                   # [max_reqs] blocks in each row
        self._row_of: dict[str, int] = {}                                      # request id -> row
        self._id_of: list[str | None] = [None] * max_reqs                       # row -> request id
        self._lists: list[list[int] | None] = [None] * max_reqs                 # row -> the list it mirrors
        self._written: list[int] = [0] * max_reqs                               # row -> blocks written (Python)
        self._last_step = np.zeros(max_reqs, dtype=np.int64)                    # row -> last step that used it
        self._free_rows = list(range(max_reqs - 1, -1, -1))                     # popped from the end: row 0 first
        self._step = 0
        self.num_row_writes = 0                                                 # rows (re)written or extended
        self._alloc_tokens(max_tokens)
        self._alloc_reqs(max_reqs)

    @property
    def num_rows_in_use(self) -> int:
        return len(self._row_of)

    def row_of(self, request_id: str) -> int | None:
        """The row holding ``request_id``'s block table, or None."""
        return self._row_of.get(request_id)

    def remove(self, request_id: str) -> None:
        """Free the row of ``request_id`` (finished or preempted); unknown ids are ignored."""
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._id_of[row] = None
            self._lists[row] = None                      # keeps the written ids: zeroed when the row is reused
            self._free_rows.append(row)

    def prepare(self, out: SchedulerOutput, all_tokens: bool = False, *, takes_ahead: bool = False) -> StepInputs:
        """Update the rows from ``out`` and fill the step arrays; ``all_tokens`` keeps every token's logits.

        An ahead step (``out.ahead``) fills ``token_ids`` with its
        placeholders (``scheduler.output.PLACEHOLDER_TOKEN_ID``): only a
        backend that substitutes the previous step's tokens on the device
        passes ``takes_ahead``. Raises ``ValueError`` on a step that cannot be
        laid out (a request with no new token, a block table too short for
        its context, an ahead step without ``takes_ahead``).
        """
        if out.ahead and not takes_ahead:
            raise ValueError("an ahead step's token ids are placeholders for the previous step's samples: "
                             "only a backend with supports_ahead can lay it out")
        if out.block_size != self.block_size:
            raise ValueError(f"step block_size {out.block_size} != input batch block_size {self.block_size}")
        for rid in out.finished_request_ids:
            self.remove(rid)
        for rid in out.preempted_request_ids:
            self.remove(rid)
        self._step += 1
        scheduled = out.scheduled
        row_of, lists, written = self._row_of, self._lists, self._written
        rows, query_lens, num_computed, sampling, token_ids = [], [], [], [], []
        for r in scheduled:
            row = row_of.get(r.request_id)
            if row is None:
                row = self._add_row(r.request_id, rows)
            table = r.block_table
            if lists[row] is not table or len(table) != written[row]:
                self._write_row(row, table)
            rows.append(row)
            token_ids += r.token_ids
            query_lens.append(len(r.token_ids))
            num_computed.append(r.num_computed_tokens)
            sampling.append(r.needs_sample)
        return self._arrays(rows, query_lens, num_computed, sampling, token_ids, all_tokens)

    # -- rows ----------------------------------------------------------------------

    def _add_row(self, request_id: str, taken: list[int]) -> int:
        """A row for a request new to the batch; ``taken``: rows this step already uses (never evicted)."""
        if not self._free_rows:
            self._last_step[taken] = self._step
            oldest = int(np.argmin(self._last_step))
            if self._last_step[oldest] == self._step:           # every row is in this step: grow
                self._grow_reqs(2 * len(self._id_of))
            else:
                self.remove(self._id_of[oldest])
        row = self._free_rows.pop()
        self._row_of[request_id] = row
        self._id_of[row] = request_id
        self._last_step[row] = self._step
        return row

    def _write_row(self, row: int, table: list[int]) -> None:
        """Mirror ``table`` in ``row``: its new tail if it is the same list grown, else all of it."""
        n, w = len(table), self._written[row]
        if n > self.block_tables.shape[1]:
            self._grow_blocks(max(n, 2 * self.block_tables.shape[1]))
        if self._lists[row] is table and n > w:
            self.block_tables[row, w:n] = table[w:]
        else:
            self.block_tables[row, :n] = table
            if w > n:
                self.block_tables[row, n:w] = 0
        self._lists[row] = table
        self._written[row] = n
        self.num_written[row] = n
        self.num_row_writes += 1

    # -- step arrays ---------------------------------------------------------------

    def _arrays(self, rows: list[int], query_lens: list[int], num_computed: list[int], sampling: list[bool],
                token_ids: list[int], all_tokens: bool) -> StepInputs:
        num_reqs, num_tokens = len(rows), len(token_ids)
        if num_reqs > len(self._req_buf[0]) - 1:
            self._alloc_reqs(2 * num_reqs)
        if num_tokens > len(self._tok_buf[0]):
            self._alloc_tokens(2 * num_tokens)
        bs, idx = self.block_size, self.index_dtype
        rows_a = self._rows_buf[:num_reqs]
        rows_a[:] = rows
        self._last_step[rows_a] = self._step
        q_lens, computed, ctx, starts, blocks = (b[:n] for b, n in zip(self._req_buf, (num_reqs,) * 3 + (
            num_reqs + 1, num_reqs)))
        q_lens[:] = query_lens
        computed[:] = num_computed
        if num_reqs and int(q_lens.min()) < 1:
            raise ValueError("every scheduled request needs at least one new token")
        np.add(computed, q_lens, out=ctx)
        starts[0] = 0
        np.cumsum(q_lens, out=starts[1:])
        np.floor_divide(ctx + (bs - 1), bs, out=blocks)
        short = blocks > self.num_written[rows_a]
        if short.any():
            i = int(np.flatnonzero(short)[0])
            raise ValueError(f"block table of {int(self.num_written[rows_a[i]])} blocks cannot hold "
                             f"{int(ctx[i])} tokens")
        ids, positions, slots, logits = (b[:num_tokens] for b in self._tok_buf)
        ids[:] = token_ids
        if num_tokens == num_reqs:                               # decode only: one token per request
            positions[:] = computed
            token_rows = rows_a
        else:
            request_of = np.repeat(np.arange(num_reqs), q_lens)                    # [T]
            np.subtract(np.arange(num_tokens, dtype=idx), starts[request_of], out=positions)
            positions += computed[request_of]
            token_rows = rows_a[request_of]
        np.multiply(self.block_tables[token_rows, positions // bs], bs, out=slots, dtype=idx, casting="unsafe")
        slots += positions % bs
        if all_tokens:
            logits[:] = np.arange(num_tokens, dtype=idx)
            logits_indices = logits
        else:
            ends = starts[1:][np.asarray(sampling, dtype=bool)] if num_reqs else starts[:0]
            logits_indices = logits[:len(ends)]
            np.subtract(ends, 1, out=logits_indices)
        return StepInputs(ids, positions, slots, q_lens, computed, ctx, starts, blocks, rows_a, self.block_tables,
                          self.num_written, logits_indices)

    # -- buffers -------------------------------------------------------------------

    def _alloc_tokens(self, n: int) -> None:
        self._tok_buf = tuple(np.zeros(n, dtype=self.index_dtype) for _ in range(4))   # ids, positions, slots, logits

    def _alloc_reqs(self, n: int) -> None:
        # query_lens, num_computed, context_lens, query_start_locs (n + 1), num_blocks
        self._req_buf = tuple(np.zeros(n + 1, dtype=self.index_dtype) for _ in range(5))
        self._rows_buf = np.zeros(n + 1, dtype=np.intp)

    def _grow_reqs(self, n: int) -> None:
        old = len(self._id_of)
        if n <= old:
            return
        self.block_tables = _grown(self.block_tables, (n, self.block_tables.shape[1]))
        self.num_written = _grown(self.num_written, (n,))
        self._last_step = _grown(self._last_step, (n,))
        self._id_of += [None] * (n - old)
        self._lists += [None] * (n - old)
        self._written += [0] * (n - old)
        self._free_rows = list(range(n - 1, old - 1, -1)) + self._free_rows

    def _grow_blocks(self, n: int) -> None:
        self.block_tables = _grown(self.block_tables, (self.block_tables.shape[0], n))


def _grown(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` copied into the corner of a zeroed array of ``shape``."""
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


def attention_inputs(query_lens, num_computed_tokens, block_tables, slot_mapping, block_size: int,
                     index_dtype: type = np.int64) -> StepInputs:
    """The attention part of ``StepInputs`` from plain per-request lists (in token order).

    For callers without a persistent batch (kernel tests, warm-up steps,
    ``build_attention_metadata``): checked by ``step_requests`` (``ValueError``
    on lists that disagree); block tables are padded into one array, the
    given ``slot_mapping`` is kept as it is (it may hold -1: skipped slots),
    ``token_ids`` and ``logits_indices`` are empty.
    """
    requests = list(step_requests(query_lens, num_computed_tokens, block_tables, slot_mapping, block_size))
    idx = np.dtype(index_dtype)
    num_blocks = np.array([r.num_blocks for r in requests], dtype=idx)                     # [R]
    tables = np.zeros((len(requests), max(1, int(num_blocks.max()) if requests else 1)), dtype=np.int32)
    for i, r in enumerate(requests):
        tables[i, :r.num_blocks] = r.table[:r.num_blocks]
    q_lens = np.array([r.query_len for r in requests], dtype=idx)
    computed = np.array([r.num_computed for r in requests], dtype=idx)
    starts = np.concatenate(([0], np.cumsum(q_lens))).astype(idx)
    positions = (np.concatenate([np.arange(r.num_computed, r.context_len) for r in requests])
                 if requests else np.zeros(0)).astype(idx)
    empty = np.zeros(0, dtype=idx)
    return StepInputs(empty, positions, np.asarray(slot_mapping, dtype=idx).reshape(-1), q_lens, computed,
                      computed + q_lens, starts, num_blocks, np.arange(len(requests), dtype=np.intp), tables,
                      num_blocks.astype(np.int64), empty)
