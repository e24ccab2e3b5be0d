"""``v2p vsphere ...``: what a vCenter or ESXi host holds, as a table or JSON. Parses and prints only: the
listing itself is ``sources.vsphere_inventory.inventory``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_parser(sub: Any) -> None:
    """The ``vsphere`` command and its actions, on the top-level subparsers ``sub``."""
    vs = sub.add_parser("vsphere", help="look into vCenter or an ESXi host (the vsphere:// source)").add_subparsers(
        dest="vsphere_command", required=True, metavar="ACTION")
    ls = vs.add_parser("ls", help="list datacenters, VM folders and VMs (power, guest OS, CPUs, memory, disks, "
                       "snapshots, Tools, IPs)")
    ls.add_argument("uri", nargs="?", metavar="URI", help="vsphere://[USER@]HOST[/DATACENTER[/vm/FOLDER...]] "
                    "(default: vsphere://$V2P_VSPHERE_HOST); the password from $V2P_VSPHERE_PASSWORD or "
                    "$V2P_VSPHERE_SECRETS")
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from .sources.vsphere_inventory import default_uri, inventory

    found = inventory(args.uri or default_uri(os.environ), os.environ)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for kind in ("datacenters", "folders"):
        for entity in found[kind]:
            print(f"{kind[:-1]:<10} {entity['path']}")
    if found["vms"]:
        print()
        header = ("PATH", "POWER", "GUEST OS", "CPUS", "MEMORY", "SNAPSHOTS", "TOOLS", "IPS")
        rows = [(vm["path"] + (" (template)" if vm["template"] else ""), str(vm["power"] or "?"),
                 str(vm["guest_os"] or "?"), str(vm["cpus"] or "?"), f"{vm['memory_mib'] or 0} MiB",
                 str(vm["snapshots"]), str(vm["tools"] or "?"), ", ".join(vm["ips"]) or "-") for vm in found["vms"]]
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row, vm in [(header, None), *zip(rows, found["vms"], strict=True)]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
            for disk in vm["disks"] if vm is not None else ():  # under its VM, outside the columns
                print("  " + _disk(disk))
    elif not found["datacenters"] and not found["folders"]:
        print("nothing there")
    return 0


def _disk(disk: dict[str, Any]) -> str:
    size = disk["capacity"]
    shown = f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"
    chain = f", {disk['chain']} files in its chain" if disk["chain"] > 1 else ""
    return f"{disk['label']}: {shown} {'thin' if disk['thin'] else 'thick'} {disk['file']}{chain}"
