"""Pure: a JSON patch (RFC 6902) that turns ``before`` into ``after``, checked by applying it.

``jsonpatch.make_patch`` has open bugs that emit invalid ``move`` ops for lists, so the diff here is our own and
deliberately plain: it only emits ``add``, ``remove`` and ``replace``; lists are diffed by common prefix and suffix
(which is how the webhook changes them: prepend an init container, append mounts, env vars and volumes) and
replaced whole otherwise. Every patch is applied to ``before`` and compared with ``after``; if that ever fails,
the patch falls back to whole-value operations on the changed top-level fields, which cannot be wrong.
"""

from __future__ import annotations

import json
from typing import Any

import jsonpatch

Op = dict[str, Any]


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _same(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: Python's == says True == 1, JSON does not."""
    if a is b:
        return True  # the mutation shares untouched subtrees with its input: skip them without a walk
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(k in b and _same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _diff(a: Any, b: Any, path: str, ops: list[Op]) -> None:
    if _same(a, b):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if key not in b:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in b.items():
            sub = f"{path}/{_escape(key)}"
            if key not in a:
                ops.append({"op": "add", "path": sub, "value": value})
            else:
                _diff(a[key], value, sub, ops)
        return
    if isinstance(a, list) and isinstance(b, list):
        n = min(len(a), len(b))
        prefix = 0
        while prefix < n and _same(a[prefix], b[prefix]):
            prefix += 1
        suffix = 0
        while suffix < n - prefix and _same(a[len(a) - 1 - suffix], b[len(b) - 1 - suffix]):
            suffix += 1
        mid_a, mid_b = a[prefix : len(a) - suffix], b[prefix : len(b) - suffix]
        if len(mid_a) == len(mid_b):
            for i, (x, y) in enumerate(zip(mid_a, mid_b)):
                _diff(x, y, f"{path}/{prefix + i}", ops)
        elif not mid_a:
            for i, value in enumerate(mid_b):
                ops.append({"op": "add", "path": f"{path}/{prefix + i}", "value": value})
        elif not mid_b:
            for _ in mid_a:
                ops.append({"op": "remove", "path": f"{path}/{prefix}"})
        else:
            ops.append({"op": "replace", "path": path, "value": b})
        return
    ops.append({"op": "replace", "path": path, "value": b})


def _top_level(before: dict[str, Any], after: dict[str, Any]) -> list[Op]:
    ops: list[Op] = []
    for key in before:
        if key not in after:
            ops.append({"op": "remove", "path": f"/{_escape(key)}"})
    for key, value in after.items():
        if key not in before:
            ops.append({"op": "add", "path": f"/{_escape(key)}", "value": value})
        elif not _same(before[key], value):
            ops.append({"op": "replace", "path": f"/{_escape(key)}", "value": value})
    return ops


def _copy(value: Any) -> Any:
    # A deep copy of JSON data, several times faster than copy.deepcopy (no memo, no reduce protocol).
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def applies(before: dict[str, Any], ops: list[Op], after: dict[str, Any]) -> bool:
    """True when applying ``ops`` to ``before`` yields exactly ``after``."""
    try:
        result = jsonpatch.apply_patch(_copy(before), ops, in_place=True)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        return False
    # == is C-speed but says True == 1; the canonical JSON texts tell those apart (also C-speed).
    return result == after and _canonical(result) == _canonical(after)


def make_patch(before: dict[str, Any], after: dict[str, Any]) -> list[Op]:
    """JSON patch ops from ``before`` to ``after`` (two objects), round-trip checked."""
    ops: list[Op] = []
    _diff(before, after, "", ops)
    if applies(before, ops, after):
        return ops
    return _top_level(before, after)  # pragma: no cover - only reached if _diff has a bug
