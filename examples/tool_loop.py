"""A tool loop against edge-magistral's OpenAI-compatible service, with the official openai client.

    edge-magistral serve --model M.gguf                      # in another terminal
    python examples/tool_loop.py "What is the weather in Paris and in Tokyo?"
    python examples/tool_loop.py --stream "..."              # the same loop, streamed

The model asks for calls (``finish_reason == "tool_calls"``); the script runs them, sends back the
assistant message (with its ``reasoning_content``: the thought that led to the calls) and one
``role: "tool"`` message per call, and asks again until the model answers in text.
``EDGE_MAGISTRAL_URL`` and ``EDGE_MAGISTRAL_API_KEY`` (or --base-url/--api-key) say where the
service is. Exit status: 0 answered, 1 the turn was cut (max_tokens) or the call was botched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from openai import OpenAI

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def get_weather(city: str, unit: str) -> dict[str, Any]:
    """The tool itself (a stand-in: a real one would ask a weather service)."""
    celsius = {"paris": 21, "tokyo": 27, "london": 16}.get(city.strip().lower())
    if celsius is None:
        return {"error": f"unknown city {city!r}"}
    return {"city": city, "temperature": celsius if unit == "celsius" else round(celsius * 9 / 5 + 32), "unit": unit}


TOOLS = {"get_weather": get_weather}


def run_call(name: str, arguments: str) -> str:
    """A call's result as the text of its tool message (JSON here; any text will do)."""
    result = TOOLS[name](**json.loads(arguments))  # the service checked the arguments against the schema
    return json.dumps(result)


def ask(client: OpenAI, stream: bool, **request: Any) -> tuple[str, str, list[dict[str, Any]], str, Any]:
    """One turn: (content, reasoning, tool calls as OpenAI's dicts, finish_reason, watchdog extension)."""
    if not stream:
        r = client.chat.completions.create(**request)
        choice, message = r.choices[0], r.choices[0].message
        calls = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls or []]
        reasoning = getattr(message, "reasoning_content", None) or ""  # an extension field
        return message.content or "", reasoning, calls, choice.finish_reason, r.model_extra.get("watchdog")
    content, reasoning, calls, finish, watchdog = [], [], {}, None, None
    for chunk in client.chat.completions.create(**request, stream=True):
        watchdog = (chunk.model_extra or {}).get("watchdog") or watchdog  # in the last chunk
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        print(delta.content or "", end="", flush=True)
        for piece in delta.tool_calls or []:  # id and name come once, then the arguments in pieces
            call = calls.setdefault(piece.index, {"id": None, "type": "function",
                                                  "function": {"name": None, "arguments": ""}})
            call["id"] = piece.id or call["id"]
            call["function"]["name"] = piece.function.name or call["function"]["name"]
            call["function"]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    print()
    # only a turn that ended in calls has calls to run; a cut one streamed part of a call
    ordered = [calls[i] for i in sorted(calls)] if finish == "tool_calls" else []
    return "".join(content), "".join(reasoning), ordered, finish, watchdog


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("question")
    p.add_argument("--base-url", default=os.environ.get("EDGE_MAGISTRAL_URL", "http://127.0.0.1:8080/v1"))
    p.add_argument("--api-key", default=os.environ.get("EDGE_MAGISTRAL_API_KEY", "none"))
    p.add_argument("--model", default="magistral", help="any name: the service runs its one model")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--tool-choice", default="auto", help="the first turn's: auto, required or none")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--think-budget", type=int, default=None, help="max_thinking_tokens (0: no thinking)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-turns", type=int, default=6)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    messages: list[dict[str, Any]] = [{"role": "user", "content": args.question}]
    extra = {"max_thinking_tokens": args.think_budget} if args.think_budget is not None else {}
    choice = args.tool_choice
    for _ in range(args.max_turns):
        content, reasoning, calls, finish, watchdog = ask(
            client, args.stream, model=args.model, messages=messages, tools=[WEATHER_TOOL], tool_choice=choice,
            max_tokens=args.max_tokens, seed=args.seed, extra_body=extra)
        if finish == "tool_calls":
            message: dict[str, Any] = {"role": "assistant", "content": content or None, "tool_calls": calls}
            if reasoning:
                message["reasoning_content"] = reasoning  # kept in a tool conversation's prompt
            messages.append(message)
            for call in calls:
                result = run_call(call["function"]["name"], call["function"]["arguments"])
                print(f"{call['function']['name']}({call['function']['arguments']}) -> {result}", file=sys.stderr)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            choice = "auto"  # "required" again would never let the model answer
            continue
        if not args.stream:
            print(content)
        if watchdog and watchdog.get("tool_error"):
            print(f"the model botched a call, none was made: {watchdog['tool_error']}", file=sys.stderr)
            return 1
        if finish == "length":
            print(f"cut: {watchdog and watchdog.get('stop_reason')} (raise --max-tokens)", file=sys.stderr)
            return 1
        return 0
    print(f"no answer within {args.max_turns} turns", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
