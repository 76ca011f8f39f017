"""detect() on recorded boxes (tests/data/hardware, real output formats), the JSON round trip that
``plan --hardware`` relies on, and the real probe of this machine's llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_magistral.errors import BadInputError
from edge_magistral.hardware import (
    Hardware,
    RecordedReader,
    SystemReader,
    detect,
    from_dict,
    load_hardware,
    parse_nvidia_smi,
)
from edge_magistral.units import GiB

DATA = Path(__file__).parent / "data" / "hardware"


def box(name: str) -> Hardware:
    return detect(RecordedReader(DATA / name), store_dir="/srv/models")


# name: (vendor, gpu name, total GiB, unified, llama.cpp device, probe)
GPUS = {
    "rtx4090-desktop": ("nvidia", "NVIDIA GeForce RTX 4090", 23.99, False, "CUDA0", "nvidia-smi"),
    "rtx4060ti-16gb": ("nvidia", "NVIDIA GeForce RTX 4060 Ti", 16.0, False, "CUDA0", "nvidia-smi"),
    "rtx4060-laptop-8gb": ("nvidia", "NVIDIA GeForce RTX 4060 Laptop GPU", 8.0, False, "CUDA0", "nvidia-smi"),
    "h200-nvml": ("nvidia", "NVIDIA H200", 140.4, False, "CUDA0", "nvml"),
    "jetson-agx-orin-64gb": ("nvidia", "NVIDIA Jetson AGX Orin Developer Kit", 61.36, True, "CUDA0", "tegra"),
    "jetson-orin-nx-16gb": ("nvidia", "NVIDIA Orin NX Developer Kit", 15.21, True, "CUDA0", "tegra"),
    "amd-7900xtx-sysfs": ("amd", "Radeon RX 7900 XTX", 23.98, False, "ROCm0", "sysfs"),
    "amd-rocm-smi-only": ("amd", "Radeon RX 6800 XT", 15.98, False, None, "rocm-smi"),
    "macbook-m2-max-32gb": ("apple", "Apple M2 Max", 21.33, True, "MTL0", "sysctl"),
}


@pytest.mark.parametrize("name", sorted(GPUS))
def test_gpus_of_recorded_boxes(name: str) -> None:
    vendor, gpu_name, total_gib, unified, device, source = GPUS[name]
    hw = box(name)
    assert len(hw.gpus) == 1
    g = hw.gpus[0]
    assert (g.vendor, g.name, g.unified, g.ggml_device, g.source) == (
        vendor,
        gpu_name,
        unified,
        device,
        source,
    )
    assert g.total_bytes / GiB == pytest.approx(total_gib, abs=0.01)
    assert 0 < g.free_bytes <= g.total_bytes
    assert g.bandwidth_gbs and g.bandwidth_gbs > 50


def test_cpu_and_ram_from_proc() -> None:
    hw = box("rtx4090-desktop")
    assert hw.cpu.model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert (hw.cpu.cores_physical, hw.cpu.cores_logical) == (16, 32)
    assert {"AVX2", "AVX512F", "FMA", "F16C"} <= set(hw.cpu.flags)
    assert hw.ram_total_bytes == 65_640_584 * 1024 and hw.ram_available_bytes == 58_912_304 * 1024
    assert hw.disk_free_bytes == 412 * GiB and hw.store_dir == "/srv/models"
    assert "AVX512F" not in box("amd-rocm-smi-only").cpu.flags  # Zen 3


def test_arm_flags_and_board_on_jetson() -> None:
    hw = box("jetson-agx-orin-64gb")
    assert {"NEON", "DOTPROD", "FP16"} <= set(hw.cpu.flags) and hw.cpu.cores_logical == 12
    assert hw.is_jetson and hw.board == "NVIDIA Jetson AGX Orin Developer Kit"
    assert hw.jetson_release.startswith("# R36 (release), REVISION: 4.0")


def test_jetson_gpu_memory_is_mem_available_not_mem_free() -> None:
    hw = box("jetson-agx-orin-64gb")
    g = hw.gpus[0]
    assert g.free_bytes == 60_915_220 * 1024 == hw.ram_available_bytes  # MemAvailable
    assert g.free_bytes != 58_102_332 * 1024  # MemFree (Ollama #12283)
    assert g.total_bytes == hw.ram_total_bytes and g.compute_capability == "8.7"


def test_discrete_gpu_free_memory_is_what_llama_cpp_reports() -> None:
    g = box("rtx4090-desktop").gpus[0]
    assert g.free_bytes == 23871 * 1024**2 - 3 * 1024**2  # ggml's number, not nvidia-smi's 23871 MiB


def test_apple_unified_memory_and_wired_limit(tmp_path: Path) -> None:
    hw = box("macbook-m2-max-32gb")
    g = hw.gpus[0]
    assert (
        hw.os == "darwin" and hw.cpu.cores_physical == 12 and {"NEON", "DOTPROD", "BF16"} <= set(hw.cpu.flags)
    )
    assert hw.ram_total_bytes == 32 * GiB
    assert g.total_bytes == int(32 * GiB * 2 / 3)  # macOS's default GPU working set at 32 GB
    assert (
        g.free_bytes == hw.ram_available_bytes < g.total_bytes
    )  # vm_stat: free+inactive+speculative+purgeable
    # a raised wired limit (sudo sysctl iogpu.wired_limit_mb=28672) is honoured
    d = tmp_path / "mac"
    shutil.copytree(DATA / "macbook-m2-max-32gb", d)
    p = d / "cmd" / "sysctl_-a.txt"
    p.write_text(p.read_text().replace("iogpu.wired_limit_mb: 0", "iogpu.wired_limit_mb: 28672"))
    assert detect(RecordedReader(d)).gpus[0].total_bytes == 28 * GiB


def test_gpu_without_a_llama_cpp_backend_is_an_error_with_the_fix() -> None:
    hw = box("rtx3090-cpu-build")
    errors = [f for f in hw.findings if f.level == "error"]
    assert len(errors) == 1 and "RTX 3090" in errors[0].message and "CPU only" in errors[0].message
    assert errors[0].fix == (
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36'
    )
    assert hw.gpus[0].ggml_device is None and hw.runnable_gpus() == []
    jetson = box("jetson-agx-orin-64gb-cpu-build")
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in next(f.fix for f in jetson.findings if f.level == "error")


def test_no_error_when_llama_cpp_drives_the_gpu() -> None:
    for name in ("rtx4090-desktop", "jetson-agx-orin-64gb", "amd-7900xtx-sysfs", "macbook-m2-max-32gb"):
        assert not [f for f in box(name).findings if f.level == "error"], name


def test_llama_cpp_not_installed_is_a_warning_and_vendor_gpus_are_trusted() -> None:
    hw = box("amd-rocm-smi-only")
    assert hw.ggml_devices is None
    assert [f.level for f in hw.findings] == ["warning"]
    assert hw.runnable_gpus() == hw.gpus


def test_cgroup_v2_limit_caps_usable_ram() -> None:
    hw = box("cpu-only-32gb-container-12g")
    assert hw.cgroup_limit_bytes == 12 * GiB and hw.cgroup_usage_bytes == 500 * 1024**2
    assert hw.usable_ram_bytes == 12 * GiB - 500 * 1024**2 < hw.ram_available_bytes
    assert any("container" in f.message for f in hw.findings)
    assert box("cpu-only-32gb").cgroup_limit_bytes is None  # memory.max "max"


def test_cgroup_v1_takes_the_tightest_limit_up_the_tree() -> None:
    hw = box("cgroup-v1-limited")
    assert hw.cgroup_limit_bytes == 16 * GiB  # set on the parent; the leaf says "unlimited"
    assert hw.cgroup_usage_bytes == 1 * GiB
    assert hw.usable_ram_bytes == 15 * GiB


def test_this_sandbox_recorded_cgroup_v1_is_unlimited() -> None:
    hw = box("sandbox-epyc-cgroup-v1")
    assert hw.cgroup_limit_bytes is None and hw.cgroup_usage_bytes and hw.cgroup_usage_bytes > 0
    assert hw.gpus == [] and [d.name for d in hw.ggml_devices or []] == ["CPU"]


def test_nvidia_smi_several_cards_and_missing_values() -> None:
    text = (
        "0, NVIDIA GeForce RTX 3090, 24576, 24245, 535.183.01, 8.6, 00000000:2B:00.0\n"
        "1, NVIDIA GeForce RTX 3090, 24576, 23911, 535.183.01, 8.6, 00000000:2C:00.0\n"
        "0, Orin (nvgpu), [N/A], [N/A], 540.4.0, 8.7, 00000000:00:00.0\n"
    )
    g = parse_nvidia_smi(text)
    assert [x.pci_bus_id for x in g] == ["0000:2b:00.0", "0000:2c:00.0", "0000:00:00.0"]
    assert g[1].free_bytes == 23911 * 1024**2 and g[2].total_bytes == 0


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.iterdir() if p.is_dir()))
def test_json_round_trip(name: str) -> None:
    hw = box(name)
    again = from_dict(json.loads(hw.to_json()))
    assert again == hw
    assert again.usable_ram_bytes == hw.usable_ram_bytes and again.runnable_gpus() == hw.runnable_gpus()


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"os": "linux"}', "missing field 'machine'"),
        ("TRUNCATE", "not valid JSON"),
        ("BADTYPE", "field 'ram_total_bytes' must be int"),
        ("NEGATIVE", "gpus[0].free_bytes"),
        ("EXTRA", "malformed"),
        ("SCHEMA", "schema 99"),
    ],
)
def test_corrupt_hardware_json_is_a_clear_error(tmp_path: Path, text: str, words: str) -> None:
    good = box("rtx4090-desktop").to_dict()
    if text == "TRUNCATE":
        text = json.dumps(good)[:500]
    elif text == "BADTYPE":
        text = json.dumps({**good, "ram_total_bytes": "64 GB"})
    elif text == "NEGATIVE":
        good["gpus"][0]["free_bytes"] = -1
        text = json.dumps(good)
    elif text == "EXTRA":
        good["gpus"][0]["vram_gb"] = 24
        text = json.dumps(good)
    elif text == "SCHEMA":
        text = json.dumps({**good, "schema": 99})
    p = tmp_path / "hw.json"
    p.write_text(text)
    with pytest.raises(BadInputError) as e:
        load_hardware(p)
    assert str(p) in str(e.value) and words in str(e.value)


def test_missing_hardware_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such hardware file"):
        load_hardware(tmp_path / "nope.json")


def test_real_llama_cpp_devices_on_this_machine() -> None:
    pytest.importorskip("llama_cpp")
    devs = SystemReader().ggml_devices()
    assert devs is not None and devs[-1]["type"] == "cpu" and devs[-1]["total_bytes"] > 1 * GiB
    hw = detect()
    assert hw.ggml_devices and hw.ram_total_bytes > 1 * GiB and hw.cpu.cores_logical >= 1
    assert from_dict(json.loads(hw.to_json())) == hw


def test_cli_detect_json_feeds_plan_hardware(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from edge_magistral.cli import (
        cli,
        plan_cmds,  # noqa: F401
    )

    r = CliRunner().invoke(cli, ["detect", "--json"])
    assert r.exit_code == 0, r.output
    (tmp_path / "hw.json").write_text(r.output)
    assert load_hardware(tmp_path / "hw.json").cpu.cores_logical >= 1
    r = CliRunner().invoke(cli, ["detect"])
    assert r.exit_code == 0 and "llama.cpp sees: CPU" in r.output


def test_cli_detect_exits_non_zero_on_an_error_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_magistral.cli import cli, plan_cmds

    monkeypatch.setattr(plan_cmds, "detect", lambda store_dir=None: box("rtx3090-cpu-build"))
    r = CliRunner().invoke(cli, ["detect"])
    assert r.exit_code == 8 and "ERROR" in r.output and "GGML_CUDA=on" in r.output
