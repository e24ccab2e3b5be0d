"""Targets: where migrated VMs go. One module per kind, one interface (``base.Target``), one table of kinds.

A kind registers itself in ``kinds`` with what names it (whole words such as ``local``, URL schemes
such as ``pve://``), the keys of its target dict, and factories that parse its own URL or dict into a
``Target``; ``factory.make_target`` picks the kind from that table, and nothing outside the kind's own
modules knows its URL. The built-in kinds: ``local`` (``kind_local``), ``proxmox`` (``kind_pve``).
(This file imports nothing: every ``v2p.targets.*`` import runs it.)
"""
