"""Sizes of a graph's fake values, read with the facts its shape environment holds.

A graph traced with dynamic sizes carries constants and equal sizes in forms that do not
look constant or equal: GPT-2's ``view(b, t, -1, 8)`` gave ``SymInt(2)``, and a fake
unflatten gives a window size of 2 back as ``W // (W // 2)``, which is 2 only because a
view guarded W to be even. Shape rules read ints as static sizes and compare sizes, so a
floor division or modulus that the shape environment proves constant is read as that
constant. Proofs add no guard: they hold for every input the graph admits.
"""

from __future__ import annotations

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import (
    ShapeEnv,
    is_concrete_int,
    statically_known_true,
)
from torch.utils._sympy.functions import FloorDiv, Mod

__all__ = ["equal", "folded", "proves", "same_size", "static_size", "whole_quotient"]


def static_size(size: int | torch.SymInt) -> int | torch.SymInt:
    """`size` as an int where it is one for every input the graph admits."""
    if is_concrete_int(size):
        return int(size)
    value = folded(size.node.expr, size.node.shape_env)  # type: ignore[union-attr]
    return int(value) if value.is_Integer else size


def same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """Whether two sizes are equal for every input the graph admits."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    env = (a if isinstance(a, torch.SymInt) else b).node.shape_env  # type: ignore[union-attr]
    exprs = [sympy.Integer(s) if isinstance(s, int) else s.node.expr for s in (a, b)]
    return equal(exprs[0], exprs[1], env)


def equal(a: sympy.Expr, b: sympy.Expr, env: ShapeEnv | None) -> bool:
    """Whether two size expressions are equal for every input the graph admits: proved by
    `env` (its proofs are cached, so asked first), or alike once `folded`."""
    return proves(env, sympy.Eq(a, b)) or sympy.simplify(folded(a, env) - folded(b, env)) == 0


def folded(expr: sympy.Expr, env: ShapeEnv | None) -> sympy.Expr:
    """`expr` with each floor division that divides exactly (``(h * h) // h``) replaced by
    its quotient, and each floor division and modulus that `env` proves constant by that
    constant, innermost first (``(s // (s // 2)) * 3`` is 6 where s is even)."""
    if expr.is_number:
        return expr

    def simpler(term: sympy.Expr) -> sympy.Expr:
        if isinstance(term, FloorDiv) and (q := whole_quotient(*term.args)) is not None:
            return q
        if env is None:
            return term
        hint = term.xreplace(env.backed_var_to_val)  # the example input's value
        return hint if hint.is_Integer and proves(env, sympy.Eq(term, hint)) else term

    return expr.replace(lambda term: isinstance(term, FloorDiv | Mod), simpler)


def whole_quotient(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr | None:
    """``a / b`` where it is whole for every value of the symbols: a polynomial with
    integer coefficients (``B * (T - 1) / B``), floor divisions being opaque sizes; None
    for a zero divisor (a dim of size zero), where sympy gives ``zoo``."""
    if b == 0:
        return None
    quotient = sympy.cancel(a / b)
    numerator, denominator = sympy.fraction(quotient)
    if denominator != 1:
        return None
    if numerator.is_Integer:
        return quotient
    try:  # generators found by sympy: symbols, and floor divisions as opaque sizes
        coefficients = sympy.Poly(numerator).coeffs()
    except sympy.PolynomialError:
        return None
    return quotient if all(c.is_Integer for c in coefficients) else None


def proves(env: ShapeEnv | None, fact: sympy.Basic) -> bool:
    """Whether `fact` holds for every input the graph admits, its guards included, without
    adding a guard."""
    if fact in (sympy.true, sympy.false) or env is None:
        return fact == sympy.true
    return statically_known_true(env.create_symboolnode(fact))
