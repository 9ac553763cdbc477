"""What StorageProfiles say about a StorageClass: access and volume modes per provisioner, clone strategy.

The table holds virtplane's own provisioners and well-known third-party ones, with the capabilities CDI's
StorageProfile controller reports for them (facts gathered from CDI's documentation and capabilities list).
Order within an entry is preference order: the first set is what a DataVolume using the `storage:` API gets
when it names neither access modes nor volume mode.

A class whose provisioner is unknown gets no claim property sets: CDI's rule (and the seed's) is that the
user must then say which access and volume mode the class supports, on the StorageProfile's spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]

LOCAL_PROVISIONER = "virtplane.io/local"
SHARED_PROVISIONER = "virtplane.io/shared"
# Plain host directories with no capability entry on purpose: it stands for any provisioner whose access and
# volume modes virtplane cannot know (an NFS mount, a SAN), so its StorageProfile must be filled in by hand.
HOSTPATH_PROVISIONER = "virtplane.io/hostpath"
OUR_PROVISIONERS = (LOCAL_PROVISIONER, SHARED_PROVISIONER, HOSTPATH_PROVISIONER)
NO_PROVISIONER = "kubernetes.io/no-provisioner"

RWO, ROX, RWX = "ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"
BLOCK, FS = "Block", "Filesystem"

Cap = tuple[str, str]  # (access mode, volume mode)

_RBD: list[Cap] = [(RWX, BLOCK), (RWO, BLOCK), (RWO, FS)]
_TOPOLVM: list[Cap] = [(RWO, BLOCK), (RWO, FS)]
_ALL_BUT_RWX_FS: list[Cap] = [(RWX, BLOCK), (RWO, BLOCK), (RWO, FS)]
_RWO_BOTH: list[Cap] = [(RWO, BLOCK), (RWO, FS)]

CAPABILITIES: dict[str, list[Cap]] = {
    # ours: Filesystem first because it needs nothing from the host; Block (loop devices) on request
    LOCAL_PROVISIONER: [(RWO, FS), (RWO, BLOCK)],
    SHARED_PROVISIONER: [(RWX, FS), (RWX, BLOCK)],
    # hostpath-style
    "kubevirt.io.hostpath-provisioner": [(RWO, FS)],
    "kubevirt.io/hostpath-provisioner": [(RWO, FS)],
    "k8s.io/minikube-hostpath": [(RWO, FS)],
    "rancher.io/local-path": [(RWO, FS)],
    # NFS
    "nfs.csi.k8s.io": [(RWX, FS)],
    "k8s-sigs.io/nfs-subdir-external-provisioner": [(RWX, FS)],
    # Ceph
    "kubernetes.io/rbd": _RBD,
    "rbd.csi.ceph.com": _RBD,
    "rook-ceph.rbd.csi.ceph.com": _RBD,
    "openshift-storage.rbd.csi.ceph.com": _RBD,
    "cephfs.csi.ceph.com": [(RWX, FS)],
    "openshift-storage.cephfs.csi.ceph.com": [(RWX, FS)],
    # LVM
    "topolvm.cybozu.com": _TOPOLVM,
    "topolvm.io": _TOPOLVM,
    "lvm.csi.metal-stack.io": _RWO_BOTH,
    # LINSTOR, Longhorn, Portworx, OpenStack, clouds
    "linstor.csi.linbit.com": _ALL_BUT_RWX_FS,
    "driver.longhorn.io": [(RWO, BLOCK)],
    "pxd.portworx.com": [(RWX, BLOCK), (RWX, FS), (RWO, BLOCK), (RWO, FS)],
    "cinder.csi.openstack.org": _RWO_BOTH,
    "manila.csi.openstack.org": [(RWX, FS)],
    "kubernetes.io/aws-ebs": [(RWO, BLOCK)],
    "ebs.csi.aws.com": [(RWO, BLOCK)],
    "efs.csi.aws.com": [(RWX, FS), (RWO, FS)],
    "kubernetes.io/azure-disk": [(RWO, BLOCK)],
    "disk.csi.azure.com": [(RWO, BLOCK)],
    "kubernetes.io/azure-file": [(RWX, FS)],
    "file.csi.azure.com": [(RWX, FS)],
    "kubernetes.io/gce-pd": [(RWO, BLOCK)],
    "pd.csi.storage.gke.io": [(RWO, BLOCK)],
    "csi.vsphere.vmware.com": [(RWO, BLOCK), (RWO, FS)],
    "csi.ovirt.org": _RWO_BOTH,
    "csi.hpe.com": _ALL_BUT_RWX_FS,
    "block.csi.ibm.com": _ALL_BUT_RWX_FS,
    "spectrumscale.csi.ibm.com": [(RWX, FS), (RWO, FS)],
}

# CDI's clone strategies: "copy" (host-assisted), "snapshot" (smart clone), "csi-clone".
CLONE_STRATEGIES: dict[str, str] = {
    # ours clone copy-on-write inside a pool, which is what a CSI clone is
    LOCAL_PROVISIONER: "csi-clone",
    SHARED_PROVISIONER: "csi-clone",
    "rook-ceph.rbd.csi.ceph.com": "csi-clone",
    "openshift-storage.rbd.csi.ceph.com": "csi-clone",
    "cephfs.csi.ceph.com": "csi-clone",
    "pxd.portworx.com": "csi-clone",
    "csi.hpe.com": "csi-clone",
    "block.csi.ibm.com": "csi-clone",
    "topolvm.cybozu.com": "copy",
    "topolvm.io": "copy",
    "pd.csi.storage.gke.io": "snapshot",
}
DEFAULT_CLONE_STRATEGY = "snapshot"  # CDI's default when the profile says nothing

# Classes CDI knows do not work for disks (object-bucket provisioners).
UNSUPPORTED = frozenset({"openshift-storage.noobaa.io/obc", "openshift-storage.ceph.rook.io/bucket",
                         "rook-ceph.ceph.rook.io/bucket", "stork-snapshot"})


def provisioner_key(storage_class: Mapping[str, Any]) -> str:
    """Some drivers serve several kinds of storage; their class parameters say which (as CDI maps them)."""
    prov = str(storage_class.get("provisioner") or "")
    params = storage_class.get("parameters") or {}
    if prov == "pxd.portworx.com" and "vers=3.0" in str(params.get("sharedv4_mount_options", "")):
        return "pxd.portworx.com/nfs"
    if prov == "csi.vsphere.vmware.com" and "nfs" in str(params.get("csi.storage.k8s.io/fstype", "")):
        return "csi.vsphere.vmware.com/nfs"
    return prov


_EXTRA: dict[str, list[Cap]] = {
    "pxd.portworx.com/nfs": [(RWX, FS), (RWO, FS)],
    "csi.vsphere.vmware.com/nfs": [(RWX, FS), (RWO, BLOCK), (RWO, FS)],
}


def claim_property_sets(storage_class: Mapping[str, Any], pvs: list[JSON] | None = None) -> list[JSON]:
    """status.claimPropertySets for a class with no spec override (empty when nothing is known)."""
    key = provisioner_key(storage_class)
    caps = CAPABILITIES.get(key) or _EXTRA.get(key)
    if caps is None and key == NO_PROVISIONER and pvs:
        # static local volumes: what the administrator's PVs of this class offer
        name = (storage_class.get("metadata") or {}).get("name")
        seen: list[Cap] = []
        for pv in pvs:
            spec = pv.get("spec") or {}
            if spec.get("storageClassName") != name:
                continue
            for mode in spec.get("accessModes") or []:
                cap = (mode, spec.get("volumeMode") or FS)
                if cap not in seen:
                    seen.append(cap)
        caps = seen
    return [{"accessModes": [a], "volumeMode": v} for a, v in caps or []]


def clone_strategy(storage_class: Mapping[str, Any]) -> str:
    return CLONE_STRATEGIES.get(provisioner_key(storage_class), DEFAULT_CLONE_STRATEGY)


def profile_status(storage_class: Mapping[str, Any], spec: Mapping[str, Any] | None,
                   pvs: list[JSON] | None = None) -> JSON:
    """The StorageProfile status CDI computes: spec overrides win over the table."""
    spec = spec or {}
    name = (storage_class.get("metadata") or {}).get("name")
    sets = [s for s in spec.get("claimPropertySets") or [] if isinstance(s, dict)]
    status: JSON = {
        "storageClass": name,
        "provisioner": storage_class.get("provisioner"),
        "claimPropertySets": sets or claim_property_sets(storage_class, pvs),
        "cloneStrategy": spec.get("cloneStrategy") or clone_strategy(storage_class),
    }
    if spec.get("dataImportCronSourceFormat"):
        status["dataImportCronSourceFormat"] = spec["dataImportCronSourceFormat"]
    if spec.get("snapshotClass"):
        status["snapshotClass"] = spec["snapshotClass"]
    if not status["claimPropertySets"]:
        del status["claimPropertySets"]
    return status


def first_usable(sets: list[JSON], access_modes: list[str] | None, volume_mode: str | None) -> tuple[
        list[str], str] | None:
    """CDI's choice from a profile: the first set that agrees with what the user did say."""
    for s in sets:
        modes = [m for m in s.get("accessModes") or [] if isinstance(m, str)]
        vmode = s.get("volumeMode") or FS
        if not modes:
            continue
        if volume_mode and vmode != volume_mode:
            continue
        if access_modes and not set(access_modes) <= set(modes):
            continue
        return (list(access_modes) if access_modes else modes), vmode
    return None
