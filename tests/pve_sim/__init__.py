"""A simulated Proxmox VE API for tests: ``PVESim`` serves it over HTTPS, every request
checked against the real PVE API schema (``schema``), the work done for real (``cluster``,
``realvm``)."""

from .server import PVESim

__all__ = ["PVESim"]
