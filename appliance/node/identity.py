"""A node's stable id: derived from /etc/machine-id, or generated once and kept in the state dir.

Never a constant baked into an image: a flashed card gets a fresh machine-id on first boot, and
so a fresh node id. The node name salts the id so one host can run several nodes.
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

MACHINE_ID = Path("/etc/machine-id")


def machine_secret(state_dir: str | Path) -> str:
    try:
        text = MACHINE_ID.read_text().strip()
        if text and text != "uninitialized":
            return text
    except OSError:
        pass
    stored = Path(state_dir) / "node-secret"
    if not stored.exists():
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(uuid.uuid4().hex + "\n")
    return stored.read_text().strip()


def node_id(state_dir: str | Path, name: str = "") -> str:
    return hashlib.sha256(f"{machine_secret(state_dir)}:{name}".encode()).hexdigest()[:12]
