"""Watching a running VM's serial output, for tests: what ``Target.observe`` did before it left the interface
(no stage asks it; the boot check watches through ``v2p.bootwatch``). Only the ``Target`` interface is used,
so it watches every kind alike."""

from __future__ import annotations

import re
import time

from v2p.targets.base import Target


def observe(target: Target, vmid: int, *, timeout: float, patterns: dict[str, str],
            poll: float = 0.1) -> tuple[str, str]:
    """Watch VM ``vmid`` until a pattern (name -> regex) matches its output, it stops, or ``timeout``
    passes: ("<name>" | "stopped" | "timeout", output)."""
    compiled = {name: re.compile(regex) for name, regex in patterns.items()}
    deadline = time.monotonic() + timeout
    while True:
        output = target.guest_output(vmid)
        for name, regex in compiled.items():
            if output and regex.search(output):
                return name, output
        if target.status(vmid) != "running":
            return "stopped", target.guest_output(vmid)
        if time.monotonic() >= deadline:
            return "timeout", output
        time.sleep(poll)
