"""The install: which torch build `make setup` takes, and the lock it installs from."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.helpers import ROOT

SCRIPT = ROOT / "sweeps" / "install.py"
# A script, not a module: loaded by path.
_spec = importlib.util.spec_from_file_location("install", SCRIPT)
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)
PIP_DRY_RUN = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
PIP_DRY_RUN += ["--no-deps", "--quiet", "--report", "-"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock() -> dict[str, str]:
    pins = {}
    for line in install.LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = match.group(2)
    return pins


def _fake_nvidia_smi(tmp_path, stdout: str, code: int) -> str:
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{stdout}'\nexit {code}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    return str(tmp_path)


def _plan(build: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "torch", "--build", build, "--plan"],
        capture_output=True,
        text=True,
        env={"PATH": path, "HOME": "/nonexistent"},
    )


def test_auto_takes_the_cuda_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    fake = _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\\n", 0)
    done = _plan("auto", fake)
    assert done.returncode == 0, done.stderr
    # PyPI's own torch==<release>, with no +cpu and no other index: on Linux the CUDA build.
    assert done.stdout.split() == [f"torch=={install.locked_version()}"]


@pytest.mark.parametrize(
    ("stdout", "code"),
    [("No devices were found\\n", 6), ("", 0), ("NVIDIA-SMI has failed\\n", 9)],
)
def test_auto_takes_the_cpu_build_where_no_gpu_is_listed(tmp_path, monkeypatch, stdout, code):
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, stdout, code))
    assert install.choose("auto")[0] == "cpu"


def test_auto_takes_the_cpu_build_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert install.choose("auto") == (
        "cpu",
        "TORCH_BUILD=auto, and no GPU is listed by nvidia-smi",
    )


@pytest.mark.parametrize("answers", [True, False])
def test_every_cpu_attempt_pins_the_cpu_build(answers, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    version = install.locked_version()
    tries = [args for _, args in install.attempts("cpu", version, cpu_index_answers=answers)]
    # PyPI has no +cpu releases, so none of these can resolve to its CUDA build.
    assert all(args[0] == f"torch=={version}+cpu" for args in tries)
    assert (["--extra-index-url", install.CPU_INDEX] in [args[1:] for args in tries]) == answers
    assert tries[-1] == [f"torch=={version}+cpu"]  # the fallback: pip's own sources


def test_the_overrides_install_exactly_what_they_name():
    tries = install.attempts("", "2.13.0", spec="torch==2.12.0", index="https://example/whl")
    assert [args for _, args in tries] == [["torch==2.12.0", "--index-url", "https://example/whl"]]
    tries = install.attempts("", "2.13.0", spec="torch")
    assert [args for _, args in tries] == [["torch"]]


def test_the_cpu_requirement_resolves_to_a_cpu_build_here(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    version = install.locked_version()
    (*_, (_, fallback)) = install.attempts("cpu", version)
    done = subprocess.run(
        [*PIP_DRY_RUN, *fallback],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (torch,) = json.loads(done.stdout)["install"]
    assert torch["metadata"]["name"] == "torch"
    assert torch["metadata"]["version"] == f"{version}+cpu"


def test_no_cpu_build_anywhere_stops_with_one_line_on_how_to_choose(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(install, "index_answers", lambda: False)
    monkeypatch.setattr(install, "_installed_version", lambda: None)
    calls = []

    def pip_finds_nothing(command, **_):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(install.subprocess, "run", pip_finds_nothing)
    assert install.main(["torch", "--build", "cpu"]) == 2
    assert len(calls) == 1 and f"torch=={install.locked_version()}+cpu" in calls[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert all(word in err for word in ("TORCH_BUILD", "TORCH_SPEC", "TORCH_INDEX"))


def test_an_unknown_build_is_one_line_naming_the_choices(tmp_path):
    done = _plan("gpu", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        "install.py: error: TORCH_BUILD=gpu: unknown build; choose one of: auto, cpu, cuda\n"
    )


def test_it_says_which_build_is_installed():
    installed = install.installed_build()
    version = importlib.metadata.version("torch")
    assert installed.startswith(f"torch {version}, ")
    import torch

    assert ("CUDA" in installed) == (torch.version.cuda is not None)


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for e in extras for r in e)]]


def test_the_lock_pins_every_requirement_of_the_project_within_its_range():
    pins = _lock()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {install.LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins)
        for extra in requirement.extras:  # psycopg[binary]: psycopg-binary
            assert canonicalize_name(f"{requirement.name}-{extra}") in pins
    assert Version(pins["torch"]).local is None  # a release, which every build of it satisfies


def _closure(name: str) -> set[str]:
    """name and everything it requires, on this machine, as installed."""
    seen, todo = set(), [name]
    while todo:
        current = canonicalize_name(todo.pop())
        if current in seen:
            continue
        seen.add(current)
        try:
            requires = importlib.metadata.requires(current) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(
                {**default_environment(), "extra": ""}
            ):
                todo.append(requirement.name)
    return seen


def test_the_installed_environment_is_the_lock():
    pins = _lock()
    # A CUDA build of torch brings its own exactly pinned nvidia-* wheels, which the lock (made
    # on the CPU build) does not list.
    torch_only = _closure("torch") - set(pins)
    # Copies a package vendors are its own, not installed: setuptools puts its _vendor
    # directory on sys.path once imported (inductor's C++ builds import it).
    installed_paths = [p for p in sys.path if "_vendor" not in Path(p).parts]
    wrong = {}
    for dist in importlib.metadata.distributions(path=installed_paths):
        name = canonicalize_name(dist.metadata["Name"])
        if name == "fce" or name in torch_only:
            continue
        installed = Version(dist.version).public if name == "torch" else dist.version
        if pins.get(name) != installed:
            wrong[name] = (installed, pins.get(name))
    assert wrong == {}, "installed, locked: run `make setup` (or `make lock`)"
    project = PYPROJECT["project"]
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        importlib.metadata.version(Requirement(line).name)  # what `make setup` installs


def test_every_install_of_the_project_goes_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    recipes = re.split(r"^(?=\S[^\n]*:)", makefile, flags=re.M)
    installs = [
        line
        for recipe in recipes
        if not recipe.startswith("lock:")
        for line in recipe.splitlines()
        if "pip install" in line
    ]
    assert installs and all("-c $(LOCKED)" in line for line in installs), installs
    assert "--constraint $(LOCKED)" in makefile  # torch's own dependencies
    cluster = (ROOT / "sweeps" / "cluster" / "install.sh").read_text()
    (line,) = [line for line in cluster.splitlines() if "pip install" in line]
    assert "constraints.txt" in line


def test_the_cpu_index_is_probed_once_and_briefly(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<a>torch</a>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert install.index_answers(url)
        assert not install.index_answers(f"{url}/nowhere")  # a 404: not a wheel index
    finally:
        server.shutdown()
        server.server_close()
    assert not install.index_answers(url, timeout=1)  # nothing listens there now
