"""Test seam: a ``python -m v2p`` started by an LVM test activates LVs through loop devices (this
machine has no device-mapper); see loop_activation.py. On the child's PYTHONPATH only."""

import loop_activation

loop_activation.install()
