"""The end-to-end deployment test's client, run inside the controller's network namespace
(`ip netns exec NS python3 tests/deploy_client.py ...`): it talks to the deployed panel as an
operator's laptop on the same LAN would. Prints one JSON line."""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def http(method: str, url: str, token: str = "", body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def ready_plan(panel: str, key: str, nodes: int) -> dict | None:
    """The state when the panel serves a ready plan across `nodes` online nodes, else None."""
    try:
        _, state = http("GET", f"{panel}/api/state", key)
    except (OSError, ValueError):
        return None
    online = [n for n in state.get("nodes", []) if n.get("online")]
    if state.get("ready") and state.get("plan") and len(state["plan"]["shards"]) == nodes == len(online):
        return state
    return None


def wait_plan(panel: str, key: str, nodes: int, timeout: float) -> dict:
    # The state is a snapshot to poll: the panel's event stream says the same, less simply.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state := ready_plan(panel, key, nodes):
            return state
        time.sleep(0.5)
    raise SystemExit(f"no ready plan over {nodes} nodes within {timeout} s: {http('GET', f'{panel}/api/state', key)[1]}")


def complete(panel: str, key: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{panel}/v1", api_key=key, max_retries=0, timeout=60)
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    return reply.choices[0].text


def hammer(panel: str, key: str, model: str, stop_file: str) -> dict:
    """Completions one after another until stop_file exists: how many, and which failed."""
    done, failures = 0, []
    while not Path(stop_file).exists():
        try:
            complete(panel, key, model)
            done += 1
        except Exception as e:   # noqa: BLE001 - every failure is recorded and reported
            failures.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
    return {"done": done, "failures": failures}


def browse(cluster: str, key: str, timeout: float) -> dict:
    """The cluster's broker as DNS-SD advertises it on this LAN, found by exo's own browser
    (python-zeroconf): only an advert with the hash of this cluster and key counts."""
    from appliance.config import Config
    from appliance.discovery import Discovery

    discovery = Discovery(Config(cluster=cluster, cluster_key=key)).start()
    try:
        advert = discovery.wait_for_broker(timeout)
    finally:
        discovery.stop()
    if advert is None:
        raise SystemExit(f"no advert of cluster {cluster} within {timeout} s")
    return {"name": advert.name, "cluster": advert.cluster, "address": advert.address, "since": advert.since}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "browse":
        print(json.dumps(browse(args[0], args[1], float(args[2]))), flush=True)
        return
    panel, *rest = args
    if command == "wait-plan":
        result = wait_plan(panel, rest[0], int(rest[1]), float(rest[2]))
    elif command == "complete":
        result = {"text": complete(panel, rest[0], rest[1])}
    elif command == "post":
        status, body = http("POST", panel + rest[0], rest[1], json.loads(rest[2]) if len(rest) > 2 else None)
        result = {"status": status, "body": body}
    elif command == "hammer":
        result = hammer(panel, *rest)
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
