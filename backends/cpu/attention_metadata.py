"""Per-step attention metadata of the cpu backend: decode groups, native-decode tables, prefill chunks.

Built once per step for all layers, from the step's ``StepInputs``
(``backends.input_batch``: a persistent batch's arrays, or plain lists
through ``attention_inputs``), by vectorised numpy over the requests:

- decodes (one new token) go to the native kernel as one ``[n, max_blocks]``
  int32 table (``NativeDecode``), or, without it, are sorted by the blocks
  their window spans and packed into ``DecodeGroup``s whose padded gather
  stays under ``max_gather_tokens``;
- every other request becomes ``PrefillChunk``s: plain causal when nothing
  is cached before it, else pieces of query rows over its gathered context
  with bounded masks.

A sliding window's variant is derived on first use (``windowed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from backends.input_batch import StepInputs, attention_inputs


# Decode requests are gathered in groups of about this many bytes of K
# (padding included), so each group's K/V copy is still in the CPU cache when
# SDPA reads it; DEFAULT_MAX_GATHER_TOKENS is that budget for 4 KV heads of
# 64 float32 dims (the default of a bare ``build_attention_metadata`` call).
GATHER_BUDGET_BYTES = 2 << 20
DEFAULT_MAX_GATHER_TOKENS = 2048
# A chunk after a cached prefix attends in pieces of query rows whose
# [rows, context] mask holds at most this many elements.
MAX_MASK_ELEMENTS = 1 << 23


@dataclass
class DecodeGroup:
    """Decode requests (one new token each) attended together: one padded gather, one SDPA."""

    rows: torch.Tensor                # [n] int64: rows of their tokens in the flattened batch
    block_ids: torch.Tensor           # [n * num_blocks] int64: block tables (from the window's first block), padded
    num_blocks: int                   # blocks per request after padding
    mask: torch.Tensor                # [n, 1, 1, num_blocks * block_size] additive: 0 attend, -inf not


@dataclass
class NativeDecode:
    """All decode requests of the step, for the native kernel."""

    rows: torch.Tensor                # [n] int64: rows of their tokens in the flattened batch
    block_tables: torch.Tensor        # [n, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor        # [n] int32
    every: bool = False               # the step's only requests: rows are 0 .. n-1, one per token


@dataclass
class PrefillChunk:
    """One request with several new tokens (or a piece of its rows), attended on its own."""

    query_start: int                  # first row of its tokens in the flattened batch
    query_end: int                    # one past its last row
    context_len: int                  # keys up to its last row's position (cached + new)
    block_ids: torch.Tensor | None    # [num_ctx_blocks] int64 from key_start's block; None: plain causal
    mask: torch.Tensor | None         # [q_len, context_len - key_start] additive (0 / -inf); None with block_ids None
    key_start: int = 0                # position of the first gathered key (a block boundary)


@dataclass
class CPUAttentionMetadata:
    """Per-step inputs of ``CPUAttention``, shared by all layers."""

    slot_mapping: torch.Tensor                    # [T] int64: cache slot of each new token
    block_size: int
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    native_decode: NativeDecode | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    step: StepInputs | None = None                # the step's per-request arrays, in token order
    window: int | None = None                     # the sliding window these groups and chunks are for
    max_gather_tokens: int = DEFAULT_MAX_GATHER_TOKENS
    max_mask_elements: int = MAX_MASK_ELEMENTS    # a prefix chunk's query rows per piece: mask size bound
    dtype: torch.dtype = torch.float32            # of the additive masks
    _windowed: dict = field(default_factory=dict, repr=False)   # window -> this step's metadata for it
    _tables: np.ndarray | None = field(default=None, repr=False)  # [R, W] int32, gathered on first use

    def windowed(self, window: int | None) -> "CPUAttentionMetadata":
        """This step's metadata for layers with sliding ``window`` (itself for None), built on first use."""
        if window == self.window:
            return self
        if window not in self._windowed:
            self._windowed[window] = _build(self.step, self.slot_mapping, self.block_size, self.max_gather_tokens,
                                            self.dtype, self.native_decode is not None, window,
                                            self.max_mask_elements, self.native_decode, self._tables)
        return self._windowed[window]

    def tables(self) -> np.ndarray:
        """``[R, W]`` int32 block tables of the step's requests (0 past each one's blocks), gathered once."""
        if self._tables is None:
            self._tables = self.step.tables()
        return self._tables

    def token_context_lens(self) -> torch.Tensor:
        """``[T]`` int64: each new token's request context length after this step."""
        return torch.from_numpy(np.repeat(self.step.context_lens, self.step.query_lens).astype(np.int64))


def build_attention_metadata(
    query_lens: Sequence[int],
    num_computed_tokens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    max_gather_tokens: int = DEFAULT_MAX_GATHER_TOKENS,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    native_decode: bool = False,
    window: int | None = None,
    max_mask_elements: int = MAX_MASK_ELEMENTS,
) -> CPUAttentionMetadata:
    """Build the step's metadata from plain per-request lists (in token order).

    The list form of ``metadata_from_inputs`` (``backends.input_batch.attention_inputs``
    checks and packs the lists). With ``native_decode`` all decode requests
    go to the native kernel. Otherwise they are sorted by length and packed
    into groups whose padded gather stays under ``max_gather_tokens`` (a
    group holds at least one). Masks are additive in ``dtype`` (the query
    dtype), so SDPA need not convert a boolean mask in every layer.
    ``window`` builds it for layers with that sliding window (``windowed``
    derives the others).
    """
    step = attention_inputs(query_lens, num_computed_tokens, block_tables, slot_mapping, block_size)
    return metadata_from_inputs(step, block_size, max_gather_tokens, dtype, device, native_decode, window,
                                max_mask_elements)


def metadata_from_inputs(step: StepInputs, block_size: int, max_gather_tokens: int = DEFAULT_MAX_GATHER_TOKENS,
                         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         native_decode: bool = False, window: int | None = None,
                         max_mask_elements: int = MAX_MASK_ELEMENTS) -> CPUAttentionMetadata:
    """The step's metadata from its ``StepInputs`` (a persistent ``InputBatch``'s, or ``attention_inputs``)."""
    slots = torch.from_numpy(np.ascontiguousarray(step.slot_mapping, dtype=np.int64)).to(device)
    return _build(step, slots, block_size, max_gather_tokens, dtype, native_decode, window, max_mask_elements)


def _build(step: StepInputs, slots: torch.Tensor, block_size: int, max_gather_tokens: int,
           dtype: torch.dtype, native_decode: bool, window: int | None, max_mask_elements: int = MAX_MASK_ELEMENTS,
           native: NativeDecode | None = None, tables: np.ndarray | None = None) -> CPUAttentionMetadata:
    """Classify the step's requests (vectorised) and build the groups and chunks of ``window``."""
    device = slots.device
    meta = CPUAttentionMetadata(slot_mapping=slots, block_size=block_size, step=step, window=window,
                                max_gather_tokens=max_gather_tokens, max_mask_elements=max_mask_elements,
                                dtype=dtype, _tables=tables)
    q_lens, starts, ctx, num_blocks = step.query_lens, step.query_start_locs, step.context_lens, step.num_blocks
    decodes = np.flatnonzero(q_lens == 1)                                        # [n] request indices
    for i in np.flatnonzero(q_lens != 1).tolist():
        start, q_len, num_computed = int(starts[i]), int(q_lens[i]), int(step.num_computed[i])
        if num_computed == 0 and (window is None or q_len <= window):
            meta.prefills.append(PrefillChunk(start, start + q_len, int(ctx[i]), None, None))
        else:
            meta.prefills += _prefix_chunks(start, q_len, num_computed, meta.tables()[i], block_size, dtype,
                                            device, window, max_mask_elements)
    if native_decode:
        meta.native_decode = native
        if len(decodes) and native is None:
            every = len(decodes) == len(q_lens)                  # a decode-only step: no selection copies
            tables = meta.tables() if every else meta.tables()[decodes]
            width = int(num_blocks[decodes].max())
            if width < tables.shape[1]:
                tables = np.ascontiguousarray(tables[:, :width])
            meta.native_decode = NativeDecode(
                rows=torch.from_numpy((starts[:-1] if every else starts[decodes]).astype(np.int64)).to(device),
                block_tables=torch.from_numpy(tables).to(device),
                context_lens=torch.from_numpy((ctx if every else ctx[decodes]).astype(np.int32)).to(device),
                every=every,
            )
        return meta
    if not len(decodes):
        return meta
    firsts = _first_blocks(ctx[decodes], window, block_size)                    # [n]
    spans = num_blocks[decodes] - firsts                                         # [n] blocks each gathers
    order = np.argsort(spans, kind="stable")
    group: list[int] = []
    for j, span in zip(order.tolist(), spans[order].tolist()):
        if group and (len(group) + 1) * span * block_size > max_gather_tokens:
            meta.decode_groups.append(_decode_group(meta, decodes, firsts, spans, group, window))
            group = []
        group.append(j)
    if group:
        meta.decode_groups.append(_decode_group(meta, decodes, firsts, spans, group, window))
    return meta


def _first_blocks(context_lens: np.ndarray, window: int | None, block_size: int) -> np.ndarray:
    """The first block a query at position ``context_len - 1`` reads under ``window``, per request."""
    if window is None:
        return np.zeros(len(context_lens), dtype=np.int64)
    return np.maximum(context_lens.astype(np.int64) - window, 0) // block_size


def _first_block(context_len: int, window: int | None, block_size: int) -> int:
    """The first block a query at position ``context_len - 1`` reads under ``window``."""
    return 0 if window is None else max(0, context_len - window) // block_size


def _prefix_chunks(start: int, q_len: int, num_computed: int, table: Sequence[int], block_size: int,
                   dtype: torch.dtype, device: torch.device | str, window: int | None = None,
                   max_mask_elements: int = MAX_MASK_ELEMENTS) -> list[PrefillChunk]:
    """A chunk attending gathered keys, in pieces of query rows with bounded masks.

    Under ``window`` a piece gathers only from the first block its first row's window reaches.
    """
    context_len = num_computed + q_len
    span = context_len if window is None else min(context_len, window + q_len)
    rows = max(1, max_mask_elements // span)
    pieces = []
    for a in range(0, q_len, rows):
        b = min(q_len, a + rows)
        piece_len = num_computed + b                          # keys the last row of the piece sees
        first_block = _first_block(num_computed + a + 1, window, block_size)
        key_start = first_block * block_size
        query_pos = torch.arange(num_computed + a, piece_len, device=device)[:, None]    # [r, 1]
        key_pos = torch.arange(key_start, piece_len, device=device)[None, :]             # [1, L]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= key_pos > query_pos - window
        pieces.append(PrefillChunk(
            start + a, start + b, piece_len,
            torch.as_tensor(table[first_block: -(-piece_len // block_size)], dtype=torch.int64, device=device),
            additive_mask(allowed, dtype), key_start,                                        # [r, L]
        ))
    return pieces


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _decode_group(meta: CPUAttentionMetadata, decodes: np.ndarray, firsts: np.ndarray, spans: np.ndarray,
                  group: list[int], window: int | None) -> DecodeGroup:
    """Decodes ``group`` (indices into ``decodes``) gathered together, from each one's window's first block."""
    bs, device = meta.block_size, meta.slot_mapping.device
    g = np.asarray(group, dtype=np.intp)
    requests, first, span = decodes[g], firsts[g], spans[g]                      # [n] each
    num_blocks = int(span.max())
    tables = meta.tables()
    cols = np.minimum(first[:, None] + np.arange(num_blocks)[None, :], tables.shape[1] - 1)   # [n, nb]
    block_ids = np.where(np.arange(num_blocks)[None, :] < span[:, None], tables[requests[:, None], cols], 0)
    lens = torch.from_numpy(meta.step.context_lens[requests].astype(np.int64))[:, None].to(device)    # [n, 1]
    key_pos = torch.from_numpy(first * bs)[:, None].to(device) + \
        torch.arange(num_blocks * bs, device=device)[None, :]                   # [n, L]
    allowed = key_pos < lens
    if window is not None:
        allowed &= key_pos >= lens - window
    return DecodeGroup(
        rows=torch.from_numpy(meta.step.query_start_locs[requests].astype(np.int64)).to(device),
        block_ids=torch.from_numpy(block_ids.astype(np.int64).reshape(-1)).to(device),
        num_blocks=num_blocks,
        mask=additive_mask(allowed, meta.dtype)[:, None, None, :],                   # [n, 1, 1, L]
    )
