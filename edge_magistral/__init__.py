"""edge-magistral: run Magistral Small 1.1 on edge hardware through llama.cpp and GGUF."""

__version__ = "0.1.0"
