"""Profiles: the built-in ones load and match the right boxes; broken ones fail naming file and field;
a user directory adds and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_magistral.errors import BadInputError
from edge_magistral.hardware import RecordedReader, detect
from edge_magistral.profiles import BUILTIN_DIR, choose_profile, load_profile_file, load_profiles

DATA = Path(__file__).parent / "data" / "hardware"

CLASSES = {
    "rtx-24gb",
    "nvidia-16gb",
    "nvidia-12gb",
    "nvidia-8gb",
    "datacenter-80gb",
    "jetson-agx-orin-64gb",
    "jetson-agx-orin-32gb",
    "jetson-orin-nx-16gb",
    "apple-silicon",
    "amd-rocm-16-24gb",
    "cpu-only",
    "generic",
}


def test_builtin_profiles_load_and_cover_the_classes() -> None:
    profiles = load_profiles([BUILTIN_DIR])
    assert CLASSES <= set(profiles)
    for p in profiles.values():
        assert p.min_ctx <= p.target_ctx and p.quants and p.source.endswith(".yaml")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("rtx4090-desktop", "rtx-24gb"),
        ("rtx4060ti-16gb", "nvidia-16gb"),
        ("rtx4060-laptop-8gb", "nvidia-8gb"),
        ("h200-nvml", "datacenter-80gb"),
        ("jetson-agx-orin-64gb", "jetson-agx-orin-64gb"),
        ("jetson-orin-nx-16gb", "jetson-orin-nx-16gb"),
        ("macbook-m2-max-32gb", "apple-silicon"),
        ("amd-7900xtx-sysfs", "amd-rocm-16-24gb"),
        ("amd-rocm-smi-only", "amd-rocm-16-24gb"),
        ("cpu-only-32gb", "cpu-only"),
        ("sandbox-epyc-cgroup-v1", "cpu-only"),
        # a GPU llama.cpp cannot drive does not count: plan for what will run
        ("rtx3090-cpu-build", "cpu-only"),
        ("jetson-agx-orin-64gb-cpu-build", "cpu-only"),
        ("rtx3050-laptop-4gb", "generic"),  # no profile names a 4 GB card
    ],
)
def test_recorded_boxes_match_their_profile(name: str, expected: str) -> None:
    hw = detect(RecordedReader(DATA / name))
    assert choose_profile(hw, load_profiles([BUILTIN_DIR])).name == expected


def _write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


GOOD = """name: test-box
match:
  gpu: discrete
  gpu_gib: [20, 26]
quants: [Q4_K_M]
context:
  target: 8192
  min: 4096
"""


@pytest.mark.parametrize(
    "text, field",
    [
        ("name: x\nmatch: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (GOOD.replace("min: 4096", "min: lots"), "'context.min' must be an integer"),
        (GOOD.replace("min: 4096", "min: 16384"), "'context.min' (16384) is larger than context.target"),
        (GOOD.replace("[Q4_K_M]", "[Q4_K_M, Q4_K_XL]"), "'quants' must be a non-empty list"),
        (
            GOOD.replace("gpu: discrete", "gpu: big"),
            "'match.gpu' must be one of none, discrete, unified, any",
        ),
        (GOOD.replace("[20, 26]", "[26, 20]"), "'match.gpu_gib' must be [min, max]"),
        (GOOD + "kv_type: q2_k\n", "'kv_type' must be one of f16, q8_0, q4_0"),
        (GOOD + "treads: 4\n", "'treads' is not a known field"),
        (
            GOOD.replace("match:\n", "match:\n  name_regex: 'RTX (40'\n"),
            "'match.name_regex' is not a valid regular",
        ),
        (GOOD.replace("name: test-box", "name: Test Box"), "'name' must be lower-case"),
        (GOOD + "reserve:\n  gpu_mib: -5\n", "'reserve.gpu_mib' must be an integer from 0"),
        (GOOD + "threads: all\n", "'threads' must be physical, logical or a number"),
        (GOOD + "flash_attn: maybe\n", "'flash_attn' must be true or false"),
        (GOOD + "n_batch: 256\nn_ubatch: 512\n", "'n_ubatch' (512) is larger than n_batch"),
        (GOOD + "parallel: 0\n", "'parallel' must be an integer from 1 to 64"),
        (GOOD + "parallel: four\n", "'parallel' must be an integer from 1 to 64"),
    ],
)
def test_broken_profile_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    p = _write(tmp_path, "broken.yaml", text)
    with pytest.raises(BadInputError) as e:
        load_profiles([tmp_path])
    assert str(e.value).startswith(f"{p}: ") and field in str(e.value)


def test_user_directory_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "profiles"
    _write(user, "mine.yaml", GOOD)
    _write(user, "24.yaml", GOOD.replace("name: test-box", "name: rtx-24gb") + "priority: 99\n")
    monkeypatch.setenv("EDGE_MAGISTRAL_PROFILES", str(user))
    profiles = load_profiles()
    assert "test-box" in profiles and CLASSES <= set(profiles)
    assert profiles["rtx-24gb"].quants == ("Q4_K_M",) and profiles["rtx-24gb"].source == str(user / "24.yaml")
    hw = detect(RecordedReader(DATA / "rtx4090-desktop"))
    assert choose_profile(hw, profiles).source == str(user / "24.yaml")


def test_two_files_with_one_name_in_a_directory(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD)
    _write(tmp_path, "b.yaml", GOOD)
    with pytest.raises(BadInputError, match="already used by"):
        load_profiles([tmp_path])


def test_unknown_profile_name() -> None:
    hw = detect(RecordedReader(DATA / "cpu-only-32gb"))
    with pytest.raises(BadInputError, match="no profile named 'laptop'; known: .*cpu-only"):
        choose_profile(hw, load_profiles([BUILTIN_DIR]), "laptop")


def test_generic_exists_even_without_files(tmp_path: Path) -> None:
    profiles = load_profiles([tmp_path / "empty"])
    hw = detect(RecordedReader(DATA / "rtx4090-desktop"))
    assert set(profiles) == {"generic"} and choose_profile(hw, profiles).name == "generic"


def test_threads_policy() -> None:
    hw = detect(RecordedReader(DATA / "rtx4090-desktop"))
    p = load_profile_file(BUILTIN_DIR / "rtx-24gb.yaml")
    assert p.threads_for(hw) == 16
    assert (
        load_profiles([BUILTIN_DIR])["cpu-only"].threads_for(detect(RecordedReader(DATA / "cpu-only-32gb")))
        == 8
    )


def test_a_wheel_carries_the_builtin_profiles(tmp_path: Path) -> None:
    """A non-editable install (an air-gap wheelhouse) must still find the profiles: the wheel puts
    them under <prefix>/share/edge-magistral/profiles, where profiles.py looks outside a checkout."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path), str(root)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("edge_magistral-*.whl"))).namelist()
    carried = {Path(n).name for n in names if "/data/share/edge-magistral/profiles/" in n}
    assert carried == {p.name for p in (root / "profiles").glob("*.yaml")}


def test_parallel_slots_default_to_one_on_small_boxes(tmp_path: Path) -> None:
    """Slots cost a KV cache each: only the big-GPU profiles ask for more than one by default."""
    profiles = load_profiles([BUILTIN_DIR])
    assert profiles["datacenter-80gb"].parallel == 4 and profiles["rtx-24gb"].parallel == 2
    small = ("cpu-only", "generic", "jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb",
             "nvidia-8gb", "nvidia-12gb", "nvidia-16gb")
    assert all(profiles[name].parallel == 1 for name in small)
    assert load_profile_file(_write(tmp_path, "p.yaml", GOOD + "parallel: 3\n")).parallel == 3
