"""Targets: where migrated VMs go. One module per kind, one interface (``base.Target``)."""
