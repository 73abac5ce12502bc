"""Stream one greedy completion with the official openai client and print a JSON line per piece
({"piece", "t"}) and one at the end ({"finish_reason"} or {"error", "status"}).

    python -m tests.stream_client URL MODEL PROMPT MAX_TOKENS

Fault tests run it on a lab host, next to the panel, so that the client sees what a user would.
"""
import json
import sys
import time

import openai


def main(url: str, model: str, prompt: str, max_tokens: int) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    end: dict = {"finish_reason": None}
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True)
        for chunk in stream:
            choice = chunk.choices[0]
            if choice.text:
                print(json.dumps({"piece": choice.text, "t": time.monotonic()}), flush=True)
            if choice.finish_reason:
                end = {"finish_reason": choice.finish_reason}
    except openai.APIError as e:
        end = {"error": str(e), "status": getattr(e, "status_code", None)}
    print(json.dumps(end), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
