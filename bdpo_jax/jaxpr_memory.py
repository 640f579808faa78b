"""Peak bytes of a jaxpr's values when its equations run in program order.

`peak_bytes(closed_jaxpr, size_of)` walks the equations once, holding each value from the
equation that defines it to its last use (an output of the jaxpr to the end) and adding, at each
equation, what the equation itself needs while it runs: its outputs, or for an equation with
inner jaxprs (jit, remat, custom derivatives, cond, scan, while) the peak of the inner program
(cond: its largest branch; scan and while: the stacked outputs plus one iteration's body).
The jaxpr's own inputs are the caller's (not counted). A value that an elementwise equation
computes and only elementwise equations or reductions read is fused into its readers, as XLA's
loop fusion does: it is never stored, and the inputs it is computed from are held until those
readers run. This is the schedule of a program that frees every value at its last use and
reorders nothing; a compiler can do better by reordering or worse by keeping values longer
(bench/memory.py sets it beside XLA's programs).

For the backward of a vjp traced in order (forward, then the transposed equations in reverse),
the peak counts the saved activations still needed, the gradients of the skip connections that
wait for their block, the re-run layer's intermediates and the parameter gradients written so
far, all at the point where their sum is largest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jax.extend import core as jex_core

SizeOf = Callable[[jex_core.Var], int]
_LOOPS = ("scan", "while")
# elementwise and shape-only primitives XLA fuses into the loops of the equations that read them
FUSIBLE = frozenset(
    "abs add add_any broadcast_in_dim convert_element_type copy cos div erf erfc exp "
    "expand_dims integer_pow iota log logistic max min mul neg pow reshape rsqrt select_n "
    "sign sin sqrt square squeeze sub tanh transpose".split()
)
# what a fused producer can also be folded into, besides elementwise loops
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax"})
_CALLS = frozenset({"jit", "pjit", "closed_call"})


def array_bytes(aval, min_itemsize: int = 1) -> int:
    """Bytes of an array (anything with a shape and a dtype), each element counted at no fewer
    than `min_itemsize` bytes; 0 for tokens and other values without them."""
    dtype = getattr(aval, "dtype", None)
    shape = getattr(aval, "shape", None)
    if dtype is None or shape is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * max(np.dtype(dtype).itemsize, min_itemsize)


def value_bytes(var: jex_core.Var, min_itemsize: int = 1) -> int:
    """Bytes of one jaxpr value (`array_bytes` of its aval)."""
    return array_bytes(var.aval, min_itemsize)


def _inner_jaxprs(eqn: jex_core.JaxprEqn) -> list[jex_core.Jaxpr]:
    return [j.jaxpr if hasattr(j, "jaxpr") else j for j in jex_core.jaxprs_in_params(eqn.params)]


def _equation_bytes(eqn: jex_core.JaxprEqn, stored: list, size_of: SizeOf) -> int:
    """What one equation holds while it runs: the outputs it stores, or its inner program's
    peak (an elementwise call is one loop: its stored outputs only)."""
    outputs = sum(size_of(v) for v in stored)
    inner = [] if _fusible(eqn) else [_program_peak(j, size_of) for j in _inner_jaxprs(eqn)]
    if not inner:
        return outputs
    if eqn.primitive.name in _LOOPS:
        return outputs + max(inner)
    return max(outputs, max(inner))


def _fusible(eqn: jex_core.JaxprEqn) -> bool:
    """Elementwise: a FUSIBLE primitive, or a call (jit) of nothing else (XLA inlines calls)."""
    if eqn.primitive.name in FUSIBLE:
        return True
    inner = _inner_jaxprs(eqn)
    return eqn.primitive.name in _CALLS and all(_fusible(e) for j in inner for e in j.eqns)


def _fuses_producers(eqn: jex_core.JaxprEqn) -> bool:
    return eqn.primitive.name in _REDUCTIONS or _fusible(eqn)


def _run_points(jaxpr: jex_core.Jaxpr) -> tuple[list[int], set]:
    """(up to which equation each equation's inputs are read, the values fused away). An output
    of an elementwise equation that only elementwise equations or reductions read is fused into
    them: it is never stored, and the equation's inputs are read again where they run."""
    readers: dict[jex_core.Var, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jex_core.Var):
                readers.setdefault(v, []).append(i)
    outputs = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
    reads_until = list(range(len(jaxpr.eqns)))
    fused: set = set()
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        if not _fusible(eqn):
            continue
        for v in eqn.outvars:
            later = readers.get(v, [])
            if v in outputs or not later:
                continue
            if all(_fuses_producers(jaxpr.eqns[j]) for j in later):
                fused.add(v)
                reads_until[i] = max(reads_until[i], *(reads_until[j] for j in later))
    return reads_until, fused


def _program_peak(jaxpr: jex_core.Jaxpr, size_of: SizeOf) -> int:
    """Peak bytes of the values `jaxpr` stores (its inputs and constants excluded)."""
    reads_until, fused = _run_points(jaxpr)
    last_use: dict[jex_core.Var, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jex_core.Var):
                last_use[v] = max(last_use.get(v, 0), reads_until[i])
    for v in jaxpr.outvars:
        if isinstance(v, jex_core.Var):
            last_use[v] = len(jaxpr.eqns)
    frees: dict[int, list] = {}
    for v, i in last_use.items():
        frees.setdefault(i, []).append(v)
    inputs = set(jaxpr.invars) | set(jaxpr.constvars)
    held = 0
    peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        stored = [v for v in eqn.outvars if v not in fused]
        if stored or not eqn.outvars:  # else fused into the equations that read its outputs
            peak = max(peak, held + _equation_bytes(eqn, stored, size_of))
            held += sum(size_of(v) for v in stored if v in last_use)
        held -= sum(size_of(v) for v in frees.get(i, ()) if v not in inputs and v not in fused)
    return max(peak, held)


def peak_bytes(closed: jex_core.ClosedJaxpr, size_of: SizeOf | None = None) -> int:
    """Peak bytes of the values a closed jaxpr defines, run in program order (module docstring);
    `size_of` sizes one value (default: `value_bytes`)."""
    return _program_peak(closed.jaxpr, size_of or value_bytes)
