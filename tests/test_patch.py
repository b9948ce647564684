"""JSON patches from before/after: exact ops for the shapes the webhook produces, and round-trip for any JSON."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook import patch
from webhook.patch import applies, make_patch


@pytest.mark.parametrize(
    "before,after,ops",
    [
        ({"a": 1}, {"a": 1}, []),
        ({"a": 1}, {"a": 2}, [{"op": "replace", "path": "/a", "value": 2}]),
        ({"a": 1}, {"a": 1, "b": [1]}, [{"op": "add", "path": "/b", "value": [1]}]),
        ({"a": 1, "b": 2}, {"a": 1}, [{"op": "remove", "path": "/b"}]),
        ({"m": {"model.cache/ref": "x"}}, {"m": {"model.cache/ref": "x", "a~b": "y"}},
         [{"op": "add", "path": "/m/a~0b", "value": "y"}]),
        ({"m": {}}, {"m": {"model.cache/injected": "y"}}, [{"op": "add", "path": "/m/model.cache~1injected", "value": "y"}]),
        ({"l": [1, 2]}, {"l": [1, 2, 3, 4]}, [{"op": "add", "path": "/l/2", "value": 3}, {"op": "add", "path": "/l/3", "value": 4}]),
        ({"l": [2, 3]}, {"l": [1, 2, 3]}, [{"op": "add", "path": "/l/0", "value": 1}]),
        ({"l": [1, 3]}, {"l": [1, 2, 3]}, [{"op": "add", "path": "/l/1", "value": 2}]),
        ({"l": [1, 2, 3, 4]}, {"l": [1, 4]}, [{"op": "remove", "path": "/l/1"}, {"op": "remove", "path": "/l/1"}]),
        ({"l": [1, 2, 3]}, {"l": [1, 5, 3]}, [{"op": "replace", "path": "/l/1", "value": 5}]),
        ({"l": [1, 2, 3]}, {"l": [9, 8]}, [{"op": "replace", "path": "/l", "value": [9, 8]}]),
        ({"l": [{"n": "a"}]}, {"l": [{"n": "a", "env": [1]}]}, [{"op": "add", "path": "/l/0/env", "value": [1]}]),
        ({"a": True}, {"a": 1}, [{"op": "replace", "path": "/a", "value": 1}]),
        ({"a": [True]}, {"a": [1]}, [{"op": "replace", "path": "/a/0", "value": 1}]),
        ({"a": {"b": 1}}, {"a": [1]}, [{"op": "replace", "path": "/a", "value": [1]}]),
        ({"": 1}, {"": 2}, [{"op": "replace", "path": "/", "value": 2}]),
    ],
    ids=[
        "equal", "replace", "add-key", "remove-key", "tilde-escaped", "slash-escaped", "append", "prepend",
        "insert-middle", "remove-middle", "replace-item", "replace-list", "nested-add", "bool-is-not-int",
        "bool-in-list", "type-change", "empty-key",
    ],
)
def test_exact_ops(before, after, ops):
    assert make_patch(before, after) == ops
    assert jsonpatch.apply_patch(before, ops) == after


def test_falls_back_to_top_level_values_when_the_diff_is_wrong(monkeypatch):
    def broken(a, b, path, ops):
        ops.append({"op": "move", "from": "/spec/nothing", "path": "/spec/x"})

    monkeypatch.setattr(patch, "_diff", broken)
    before = {"metadata": {"name": "p"}, "spec": {"containers": []}, "status": {}}
    after = {"metadata": {"name": "p", "annotations": {"k": "v"}}, "spec": {"containers": [], "volumes": []}, "kind": "Pod"}
    ops = make_patch(before, after)
    assert ops == [
        {"op": "remove", "path": "/status"},
        {"op": "replace", "path": "/metadata", "value": {"name": "p", "annotations": {"k": "v"}}},
        {"op": "replace", "path": "/spec", "value": {"containers": [], "volumes": []}},
        {"op": "add", "path": "/kind", "value": "Pod"},
    ]
    assert applies(before, ops, after)


def test_applies_reports_ops_that_fail():
    assert not applies({"a": 1}, [{"op": "remove", "path": "/b"}], {"a": 1})
    assert not applies({"a": 1}, [{"op": "replace", "path": "/a", "value": 3}], {"a": 2})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet="ab/~", max_size=3), children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=4)


@given(json_objects, json_objects)
@settings(max_examples=400, deadline=None)
def test_any_two_objects_round_trip(before, after):
    ops = make_patch(before, after)
    original = copy.deepcopy(before)
    result = jsonpatch.apply_patch(before, ops)
    assert before == original
    assert result == after
    assert all(op["op"] in ("add", "remove", "replace") for op in ops)


# --- the copy-on-write applier agrees with jsonpatch -------------------------------------------------------------

def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)  # unlike ==, tells True from 1


tokens = st.sampled_from(["a", "b", "a/b", "~", "", "0", "1", "2", "5", "01", "-1", "x"])
pointers = st.lists(tokens, max_size=3).map(lambda parts: "".join("/" + patch._escape(p) for p in parts))
random_ops = st.lists(
    st.one_of(
        st.builds(lambda p, v: {"op": "add", "path": p, "value": v}, pointers | pointers.map(lambda p: p + "/-"), json_values),
        st.builds(lambda p: {"op": "remove", "path": p}, pointers),
        st.builds(lambda p, v: {"op": "replace", "path": p, "value": v}, pointers, json_values),
    ),
    max_size=4,
)


@given(json_objects, random_ops)
@settings(max_examples=600, deadline=None)
def test_apply_patch_agrees_with_jsonpatch_and_never_changes_its_input(doc, ops):
    original = copy.deepcopy(doc)
    try:
        expected = jsonpatch.apply_patch(copy.deepcopy(doc), copy.deepcopy(ops))
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        with pytest.raises(ValueError):
            patch.apply_patch(doc, ops)
        assert not applies(doc, ops, doc)
    else:
        result = patch.apply_patch(doc, ops)
        assert _canonical(result) == _canonical(expected)
        assert applies(doc, ops, expected)
    assert _canonical(doc) == _canonical(original)


@given(json_objects, json_objects)
@settings(max_examples=200, deadline=None)
def test_applies_is_exact(before, after):
    ops = make_patch(before, after)
    assert applies(before, ops, after)
    if _canonical(before) != _canonical(after):
        assert not applies(before, [], after)
