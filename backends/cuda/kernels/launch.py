"""One prepared launch of a Triton kernel: what its launcher computed, before it runs.

Each kernel module splits its launcher in two: ``*_launch(...)`` computes the
grid, the runtime arguments and the compile-time ones (constexprs, warps)
from the tensors, and the launcher runs the result. ``kernels.variants``
calls the same ``*_launch`` functions on ``meta`` tensors to list every
compiled form (variant) the backend uses, so the ahead-of-time compile check
(``kernels.aot``) and the launches can never disagree on a constexpr.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class KernelLaunch(NamedTuple):
    """A kernel with its grid and arguments (a tuple: cheap to build once per launch)."""

    kernel: Any                      # the ``@triton.jit`` function
    grid: tuple[int, ...]            # programs along each axis
    args: tuple                      # runtime arguments in the kernel's order (tensors, ints, floats)
    meta: dict[str, Any]             # constexprs by name, plus ``num_warps`` (a launch option)

    def run(self) -> None:
        """Launch (compiles the variant first if this process has not yet)."""
        self.kernel[self.grid](*self.args, **self.meta)
