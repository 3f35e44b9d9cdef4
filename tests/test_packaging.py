"""Packaging: every package folder is listed in pyproject.toml, and a normal (non-editable) wheel
installs datamodules/ and callbacks/ inside the lit_vlm namespace, with no generic top-level names."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"lit_vlm": ROOT / "lit_vlm", "lit_vlm.datamodules": ROOT / "datamodules", "lit_vlm.callbacks": ROOT / "callbacks"}


def listed_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed():
    found = set()
    for name, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed_packages()


def test_console_script_and_namespace_imports():
    import lit_vlm.callbacks
    import lit_vlm.datamodules

    assert Path(lit_vlm.datamodules.__file__).parent == ROOT / "datamodules"
    assert Path(lit_vlm.callbacks.__file__).parent == ROOT / "callbacks"
    proc = subprocess.run([sys.executable, "-m", "lit_vlm", "data", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "synth" in proc.stdout


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build without isolation here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lit_vlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lit_vlm/datamodules/synth.py" in names and "lit_vlm/callbacks/retrieval.py" in names
    assert "lit_vlm/cli.py" in names and "lit_vlm/modules/vision.py" in names
    tops = {n.split("/")[0] for n in names}
    assert "datamodules" not in tops and "callbacks" not in tops
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lit-vlm = lit_vlm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
