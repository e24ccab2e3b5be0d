"""Example kinds used by tests only (see docs/HACKING.md, "Adding a source kind")."""
