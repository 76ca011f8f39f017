#!/usr/bin/env python3
"""Build Magistral GGUF quantizations: the same as `edge-magistral build`.

    scripts/build_quants.py SRC --out DIR --quants Q4_K_M,Q5_K_M,Q6_K,Q8_0
"""

import sys

from edge_magistral.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["build"]
    main()
