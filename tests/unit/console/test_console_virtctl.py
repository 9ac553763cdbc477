"""virtctl: argument parsing, targets, ssh/scp command lines, `create vm` YAML, exit codes (no cluster)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from virtplane.cli import virtctl
from virtplane.client import rest


def parse(*argv: str) -> argparse.Namespace:
    args = virtctl.parse_args(argv)
    if args.verb == "create":
        virtctl._finish_create_args(args)
    return args


def ctx(namespace: str = "default", kubeconfig: str | None = None) -> virtctl.Context:
    return virtctl.Context(rest.ClientConfig(server="https://127.0.0.1:6443"), namespace, False, kubeconfig, None)


def create_vm(*flags: str) -> dict[str, Any]:
    return virtctl.build_vm(parse("create", "vm", *flags))


# -- global flags, anywhere on the line ------------------------------------------------------------------

def test_global_flags_before_or_after_the_verb() -> None:
    a = parse("-n", "prod", "--kubeconfig", "/k", "console", "vm1")
    b = parse("console", "vm1", "--namespace=prod", "--kubeconfig=/k")
    for args in (a, b):
        assert (args.namespace, args.kubeconfig, args.name, args.timeout) == ("prod", "/k", "vm1", 5)


def test_namespace_from_kubeconfig_context_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(yaml.safe_dump({
        "current-context": "a", "clusters": [{"name": "c", "cluster": {"server": "https://x:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    assert virtctl.load_context(parse("console", "x")).namespace == "team-a"
    assert virtctl.load_context(parse("console", "x", "--context", "b")).namespace == "default"
    assert virtctl.load_context(parse("console", "x", "-n", "other")).namespace == "other"
    with pytest.raises(virtctl.CLIError, match="context nope not found"):
        virtctl.load_context(parse("console", "x", "--context", "nope"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(virtctl.CLIError, match="cannot read kubeconfig"):
        virtctl.load_context(parse("console", "x"))


def test_pflag_style_booleans() -> None:
    assert parse("start", "vm", "--paused").paused is True
    assert parse("start", "vm", "--paused=false").paused is False
    assert parse("port-forward", "--stdio=true", "vm/x", "22").stdio is True
    assert parse("stop", "vm", "--force", "--grace-period", "0").grace_period == 0
    assert parse("scp", "-r", "./dir", "vm/x:/tmp").recursive is True  # a boolean never takes the next word
    args = parse("create", "vm", "--infer-instancetype=false", "--name=false")
    assert args.infer_instancetype is False and args.infer_instancetype_set and args.vm_name == "false"
    with pytest.raises(SystemExit):
        parse("start", "vm", "--paused=maybe")


def test_stop_needs_force_and_grace_period_together() -> None:
    with pytest.raises(virtctl.CLIError, match="Must both use --force=true and set --grace-period"):
        virtctl._grace(parse("stop", "vm", "--grace-period", "0"))
    with pytest.raises(virtctl.CLIError):
        virtctl._grace(parse("stop", "vm", "--force"))
    assert virtctl._grace(parse("stop", "vm")) is None


# -- targets and ports -------------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "expected"), [
    ("vm/web", virtctl.Target("vm", "web", None)),
    ("vmi/web/prod", virtctl.Target("vmi", "web", "prod")),
    ("VirtualMachines/web", virtctl.Target("vm", "web", None)),
    ("alice@vm/web/prod", virtctl.Target("vm", "web", "prod", "alice")),
])
def test_targets(arg: str, expected: virtctl.Target) -> None:
    assert virtctl.parse_target(arg, allow_user=True) == expected


@pytest.mark.parametrize(("arg", "message"), [
    ("web", "type and name"), ("pod/web", "unsupported resource type"), ("vm/", "name cannot be empty"),
    ("vm/a/b/c", "more than two"), ("@vm/x", "username before"), ("vm/web/", "namespace cannot be empty"),
])
def test_bad_targets(arg: str, message: str) -> None:
    with pytest.raises(virtctl.CLIError, match=message):
        virtctl.parse_target(arg, allow_user=True)


def test_ports() -> None:
    assert virtctl.parse_port("8080") == virtctl.ForwardedPort(8080, 8080, "tcp")
    assert virtctl.parse_port("8080:80") == virtctl.ForwardedPort(8080, 80, "tcp")
    assert virtctl.parse_port("udp/5353:53") == virtctl.ForwardedPort(5353, 53, "udp")
    assert virtctl.parse_port("0:22") == virtctl.ForwardedPort(0, 22, "tcp")
    for bad in ("http", "sctp/22", "70000", "0", "22:0"):
        with pytest.raises(virtctl.CLIError):
            virtctl.parse_port(bad)


# -- ssh / scp ---------------------------------------------------------------------------------------

def test_ssh_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/virtctl.py"])
    args = parse("ssh", "fedora@vm/web", "-i", "/keys/id", "-p", "2222", "-t", "-o StrictHostKeyChecking=no",
                 "-c", "hostname", "-n", "prod")
    argv = virtctl.build_ssh_argv(args, ctx("prod", kubeconfig="/k/config"))
    assert argv[0] == "ssh"
    assert argv[-2:] == ["fedora@vm.web.prod", "hostname"]
    assert ["-o", "StrictHostKeyChecking=no"] == argv[3:5]
    assert argv[argv.index("-i") + 1] == "/keys/id"
    proxy = argv[2]
    assert proxy.startswith("ProxyCommand=")
    assert shlex.split(proxy.removeprefix("ProxyCommand=")) == [
        sys.executable, "-m", "virtplane.cli.virtctl", "--kubeconfig", "/k/config", "port-forward",
        "--stdio=true", "vm/web/prod", "2222"]


def test_ssh_username_flag_and_no_builtin_client() -> None:
    args = parse("ssh", "vmi/db", "-l", "admin")
    assert virtctl.build_ssh_argv(args, ctx())[-1] == "admin@vmi.db.default"
    with pytest.raises(virtctl.CLIError, match="built-in SSH client"):
        virtctl._require_local_ssh(parse("ssh", "vmi/db", "--local-ssh=false"), "ssh")


def test_scp_command_lines() -> None:
    up = virtctl.build_scp_argv(parse("scp", "-r", "./dir", "root@vm/web/prod:/tmp/dir"), ctx())
    assert up[0] == "scp" and up[-3:] == ["-r", "./dir", "root@vm.web.prod:/tmp/dir"]
    down = virtctl.build_scp_argv(parse("scp", "--preserve", "vmi/db:/etc/hosts", "hosts"), ctx())
    assert down[-3:] == ["-p", "vmi.db.default:/etc/hosts", "hosts"]
    with pytest.raises(virtctl.CLIError, match="exactly one"):
        virtctl.build_scp_argv(parse("scp", "a", "b"), ctx())


# -- create vm ---------------------------------------------------------------------------------------

def test_create_vm_defaults_yaml() -> None:
    text = virtctl.to_yaml(create_vm("--name", "my-vm"))
    assert text == """apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  creationTimestamp: null
  name: my-vm
spec:
  runStrategy: Always
  template:
    metadata:
      creationTimestamp: null
    spec:
      domain:
        devices: {}
        memory:
          guest: 512Mi
        resources: {}
      terminationGracePeriodSeconds: 180
status: {}
"""


def test_create_vm_random_name_and_namespace() -> None:
    vm = virtctl.build_vm(parse("create", "vm"), namespace="prod")
    assert vm["metadata"]["name"].startswith("vm-") and len(vm["metadata"]["name"]) == 8
    assert vm["metadata"]["namespace"] == "prod"


def test_create_vm_instancetype_preference_containerdisk_cloud_init() -> None:
    vm = create_vm("--name", "web", "--instancetype", "u1.medium", "--preference", "virtualmachinepreference/fedora",
                   "--volume-containerdisk", "src:quay.io/containerdisks/fedora:41,bootorder:1",
                   "--cloud-init-user-data", "I2Nsb3VkLWNvbmZpZwo=", "--run-strategy", "halted")
    spec = vm["spec"]
    assert spec["runStrategy"] == "Halted"
    assert spec["instancetype"] == {"name": "u1.medium"}
    assert spec["preference"] == {"name": "fedora", "kind": "virtualmachinepreference"}
    tpl = spec["template"]["spec"]
    assert "memory" not in tpl["domain"]  # the instance type sizes the VM
    assert tpl["domain"]["devices"]["disks"] == [{"bootOrder": 1, "name": "web-containerdisk-0"}]
    assert tpl["volumes"] == [
        {"name": "web-containerdisk-0", "containerDisk": {"image": "quay.io/containerdisks/fedora:41"}},
        {"name": "cloudinitdisk", "cloudInitNoCloud": {"userDataBase64": "I2Nsb3VkLWNvbmZpZwo="}},
    ]


def test_create_vm_volume_import_infers_instancetype_and_preference() -> None:
    vm = create_vm("--name", "db", "--volume-import", "type:ds,src:os-images/fedora,size:30Gi,name:root")
    spec = vm["spec"]
    assert spec["dataVolumeTemplates"] == [{
        "metadata": {"creationTimestamp": None, "name": "root"},
        "spec": {"sourceRef": {"kind": "DataSource", "name": "fedora", "namespace": "os-images"},
                 "storage": {"resources": {"requests": {"storage": "30Gi"}}}}}]
    assert spec["template"]["spec"]["volumes"] == [{"name": "root", "dataVolume": {"name": "root"}}]
    implicit = {"inferFromVolume": "root", "inferFromVolumeFailurePolicy": "Ignore"}
    assert spec["instancetype"] == implicit and spec["preference"] == implicit
    assert spec["template"]["spec"]["domain"]["memory"] == {"guest": "512Mi"}  # kept as a fallback
    explicit = create_vm("--name", "db", "--volume-import", "type:pvc,src:ns1/golden,name:root",
                         "--infer-instancetype")["spec"]
    assert explicit["instancetype"] == {"inferFromVolume": "root"}
    assert "memory" not in explicit["template"]["spec"]["domain"]
    assert explicit["dataVolumeTemplates"][0]["spec"] == {"source": {"pvc": {"name": "golden", "namespace": "ns1"}},
                                                         "storage": {"resources": {}}}


def test_create_vm_generated_cloud_init_is_a_literal_block() -> None:
    vm = create_vm("--name", "x", "--user", "fedora", "--ssh-key", "ssh-ed25519 AAAA me")
    user_data = vm["spec"]["template"]["spec"]["volumes"][0]["cloudInitNoCloud"]["userData"]
    assert user_data == "#cloud-config\nuser: fedora\nssh_authorized_keys:\n  - ssh-ed25519 AAAA me"
    assert "userData: |-\n" in virtctl.to_yaml(vm)
    assert yaml.safe_load(virtctl.to_yaml(vm)) == vm


@pytest.mark.parametrize(("flags", "message"), [
    (("--run-strategy", "Sometimes"), 'invalid run strategy "Sometimes"'),
    (("--volume-containerdisk", "src:a,bootorder:1", "--volume-containerdisk", "src:b,bootorder:1"),
     "bootorder 1 was specified multiple times"),
    (("--volume-pvc", "src:other/pvc"), 'not allowed to specify namespace of pvc "pvc"'),
    (("--volume-import", "type:http,size:1Gi"), "url is required with http volume source"),
    (("--volume-import", "type:pvc,src:pvc"), 'namespace of pvc "pvc" must be specified'),
    (("--volume-import", "type:blank"), "size must be specified"),
    (("--volume-import", "type:nfs,size:1Gi"), 'invalid volume import type "nfs"'),
    (("--volume-containerdisk", "image:x"), "unknown param(s): image:x"),
    (("--memory", "1Gi", "--instancetype", "u1.small"), "none of the others can be"),
    (("--cloud-init-user-data", "e30=", "--user", "x"), "cannot be combined"),
    (("--volume-containerdisk", "src:a,name:Bad_Name"), 'invalid name "Bad_Name"'),
])
def test_create_vm_flag_errors(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(virtctl.CLIError) as err:
        create_vm("--name", "x", *flags)
    assert message in err.value.message


# -- exit codes ----------------------------------------------------------------------------------------

def test_exit_codes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert virtctl.main(["image-upload", "dv", "foo", "--image-path=x"]) == 1
    assert capsys.readouterr().err == "Error: image-upload: cannot read x: no such file\n"
    with pytest.raises(SystemExit) as usage:
        virtctl.main(["console"])
    assert usage.value.code == 2
    assert "Error: the following arguments are required: VMI" in capsys.readouterr().err
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert virtctl.main(["start", "vm1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: cannot read kubeconfig") and "Traceback" not in err
    assert virtctl.main(["create", "vm", "--name", "ok"]) == 0  # create needs no cluster
    assert "name: ok" in capsys.readouterr().out


# -- the API server's mapping of subresource paths to node paths ----------------------------------------

def test_apiserver_node_paths() -> None:
    from virtplane.apiserver import consoles, errors

    assert consoles._node_path("console") == ("console", True)
    assert consoles._node_path("vnc") == ("vnc", True)
    assert consoles._node_path("vnc/screenshot") == ("vnc/screenshot", False)
    assert consoles._node_path("consolelog") == ("consolelog", False)
    assert consoles._node_path("portforward/22") == ("portforward/22/tcp", True)
    assert consoles._node_path("portforward/53/UDP") == ("portforward/53/udp", True)
    for bad, code in (("portforward/0", 400), ("portforward/22/sctp", 400), ("portforward/x", 400),
                      ("vnc/other", 404), ("console/extra", 404)):
        with pytest.raises(errors.StatusError) as err:
            consoles._node_path(bad)
        assert err.value.code == code
