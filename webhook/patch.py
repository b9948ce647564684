"""Pure: a JSON patch (RFC 6902) that turns ``before`` into ``after``; the tests check that it does.

``jsonpatch.make_patch`` has open bugs that emit invalid ``move`` ops for lists, so the diff here is our own and
deliberately plain: it only emits ``add``, ``remove`` and ``replace``; lists are diffed by common prefix and suffix
(which is how the webhook changes them: prepend an init container, append mounts, env vars and volumes) and
replaced whole otherwise.

The round trip (``applies``: ``jsonpatch.apply_patch(before, ops) == after``, with JSON's equality) is asserted by
the tests, not per request: on every shape the injectors produce (tests/test_mutate.py, test_admission.py, and the
hypothesis tests of random annotations), and on arbitrary pairs of JSON values (tests/test_patch.py). Per
request it would cost more than the diff: a deep copy, jsonpatch's pointer walks and a full comparison ran to
over a millisecond for a 16 KB pod, most of the admission time (bench/admission.py).

Cost: ``mutate_pod`` returns a pod that shares every untouched subtree with its input, and the diff skips shared
subtrees by identity, so it walks only the few paths the injectors changed.
"""

from __future__ import annotations

from itertools import compress, repeat
from operator import is_, is_not
from typing import Any

import jsonpatch

Op = dict[str, Any]
_ABSENT = object()


def _escape(token: str) -> str:
    if "~" in token or "/" in token:
        return token.replace("~", "~0").replace("/", "~1")
    return token


def _same(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: Python's == says True == 1, JSON does not."""
    if a is b:
        return True  # the mutation shares untouched subtrees with its input: skip them without a walk
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return False
        theirs = list(map(b.__getitem__, a))
        # Most members are shared objects: a C-speed identity pass settles them before any call per member.
        return all(map(is_, a.values(), theirs)) or all(map(_same, a.values(), theirs))
    if isinstance(a, list):
        return len(a) == len(b) and (all(map(is_, a, b)) or all(map(_same, a, b)))
    equal: bool = a == b  # JSON values: == is a bool
    return equal


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    """How many leading items of ``a`` and ``b`` are the same; identical objects are skipped at C speed."""
    n = min(len(a), len(b))
    identical = list(map(is_, a, b))  # n items
    identical.append(False)  # a sentinel at n: index() always finds one (no exception per call)
    i = 0
    while True:
        i = identical.index(False, i)
        # != settles most differing items at C speed; only equal ones need the exact (True is not 1) check.
        if i == n or a[i] != b[i] or not _same(a[i], b[i]):
            return i
        i += 1


def _diff(a: Any, b: Any, path: str, ops: list[Op]) -> None:
    if a is b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        # No whole-dict comparison first: it would walk the subtrees the recursion below walks again. The members
        # that are the same object in both (nearly all of them) are filtered out at C speed.
        if not a.keys() <= b.keys():
            for key in a:
                if key not in b:
                    ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key in compress(b, map(is_not, map(a.get, b, repeat(_ABSENT)), b.values())):
            value = b[key]
            if key not in a:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            else:
                _diff(a[key], value, f"{path}/{_escape(key)}", ops)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) <= len(b) and all(map(is_, a, b)):
            # ``b`` extends ``a`` (the injectors append env vars, mounts and volumes): the general path below gives
            # the same adds, after two prefix scans and two reversed copies.
            ops.extend({"op": "add", "path": f"{path}/{i}", "value": b[i]} for i in range(len(a), len(b)))
            return
        prefix = _common_prefix(a, b)
        suffix = _common_prefix(a[prefix:][::-1], b[prefix:][::-1])
        mid_a, mid_b = a[prefix : len(a) - suffix], b[prefix : len(b) - suffix]
        if len(mid_a) == len(mid_b):
            for i, (x, y) in enumerate(zip(mid_a, mid_b, strict=True)):
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
    if not _same(a, b):
        ops.append({"op": "replace", "path": path, "value": b})


def applies(before: dict[str, Any], ops: list[Op], after: dict[str, Any]) -> bool:
    """True when ``jsonpatch`` applying ``ops`` to (a copy of) ``before`` yields exactly ``after``: the round-trip
    check the tests run on every patch (a debugging aid; not called per request)."""
    try:
        result = jsonpatch.apply_patch(before, ops)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        return False
    return _same(result, after)


def make_patch(before: dict[str, Any], after: dict[str, Any]) -> list[Op]:
    """JSON patch ops (add, remove, replace) from ``before`` to ``after``, two JSON objects."""
    ops: list[Op] = []
    _diff(before, after, "", ops)
    return ops
