"""Layers across several boxes through llama.cpp's RPC backend (ggml-rpc).

- ``backend``: the ggml-rpc library through ctypes (register workers in a head, serve devices in
  a worker). The only module here that touches llama.cpp.
- ``probe``: a pure-Python client for the few RPC messages a head needs before llama.cpp sees a
  worker (hello/version, device count, device memory), so a dead or mismatched worker is a clear
  error instead of llama.cpp aborting the process.
- ``endpoints``: worker addresses, the cluster file, and which addresses are allowed.
- ``worker``: the ``rpc-worker`` command's supervisor (child server, allow-list, info).
"""
