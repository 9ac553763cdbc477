"""From a Pod's spec to what runc needs: process (command, env, cwd, user), mounts, volumes on disk.

Kubernetes semantics: `command` replaces the image's Entrypoint and drops its Cmd; `args` alone replaces Cmd;
`$(VAR)` in command/args/env values expands from the container's env (`$$` escapes); env from the image
first, then `envFrom` in order, then `env` (later wins).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from virtplane.api.quantity import parse_quantity

JSON = dict[str, Any]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ContainerConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap/Secret/key is missing (retried)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, text)


def field_value(pod: JSON, path: str, host_ip: str, pod_ip: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
              "spec.serviceAccountName": spec.get("serviceAccountName"), "status.hostIP": host_ip,
              "status.podIP": pod_ip, "status.podIPs": pod_ip, "status.hostIPs": host_ip}  # fmt: skip
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        d = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {path!r}")


Lookup = Callable[[str, str], JSON | None]  # (kind "configmaps"|"secrets", name) → object or None


def _data(kind: str, obj: JSON) -> dict[str, str]:
    if kind == "secrets":
        out = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        out.update(obj.get("stringData") or {})
        return out
    return {**{k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("binaryData") or {}).items()},
            **(obj.get("data") or {})}  # fmt: skip


def container_env(pod: JSON, container: JSON, image_env: Sequence[str], lookup: Lookup, host_ip: str,
                  pod_ip: str) -> list[str]:  # fmt: skip
    env: dict[str, str] = {}
    for item in image_env:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOSTNAME"] = (pod.get("metadata") or {}).get("name", "")
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix") or ""
        for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
            ref = src.get(key)
            if not ref:
                continue
            obj = lookup(kind, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind[:-1]} "{ref.get("name")}" not found')
            for k, v in _data(kind, obj).items():
                env[prefix + k] = v
    for item in container.get("env") or []:
        name = item.get("name", "")
        if "value" in item or not item.get("valueFrom"):
            env[name] = expand(str(item.get("value") or ""), env)
            continue
        vf = item["valueFrom"]
        if vf.get("fieldRef"):
            env[name] = field_value(pod, vf["fieldRef"].get("fieldPath", ""), host_ip, pod_ip)
        elif vf.get("configMapKeyRef") or vf.get("secretKeyRef"):
            kind, ref = ("configmaps", vf["configMapKeyRef"]) if vf.get("configMapKeyRef") else \
                ("secrets", vf["secretKeyRef"])  # fmt: skip
            obj = lookup(kind, ref.get("name", ""))
            data = _data(kind, obj) if obj is not None else None
            if data is None or ref.get("key") not in data:
                if ref.get("optional"):
                    continue
                what = f'{kind[:-1]} "{ref.get("name")}" not found' if data is None else \
                    f'couldn\'t find key {ref.get("key")} in {kind[:-1].capitalize()} {ref.get("name")}'  # fmt: skip
                raise ContainerConfigError(what)
            env[name] = data[ref["key"]]
        elif vf.get("resourceFieldRef"):
            env[name] = resource_field(container, vf["resourceFieldRef"])
    return [f"{k}={v}" for k, v in env.items()]


def resource_field(container: JSON, ref: JSON) -> str:
    res = container.get("resources") or {}
    kind, _, rname = str(ref.get("resource", "")).partition(".")
    value = (res.get(kind) or {}).get(rname)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    q = parse_quantity(value) / divisor
    return str(int(q.to_integral_value(rounding="ROUND_CEILING")))


def process(pod: JSON, container: JSON, image_config: JSON, env: list[str]) -> JSON:
    entry = list(image_config.get("Entrypoint") or [])
    cmd = list(image_config.get("Cmd") or [])
    if container.get("command"):
        argv = [*container["command"], *(container.get("args") or [])]
    elif container.get("args"):
        argv = [*entry, *container["args"]]
    else:
        argv = [*entry, *cmd]
    if not argv:
        raise ContainerConfigError("no command specified")
    envmap = dict(e.split("=", 1) for e in env)
    argv = [expand(a, envmap) for a in argv]
    uid, gid = _user(pod, container, image_config)
    return {"args": argv, "env": env, "cwd": container.get("workingDir") or image_config.get("WorkingDir") or "/",
            "user": {"uid": uid, "gid": gid}, "terminal": False}  # fmt: skip


def _user(pod: JSON, container: JSON, image_config: JSON) -> tuple[int, int]:
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    csc = container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is None:
        user = str(image_config.get("User") or "0")
        u, _, g = user.partition(":")
        uid = int(u) if u.isdigit() else 0
        if gid is None and g.isdigit():
            gid = int(g)
    return int(uid), int(gid if gid is not None else 0)


# -- volumes ------------------------------------------------------------------------------------------------


def _write_files(dest: Path, files: Mapping[str, bytes], mode: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ContainerConfigError(f"invalid volume file path {rel!r}")
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)


def _items(data: Mapping[str, bytes], items: Sequence[JSON] | None, what: str, optional: bool) -> dict[str, bytes]:
    if not items:
        return dict(data)
    out = {}
    for it in items:
        if it.get("key") not in data:
            if optional:
                continue
            raise ContainerConfigError(f"{what}: key {it.get('key')!r} not found")
        out[it.get("path") or it["key"]] = data[it["key"]]
    return out


def prepare_volumes(pod: JSON, root: Path, lookup: Lookup, host_ip: str, pod_ip: str) -> dict[str, Path]:
    """Volume name → host directory (or file source). Blocking; idempotent (rewrites config/secret files)."""
    out: dict[str, Path] = {}
    for vol in (pod.get("spec") or {}).get("volumes") or []:
        name = vol.get("name", "")
        d = root / name
        if "emptyDir" in vol:
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o777)
        elif "configMap" in vol or "secret" in vol:
            kind, src = ("configmaps", vol["configMap"]) if "configMap" in vol else ("secrets", vol["secret"])
            ref = src.get("name") if kind == "configmaps" else src.get("secretName")
            obj = lookup(kind, ref or "")
            if obj is None and not src.get("optional"):
                raise ContainerConfigError(f'{kind[:-1]} "{ref}" not found')
            raw = _data(kind, obj) if obj is not None else {}
            data = {k: v.encode() for k, v in raw.items()}
            if obj is not None and kind == "configmaps":
                data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            if obj is not None and kind == "secrets":
                data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            mode = int(src.get("defaultMode", 0o644))
            _write_files(d, _items(data, src.get("items"), f"volume {name}", bool(src.get("optional"))), mode)
        elif "downwardAPI" in vol:
            src = vol["downwardAPI"]
            files: dict[str, bytes] = {}
            for it in src.get("items") or []:
                if it.get("fieldRef"):
                    files[it["path"]] = field_value(pod, it["fieldRef"].get("fieldPath", ""), host_ip,
                                                    pod_ip).encode()  # fmt: skip
                elif it.get("resourceFieldRef"):
                    cname = it["resourceFieldRef"].get("containerName")
                    c = next((c for c in pod["spec"].get("containers") or [] if c.get("name") == cname), {})
                    files[it["path"]] = resource_field(c, it["resourceFieldRef"]).encode()
            _write_files(d, files, int(src.get("defaultMode", 0o644)))
        elif "persistentVolumeClaim" in vol:
            out[name] = _claim_path(vol["persistentVolumeClaim"].get("claimName", ""), lookup)
            continue
        elif "hostPath" in vol:
            hp = Path(vol["hostPath"].get("path", "/"))
            if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                hp.mkdir(parents=True, exist_ok=True)
            out[name] = hp
            continue
        else:
            kind = next((k for k in vol if k != "name"), "unknown")
            raise ContainerConfigError(f"volume {name}: {kind} volumes are not supported on this node")
        out[name] = d
    return out


def _claim_path(claim: str, lookup: Lookup) -> Path:
    """The host directory behind a bound Filesystem claim (the storage provisioner's local/hostPath PVs)."""
    pvc = lookup("persistentvolumeclaims", claim)
    if pvc is None:
        raise ContainerConfigError(f'persistentvolumeclaim "{claim}" not found')
    pv_name = (pvc.get("spec") or {}).get("volumeName")
    if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
        raise ContainerConfigError(f'persistentvolumeclaim "{claim}" is not bound yet')
    pv = lookup("persistentvolumes", pv_name)
    spec = (pv or {}).get("spec") or {}
    if spec.get("volumeMode") == "Block":
        raise ContainerConfigError(f'persistentvolumeclaim "{claim}": Block volumes are not supported for pods')
    path = (spec.get("local") or {}).get("path") or (spec.get("hostPath") or {}).get("path")
    if not path or not Path(path).is_dir():
        raise ContainerConfigError(f'persistentvolume "{pv_name}" has no directory on this node')
    return Path(path)


def mounts(container: JSON, volumes: Mapping[str, Path]) -> list[JSON]:
    out = []
    for m in container.get("volumeMounts") or []:
        src = volumes.get(m.get("name", ""))
        if src is None:
            raise ContainerConfigError(f"volumeMount {m.get('name')!r}: no such volume")
        if m.get("subPath"):
            src = src / m["subPath"]
            if not src.exists():
                src.mkdir(parents=True, exist_ok=True)
        opts = ["rbind", "ro" if m.get("readOnly") else "rw"]
        out.append({"destination": m["mountPath"], "type": "bind", "source": str(src), "options": opts})
    return out


def limits(container: JSON) -> dict[str, int]:
    lim = (container.get("resources") or {}).get("limits") or {}
    out = {}
    if "memory" in lim:
        out["memory"] = int(parse_quantity(lim["memory"]))
    if "cpu" in lim:
        out["cpu"] = int(parse_quantity(lim["cpu"]) * 1000)
    return out


def cpu_request(container: JSON) -> int:
    """The CPU request in millicores; the limit when only a limit is set (as API defaulting does), else 0."""
    res = container.get("resources") or {}
    for source in (res.get("requests") or {}, res.get("limits") or {}):
        if "cpu" in source:
            return int(parse_quantity(source["cpu"]) * 1000)
    return 0


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
