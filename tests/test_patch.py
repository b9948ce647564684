"""JSON patches from before/after: exact ops for the shapes the webhook produces, and round-trip for any JSON."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert applies(before, ops, after)


def test_applies_reports_ops_that_fail():
    assert not applies({"a": 1}, [{"op": "remove", "path": "/b"}], {"a": 1})
    assert not applies({"a": 1}, [{"op": "replace", "path": "/a", "value": 3}], {"a": 2})


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)  # unlike ==, tells True from 1


def _containers(children):
    # A named function, not a lambda: hypothesis checks by reading the source that extend uses its argument, and
    # that check can misread a lambda spread over lines (HypothesisDeprecationWarning, an error under our filters).
    return st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet="ab/~", max_size=3), children, max_size=4)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3), _containers, max_leaves=20)
json_objects = st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=4)


@given(json_objects, json_objects)
@settings(max_examples=400, deadline=None)
def test_any_two_objects_round_trip(before, after):
    ops = make_patch(before, after)
    original = copy.deepcopy(before)
    result = jsonpatch.apply_patch(before, ops)
    assert _canonical(before) == _canonical(original)
    assert _canonical(result) == _canonical(after)
    assert all(op["op"] in ("add", "remove", "replace") for op in ops)


@given(json_objects, json_objects)
@settings(max_examples=200, deadline=None)
def test_applies_is_exact(before, after):
    ops = make_patch(before, after)
    assert applies(before, ops, after)
    if _canonical(before) != _canonical(after):
        assert not applies(before, [], after)
