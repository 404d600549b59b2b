"""A request's body for ``serve``'s JSON API: read with limits, parsed strictly, checked field by field.

A body comes from a stranger. Python's ``json`` module alone would turn some of it into a 500: nesting
100,000 deep (RecursionError), an integer of 5000 digits (ValueError past Python's 4300-digit guard),
``1e400`` (float infinity, then OverflowError in ``int()``), ``NaN`` / ``Infinity`` (not JSON at all, but
Python reads them). Here each is the client's error, a 400 naming it, before any field is looked at:

* the body is read up to a size limit (413 past it) and within ``BODY_TIMEOUT_S`` seconds: a client that
  declares more bytes (Content-Length) than it sends gets a 408 and its connection is closed;
* it must be UTF-8 JSON (RFC 8259), one object, nested at most ``MAX_DEPTH`` deep, with no key twice;
* an integer has at most ``MAX_INT_DIGITS`` digits, a number is finite, ``NaN`` / ``Infinity`` are refused.

The fields are then checked by type and range; a refusal says what arrived in JSON's words (``got the
string "1"``, ``got true``, ``got a list``), so ``"1"`` is never shown as if it were the number 1, and
``true`` is not an integer.
"""

from __future__ import annotations

import asyncio
import json
import math

from lora4diffusion.errors import UserError

MAX_DEPTH = 8  # the API's bodies nest 2 deep ({"loras": {"name": 0.5}}); 8 leaves room, 100,000 does not
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: no count, step, seed or rank is longer
MAX_NUMBER_CHARS = 64  # a number literal (digits, point, exponent); longer ones are not numbers we take
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this many seconds of the request's headers
SHOWN = 40  # characters of a refused value quoted in a message


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"error": message}`` (UserError is the 400 one)."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message = status, message
        self.close = close  # also close the connection (the client is still sending, or never will)


def describe(value: object) -> str:
    """A JSON value as a message shows it: ``the string "1"``, ``true``, ``null``, ``a list``, ``2.5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value)
        return f"the string {text if len(text) <= SHOWN else text[: SHOWN - 4] + '...' + chr(34)}"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ------------------------------------------------------------------------------------------ reading a body
async def read_body(request, limit: int, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The raw body of a Starlette ``request``: at most ``limit`` bytes (413), all of it within ``timeout``
    seconds (408, and the connection is closed: a client that declared more than it sends holds nothing)."""
    mib = f"{limit / 2**20:.3g} MiB"
    length = request.headers.get("content-length")
    if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > limit):
        raise HTTPError(413, f"request body too large (limit {mib})", close=True)
    chunks: list[bytes] = []
    got = 0

    async def collect() -> None:
        nonlocal got
        async for chunk in request.stream():
            got += len(chunk)
            if got > limit:
                raise HTTPError(413, f"request body too large (limit {mib})", close=True)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        declared = f" of the {length} declared (Content-Length)" if length is not None else ""
        raise HTTPError(408, f"the request body did not arrive within {timeout:g} s ({got} bytes{declared});"
                        " connection closed", close=True) from None
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------ parsing it
def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise UserError(f"the request body holds an integer of {len(text.lstrip('-'))} digits (at most "
                        f"{MAX_INT_DIGITS}): {text[:20]}...")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise UserError(f"the request body holds a number written with {len(text)} characters (at most "
                        f"{MAX_NUMBER_CHARS}): {text[:20]}...")
    value = float(text)
    if not math.isfinite(value):
        raise UserError(f"the request body holds the number {text}, out of range (numbers must be finite)")
    return value


def _constant(name: str) -> float:
    raise UserError(f"the request body holds {name}, which is not a JSON number (numbers must be finite)")


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UserError(f"the request body has the key {json.dumps(twice)[:SHOWN]} twice")
    return obj


def _depth(value: object) -> int:
    """How deep lists and objects nest (1: a flat object), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:  # deeper than the limit: known to fail, no need to walk it all
                stack += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; every way it is not one we take is a UserError (a 400) naming it."""
    try:
        text = raw.decode("utf-8") if raw.strip() else "{}"
    except UnicodeDecodeError as e:
        raise UserError(f"the request body is not UTF-8 (byte {e.start}); JSON is sent as UTF-8") from None
    try:
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                         object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise UserError(f"the request body is not JSON ({e.msg} at {where})") from None
    except RecursionError:
        raise UserError(f"the request body nests lists or objects too deeply (at most {MAX_DEPTH})") from None
    if not isinstance(obj, dict):
        raise UserError(f"the request body must be a JSON object, got {describe(obj)}")
    if _depth(obj) > MAX_DEPTH:
        raise UserError(f"the request body nests lists or objects too deeply (at most {MAX_DEPTH})")
    return obj


# ------------------------------------------------------------------------------------------ its fields
def int_field(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    """An integer in lo..hi (absent or null: ``default``). JSON has one number type, so 2.0 is 2; true,
    "2" and 2.5 are not integers."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UserError(f"{key} must be an integer in {lo}..{hi}, got {describe(v)}")
    return v


def float_field(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (absent or null: ``default``); true and "1" are not numbers."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise UserError(f"{key} must be a number in {lo:g}..{hi:g}, got {describe(v)}")
    return float(v)


def str_field(body: dict, key: str, default: str = "", max_chars: int = 2000) -> str:
    """A string of at most ``max_chars`` characters (absent or null: ``default``)."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise UserError(f"{key} must be a string, got {describe(v)}")
    if len(v) > max_chars:
        raise UserError(f"{key} is {len(v)} characters long; at most {max_chars}")
    return v


def object_field(body: dict, key: str, what: str) -> dict:
    """A JSON object (absent or null: {}); ``what`` shows its shape in the message."""
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UserError(f"{key} must be an object {what}, got {describe(v)}")
    return v
