"""Where a decode step's time goes: timers wrapped around a live backend's parts.

``instrument(backend, timers)`` replaces, on the instances only (no class or
module is changed, and ``restore()`` puts them back), the calls one step
makes through the backend with timed ones:

- cpu (the torch model): ``execute``, ``compute_logits``, the model's
  ``forward``, its ``linear`` (every projection and the LM head: the
  matmuls), the attention's ``forward`` (cache write and attention) and its
  native decode kernel, the native fused layer calls of a float32 decode step
  (``ops.attn_in`` / ``ops.mlp_block``: the layer's GEMMs with its norms,
  RoPE and SwiGLU, which bypass ``linear``), and the sampler; where a layer
  is one native call (``model.decode_layers``), the call times its parts
  itself and its cache write + attention count as attention, the rest as
  the fused layer call;
- metal (MLX, lazy): ``execute`` (with async scheduling: ``submit`` plus the
  sampler's ``finish``, the wait of the handle's ``result()``),
  ``compute_logits``, the model's ``forward`` (which only builds the graph)
  and the sampler; the rest of
  ``compute_logits`` is the ``mx.eval`` that computes the step plus the input
  preparation (small beside it). MLX gives no per-op times; the matmul part
  of the evaluation is estimated by ``mlx_matmul_ms`` (the model's own
  weights at one row, one graph).

``breakdown`` turns one step's timer totals and its wall time into shares
that sum to one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable


class Timers:
    """Inclusive seconds per name; a call inside a call of the same name is not counted twice."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)   # name -> seconds this step
        self._depth: dict[str, int] = defaultdict(int)       # name -> calls in progress

    def reset(self) -> None:
        """Start a new step."""
        self.totals.clear()

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` timed under ``name``."""
        def timed(*args, **kwargs):
            if self._depth[name]:
                return fn(*args, **kwargs)
            self._depth[name] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t0
                self._depth[name] -= 1
        return timed


class _TimedKernel:
    """A kernel object whose calls are timed; its other attributes (``supports``) pass through."""

    def __init__(self, kernel: Any, timed: Callable) -> None:
        self._kernel = kernel
        self._timed = timed

    def __call__(self, *args, **kwargs):
        return self._timed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


def _timed_layer_run(layers: Any, timers: Timers) -> Callable:
    """``layers.run`` (one native call per decoder layer) split by the call's own clock: its cache write
    and attention go to ``attention`` (and ``native_attention``), the rest of the call to ``fused_layer``."""
    run = layers.run

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            attention = layers.last_timings[1]
            timers.totals["attention"] += attention
            timers.totals["native_attention"] += attention
            timers.totals["fused_layer"] += wall - attention
    return timed


def instrument(backend: Any, timers: Timers) -> Callable[[], None]:
    """Wrap ``backend``'s step parts (see the module docstring); returns ``restore``."""
    if backend.name not in ("cpu", "metal"):
        raise ValueError(f"the step breakdown supports the cpu and metal backends, not {backend.name!r}")
    patched: list[tuple[Any, str, bool, Any]] = []     # (object, attribute, was it on the instance, old value)

    def patch(obj: Any, attr: str, new: Any) -> None:
        patched.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
        setattr(obj, attr, new)

    patch(backend, "execute", timers.wrap("execute", backend.execute))
    patch(backend, "compute_logits", timers.wrap("compute_logits", backend.compute_logits))
    for attr in ("sample_rows", "sample"):
        if hasattr(backend.sampler, attr):
            patch(backend.sampler, attr, timers.wrap("sampler", getattr(backend.sampler, attr)))
    model = backend.model
    if backend.name == "cpu":
        patch(model, "forward", timers.wrap("forward", model.forward))
        patch(model, "linear", timers.wrap("matmul", model.linear))
        attention = model.attention
        patch(attention, "forward", timers.wrap("attention", attention.forward))
        ops = getattr(model, "ops", None)
        if ops is not None and hasattr(ops, "attn_in"):
            patch(ops, "attn_in", timers.wrap("fused_layer", ops.attn_in))
            patch(ops, "mlp_block", timers.wrap("fused_layer", ops.mlp_block))
        kernel = getattr(attention, "decode_kernel", None)
        if kernel is not None:
            patch(attention, "decode_kernel", _TimedKernel(kernel, timers.wrap("native_attention", kernel)))
        layers = getattr(model, "decode_layers", None)
        if layers is not None:
            patch(layers, "record_timings", True)
            patch(layers, "run", _timed_layer_run(layers, timers))
    else:
        # Only the graph build: evaluating inside ``forward`` would keep the old KV
        # caches referenced (the caller's frame), so MLX could not scatter in place.
        patch(model, "forward", timers.wrap("forward", model.forward))
        # Async scheduling: a step is ``submit`` (graph build, sampler.start) and later its handle's
        # ``result()``, whose wait is the sampler's ``finish``: both count as the step's backend time.
        patch(backend, "submit", timers.wrap("execute", backend.submit))
        sampler = backend.sampler
        patch(sampler, "start", timers.wrap("sampler", sampler.start))
        patch(sampler, "finish", timers.wrap("execute", timers.wrap("sampler", sampler.finish)))

    def restore() -> None:
        for obj, attr, on_instance, old in reversed(patched):
            if on_instance:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)

    return restore


# The breakdown's parts, in print order, with their labels.
PARTS = {
    "matmul": "matmul (projections, LM head)",
    "fused_layer": "fused layer calls (GEMMs + norm, RoPE, SwiGLU)",
    "attention": "attention (cache write + attend)",
    "eval_other": "MLX eval besides matmul, and input preparation",
    "model_other": "model other (norms, RoPE, activation, adds, Python)",
    "graph_build": "MLX graph build (Python)",
    "prepare": "input preparation (tensors, metadata)",
    "sampler": "sampler",
    "backend_other": "backend other (run_step glue)",
    "engine": "engine (schedule, update, detokenize)",
}
# The parts that are host work around the model: the per-step Python/dispatch overhead.
OVERHEAD_PARTS = ("graph_build", "prepare", "sampler", "backend_other", "engine")


def breakdown(backend_name: str, totals: dict[str, float], step_s: float, mlx_matmul_s: float = 0.0) -> dict[str, float]:
    """Seconds per part (``PARTS``) of one step of ``step_s`` from its timer totals; they sum to ``step_s``."""
    t = defaultdict(float, totals)
    parts = {
        "sampler": t["sampler"],
        "backend_other": max(0.0, t["execute"] - t["compute_logits"] - t["sampler"]),
        "engine": max(0.0, step_s - t["execute"]),
    }
    if backend_name == "cpu":
        parts.update(matmul=t["matmul"], attention=t["attention"], fused_layer=t["fused_layer"],
                     model_other=max(0.0, t["forward"] - t["matmul"] - t["attention"] - t["fused_layer"]),
                     prepare=max(0.0, t["compute_logits"] - t["forward"]))
    else:
        rest = max(0.0, t["compute_logits"] - t["forward"])           # mx.eval and the input preparation
        matmul = min(mlx_matmul_s, rest)
        parts.update(matmul=matmul, eval_other=rest - matmul, graph_build=t["forward"])
    return {k: parts[k] for k in PARTS if k in parts}


def mlx_matmul_ms(model: Any, rows: int = 1, repeats: int = 7) -> float:
    """Median ms of the dense layers' projections and the LM head of an MLX model at ``rows`` rows, one eval.

    The model's own weights (dense or packed), each multiplied by a fresh
    ``[rows, in]`` input in the compute dtype (no chaining) through the
    model's ``linear``, all in one graph: the matmul work of one decode step
    as MLX runs it, without the rest of the step. MoE layers are left out.
    """
    import mlx.core as mx

    from backends.metal.weights import linear

    weights = []
    for layer in model.layers:
        if getattr(layer, "router", None) is None:
            weights += [layer.qkv, layer.o_proj, layer.gate_up, layer.down]
    weights.append(model.lm_head if model.lm_head is not None else model.embed)
    inputs = [mx.random.normal((rows, w.shape[1])).astype(model.dtype) for w in weights]   # [rows, in] each
    mx.eval(inputs)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        mx.eval([linear(x, w) for x, w in zip(inputs, weights)])                         # [rows, out] each
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2] * 1000.0
