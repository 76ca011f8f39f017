"""``python -m edge_magistral.hardware --ggml-devices``: the devices llama.cpp sees, as JSON on
stdout (run in a child process by :class:`~edge_magistral.hardware.system.SystemReader`)."""

import json
import sys

from edge_magistral.hardware.ggml import ggml_devices_here

if sys.argv[1:] == ["--ggml-devices"]:
    print(json.dumps(ggml_devices_here()))
