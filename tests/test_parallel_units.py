"""Parallel slots in the service config: the planned slots are pinned in the config file, checked
there, and left to the planner when absent. (The supervisor's and worker's handling of parallel
jobs is tested through their public interfaces in test_server_protocol.py.)"""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------------------- the service config

def test_service_config_pins_the_planned_slots(tmp_path):
    from edge_magistral.cli.serve_cmds import _from_file
    from edge_magistral.errors import BadInputError
    from edge_magistral.systemd import ServiceConfig, read_service_config

    path = tmp_path / "config.yaml"
    path.write_text(ServiceConfig(model="/m.gguf", ctx=8192, parallel=3).to_yaml())
    assert read_service_config(path).parallel == 3 and _from_file(str(path))["parallel"] == 3
    path.write_text("model: /m.gguf\nparallel: 0\n")
    with pytest.raises(BadInputError, match="`parallel` is 0, outside 1..64"):
        read_service_config(path)
    path.write_text("model: /m.gguf\n")
    assert read_service_config(path).parallel is None  # the planner chooses at each start
