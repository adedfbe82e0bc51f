"""
The calculator tool the model can call between <|python_start|> and <|python_end|>.

The model's text is parsed with Python's ast and walked by a tiny interpreter that knows only:
numbers, + - * / // % **, unary + and -, parentheses, string literals, and str.count(str).
Anything else (names, other attributes, calls, subscripts, comprehensions, lambdas, ...) is refused.
There is no eval(): code that is not on the whitelist is never executed.

Time is bounded by construction: the expression length is capped, every intermediate integer
is capped in size (so no single operation is slow), and a wall-clock deadline is checked at every
node. This works in any thread, unlike signal.alarm which only works on the main thread.
"""

import ast
import math
import operator
import time
import warnings

MAX_EXPR_CHARS = 1000  # model-written expressions are short; this also bounds parse time and depth
MAX_INT_BITS = 10_000  # ~3000 decimal digits: big enough for arithmetic, small enough to stay fast
MAX_POW_EXPONENT = 10_000
TIME_LIMIT_S = 1.0

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Refused(Exception):
    """The expression uses something outside the whitelist or exceeds a budget."""


def _is_number(x):
    # bool is a subclass of int, but True/False can only come from names, which are refused anyway
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(x):
    if not (_is_number(x) or isinstance(x, str)):
        raise Refused(f"result of type {type(x).__name__}")  # e.g. complex from (-8) ** 0.5
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise Refused("integer result too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise Refused("float overflow")
    return x


def _power(base, exponent):
    if abs(exponent) > MAX_POW_EXPONENT:
        raise Refused("exponent too large")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # estimate the result size before computing it: bits(base**e) <= e * bits(base)
        if exponent * base.bit_length() > MAX_INT_BITS:
            raise Refused("power result too large")
    return base ** exponent


def _evaluate(node, deadline):
    if time.monotonic() > deadline:
        raise Refused("time limit exceeded")
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, deadline)
    if isinstance(node, ast.Constant):
        if _is_number(node.value) or isinstance(node.value, str):
            return _check_size(node.value)
        raise Refused(f"literal of type {type(node.value).__name__}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand, deadline)
        if not _is_number(operand):
            raise Refused("unary operator on a non-number")
        return _UNARY_OPS[type(node.op)](operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate(node.left, deadline)
        right = _evaluate(node.right, deadline)
        # numbers only: this rules out "a" * 10**9 and "%s" formatting
        if not (_is_number(left) and _is_number(right)):
            raise Refused("arithmetic on a non-number")
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        # the one call allowed: <string>.count(<string>)
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count"):
            raise Refused("only the .count() method may be called")
        if node.keywords or len(node.args) != 1:
            raise Refused(".count() takes exactly one positional argument")
        receiver = _evaluate(func.value, deadline)
        needle = _evaluate(node.args[0], deadline)
        if not (isinstance(receiver, str) and isinstance(needle, str)):
            raise Refused(".count() is only allowed as str.count(str)")
        return receiver.count(needle)
    raise Refused(f"{type(node).__name__} is not allowed")


def use_calculator(expr):
    """
    Evaluate a calculator expression written by the model.
    Returns the result as a string, or None if the expression is refused or fails.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    expr = expr.strip()
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # thousands separators: "1,234 * 2" (not inside string literals)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for odd escapes in string literals
            tree = ast.parse(expr, mode="eval")
        result = _evaluate(tree, deadline=time.monotonic() + TIME_LIMIT_S)
        return str(result)
    except (Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        # division by zero, overflow, bad syntax, etc.: the tool call simply produces no output
        return None
