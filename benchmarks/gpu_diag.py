"""Load a GGUF fully on the GPU in one of several ways and decode a few tokens (crash bisection).

    python -X faulthandler benchmarks/gpu_diag.py bare|verbose|ourlog|numpyfirst|engine|kwtypes|... MODEL.gguf
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

how, path = sys.argv[1], sys.argv[2]
t = time.time()
if how == "engine":
    from edge_magistral.engine import Engine  # first: it loads llama_cpp before anything loads numpy
    from edge_magistral.generation import Done, Limits, LoadSettings

    e = Engine(LoadSettings(path, n_ctx=1024, n_gpu_layers=99))
    print("loaded", time.time() - t, flush=True)
    done = [ev for ev in e.generate_ids([1, 3, 1000, 4], Limits(think_budget=0, max_tokens=32)) if isinstance(ev, Done)]
    print(done[0].timings, flush=True)
    e.close()
else:
    if how == "numpyfirst":
        import gguf  # noqa: F401  (numpy, yaml) before llama_cpp, as the engine used to
    import llama_cpp

    if how == "ourlog":
        from edge_magistral import llama_log

        llama_log.install()
    extra = {"kwtypes": {"type_k": 1, "type_v": 1}, "kwthreads": {"n_threads": 16, "n_threads_batch": 16},
             "kwchat": {"chat_format": "chatml"}, "kwbatch": {"n_batch": 512, "n_ubatch": 512, "logits_all": False},
             "kwsplit": {"tensor_split": None}}.get(how, {})
    m = llama_cpp.Llama(path, n_ctx=1024, n_gpu_layers=99, flash_attn=True, verbose=(how == "verbose"), **extra)
    print("loaded", time.time() - t, flush=True)
    print([tok for _, tok in zip(range(8), m.generate([1, 3, 1000, 4], temp=0.7))], flush=True)
print("ok", how, flush=True)
