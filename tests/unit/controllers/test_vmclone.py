"""VirtualMachineClone's pure parts: KubeVirt's filter patterns and the target VM built from the source."""

from __future__ import annotations

import re

import pytest

from virtplane.controllers import vmclone


def test_filters_last_match_wins() -> None:
    assert vmclone.matches("anything", None)
    assert vmclone.matches("app", ["*"])
    assert not vmclone.matches("team", ["*", "!team"])
    assert vmclone.matches("keep/a", ["keep/*"]) and not vmclone.matches("drop/a", ["keep/*"])
    assert not vmclone.matches("x", [])


def test_target_vm() -> None:
    source = {"metadata": {"name": "src", "namespace": "ns", "labels": {"a": "1", "b": "2"},
                           "annotations": {"kubevirt.io/latest-observed-api-version": "v1", "n": "x"}},
              "spec": {"runStrategy": "Halted", "dataVolumeTemplates": [{"metadata": {"name": "d"}}],
                       "template": {"metadata": {"labels": {"kubevirt.io/vm": "src"}},
                                    "spec": {"domain": {"devices": {"interfaces": [
                                        {"name": "default", "macAddress": "02:00:00:00:00:01"},
                                        {"name": "second", "macAddress": "02:00:00:00:00:02"}]},
                                        "firmware": {"uuid": "u", "serial": "s"}},
                                        "volumes": [{"name": "root", "dataVolume": {"name": "d"}},
                                                    {"name": "pvc", "persistentVolumeClaim": {"claimName": "p"}},
                                                    {"name": "ci", "cloudInitNoCloud": {"userData": "x"}}]}}}}
    clone = {"metadata": {"name": "c", "uid": "0123456789abcdef"},
             "spec": {"target": {"name": "dst"}, "labelFilters": ["*", "!b"],
                      "newMacAddresses": {"second": "02:00:00:00:00:09"}}}
    vm = vmclone.target_vm(clone, source)
    assert vm["metadata"] == {"name": "dst", "namespace": "ns", "labels": {"a": "1"}, "annotations": {"n": "x"}}
    assert "dataVolumeTemplates" not in vm["spec"]
    tspec = vm["spec"]["template"]["spec"]
    assert vm["spec"]["template"]["metadata"]["labels"] == {"kubevirt.io/vm": "dst"}
    assert tspec["domain"]["devices"]["interfaces"] == [{"name": "default"},
                                                         {"name": "second", "macAddress": "02:00:00:00:00:09"}]
    assert tspec["domain"]["firmware"] == {}
    assert tspec["volumes"] == [{"name": "root", "dataVolume": {"name": "restore-01234567-root"}},
                                {"name": "pvc", "dataVolume": {"name": "restore-01234567-pvc"}},
                                {"name": "ci", "cloudInitNoCloud": {"userData": "x"}}]
    assert source["spec"]["template"]["spec"]["volumes"][0] == {"name": "root", "dataVolume": {"name": "d"}}


def test_target_vm_patches() -> None:
    source = {"metadata": {"name": "src", "namespace": "ns"},
              "spec": {"template": {"spec": {"domain": {"cpu": {"cores": 1}}}}}}
    patches = ['{"op": "replace", "path": "/spec/template/spec/domain/cpu/cores", "value": 2}',
               '{"op": "add", "path": "/metadata/labels/cloned", "value": "yes"}',
               '{"op": "add", "path": "/spec/runStrategy", "value": "Always"}']
    clone = {"metadata": {"name": "c", "uid": "0123456789abcdef"}, "spec": {"target": {"name": "dst"},
                                                                        "patches": patches}}
    vm = vmclone.target_vm(clone, source)
    assert vm["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 2}
    assert vm["metadata"]["labels"] == {"cloned": "yes"} and vm["spec"]["runStrategy"] == "Always"
    assert source["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 1}  # the source is untouched
    for bad, says in (("not json", "spec.patches[0] is not JSON"),
                      ('["op"]', "must be one JSON patch operation"),
                      ('{"op": "remove", "path": "/spec/nope"}', "do not apply to the target VM")):
        clone["spec"]["patches"] = [bad]
        with pytest.raises(vmclone.PatchesError, match=re.escape(says)):
            vmclone.target_vm(clone, source)


def test_volume_name_policy() -> None:
    source = {"metadata": {"name": "src", "namespace": "ns"},
              "spec": {"template": {"spec": {"volumes": [{"name": "root", "dataVolume": {"name": "d"}}]}}}}
    clone = {"metadata": {"name": "c", "uid": "0123456789abcdef"}, "spec": {"target": {"name": "dst"}}}
    volumes = vmclone.target_vm(clone, source)["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "root", "dataVolume": {"name": "restore-01234567-root"}}]  # RandomizeNames
    clone["spec"]["volumeNamePolicy"] = "PrefixTargetName"
    volumes = vmclone.target_vm(clone, source)["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "root", "dataVolume": {"name": "dst-root"}}]
