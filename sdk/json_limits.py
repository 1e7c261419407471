"""Limits on the JSON a client sends (nesting depth, integer size, encodable strings, finite numbers),
checked before anything is stored, so that whatever the service accepts it can always serve back."""

from __future__ import annotations

import json
import math

from sdk.errors import SdkError

MAX_METADATA_DEPTH = 32  # nested objects/arrays in one item's metadata
INT_LIMIT = 2**63  # metadata integers must fit in a signed 64-bit integer (what any JSON client can read)


class JSONLimitError(SdkError):
    """JSON that is too deep, holds an integer out of range, a lone surrogate or a non-finite number."""


def _check_text(s: str, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONLimitError(f"{what} holds a string that is not valid Unicode (a lone surrogate such as "
                             "\\ud800); send UTF-8 text") from None


def check_json(value, max_depth: int, what: str) -> None:
    """Raise JSONLimitError unless `value` is plain JSON (dict/list/str/int/float/bool/None) within the limits."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth >= max_depth:
                raise JSONLimitError(f"{what} is nested more than {max_depth} levels deep; flatten it")
            if isinstance(v, dict):
                for key, item in v.items():
                    if not isinstance(key, str):
                        raise JSONLimitError(f"{what} has a non-string key {key!r}; JSON keys are strings")
                    _check_text(key, what)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)
        elif isinstance(v, str):
            _check_text(v, what)
        elif v is None or isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not -INT_LIMIT <= v < INT_LIMIT:
                raise JSONLimitError(f"{what} holds an integer outside the signed 64-bit range; send it as a string")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise JSONLimitError(f"{what} holds NaN or Infinity, which JSON cannot carry")
        else:
            raise JSONLimitError(f"{what} holds a {type(v).__name__}, which is not JSON")


def loads(text: str | bytes, what: str):
    """json.loads with one-line JSONLimitErrors for invalid, too deeply nested or too long-numbered input
    (the parser's own limits; what is stored is checked again with `check_json`)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"{what} is nested too deeply to parse; flatten it") from None
    except json.JSONDecodeError:
        raise JSONLimitError(f"{what} is not valid JSON") from None
    except UnicodeDecodeError:
        raise JSONLimitError(f"{what} is not UTF-8 text") from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise JSONLimitError(f"{what} holds an integer with too many digits; send long numbers as strings") from None
