"""Pods beside VMs: the node agent's container runtime (OCI images, runc, CNI) and its pod reconciler.

Layout under `<node data dir>/pods/`:
- `layers/sha256/<hex>/`   one unpacked image layer, shared by every container using it (overlayfs lowerdir);
- `images/<key>.json`      image reference → manifest digest, config and layer digests (IfNotPresent);
- `sandboxes/<pod uid>/`   a pod: `sandbox.json` (netns, IP, restart bookkeeping), `volumes/`, `etc/`,
                           `containers/<name>/` (runc bundle, overlay upper/work, shim state, logs);
- `runc/`                  runc's state root for this node (so several agents on one host never collide).
"""
