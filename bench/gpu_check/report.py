"""What the GPU check prints and keeps: log lines, one SUMMARY line per section, a JSON summary.

Every section ends with ``SUMMARY <letter> <title>: <figures>`` on stdout and
a rewrite of the JSON file (``$OUT/gpu_check.json`` when ``OUT`` is set), so
whatever a run measured before being killed at its limit is on record.
``scripts/gpu_check.sh`` tees the whole output to ``$OUT/gpu_check.log``.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def say(*parts: Any) -> None:
    """One line of the check's log (the CLI's own output, flushed at once)."""
    print(*parts, flush=True)


@dataclass
class SectionResult:
    """One section's outcome."""

    letter: str                     # "a".."h"
    title: str                      # what it measures
    status: str                     # "ok", "failed", "skipped"
    seconds: float                  # wall time
    summary: str                    # the one-line figures
    figures: dict = field(default_factory=dict)   # machine-readable figures


class Report:
    """Runs sections under a time budget and records their results."""

    def __init__(self, plan_name: str, time_limit_s: float, json_path: Path | None, context: dict) -> None:
        self.plan_name = plan_name
        self.time_limit_s = time_limit_s
        self.json_path = json_path
        self.context = context                        # device, versions: written with every summary
        self.sections: list[SectionResult] = []
        self.t0 = time.perf_counter()

    def remaining_s(self) -> float:
        """Seconds left of the run's time limit."""
        return self.time_limit_s - (time.perf_counter() - self.t0)

    def run(self, letter: str, title: str, fn: Callable[[], tuple[str, dict]], needs_s: float = 0.0) -> SectionResult:
        """Run ``fn`` (returns ``(summary, figures)``) unless fewer than ``needs_s`` seconds are left."""
        say(f"\n=== ({letter}) {title} ===")
        t0 = time.perf_counter()
        if self.remaining_s() < needs_s:
            result = SectionResult(letter, title, "skipped", 0.0,
                                   f"skipped: {self.remaining_s():.0f} s left, needs about {needs_s:.0f}")
        else:
            try:
                summary, figures = fn()
                result = SectionResult(letter, title, "ok", time.perf_counter() - t0, summary, figures)
            except Exception as error:  # noqa: BLE001 - report and go on with the next section
                traceback.print_exc()
                result = SectionResult(letter, title, "failed", time.perf_counter() - t0, f"FAILED: {error!r:.300}")
        self.add(result)
        return result

    def add(self, result: SectionResult) -> None:
        """Record ``result``, print its SUMMARY line and rewrite the JSON summary."""
        self.sections.append(result)
        say(f"SUMMARY ({result.letter}) {result.title} [{result.status}, {result.seconds:.1f} s]: {result.summary}")
        self.write()

    def write(self) -> None:
        """The JSON summary as it stands (nothing when no path was given)."""
        if self.json_path is None:
            return
        doc = {"plan": self.plan_name, "elapsed_s": round(time.perf_counter() - self.t0, 1), **self.context,
               "sections": [vars(s) for s in self.sections]}
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.json_path)

    @property
    def failed(self) -> list[SectionResult]:
        return [s for s in self.sections if s.status == "failed"]

    def close(self) -> int:
        """Print every SUMMARY line again at the end; exit status 1 when a section failed."""
        say(f"\n=== summary: {self.plan_name}, {time.perf_counter() - self.t0:.0f} s ===")
        for s in self.sections:
            say(f"({s.letter}) {s.title} [{s.status}]: {s.summary}")
        self.write()
        return 1 if self.failed else 0
