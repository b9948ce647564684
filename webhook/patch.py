"""Pure: a JSON patch (RFC 6902) that turns ``before`` into ``after``, checked by applying it.

``jsonpatch.make_patch`` has open bugs that emit invalid ``move`` ops for lists, so the diff here is our own and
deliberately plain: it only emits ``add``, ``remove`` and ``replace``; lists are diffed by common prefix and suffix
(which is how the webhook changes them: prepend an init container, append mounts, env vars and volumes) and
replaced whole otherwise. Every patch is applied to ``before`` and compared with ``after``; if that ever fails,
the patch falls back to whole-value operations on the changed top-level fields, which cannot be wrong.

Cost: this runs on every admitted pod, so neither step walks what did not change. ``mutate_pod`` returns a pod
that shares every untouched subtree with its input, the diff skips shared subtrees by identity, and the check
applies the ops copy-on-write (copying only the dicts and lists along each op's path) before comparing with
``after``, where the shared subtrees are again identical objects. A 16 KB pod costs tens of microseconds where a
deep copy, ``jsonpatch.apply_patch`` and a full comparison cost over a millisecond (bench/admission.py).
"""

from __future__ import annotations

from operator import is_
from typing import Any

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
        if a.keys() != b.keys():
            return False
        theirs = list(map(b.__getitem__, a))
        # Most members are shared objects: a C-speed identity pass settles them before any call per member.
        return all(map(is_, a.values(), theirs)) or all(map(_same, a.values(), theirs))
    if isinstance(a, list):
        return len(a) == len(b) and (all(map(is_, a, b)) or all(map(_same, a, b)))
    return a == b


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    """How many leading items of ``a`` and ``b`` are the same; identical objects are skipped at C speed."""
    n = min(len(a), len(b))
    identical = list(map(is_, a, b))
    i = 0
    while i < n:
        try:
            i = identical.index(False, i)
        except ValueError:
            return n
        # != settles most differing items at C speed; only equal ones need the exact (True is not 1) check.
        if a[i] != b[i] or not _same(a[i], b[i]):
            return i
        i += 1
    return n


def _diff(a: Any, b: Any, path: str, ops: list[Op]) -> None:
    if a is b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        # No whole-dict comparison first: it would walk the subtrees the recursion below walks again.
        for key in a:
            if key not in b:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in b.items():
            if key not in a:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            elif a[key] is not value:
                _diff(a[key], value, f"{path}/{_escape(key)}", ops)
        return
    if isinstance(a, list) and isinstance(b, list):
        prefix = _common_prefix(a, b)
        suffix = _common_prefix(a[prefix:][::-1], b[prefix:][::-1])
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
    if not _same(a, b):
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


# --- applying, copy-on-write ---------------------------------------------------------------------------------


class _Inapplicable(ValueError):
    """An op that RFC 6902 says fails on this document (missing target, bad index, unknown op)."""


def _index(token: str, size: int) -> int:
    # RFC 6901: array indices are "0" or digits without a leading zero; range is checked by the caller.
    if not token.isdigit() or not token.isascii() or (len(token) > 1 and token[0] == "0"):
        raise _Inapplicable(f"{token!r} is not an array index")
    i = int(token)
    if i > size:
        raise _Inapplicable(f"index {i} is out of range")
    return i


def _slot(node: Any, token: str) -> Any:
    """The key or index ``token`` names in ``node``, which must exist."""
    if isinstance(node, dict):
        if token not in node:
            raise _Inapplicable(f"no member {token!r}")
        return token
    if isinstance(node, list):
        i = _index(token, len(node))
        if i == len(node):
            raise _Inapplicable(f"index {i} is out of range")
        return i
    raise _Inapplicable("a path goes through a scalar")


def _apply(doc: Any, op: Any, own: dict[int, Any]) -> Any:
    """``doc`` with ``op`` applied. Containers in ``own`` (by id) were copied by this application and may be
    edited in place; any other container on the op's path is copied first, so ``before`` and the op values are
    never changed. ``own`` also keeps those copies alive, so their ids cannot be reused while it is in use."""
    kind = op.get("op") if isinstance(op, dict) else None
    path = op.get("path") if isinstance(op, dict) else None
    if kind not in ("add", "remove", "replace") or not isinstance(path, str) or (kind != "remove" and "value" not in op):
        raise _Inapplicable(f"unsupported op {op!r}")
    if path == "":
        if kind == "remove":
            raise _Inapplicable("cannot remove the whole document")
        return op["value"]
    if not path.startswith("/"):
        raise _Inapplicable(f"{path!r} is not a JSON pointer")
    tokens = path[1:].split("/")
    if "~" in path:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in tokens]
    last = tokens.pop()

    root = node = doc
    parent, slot = None, None
    for token in (None, *tokens):
        if token is not None:
            parent, slot = node, _slot(node, token)
            node = node[slot]
        if id(node) not in own:
            if isinstance(node, dict):
                node = dict(node)
            elif isinstance(node, list):
                node = list(node)
            else:
                raise _Inapplicable("a path goes through a scalar")
            own[id(node)] = node
            if parent is None:
                root = node
            else:
                parent[slot] = node
    if isinstance(node, dict):
        if kind != "add" and last not in node:
            raise _Inapplicable(f"no member {last!r} to {kind}")
        if kind == "remove":
            del node[last]
        else:
            node[last] = op["value"]
    elif isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else _index(last, len(node)), op["value"])
        else:
            i = _slot(node, last)
            if kind == "remove":
                del node[i]
            else:
                node[i] = op["value"]
    else:
        raise _Inapplicable("the target's parent is a scalar")
    return root


def apply_patch(before: Any, ops: list[Op]) -> Any:
    """``before`` with the RFC 6902 ``add``/``remove``/``replace`` ops applied; ValueError when one cannot be.

    ``before`` is not changed: the result shares every subtree the ops did not touch with it."""
    own: dict[int, Any] = {}
    doc: Any = before
    for op in ops:
        doc = _apply(doc, op, own)
    return doc


def applies(before: dict[str, Any], ops: list[Op], after: dict[str, Any]) -> bool:
    """True when applying ``ops`` to ``before`` yields exactly ``after``. Comparing the copy-on-write result with
    an ``after`` that shares the same untouched subtrees costs little more than the ops themselves."""
    try:
        return _same(apply_patch(before, ops), after)
    except _Inapplicable:
        return False


def make_patch(before: dict[str, Any], after: dict[str, Any]) -> list[Op]:
    """JSON patch ops from ``before`` to ``after`` (two objects), round-trip checked."""
    ops: list[Op] = []
    _diff(before, after, "", ops)
    if applies(before, ops, after):
        return ops
    return _top_level(before, after)  # pragma: no cover - only reached if _diff has a bug
