"""The cluster key: the one secret the machines of a cluster share.

`exo` creates a key on first start (kept in the state dir) and prints how another machine joins
with it (`exo --join KEY` or EXO_CLUSTER_KEY). Everything else derives from the key:

- the broker login every member uses (`credentials`), so a broker of ours refuses a machine
  without the key;
- the hash that DNS-SD adverts carry (`cluster_hash`), so a machine joins only the broker of its
  own cluster and an advert tells a stranger nothing but the cluster's name.

`--open` (for a trusted LAN) runs without a key: anonymous broker, adverts hashed on the name alone.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from appliance.config import Config

KEY_FILE = "cluster.key"
KEY_PREFIX = "exo1-"
BROKER_USERNAME = "exo"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def _derive(key: str, purpose: str) -> str:
    return hmac.new(key.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def cluster_hash(config: Config) -> str:
    """What an advert carries to say which cluster it is for: 16 hex digits, nothing secret."""
    return _derive(config.cluster_key or "open", f"advert/{config.cluster}")[:16]


def credentials(config: Config) -> tuple[str, str] | None:
    """The broker login of a keyed cluster (None when open)."""
    if not config.cluster_key:
        return None
    return BROKER_USERNAME, _derive(config.cluster_key, f"broker/{config.cluster}")
