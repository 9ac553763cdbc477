"""Realistic KubeVirt/CDI manifests and the served resources, shared by the api unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from virtplane.api import builtin, resources

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared"

# The KubeVirt user guide's vm-cirros example: containerDisk + cloudInitNoCloud.
VM_CIRROS = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  labels:
    kubevirt.io/vm: vm-cirros
  name: vm-cirros
  namespace: default
spec:
  runStrategy: Halted
  template:
    metadata:
      creationTimestamp: null
      labels:
        kubevirt.io/vm: vm-cirros
    spec:
      domain:
        devices:
          disks:
          - disk:
              bus: virtio
            name: containerdisk
          - disk:
              bus: virtio
            name: cloudinitdisk
        resources:
          requests:
            memory: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo:v1.4.0
        name: containerdisk
      - cloudInitNoCloud:
          userData: |
            #!/bin/sh

            echo 'printed from cloud-init userdata'
        name: cloudinitdisk
"""

# A VMI whose disks all sit on the SATA bus (a guest without virtio drivers), plus a CD-ROM.
VMI_SATA = """
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: vmi-sata
  namespace: default
spec:
  domain:
    cpu:
      cores: 2
    devices:
      disks:
      - name: rootdisk
        bootOrder: 1
        disk:
          bus: sata
      - name: scratch
        disk:
          bus: sata
      - name: installer
        cdrom:
          bus: sata
    resources:
      requests:
        memory: 512Mi
  volumes:
  - name: rootdisk
    containerDisk:
      image: quay.io/containerdisks/fedora:40
  - name: scratch
    emptyDisk:
      capacity: 2Gi
  - name: installer
    persistentVolumeClaim:
      claimName: installer-iso
"""

# UEFI with Secure Boot, which KubeVirt only accepts together with SMM.
VMI_EFI = """
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: vmi-efi
  namespace: default
spec:
  domain:
    features:
      smm:
        enabled: true
    firmware:
      bootloader:
        efi:
          secureBoot: true
    devices:
      disks:
      - name: containerdisk
        disk:
          bus: virtio
    memory:
      guest: 1Gi
  volumes:
  - name: containerdisk
    containerDisk:
      image: quay.io/kubevirt/fedora-with-test-tooling-container-disk:v1.4.0
"""

DV_HTTP = """
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora-dv
  namespace: default
spec:
  source:
    http:
      url: https://download.fedoraproject.org/pub/fedora/linux/releases/40/Cloud/x86_64/images/Fedora-Cloud-Base-Generic.x86_64-40-1.14.qcow2
  storage:
    resources:
      requests:
        storage: 5Gi
"""

# A bigger VM (~3 KB of JSON) for timing: DataVolume template, cloud-init, two NICs, probes, labels.
VM_LARGE = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: fedora-web
  namespace: prod
  labels: {app: web, tier: frontend, os.template.kubevirt.io/fedora40: "true", vm.kubevirt.io/template: fedora}
  annotations: {description: "web frontend", owner: team-a}
spec:
  runStrategy: Always
  dataVolumeTemplates:
  - metadata:
      name: fedora-web-root
    spec:
      sourceRef: {kind: DataSource, name: fedora, namespace: kubevirt-os-images}
      storage:
        accessModes: [ReadWriteMany]
        resources: {requests: {storage: 30Gi}}
        storageClassName: ceph-rbd
  template:
    metadata:
      labels: {app: web, kubevirt.io/domain: fedora-web, kubevirt.io/size: medium}
      annotations: {vm.kubevirt.io/flavor: medium}
    spec:
      architecture: amd64
      evictionStrategy: LiveMigrate
      terminationGracePeriodSeconds: 180
      nodeSelector: {kubernetes.io/os: linux}
      tolerations:
      - {key: dedicated, operator: Equal, value: vms, effect: NoSchedule}
      domain:
        cpu: {cores: 2, sockets: 1, threads: 1, model: host-model}
        memory: {guest: 4Gi}
        resources: {requests: {memory: 4Gi, cpu: "2"}, limits: {memory: 4Gi}}
        machine: {type: q35}
        firmware: {bootloader: {efi: {secureBoot: false}}}
        features: {acpi: {}, apic: {}, smm: {enabled: true}}
        clock: {utc: {}, timer: {hpet: {present: false}, pit: {tickPolicy: delay}, rtc: {tickPolicy: catchup}}}
        devices:
          disks:
          - {name: rootdisk, bootOrder: 1, disk: {bus: virtio}}
          - {name: cloudinitdisk, disk: {bus: virtio}}
          - {name: data, disk: {bus: virtio}, cache: none, io: native}
          interfaces:
          - {name: default, masquerade: {}, model: virtio, ports: [{name: http, port: 80}, {name: https, port: 443}]}
          - {name: storage-net, bridge: {}, macAddress: "02:00:00:12:34:56"}
          rng: {}
          inputs: [{name: tablet, type: tablet, bus: usb}]
      networks:
      - {name: default, pod: {}}
      - {name: storage-net, multus: {networkName: storage/storage-net}}
      readinessProbe: {tcpSocket: {port: 80}, initialDelaySeconds: 60, periodSeconds: 10}
      livenessProbe: {httpGet: {path: /healthz, port: 80}, initialDelaySeconds: 120}
      volumes:
      - {name: rootdisk, dataVolume: {name: fedora-web-root}}
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #cloud-config
            user: fedora
            password: fedora
            chpasswd: {expire: false}
            ssh_authorized_keys:
            - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7yzh9jLqkR8eQ8FkXwq4T5uQf3mJHsW8v6zK0y1t2p admin@example
            packages: [nginx]
            runcmd: [[systemctl, enable, --now, nginx]]
      - {name: data, persistentVolumeClaim: {claimName: web-data}}
"""


def load(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


@pytest.fixture(scope="session")
def served() -> dict[str, resources.Resource]:
    """kind -> Resource for every built-in and bundled-CRD kind."""
    out = {r.kind: r for r in builtin.builtin_resources()}
    for crd in builtin.bundled_crds():
        for r in builtin.resources_from_crd(crd):
            out[r.kind] = r
    return out


@pytest.fixture
def vm_cirros() -> dict[str, Any]:
    return load(VM_CIRROS)


@pytest.fixture
def vm_large() -> dict[str, Any]:
    return load(VM_LARGE)


@pytest.fixture
def vmi_sata() -> dict[str, Any]:
    return load(VMI_SATA)


@pytest.fixture
def vmi_efi() -> dict[str, Any]:
    return load(VMI_EFI)


@pytest.fixture
def dv_http() -> dict[str, Any]:
    return load(DV_HTTP)
