"""Tool calls out of model output, whole or as it streams.

A ``ToolCallStream`` is fed a completion's text delta by delta and gives
back what the client may see so far: content (text that is not part of a
call) and ``ToolCallDelta``s. Text that could still turn out to be a call
marker (``<tool_`` at the end of a delta) is held back until the next delta
decides it; ``finish`` releases whatever is left (an unparsable call comes
back as content, never lost). ``parse_tool_calls`` runs a stream over a
whole text.

Formats (``--tool-call-parser``, as vLLM names them):

* ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number, with content around them.
* ``llama3_json`` (Llama 3.x): the whole output is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;``.

Forced choices (see ``specs.forced_call_schema``) have their own streams:
``NamedToolStream`` (the output is the named function's arguments) and
``RequiredToolStream`` (a JSON array of calls).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()


def new_tool_call_id() -> str:
    """An id for a call, unique enough for a client to match the tool's answer to it."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call."""

    id: str                                     # "call_..."; the tool message answers with it
    name: str                                   # the function called
    arguments: str                              # its arguments, as JSON text (OpenAI's form)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call ``index``: the first carries id and name, the rest more arguments text."""

    index: int                                  # which call of the completion, from 0
    id: str | None = None                       # on the call's first delta only
    name: str | None = None                     # on the call's first delta only
    arguments: str = ""                         # arguments JSON text new in this delta


@dataclass
class ParsedDelta:
    """What a piece of output means to the client."""

    content: str = ""                           # text outside any call
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: "ParsedDelta") -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


class ToolCallStream(ABC):
    """Splits one completion's output into content and tool calls, incrementally."""

    # A call's arguments come in pieces (else each call comes whole, in one delta).
    streams_arguments = False

    def __init__(self) -> None:
        self.num_calls = 0                      # calls started so far

    @abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Take the next text delta; return what became certain."""

    @abstractmethod
    def finish(self) -> ParsedDelta:
        """The output ended: return whatever is still held back."""

    def _whole_call(self, name: str, arguments: str) -> ToolCallDelta:
        """A complete call as one delta (a new index and id)."""
        delta = ToolCallDelta(self.num_calls, new_tool_call_id(), name, arguments)
        self.num_calls += 1
        return delta


def call_from_json(obj: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) of a decoded ``{"name", "arguments" | "parameters"}`` object, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):                   # some models send the arguments already as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that starts ``marker`` (to hold back)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesToolStream(ToolCallStream):
    """``<tool_call>{json}</tool_call>`` blocks among content."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._pending = ""                      # text not yet given out
        self._in_call = False                   # _pending is the inside of an open <tool_call>

    def feed(self, text: str) -> ParsedDelta:
        self._pending += text
        out = ParsedDelta()
        while True:
            if not self._in_call:
                i = self._pending.find(self.START)
                if i < 0:
                    keep = _held_prefix(self._pending, self.START)
                    self._content(out, self._pending[:len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    return out
                self._content(out, self._pending[:i])
                self._pending, self._in_call = self._pending[i + len(self.START):], True
            else:
                j = self._pending.find(self.END)
                if j < 0:
                    return out
                body, self._pending, self._in_call = self._pending[:j], self._pending[j + len(self.END):], False
                self._call(out, body, closed=True)

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self._in_call:                       # the output ended inside a call (EOS before the end tag)
            self._call(out, self._pending, closed=False)
        else:
            self._content(out, self._pending)
        self._pending, self._in_call = "", False
        return out

    def _content(self, out: ParsedDelta, text: str) -> None:
        if self.num_calls and not text.strip():
            return                              # the whitespace between calls is no content
        out.content += text

    def _call(self, out: ParsedDelta, body: str, closed: bool) -> None:
        try:
            call = call_from_json(json.loads(body))
        except ValueError:
            call = None
        if call is None:                        # not a call after all: the client gets the text
            out.content += self.START + body + (self.END if closed else "")
        else:
            out.tool_calls.append(self._whole_call(*call))


class Llama3JsonToolStream(ToolCallStream):
    """An output that is one or more ``{"name", "parameters"}`` objects (``;``-separated)."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""                       # everything so far, while it may be calls
        self._mode = "undecided"                # "undecided", "calls" or "content"
        self._pos = 0                           # in calls mode: where the next object starts

    def feed(self, text: str) -> ParsedDelta:
        if self._mode == "content":
            return ParsedDelta(content=text)
        self._buffer += text
        if self._mode == "undecided":
            head = self._buffer.lstrip()
            if not head or (self.PYTHON_TAG.startswith(head) and head != self.PYTHON_TAG):
                return ParsedDelta()            # nothing yet, or a python tag still arriving
            if head.startswith(self.PYTHON_TAG):
                head = head[len(self.PYTHON_TAG):]
                self._pos = len(self._buffer) - len(head)
            else:
                self._pos = len(self._buffer) - len(head)
            if head and not head.startswith("{"):
                return self._to_content()
            self._mode = "calls" if head else "undecided"
            if not head:
                return ParsedDelta()
        return self._scan()

    def finish(self) -> ParsedDelta:
        if self._mode == "content":
            return ParsedDelta()
        out = self._scan()
        rest = self._buffer[self._pos:]
        if rest.strip(" \t\n;"):
            out.extend(self._to_content() if self.num_calls == 0 else ParsedDelta(content=rest))
        self._buffer, self._pos = "", 0
        return out

    def _scan(self) -> ParsedDelta:
        """Complete objects from ``_pos`` on, as calls."""
        out = ParsedDelta()
        while True:
            pos = self._pos
            while pos < len(self._buffer) and self._buffer[pos] in " \t\n;":
                pos += 1
            try:
                obj, end = _DECODER.raw_decode(self._buffer, pos)
            except ValueError:
                return out                      # incomplete (or not JSON: finish gives it back as content)
            call = call_from_json(obj)
            if call is None:
                return out
            out.tool_calls.append(self._whole_call(*call))
            self._pos = end

    def _to_content(self) -> ParsedDelta:
        self._mode = "content"
        text, self._buffer = self._buffer, ""
        return ParsedDelta(content=text)


class NamedToolStream(ToolCallStream):
    """tool_choice names a function: the (constrained) output is its arguments."""

    streams_arguments = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> ParsedDelta:
        if not text:
            return ParsedDelta()
        if self.num_calls == 0:
            return ParsedDelta(tool_calls=[self._whole_call(self.name, text)])
        return ParsedDelta(tool_calls=[ToolCallDelta(0, arguments=text)])

    def finish(self) -> ParsedDelta:
        return ParsedDelta()


class RequiredToolStream(ToolCallStream):
    """tool_choice required: the (constrained) output is a JSON array of calls."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._pos = 0                           # where the next array element (or "[") starts
        self._opened = False                    # the "[" was read

    def feed(self, text: str) -> ParsedDelta:
        self._buffer += text
        out = ParsedDelta()
        while True:
            pos = self._pos
            while pos < len(self._buffer) and self._buffer[pos] in " \t\n\r,":
                pos += 1
            if not self._opened:
                if pos < len(self._buffer) and self._buffer[pos] == "[":
                    self._opened, self._pos = True, pos + 1
                    continue
                return out
            try:
                obj, end = _DECODER.raw_decode(self._buffer, pos)
            except ValueError:
                return out
            call = call_from_json(obj)
            if call is None:
                return out
            out.tool_calls.append(self._whole_call(*call))
            self._pos = end

    def finish(self) -> ParsedDelta:
        out = self.feed("")
        rest = self._buffer[self._pos:].strip(" \t\n\r,]")
        if rest and self.num_calls == 0:
            out.content += self._buffer            # not calls (the constraint did not hold): the text
        return out


# The --tool-call-parser choices.
TOOL_CALL_PARSERS: dict[str, type[ToolCallStream]] = {
    "hermes": HermesToolStream,
    "llama3_json": Llama3JsonToolStream,
}


def tool_call_stream(mode: str, name: str | None, parser: str | None) -> ToolCallStream | None:
    """The stream for a tool choice (``specs.ToolChoice`` fields) and the
    server's parser; None when the output is plain content."""
    if mode == "function":
        return NamedToolStream(name)
    if mode == "required":
        return RequiredToolStream()
    if mode == "auto" and parser is not None:
        return TOOL_CALL_PARSERS[parser]()
    return None


def parse_tool_calls(stream: ToolCallStream, text: str) -> tuple[str, list[ToolCall]]:
    """A whole output through ``stream``: its content and its complete calls."""
    out = stream.feed(text)
    out.extend(stream.finish())
    return out.content, merge_tool_call_deltas(out.tool_calls)


def merge_tool_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Calls from their deltas (arguments pieces joined in order)."""
    calls: dict[int, list] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, [d.id, d.name, ""])
        entry[2] += d.arguments
    return [ToolCall(i, n, a) for i, n, a in (calls[k] for k in sorted(calls))]
