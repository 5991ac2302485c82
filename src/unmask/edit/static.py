"""Cheap static checks of Python text, used to choose between candidate middles of a gap (edit/suffix.py).

A 135M base cannot tell through the suffix's probability that `import sqrt` leaves the `math` of
`print(math.sqrt(16))` unbound, or that `a += b` as the body of `add` returns nothing to
`print(add(2, 3))`; a parse and a walk over the tree can. Scopes are not told apart: the counts are
conservative, and they only ever compare candidates for the same gap.
"""

from __future__ import annotations

import ast
import builtins
import warnings
from typing import Iterator

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
SCOPES = (*FUNCTIONS, ast.Lambda, ast.ClassDef)


def parse(source: str) -> ast.Module | None:
    """The module's tree, or None where `source` is not valid Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for an invalid escape
            return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def faults(source: str) -> int | None:
    """Names read but never bound, plus functions whose value is used but that never return one; None
    where `source` does not parse."""
    tree = parse(source)
    if tree is None:
        return None
    return len(unbound_names(tree)) + len(valueless_functions(tree))


def unbound_names(tree: ast.AST) -> set[str]:
    """Names the code reads that nothing in it binds and that are not builtins."""
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (*FUNCTIONS, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


def valueless_functions(tree: ast.AST) -> set[str]:
    """Functions whose value is used — called inside an expression, or annotated to return something other
    than None — whose own body never returns a value, yields or raises."""
    used = _called_for_a_value(tree)
    out = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, FUNCTIONS) or not (fn.name in used or _annotated_with_a_value(fn)):
            continue
        own = list(_own_nodes(fn))
        if not any(isinstance(n, ast.Return) and n.value is not None or isinstance(n, (ast.Yield, ast.YieldFrom,
                                                                                      ast.Raise)) for n in own):
            out.add(fn.name)
    return out


def _called_for_a_value(tree: ast.AST) -> set[str]:
    """Names of functions called where the call's value is used (not a call standing as a statement)."""
    statements = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    return {n.func.id for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and id(n) not in statements}


def _annotated_with_a_value(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    r = fn.returns
    return r is not None and not (isinstance(r, ast.Constant) and r.value is None) \
        and not (isinstance(r, ast.Name) and r.id in ("None", "NoReturn", "Never"))


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's body, not those of functions, lambdas or classes nested in it."""
    stack = [node for node in fn.body if not isinstance(node, SCOPES)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, SCOPES))
