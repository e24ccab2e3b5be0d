"""Serve the simulated PVE node until Ctrl-C: ``python -m tests.pve_sim --release 9.1 --port 8006``.

Prints the API's URL, the certificate's fingerprint, an API token, and a target URL v2p takes
as it is (tests/pve_sim/README.md). Everything lives in a folder of its own (``--root``, else a
fresh temporary one, removed at the end); it listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from .releases import RELEASES
from .schema import SchemaNotFound, schema_candidates
from .server import PVESim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pve_sim", description="a simulated Proxmox VE node")
    parser.add_argument("--release", choices=list(RELEASES), default="9.1",
                        help="the PVE release it plays, with that release's behaviour and storages (default: 9.1)")
    parser.add_argument("--port", type=int, default=8006, help="TCP port on 127.0.0.1 (default: 8006; 0: any free)")
    parser.add_argument("--root", type=Path, help="folder for its storages and certificate (default: a temporary "
                        "one, removed at exit)")
    parser.add_argument("--run-vms", action="store_true", help="run started VMs for real under QEMU (TCG)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="pve-sim-"))
    try:
        sim = PVESim(root, release=args.release, port=args.port)
    except SchemaNotFound:
        print(f"no PVE API schema: put apidoc.json at {schema_candidates()[-3]} or set V2P_PVE_SCHEMA",
              file=sys.stderr)
        return 2
    try:
        sim.start()
    except OSError as exc:
        print(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.run_vms:
        sim.run_vms()
    # A token of its own for this run (the tests' fixed one is not for a port others can reach).
    token_id, secret = "root@pam!v2p", str(uuid.uuid4())
    sim.tokens = {token_id: secret}
    node = sim.cluster.node
    storages = ", ".join(f"{s.name} ({s.type}: {','.join(sorted(s.content))})" for s in sim.cluster.storages.values())
    print(f"PVE {sim.cluster.release.manager} (release {args.release}) simulated at {sim.url}\n"
          f"  fingerprint: {sim.fingerprint}\n"
          f"  API token:   {token_id}={secret}\n"
          f"  storages:    {storages}\n"
          f"  files in:    {root}\n"
          f"v2p target:  V2P_PVE_TOKEN={secret} v2p --target "
          f"'pve://{token_id}@{sim.host}/{node}?storage=local-lvm&fingerprint={sim.fingerprint}' ...",
          flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
