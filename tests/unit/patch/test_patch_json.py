"""RFC 7386 (JSON merge patch) and RFC 6902 (JSON patch) behaviour, plus the errors the API server maps
to HTTP statuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from virtplane.api.patch import PatchError, json_equal, json_merge_patch, json_patch

# ---------------------------------------------------------------------------------------------------------
# RFC 7386: the behaviour of the RFC's appendix, case by case

MERGE_CASES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), MERGE_CASES)
def test_merge_patch_rfc7386(target: Any, patch: Any, expected: Any) -> None:
    before_target, before_patch = copy.deepcopy(target), copy.deepcopy(patch)
    assert json_merge_patch(target, patch) == expected
    assert target == before_target and patch == before_patch  # pure


def test_merge_patch_result_shares_nothing_with_inputs() -> None:
    target = {"spec": {"list": [1, 2], "keep": {"x": 1}}}
    patch = {"spec": {"new": {"y": [1]}}}
    out = json_merge_patch(target, patch)
    out["spec"]["keep"]["x"] = 2
    out["spec"]["new"]["y"].append(2)
    assert target["spec"]["keep"]["x"] == 1
    assert patch["spec"]["new"]["y"] == [1]


def test_merge_patch_kubectl_label_and_annotate() -> None:
    """`kubectl label deploy web env=prod tier-` / `kubectl annotate ... note=hello` send merge patches
    (for built-ins too: label.go uses jsonpatch.CreateMergePatch + types.MergePatchType)."""
    live = {"metadata": {"name": "web", "labels": {"app": "web", "tier": "front"}}, "spec": {"replicas": 2}}
    out = json_merge_patch(live, {"metadata": {"labels": {"env": "prod", "tier": None}}})
    assert out["metadata"]["labels"] == {"app": "web", "env": "prod"}
    out = json_merge_patch(out, {"metadata": {"annotations": {"note": "hello"}}})
    assert out["metadata"]["annotations"] == {"note": "hello"}
    # --resource-version makes kubectl include it so the server can check it
    out = json_merge_patch(out, {"metadata": {"labels": {"x": "1"}, "resourceVersion": "42"}})
    assert out["metadata"]["resourceVersion"] == "42"


def test_merge_patch_scale_subresource() -> None:
    """`kubectl scale --replicas=6` patches the scale subresource with a merge patch."""
    scale = {"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 2}, "status": {"replicas": 2}}
    assert json_merge_patch(scale, {"spec": {"replicas": 6}})["spec"] == {"replicas": 6}


# ---------------------------------------------------------------------------------------------------------
# RFC 6902


def test_add_object_member() -> None:
    assert json_patch({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}]) == {"foo": "bar", "baz": "qux"}


def test_add_array_element_and_append() -> None:
    doc = {"foo": ["bar", "baz"]}
    assert json_patch(doc, [{"op": "add", "path": "/foo/1", "value": "qux"}]) == {"foo": ["bar", "qux", "baz"]}
    assert json_patch(doc, [{"op": "add", "path": "/foo/-", "value": "end"}]) == {"foo": ["bar", "baz", "end"]}
    assert json_patch(doc, [{"op": "add", "path": "/foo/2", "value": "end"}]) == {"foo": ["bar", "baz", "end"]}
    assert doc == {"foo": ["bar", "baz"]}


def test_add_replaces_existing_member_and_array_value() -> None:
    assert json_patch({"foo": 1}, [{"op": "add", "path": "/foo", "value": [1, 2]}]) == {"foo": [1, 2]}
    assert json_patch({"foo": ["bar"]}, [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]) == {
        "foo": ["bar", ["abc", "def"]]
    }


def test_add_nested_member_and_whole_document() -> None:
    assert json_patch({"foo": "bar"}, [{"op": "add", "path": "/child", "value": {"grandchild": {}}}]) == {
        "foo": "bar",
        "child": {"grandchild": {}},
    }
    assert json_patch({"a": 1}, [{"op": "add", "path": "", "value": {"b": 2}}]) == {"b": 2}


def test_remove_object_member_and_array_element() -> None:
    assert json_patch({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}]) == {"foo": "bar"}
    assert json_patch({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}]) == {"foo": ["bar", "baz"]}


def test_replace() -> None:
    assert json_patch({"baz": "qux", "foo": "bar"}, [{"op": "replace", "path": "/baz", "value": "boo"}]) == {
        "baz": "boo",
        "foo": "bar",
    }
    assert json_patch({"a": [1, 2]}, [{"op": "replace", "path": "/a/0", "value": 9}]) == {"a": [9, 2]}


def test_move_value_and_array_element() -> None:
    doc = {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}
    assert json_patch(doc, [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]) == {
        "foo": {"bar": "baz"},
        "qux": {"corge": "grault", "thud": "fred"},
    }
    assert json_patch(
        {"foo": ["all", "grass", "cows", "eat"]}, [{"op": "move", "from": "/foo/1", "path": "/foo/3"}]
    ) == {"foo": ["all", "cows", "eat", "grass"]}
    assert json_patch({"a": 1}, [{"op": "move", "from": "/a", "path": "/a"}]) == {"a": 1}


def test_copy_is_deep() -> None:
    out = json_patch(
        {"a": {"b": [1]}}, [{"op": "copy", "from": "/a", "path": "/c"}, {"op": "add", "path": "/c/b/-", "value": 2}]
    )
    assert out == {"a": {"b": [1]}, "c": {"b": [1, 2]}}


def test_test_success_and_json_equality() -> None:
    doc = {"baz": "qux", "foo": ["a", 2, "c"], "n": 1.0, "flag": True}
    ops = [
        {"op": "test", "path": "/baz", "value": "qux"},
        {"op": "test", "path": "/foo/1", "value": 2},
        {"op": "test", "path": "/n", "value": 1},  # 1 and 1.0 are the same JSON number
        {"op": "test", "path": "/flag", "value": True},
    ]
    assert json_patch(doc, ops) == doc


@pytest.mark.parametrize(
    ("doc", "value"),
    [
        ({"baz": "qux"}, "bar"),
        ({"flag": True}, 1),
        ({"n": 1}, True),
        ({"s": "10"}, 10),
        ({"o": {"a": 1}}, {"a": 1, "b": 2}),
    ],
)
def test_test_failure_is_422_and_names_the_path(doc: dict[str, Any], value: Any) -> None:
    path = "/" + next(iter(doc))
    with pytest.raises(PatchError) as e:
        json_patch(doc, [{"op": "test", "path": path, "value": value}])
    assert e.value.status == 422
    assert "test operation failed" in e.value.message and path in e.value.message
    assert e.value.field == path


def test_pointer_escapes() -> None:
    doc = {"/": 9, "~1": 10, "a/b": {"m~n": 1}}
    assert json_patch(doc, [{"op": "test", "path": "/~01", "value": 10}]) == doc
    assert json_patch(doc, [{"op": "test", "path": "/~1", "value": 9}]) == doc
    out = json_patch(doc, [{"op": "replace", "path": "/a~1b/m~0n", "value": 2}])
    assert out["a/b"] == {"m~n": 2}
    with pytest.raises(PatchError) as e:
        json_patch(doc, [{"op": "test", "path": "/~01", "value": "10"}])
    assert e.value.status == 422


def test_extra_members_are_ignored() -> None:
    assert json_patch({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}]) == {
        "foo": "bar",
        "baz": "qux",
    }


def test_operations_are_atomic_and_input_untouched() -> None:
    doc = {"a": 1}
    with pytest.raises(PatchError):
        json_patch(doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/missing"}])
    assert doc == {"a": 1}
    value = {"deep": [1]}
    out = json_patch(doc, [{"op": "add", "path": "/v", "value": value}])
    out["v"]["deep"].append(2)
    assert value == {"deep": [1]}


@pytest.mark.parametrize(
    ("doc", "op", "needle"),
    [
        ({"foo": "bar"}, {"op": "add", "path": "/baz/bat", "value": "qux"}, "add operation does not apply"),
        ({"foo": "bar"}, {"op": "remove", "path": "/nope"}, "remove operation does not apply"),
        ({"foo": "bar"}, {"op": "replace", "path": "/nope", "value": 1}, "replace operation does not apply"),
        ({"foo": "bar"}, {"op": "move", "from": "/nope", "path": "/x"}, "move operation does not apply"),
        ({"foo": "bar"}, {"op": "copy", "from": "/nope", "path": "/x"}, "copy operation does not apply"),
        ({"foo": [1]}, {"op": "add", "path": "/foo/5", "value": 1}, "out of range"),
        ({"foo": [1]}, {"op": "add", "path": "/foo/01", "value": 1}, "not a valid array index"),
        ({"foo": [1]}, {"op": "remove", "path": "/foo/-"}, "not a valid array index"),
        ({"foo": [1]}, {"op": "replace", "path": "/foo/1", "value": 1}, "out of range"),
        ({"foo": "bar"}, {"op": "add", "path": "/foo/x", "value": 1}, "/foo/x"),
        ({"a": {"b": 1}}, {"op": "move", "from": "/a", "path": "/a/b/c"}, "own child"),
        ({"a": 1}, {"op": "remove", "path": ""}, "whole document"),
    ],
)
def test_operations_that_do_not_apply_are_422(doc: dict[str, Any], op: dict[str, Any], needle: str) -> None:
    with pytest.raises(PatchError) as e:
        json_patch(doc, [op])
    assert e.value.status == 422
    assert needle in e.value.message
    assert op["path"] in e.value.message or op.get("from", "") in e.value.message


@pytest.mark.parametrize(
    ("ops", "needle"),
    [
        ({"op": "add"}, "JSON array"),
        (["add"], "must be an object"),
        ([{"op": "frobnicate", "path": "/a"}], "unknown op"),
        ([{"path": "/a", "value": 1}], "unknown op"),
        ([{"op": "add", "value": 1}], 'missing "path"'),
        ([{"op": "add", "path": "/a"}], 'missing "value"'),
        ([{"op": "replace", "path": "/a"}], 'missing "value"'),
        ([{"op": "test", "path": "/a"}], 'missing "value"'),
        ([{"op": "move", "path": "/a"}], 'missing "from"'),
        ([{"op": "copy", "path": "/a"}], 'missing "from"'),
        ([{"op": "add", "path": "a", "value": 1}], "start with"),
        ([{"op": "add", "path": "/a~2", "value": 1}], "'~'"),
        ([{"op": "add", "path": 5, "value": 1}], "string"),
    ],
)
def test_malformed_patches_are_400(ops: Any, needle: str) -> None:
    with pytest.raises(PatchError) as e:
        json_patch({"a": 1}, ops)
    assert e.value.status == 400
    assert e.value.reason == "BadRequest"
    assert needle in e.value.message


def test_null_values_are_values() -> None:
    assert json_patch({"a": 1}, [{"op": "add", "path": "/b", "value": None}]) == {"a": 1, "b": None}
    assert json_patch({"a": None}, [{"op": "test", "path": "/a", "value": None}]) == {"a": None}


def test_kubectl_patch_type_json() -> None:
    """`kubectl patch --type json -p '[{"op":"replace","path":"/spec/replicas","value":4},...]'`."""
    live = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}}}
    ops = [
        {"op": "replace", "path": "/spec/replicas", "value": 4},
        {"op": "test", "path": "/spec/replicas", "value": 4},
        {"op": "remove", "path": "/spec/template/spec/containers/0"},
        {"op": "add", "path": "/metadata", "value": {"labels": {"x": "y"}}},
    ]
    out = json_patch(live, ops)
    assert out["spec"]["replicas"] == 4
    assert out["spec"]["template"]["spec"]["containers"] == [{"name": "b"}]
    assert out["metadata"] == {"labels": {"x": "y"}}


def test_json_equal_distinguishes_bools_from_numbers() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal([1], [1, 1])
    assert not json_equal("1", 1)
