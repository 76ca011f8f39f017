"""Layers across several boxes through llama.cpp's RPC backend (ggml-rpc).

- ``backend``: the ggml-rpc library through ctypes (register workers in a head, serve devices in
  a worker). The only module here that touches llama.cpp.
- ``probe``: a pure-Python client for the few RPC messages a head needs before llama.cpp sees a
  worker (hello/version, device count, device memory), so a dead or mismatched worker is a clear
  error instead of llama.cpp aborting the process.
- ``endpoints``: worker addresses, the cluster file, and which addresses are allowed.
- ``buffers``: what llama.cpp allocated on each worker, read from its load log.
- ``relay``: the worker's public port: allow-list, one head at a time, ``GET /info``.
- ``worker``: the ``rpc-worker`` command's supervisor (the llama.cpp server in a child).
- ``head``: the head's probe-then-plan across the boxes (``planner.cluster``).
"""
