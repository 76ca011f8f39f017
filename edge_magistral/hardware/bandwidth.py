"""Memory bandwidth by GPU name, for predicted tokens/s only."""

from __future__ import annotations

import re

# memory bandwidth (GB/s) by name, for predicted tokens/s only; first match wins
_BANDWIDTH = [
    (r"H200", 4800),
    (r"H100.*(SXM|HBM3)", 3350),
    (r"H100", 2000),
    (r"A100.*80", 2039),
    (r"A100", 1555),
    (r"L40", 864),
    (r"A6000", 768),
    (r"RTX 6000 Ada", 960),
    (r"5090", 1792),
    (r"4090", 1008),
    (r"3090", 936),
    (r"4080", 717),
    (r"5080", 960),
    (r"4070 Ti SUPER", 672),
    (r"4070", 504),
    (r"4060 Ti", 288),
    (r"3080", 760),
    (r"3060", 360),
    (r"4060.*Laptop", 256),
    (r"4060", 272),
    (r"4050", 192),
    (r"3050", 192),
    (r"2080", 448),
    (r"AGX Orin", 204.8),
    (r"Orin NX", 102.4),
    (r"Orin Nano", 68),
    (r"Orin", 204.8),
    (r"7900 XTX", 960),
    (r"7900 XT", 800),
    (r"7800 XT", 624),
    (r"6900 XT", 512),
    (r"6800", 512),
    (r"MI300", 5300),
    (r"MI250", 3200),
    (r"MI210", 1600),
    (r"M\d Ultra", 800),
    (r"M\d Max", 400),
    (r"M4 Pro", 273),
    (r"M\d Pro", 200),
    (r"M4", 120),
    (r"M[123]", 100),
]


def bandwidth_for(name: str) -> float | None:
    for pattern, gbs in _BANDWIDTH:
        if re.search(pattern, name, re.I):
            return float(gbs)
    return None
