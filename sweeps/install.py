"""What `make setup` installs first (torch: which build) and the lock (`make lock`).

    python sweeps/install.py torch [--build auto|cpu|cuda] [--spec REQ] [--index URL]
    python sweeps/install.py torch --build cpu --plan     # the pip arguments only, nothing run
    python sweeps/install.py freeze --out constraints.txt  # this environment, as the lock

Run by the environment's own interpreter. Standard library only: it runs before anything else
is installed.

torch: `auto` is `cuda` when `nvidia-smi -L` lists a GPU and `cpu` otherwise. `cpu` asks pip for
`torch==<locked>+cpu`: PyPI has no `+cpu` releases, so that pin can never resolve to PyPI's
Linux wheel, which is the CUDA build (with about 1.4 GiB of nvidia-* and triton wheels). Where
PyTorch's CPU index answers, pip gets it there; where it does not (an offline mirror), the pin
is asked of pip's own sources (a find-links folder of wheels, a private index), and where none
has it the script stops with one line saying how to choose. `cuda` asks for `torch==<locked>`,
which on Linux is PyPI's CUDA build. `--spec`/`--index` (TORCH_SPEC, TORCH_INDEX) install
exactly that requirement from that index instead. Either way it ends by printing the build
that is installed, read from torch's own version file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUILDS = ("auto", "cpu", "cuda")
# An unreachable index costs pip five retries per page; a short probe decides once instead.
PROBE_TIMEOUT_S = 5
HOW_TO_CHOOSE = (
    "choose with `make setup TORCH_BUILD=cpu|cuda`, or name the build: "
    "`make setup TORCH_SPEC=<requirement> TORCH_INDEX=<wheel index>`"
)


class SetupError(Exception):
    """One line for the user; the script exits non-zero with it."""


def locked_version(lock: Path = LOCK) -> str:
    """torch's version in the lock (a constraints file): the release the suite is tested on."""
    found = re.findall(r"^torch==([^\s;#+]+)", lock.read_text(), flags=re.M | re.I)
    if len(found) != 1:
        raise SetupError(f"{lock}: expected one `torch==<version>` line, found {len(found)}")
    return found[0]


def gpu_listed() -> bool:
    """Whether `nvidia-smi -L` (the NVIDIA driver's tool) lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.split("\n"))


def choose(build: str) -> tuple[str, str]:
    """The build to install for TORCH_BUILD=build, and why."""
    if build not in BUILDS:
        raise SetupError(f"TORCH_BUILD={build}: unknown build; choose one of: {', '.join(BUILDS)}")
    if build != "auto":
        return build, f"TORCH_BUILD={build}"
    if gpu_listed():
        return "cuda", "TORCH_BUILD=auto, and nvidia-smi lists a GPU; TORCH_BUILD=cpu for CPU"
    return "cpu", "TORCH_BUILD=auto, and no GPU is listed by nvidia-smi"


def index_answers(url: str = CPU_INDEX, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/torch/", timeout=timeout) as response:
            return response.status < 400
    except (OSError, urllib.error.URLError, ValueError):
        return False


def attempts(
    build: str, version: str, spec: str = "", index: str = "", cpu_index_answers: bool = False
) -> list[tuple[str, list[str]]]:
    """The pip install arguments to try in turn, each with where it looks."""
    if spec or index:
        requirement = spec or f"torch=={version}"
        source = index or "pip's configured sources"
        return [
            (
                f"{requirement} from {source}",
                [requirement, *(["--index-url", index] * bool(index))],
            )
        ]
    if build == "cuda":
        return [(f"torch=={version} from PyPI (on Linux, the CUDA build)", [f"torch=={version}"])]
    if sys.platform == "darwin":
        # PyTorch publishes no +cpu wheels for macOS; PyPI's macOS wheels are CPU builds.
        return [(f"torch=={version} from PyPI (on macOS, a CPU build)", [f"torch=={version}"])]
    pinned = f"torch=={version}+cpu"
    found = f"{pinned} from pip's configured sources"
    if cpu_index_answers:
        return [
            (f"{pinned} from {CPU_INDEX}", [pinned, "--extra-index-url", CPU_INDEX]),
            (found, [pinned]),
        ]
    return [(f"{found} ({CPU_INDEX} does not answer)", [pinned])]


def installed_build() -> str:
    """The installed torch's version and build, from its metadata and version.py (no import)."""
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return "no torch"
    version_py = Path(str(dist.locate_file("torch/version.py")))
    text = version_py.read_text() if version_py.is_file() else ""
    cuda = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, flags=re.M)
    hip = re.search(r"^hip\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, flags=re.M)
    if cuda:
        return f"torch {dist.version}, the CUDA {cuda.group(1)} build"
    if hip:
        return f"torch {dist.version}, the ROCm {hip.group(1)} build"
    return f"torch {dist.version}, a CPU build"


def install_torch(args: argparse.Namespace) -> int:
    version = args.version or locked_version(Path(args.lock))
    if args.spec or args.index:
        build, why = "", "TORCH_SPEC/TORCH_INDEX given"
        tries = attempts(build, version, args.spec, args.index)
    else:
        build, why = choose(args.build)
        cpu_pin = build == "cpu" and sys.platform != "darwin"
        wanted = f"{version}+cpu" if cpu_pin else version
        if not args.plan and _installed_version() == wanted:
            print(f"install.py: {installed_build()} ({why}), already installed")
            return 0
        tries = attempts(build, version, cpu_index_answers=cpu_pin and index_answers())
        # torch's own dependencies at the lock's versions (an override's index may lack them:
        # the project's install, under the lock, settles those).
        tries = [(where, [*pip_args, *_constraint(args)]) for where, pip_args in tries]
    if args.plan:
        for _, pip_args in tries:
            print(" ".join(pip_args))
        return 0
    for where, pip_args in tries:
        print(f"install.py: {why}: installing {where}", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *pip_args])
        if done.returncode == 0:
            print(f"install.py: installed {installed_build()} ({why})")
            return 0
    tried = "; ".join(where for where, _ in tries)
    raise SetupError(f"no torch installed (tried {tried}); {HOW_TO_CHOOSE}")


def _constraint(args: argparse.Namespace) -> list[str]:
    return ["--constraint", args.constraint] if args.constraint else []


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def freeze(args: argparse.Namespace) -> int:
    """Write this environment's exact versions as the lock (a pip constraints file)."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = {}
    for line in frozen.splitlines():
        name, sep, version = line.partition("==")
        if not sep or name.lower() == "fce":
            continue
        if name.lower() == "torch":
            # Whichever build (+cpu, CUDA) satisfies `torch==<release>`: the lock pins the release.
            version = version.split("+")[0]
        pins[name] = version
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins, key=str.lower))
    Path(args.out).write_text(LOCK_HEADER + body)
    print(f"install.py: wrote {len(pins)} pins to {args.out}")
    return 0


LOCK_HEADER = """\
# The lock: every package `make setup` installs (pip and setuptools too) at the version the
# suite is tested with, as a pip constraints file (`pip install -c constraints.txt ...`).
# Made by `make lock`: a fresh venv, the CPU build of torch, then `.[dev,cluster,notebooks]`,
# then `pip freeze`; not edited by hand. torch is pinned by release, which both its CPU (+cpu)
# and its CUDA builds satisfy.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    torch = sub.add_parser("torch", help="install the torch build TORCH_BUILD chooses")
    torch.add_argument("--build", default="auto", help="auto (default), cpu or cuda")
    torch.add_argument("--spec", default="", help="a requirement to install instead")
    torch.add_argument("--index", default="", help="the index to take --spec from")
    torch.add_argument("--version", default="", help="torch's release (default: the lock's)")
    torch.add_argument("--lock", default=str(LOCK), help="the lock to read torch's release from")
    torch.add_argument("--constraint", default="", help="a pip constraints file (the lock)")
    torch.add_argument(
        "--plan", action="store_true", help="print the pip arguments, install nothing"
    )
    out = sub.add_parser("freeze", help="write this environment as the lock")
    out.add_argument("--out", default=str(LOCK))
    args = parser.parse_args(argv)
    try:
        return install_torch(args) if args.command == "torch" else freeze(args)
    except SetupError as error:
        print(f"install.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
