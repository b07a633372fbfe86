"""What one HTTP generation call leaves behind: its log event, its
``--log-requests`` text and its outcome in the metrics, as a gRPC Generate does.

``HttpCall`` follows a call from its body to its last byte: a whole answer
(``answered``), or each server-sent event of a streamed one (``event``), or the
error it failed with (``failed``); ``finish`` logs and counts it once. The
outcome counts under the gRPC status code the HTTP status stands for
(``service.openai.errors.grpc_code_of_status``), so
``pagedgen_request_success_total`` and ``pagedgen_request_failure_total``
mean the same whichever API served the request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from service.openai.errors import grpc_code_of_error, grpc_code_of_status

log = structlog.get_logger(__name__)

_SSE_PREFIX = "data: "
_FINISH_MARK = '"finish_reason":"'          # in an event whose choice finished (compact JSON)


@dataclass
class HttpCall:
    endpoint: str                               # "completions" or "chat"
    metrics: Any = None                         # a service.metrics.ServerMetrics, or None
    log_requests: bool = False                  # log the prompt and completion text (debugging only)
    start: float = field(default_factory=time.perf_counter)
    request_id: str | None = None               # the call's id, once known
    code: str = "OK"                            # the gRPC code its outcome counts under
    finish_reasons: dict[int, str] = field(default_factory=dict)   # choice index -> finish reason
    texts: dict[int, str] = field(default_factory=dict)            # choice index -> text (log_requests only)
    prompt: Any = None                          # the body's prompt or messages (log_requests only)

    def received(self, body) -> None:
        """The request body (kept only with ``log_requests``)."""
        if self.log_requests:
            messages = getattr(body, "messages", None)
            self.prompt = (getattr(body, "prompt", None) if messages is None
                           else [m.model_dump(exclude_none=True) for m in messages])

    def answered(self, response) -> None:
        """A whole (non-streamed) response body."""
        self.request_id = response.id
        for choice in response.choices:
            if choice.finish_reason is not None:
                self.finish_reasons[choice.index] = choice.finish_reason
            if self.log_requests:
                message = getattr(choice, "message", None)
                self.texts[choice.index] = choice.text if message is None else (message.content or "")

    def event(self, event: str) -> None:
        """One server-sent event of a streamed response; parsed only when it
        finishes a choice or carries an error (or with ``log_requests``)."""
        if not event.startswith(_SSE_PREFIX) or event.startswith("data: [DONE]"):
            return
        if not (self.log_requests or _FINISH_MARK in event or event.startswith('data: {"error"')):
            return
        data = json.loads(event[len(_SSE_PREFIX):])
        if "error" in data:
            self.code = grpc_code_of_error(data["error"])
            return
        self.request_id = data.get("id", self.request_id)
        for choice in data.get("choices", ()):
            if choice.get("finish_reason") is not None:
                self.finish_reasons[choice["index"]] = choice["finish_reason"]
            if self.log_requests:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content") or ""
                self.texts[choice["index"]] = self.texts.get(choice["index"], "") + text

    def failed(self, status: int) -> None:
        """The call ended with HTTP ``status`` instead of an answer."""
        self.code = grpc_code_of_status(status)

    def finish(self, status: int, streamed: bool) -> None:
        """Log the call (never its text, unless ``log_requests``) and count its outcome, once."""
        try:
            log.info("http_request", endpoint=self.endpoint, request_id=self.request_id, status=status,
                     streamed=streamed, finish_reasons=[self.finish_reasons[i] for i in sorted(self.finish_reasons)],
                     duration_ms=round((time.perf_counter() - self.start) * 1e3, 1))
            if self.log_requests:
                log.info("request_text", request_id=self.request_id, endpoint=self.endpoint, prompt=self.prompt)
                log.info("request_completion_text", request_id=self.request_id,
                         completions=[self.texts[i] for i in sorted(self.texts)])
            if self.metrics is not None:
                self.metrics.observe_outcome(self.code, self.finish_reasons)
        except Exception:  # noqa: BLE001 - a failing log sink or metric never fails a served request
            log.warning("http_request_observe_failed", exc_info=True)
