"""The cluster key: the one secret the machines of a cluster share.

`exo` creates a key on first start (kept in the state dir) and prints how another machine joins
with it (`exo --join KEY` or EXO_CLUSTER_KEY). Everything else derives from the key:

- each member's broker login (`login`): the user name is who it is (a node id, a coordinator id)
  and the password an HMAC of that name, so the broker's ACL can tie a login to the topics it may
  write (`node/<to>/in/<from>`: a login writes frames only as itself);
- two fixed logins the embedded broker knows from the start (`JOINER`, `REGISTRAR`): a member asks
  to be let in on `join/<role>/<user>` with the joiner login, which may write nothing else and
  read nothing; the broker's registrar reads those requests and adds the derived password;
- the hash that DNS-SD adverts carry (`cluster_hash`), so a machine joins only the broker of its
  own cluster and an advert tells a stranger nothing but the cluster's name.

`--open` (for a trusted LAN) runs without a key: anonymous broker, adverts hashed on the name alone.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from appliance.config import Config

KEY_FILE = "cluster.key"
KEY_PREFIX = "exo1-"
JOINER = "exo+join"          # may only ask to be let in
REGISTRAR = "exo+registrar"  # the broker's own client: reads the requests to join


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def _derive(key: str, purpose: str) -> str:
    return hmac.new(key.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def cluster_hash(config: Config) -> str:
    """What an advert carries to say which cluster it is for: 16 hex digits, nothing secret."""
    return _derive(config.cluster_key or "open", f"advert/{config.cluster}")[:16]


def password(config: Config, user: str) -> str:
    """The derived broker password of `user` in a keyed cluster."""
    return _derive(config.cluster_key, f"broker/{config.cluster}/{user}")


def login(config: Config, user: str) -> tuple[str, str] | None:
    """The broker login a member uses: the configured one (Ansible, the image), else the one
    derived from the key for `user`, else None (an open cluster: anonymous)."""
    if config.broker_username:
        return config.broker_username, config.broker_password
    if config.cluster_key and user:
        return user, password(config, user)
    return None


def ensure_key(config: Config) -> str:
    """Give a closed cluster its key: the configured one ("given"), else the one kept in the state
    dir ("kept"), else a new one, kept there ("new")."""
    if config.open or config.cluster_key:
        return "given"
    path = Path(config.state_dir) / KEY_FILE
    if path.exists():
        config.cluster_key = path.read_text().strip()
        return "kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    config.cluster_key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config.cluster_key + "\n")
    return "new"
