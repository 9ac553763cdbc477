"""Structural-schema validation, unknown fields/pruning and ObjectMeta validation."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from virtplane.api import resources, validation
from virtplane.api.resources import Cause


@pytest.fixture(scope="module")
def vm_validator(served: dict[str, resources.Resource]) -> validation.Validator:
    assert served["VirtualMachine"].schema is not None
    return validation.compile_schema(served["VirtualMachine"].schema)


def _fields(causes: list[Cause]) -> dict[str, Cause]:
    return {c.field: c for c in causes}


def test_valid_manifests_pass(served: dict[str, resources.Resource], vm_cirros: dict[str, Any],
                              vm_large: dict[str, Any], vmi_sata: dict[str, Any], vmi_efi: dict[str, Any],
                              dv_http: dict[str, Any]) -> None:
    for obj in (vm_cirros, vm_large, vmi_sata, vmi_efi, dv_http):
        res = served[obj["kind"]]
        assert res.schema is not None
        v = validation.compile_schema(res.schema)
        assert v.validate(obj) == [], obj["metadata"]["name"]
        assert v.unknown_fields(obj) == [], obj["metadata"]["name"]


def test_type_error_message(vm_validator: validation.Validator, vm_cirros: dict[str, Any]) -> None:
    vm_cirros["spec"]["running"] = "yes"
    vm_cirros["spec"]["runStrategy"] = 3
    causes = _fields(vm_validator.validate(vm_cirros))
    assert causes["spec.running"] == Cause(
        "FieldValueInvalid", 'Invalid value: "string": spec.running in body must be of type boolean: "string"',
        "spec.running")
    assert causes["spec.runStrategy"].message == (
        'Invalid value: "integer": spec.runStrategy in body must be of type string: "integer"')


def test_required_and_nested_paths(vm_validator: validation.Validator, vm_cirros: dict[str, Any]) -> None:
    del vm_cirros["spec"]["template"]["spec"]["domain"]["devices"]["disks"][1]["name"]
    del vm_cirros["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["image"]
    causes = vm_validator.validate(vm_cirros)
    assert Cause("FieldValueRequired", "Required value",
                 "spec.template.spec.domain.devices.disks[1].name") in causes
    assert "spec.template.spec.volumes[0].containerDisk.image" in _fields(causes)
    del vm_cirros["spec"]
    assert vm_validator.validate(vm_cirros) == [Cause("FieldValueRequired", "Required value", "spec")]


def test_quantity_int_or_string_and_pattern(vm_validator: validation.Validator, vm_cirros: dict[str, Any]) -> None:
    requests = vm_cirros["spec"]["template"]["spec"]["domain"]["resources"]["requests"]
    requests["memory"] = 134217728  # integers are fine for quantities
    requests["cpu"] = "500m"
    assert vm_validator.validate(vm_cirros) == []
    requests["memory"] = "128 MiB"
    requests["cpu"] = True
    causes = _fields(vm_validator.validate(vm_cirros))
    mem = causes["spec.template.spec.domain.resources.requests.memory"]
    assert mem.type == "FieldValueInvalid" and mem.message.startswith('Invalid value: "128 MiB": ')
    assert "in body should match '^(\\+|-)?" in mem.message
    assert causes["spec.template.spec.domain.resources.requests.cpu"].message == (
        'Invalid value: "boolean": spec.template.spec.domain.resources.requests.cpu in body must be of type '
        'integer,string: "boolean"')


def test_enum_minimum_int32_and_nullable(served: dict[str, resources.Resource], vmi_sata: dict[str, Any]) -> None:
    assert served["VirtualMachineInstance"].schema is not None
    v = validation.compile_schema(served["VirtualMachineInstance"].schema)
    vmi_sata["spec"]["dnsPolicy"] = "Bogus"
    vmi_sata["spec"]["domain"]["devices"]["disks"][0]["bootOrder"] = 2**40
    vmi_sata["status"] = None  # VMI status is nullable in KubeVirt's schema
    vmi_sata["spec"]["hostname"] = None  # not nullable
    causes = _fields(v.validate(vmi_sata))
    assert causes["spec.dnsPolicy"] == Cause(
        "FieldValueNotSupported",
        'Unsupported value: "Bogus": supported values: "ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"',
        "spec.dnsPolicy")
    assert causes["spec.domain.devices.disks[0].bootOrder"].message == (
        "Invalid value: 1099511627776: spec.domain.devices.disks[0].bootOrder in body should be less than or "
        "equal to 2147483647")
    assert "status" not in causes
    assert causes["spec.hostname"].message == 'Invalid value: "null": spec.hostname in body must be of type ' \
        'string: "null"'


def test_keyword_checks_on_handwritten_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 5, "minLength": 2, "pattern": "^[a-z]+$"},
                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                    "ratio": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2,
                             "x-kubernetes-list-type": "set"},
                    "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                              "items": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}}}},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        },
    }
    v = validation.compile_schema(schema)
    obj = {"spec": {"name": "Abcdefg", "size": 0, "ratio": 0, "tags": ["a", "a", "b"],
                    "ports": [{"name": "x"}, {"name": "x"}], "labels": {"a": 1}}}
    causes = v.validate(obj)
    messages = {(c.field, c.message) for c in causes}
    assert ("spec.name", "Too long: may not be more than 5 bytes") in messages
    assert ("spec.name", "Invalid value: \"Abcdefg\": spec.name in body should match '^[a-z]+$'") in messages
    assert ("spec.size", "Invalid value: 0: spec.size in body should be greater than or equal to 1") in messages
    assert ("spec.ratio", "Invalid value: 0: spec.ratio in body should be greater than 0") in messages
    assert ("spec.tags", "Too many: 3: must have at most 2 items") in messages
    assert ("spec.tags[1]", 'Duplicate value: "a"') in messages
    assert ("spec.ports[1]", 'Duplicate value: {"name": "x"}') in messages
    assert ("spec.labels.a", 'Invalid value: "integer": spec.labels.a in body must be of type string: "integer"') \
        in messages
    assert validation.compile_schema(schema).validate({"spec": {"tags": []}}) == [
        Cause("FieldValueInvalid", "Invalid value: 0: spec.tags in body should have at least 1 items", "spec.tags")]


def test_unknown_fields_and_prune(vm_validator: validation.Validator, vm_cirros: dict[str, Any]) -> None:
    tmpl = vm_cirros["spec"]["template"]
    tmpl["metadata"]["whatever"] = {"kept": True}  # template metadata preserves unknown fields
    tmpl["spec"]["domain"]["devices"]["disks"][0]["bootorder"] = 1  # typo
    tmpl["spec"]["domain"]["resources"]["requests"]["hugepages-2Mi"] = "1Gi"  # a map: any key
    vm_cirros["spec"]["foo"] = "bar"
    vm_cirros["metadata"]["labelz"] = {}
    vm_cirros["status"] = {"printableStatus": "Stopped", "bogus": 1}
    expected = ["metadata.labelz", "spec.template.spec.domain.devices.disks[0].bootorder", "spec.foo",
                "status.bogus"]
    assert sorted(vm_validator.unknown_fields(vm_cirros)) == sorted(expected)
    before = copy.deepcopy(vm_cirros)
    assert vm_validator.unknown_fields(vm_cirros) and vm_cirros == before  # unknown_fields does not mutate
    assert sorted(vm_validator.prune(vm_cirros)) == sorted(expected)
    assert "foo" not in vm_cirros["spec"] and "labelz" not in vm_cirros["metadata"]
    assert "bootorder" not in tmpl["spec"]["domain"]["devices"]["disks"][0]
    assert tmpl["metadata"]["whatever"] == {"kept": True}
    assert tmpl["spec"]["domain"]["resources"]["requests"]["hugepages-2Mi"] == "1Gi"
    assert vm_validator.unknown_fields(vm_cirros) == []


def test_prune_drops_nulls_of_non_nullable_fields(vm_validator: validation.Validator,
                                                  vm_cirros: dict[str, Any]) -> None:
    vm_cirros["spec"]["running"] = None
    vm_cirros["metadata"]["creationTimestamp"] = None
    vm_cirros["status"] = None  # nullable: kept
    assert vm_validator.prune(vm_cirros) == []
    assert "running" not in vm_cirros["spec"] and "creationTimestamp" not in vm_cirros["metadata"]
    assert "status" in vm_cirros
    assert vm_validator.validate(vm_cirros) == []


def test_validate_is_fast(vm_validator: validation.Validator, vm_large: dict[str, Any]) -> None:
    import orjson

    assert len(orjson.dumps(vm_large)) > 2500
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        vm_validator.validate(vm_large)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 0.002, f"validate took {per_call * 1e6:.0f} µs"


# ---- ObjectMeta


def _meta(**meta: Any) -> dict[str, Any]:
    return {"metadata": meta}


def test_object_meta_name_rules() -> None:
    assert validation.validate_object_meta(_meta(name="vm-1", namespace="default"), True) == []
    assert validation.validate_object_meta(_meta(namespace="default"), True) == [
        Cause("FieldValueRequired", "Required value: name or generateName is required", "metadata.name")]
    assert validation.validate_object_meta(_meta(generateName="vm-", namespace="default"), True) == []
    (c,) = validation.validate_object_meta(_meta(name="My_VM", namespace="default"), True)
    assert c == Cause(
        "FieldValueInvalid",
        'Invalid value: "My_VM": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters,'
        " '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
        "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        "metadata.name")
    causes = validation.validate_object_meta(_meta(name="a" * 254, namespace="default"), True)
    assert causes[0].message.endswith("must be no more than 253 characters")
    (c,) = validation.validate_object_meta(_meta(generateName="Bad_", namespace="default"), True)
    assert c.field == "metadata.generateName"


def test_object_meta_namespace_rules() -> None:
    (c,) = validation.validate_object_meta(_meta(name="a.b"), False, is_namespace_kind=True)
    assert c.field == "metadata.name" and "RFC 1123 label" in c.message and "'my-name',  or '123-abc'" in c.message
    assert validation.validate_object_meta(_meta(name="vm"), True) == [
        Cause("FieldValueRequired", "Required value", "metadata.namespace")]
    assert validation.validate_object_meta(_meta(name="n", namespace="x"), False) == [
        Cause("FieldValueForbidden", "Forbidden: not allowed on this type", "metadata.namespace")]
    (c,) = validation.validate_object_meta(_meta(name="1svc", namespace="d"), True, name_format="dns1035")
    assert c.field == "metadata.name" and "a DNS-1035 label must consist of" in c.message


def test_object_meta_labels_annotations_finalizers() -> None:
    meta = _meta(name="vm", namespace="default",
                 labels={"kubevirt.io/vm": "vm", "bad key!": "v", "ok": "-bad-"},
                 annotations={"x" * 64: "v"}, finalizers=["kubernetes", "foo", "example.com/x"])
    causes = validation.validate_object_meta(meta, True)
    got = {(c.field, c.message.split(": ", 2)[1]) for c in causes}
    assert ("metadata.labels", '"bad key!"') in got
    assert ("metadata.labels", '"-bad-"') in got
    assert ("metadata.annotations", '"' + "x" * 64 + '"') in got
    assert ("metadata.finalizers", '"foo"') in got
    assert len(causes) == 4
    big = _meta(name="vm", namespace="d", annotations={"a": "x" * (256 * 1024)})
    assert validation.validate_object_meta(big, True) == [
        Cause("FieldValueTooLong", "Too long: may not be more than 262144 bytes", "metadata.annotations")]
