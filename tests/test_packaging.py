"""Build the wheel, install it in a bare virtualenv outside the repository, and import from it there.

The virtualenv has no pip and no site-packages but the wheel's, so every import resolves to the installed
files: nothing can come from the source tree (the editable install, the working directory, PYTHONPATH).
Importing the Countdown task there also proves that a task and `import tinyrl` need nothing beyond the
standard library, which keeps reward worker processes light.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each source folder lands inside the wheel (pyproject.toml's package-dir).
INSTALLED_AS = {"tinyrl": "tinyrl", "tasks": "tinyrl/tasks", "conf": "tinyrl/conf"}
NOT_SOURCE = {"__pycache__", ".git", ".venv", "build", "dist", "outputs", "multirun", "runs", ".pytest_cache"}


def copy_source_tree(dest: Path) -> None:
    """Copy what a clean checkout holds (tracked and new, not ignored), so stale build/ files cannot leak in."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy all but build outputs
        shutil.copytree(REPO, dest, ignore=lambda _, names: [
            n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")
        ])
        return
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():  # skips tracked files deleted in the working tree
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)


def source_files(pattern: str) -> dict[str, str]:
    """Installed path -> sha256 of every source file matching `pattern` in the packaged folders."""
    found = {}
    for folder, installed in INSTALLED_AS.items():
        for path in (REPO / folder).rglob(pattern):
            if "__pycache__" not in path.parts:
                found[f"{installed}/{path.relative_to(REPO / folder).as_posix()}"] = sha256(path.read_bytes())
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel_build")
    copy_source_tree(work / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(work / "dist"), str(work / "src")],
        capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel_file,) = (work / "dist").glob("tinyrl-*.whl")
    return wheel_file


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory, wheel) -> tuple[Path, Path]:
    """A virtualenv with only the standard library and the unpacked wheel; returns (python, site-packages)."""
    venv = tmp_path_factory.mktemp("bare_venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # installing a pure-Python wheel is unpacking it into site-packages
        archive.extractall(purelib)
    return python, Path(purelib)


def run_isolated(python: Path, code: str, cwd: Path) -> dict:
    """Run `code` in `python` from `cwd` with no PYTHON* variables and no user site; return its JSON output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [str(python), "-I", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_wheel_holds_only_the_tinyrl_package_and_every_source_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        contents = {name: sha256(archive.read(name)) for name in names if not name.endswith("/")}
    version = wheel.name.split("-")[1]
    assert {name.split("/")[0] for name in names} == {"tinyrl", f"tinyrl-{version}.dist-info"}
    assert not [name for name in names if name.startswith(("tasks/", "conf/"))]

    expected = {**source_files("*.py"), **source_files("*.yaml")}
    assert "tinyrl/tasks/countdown.py" in expected and "tinyrl/conf/__init__.py" in expected
    missing = sorted(set(expected) - set(contents))
    assert not missing, f"source files left out of the wheel (fix pyproject.toml's packages/package-data): {missing}"
    stale = sorted(path for path, digest in expected.items() if contents[path] != digest)
    assert not stale, f"wheel files differ from the source tree: {stale}"


def test_installed_wheel_imports_tasks_and_reads_configs(bare_venv, tmp_path):
    python, purelib = bare_venv
    code = """
import hashlib, importlib.resources, importlib.util, json
import tinyrl, tinyrl.tasks.countdown as countdown

def yaml_files(folder, prefix=""):
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from yaml_files(entry, prefix + entry.name + "/")
        elif entry.name.endswith(".yaml"):
            yield prefix + entry.name, entry.read_bytes()

conf = importlib.resources.files("tinyrl.conf")
print(json.dumps({
    "tinyrl": tinyrl.__file__,
    "countdown": countdown.__file__,
    "version": tinyrl.__version__,
    "top_level_tasks": importlib.util.find_spec("tasks") is not None,
    "top_level_conf": importlib.util.find_spec("conf") is not None,
    "yaml": {name: hashlib.sha256(data).hexdigest() for name, data in yaml_files(conf)},
}))
"""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    seen = run_isolated(python, code, cwd)

    assert Path(seen["tinyrl"]).is_relative_to(purelib)
    assert Path(seen["countdown"]) == purelib / "tinyrl" / "tasks" / "countdown.py"
    assert seen["version"] == installed_version(purelib)
    assert seen["top_level_tasks"] is False and seen["top_level_conf"] is False

    source_yaml = {path.removeprefix("tinyrl/conf/"): digest
                   for path, digest in source_files("*.yaml").items() if path.startswith("tinyrl/conf/")}
    assert any("/" in name for name in source_yaml), "expected config groups in subfolders of conf/"
    assert seen["yaml"] == source_yaml


def installed_version(purelib: Path) -> str:
    (dist_info,) = purelib.glob("tinyrl-*.dist-info")
    metadata = (dist_info / "METADATA").read_text()
    return next(line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Version:"))
