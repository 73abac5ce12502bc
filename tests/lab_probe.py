"""Wait, on a lab host, until the exo API at URL serves a cluster of NODES nodes: /healthz says so
and a greedy completion answers. Prints one JSON line: {"ok", "at" (the wall clock when it served), "health", "text"}.

    python -m tests.lab_probe URL MODEL NODES TIMEOUT

Discovery tests run it on each host, since the lab's addresses are reachable only from inside it.
"""
import json
import sys
import time

import httpx
import openai


def serves(url: str, model: str, nodes: int) -> tuple[dict, str] | None:
    try:
        health = httpx.get(url + "/healthz", timeout=2).json()
        plan = health.get("plan") or {}
        if health.get("nodes") != nodes or not health.get("ready") or len(plan.get("shards", [])) != nodes:
            return None
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20)
        text = client.completions.create(model=model, prompt="", max_tokens=24, temperature=0).choices[0].text
        health["broker"] = httpx.get(url + "/api/state", timeout=2).json()["broker"]
        return health, text
    except (httpx.HTTPError, openai.APIError, ValueError):
        return None


def main(url: str, model: str, nodes: int, timeout: float) -> None:
    started = time.monotonic()
    result = None
    while result is None and time.monotonic() - started < timeout:
        result = serves(url, model, nodes)
        if result is None:
            time.sleep(0.2)   # polling an HTTP API: there is no event to wait on
    health, text = result or ({}, "")
    print(json.dumps({"ok": result is not None, "at": time.time(), "health": health, "text": text}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
