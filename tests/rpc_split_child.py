"""One model load across RPC workers, in a process of its own (llama.cpp keeps the workers it was
given for the life of the process): ``python tests/rpc_split_child.py MODEL LIMITS_JSON EP=N ...``
prints one JSON line with the greedy text of a local run and of the split one, their token counts,
the plan's cluster part and the buffers llama.cpp put on each worker."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def _text(events) -> tuple[str, int]:
    from edge_magistral.generation import AnswerText, Done, ThinkingText

    out, n = [], 0
    for ev in events:
        if isinstance(ev, (ThinkingText, AnswerText)):
            out.append(ev.text)
        elif isinstance(ev, Done):
            n = ev.usage.completion_tokens
    return "".join(out), n


def _greedy(engine, limits) -> tuple[str, int]:
    from edge_magistral.chat import Message

    if engine.is_magistral:
        return _text(engine.generate([Message("user", "Count from one to twenty.")], limits))
    return _text(engine.submit(engine.raw_prompt_ids("The capital of France is Paris. The capital of"), limits))


def main() -> None:
    from edge_magistral import loader
    from edge_magistral.engine import Engine
    from edge_magistral.generation import Limits, LoadSettings
    from edge_magistral.rpc.endpoints import Cluster, WorkerSpec, parse_endpoint

    model, limits = sys.argv[1], Limits(**json.loads(sys.argv[2]))
    pins = [a.rsplit("=", 1) for a in sys.argv[3:]]
    local = Engine(LoadSettings(model, n_ctx=512, n_threads=1, speculate="off"))
    try:
        want = _greedy(local, limits)
    finally:
        local.close()
    cluster = Cluster(tuple(WorkerSpec(parse_endpoint(ep), layers=int(n)) for ep, n in pins))
    opened = loader.open_model(loader.ModelRequest(model=model, ctx=512, threads=1, parallel=1, speculate="off",
                                                   cluster=cluster))
    try:
        got = _greedy(opened.engine, limits)
        plan = opened.plan.to_dict()
        print(json.dumps({"want": want, "got": got, "cluster": plan["cluster"],
                          "output_on_host": asdict(opened.settings)["output_on_host"],
                          "buffers": opened.engine.remote_buffers.to_dict()}))
    finally:
        opened.close()


if __name__ == "__main__":
    main()
