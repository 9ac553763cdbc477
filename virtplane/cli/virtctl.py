"""`virtctl`: KubeVirt's CLI verbs against a virtplane (or KubeVirt) cluster.

The verb set grows with the VM runtime and console work; `version` is here from the start.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import virtplane
from virtplane.client import rest


async def _version(args: argparse.Namespace) -> int:
    print(f"Client Version: version.Info{{GitVersion:\"v{virtplane.__version__}\", Compiler:\"cpython\"}}")
    async with rest.Client(rest.ClientConfig.from_kubeconfig(args.kubeconfig)) as client:
        try:
            v = await client.request("GET", "/apis/subresources.kubevirt.io/v1/version")
        except (rest.APIError, OSError) as exc:
            print(f"error: cannot reach the server: {exc}", file=sys.stderr)
            return 1
    print(f"Server Version: version.Info{{GitVersion:\"{v.get('gitVersion')}\", Platform:\"{v.get('platform')}\"}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtctl")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("-n", "--namespace", default=None)
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("version", help="client and server versions")
    args = parser.parse_args(argv)
    if args.verb == "version":
        return asyncio.run(_version(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
