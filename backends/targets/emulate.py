"""aarch64 bundles on an x86 host: ``qemu-aarch64-static`` and an aarch64 Python that graphopt prepares once.

The environment lives in ``$GRAPHOPT_CACHE_DIR`` (default ``~/.cache/graphopt``) as ``aarch64-env-<key>``::

    sysroot/   Debian arm64 packages of CPython and the C libraries it and TVM's runtime need (dpkg-deb -x)
    site/      aarch64 wheels of apache-tvm (runtime libraries only: no compiler), apache-tvm-ffi,
               numpy and ml-dtypes, unzipped (pip refuses to install wheels of another platform)
    env.json   what it holds

The key hashes the TVM versions installed here (a bundle's library needs the runtime it was built
with). It is built in a temporary directory under a lock and renamed into place: an interrupted
preparation leaves nothing that a later run would use. The arm64 packages come from the host's own
Debian mirrors through apt with private state directories (the host's apt configuration is untouched).

Timings taken under qemu are emulation timings: they say nothing about a device's speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from graphopt.core.errors import GraphoptError, UnsupportedError
from graphopt.core.io import file_lock

QEMU = "qemu-aarch64-static"
# tool -> the Debian package that provides it
TOOLS = {QEMU: "qemu-user-static", "apt-get": "apt", "dpkg-deb": "dpkg"}
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# Debian arm64 packages: CPython (PY is its version) and the shared libraries it and TVM load.
DEBS = ("python{PY}-minimal", "libpython{PY}-minimal", "libpython{PY}-stdlib", "libc6", "zlib1g", "libexpat1",
        "libffi8", "libssl3", "libstdc++6", "libgcc-s1", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libuuid1",
        "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libnsl2", "libtirpc3")
ESSENTIAL = ("python{PY}-minimal", "libpython{PY}-minimal", "libpython{PY}-stdlib", "libc6", "libstdc++6",
             "libgcc-s1")
# Parts of the apache-tvm wheel a bundle never needs at run time (the compiler alone is 230 MB).
SKIPPED = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/include/", "tvm/src/", "tvm/web/",
           "tvm_ffi/include/", "tvm_ffi/src/", "tvm_ffi/3rdparty/", "tvm_ffi/cython/")


class EmulationError(GraphoptError):
    """The aarch64 environment cannot be prepared, or the emulated run failed."""


def host_arch() -> str:
    return platform.machine()


def bundle_arch(manifest: dict) -> str:
    """The CPU architecture a bundle's library was built for ('' when the manifest does not say)."""
    target = manifest.get("target") if isinstance(manifest.get("target"), dict) else {}
    inner = target.get("target") if isinstance(target.get("target"), dict) else {}
    triple = str(inner.get("mtriple") or "")
    features = target.get("features") if isinstance(target.get("features"), dict) else {}
    return triple.split("-")[0] if triple else str(features.get("arch") or "")


def needs_emulation(arch: str) -> bool:
    """Whether code for ``arch`` runs here only under qemu (aarch64 code on an x86-64 host)."""
    return arch == "aarch64" and host_arch() == "x86_64"


def check_tools() -> None:
    """Refuse (UnsupportedError naming the Debian package) when a tool the emulation needs is missing."""
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise UnsupportedError(f"running aarch64 code on this {host_arch()} host needs '{tool}' "
                                   f"(install it: apt-get install {package})")


def cache_base() -> Path:
    base = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graphopt")
    return Path(base)


def wheel_pins() -> list[str]:
    """The TVM runtime wheels matching this host's compiler (the library's ABI), then numpy and ml-dtypes."""
    pins = []
    for name in ("apache-tvm", "apache-tvm-ffi"):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise UnsupportedError(f"{name} is not installed here; it is needed to pick its aarch64 runtime") from None
    return [*pins, "numpy", "ml-dtypes", "typing-extensions"]


def env_dir() -> Path:
    key = hashlib.sha256(json.dumps([wheel_pins(), WHEEL_PLATFORM, DEBS]).encode()).hexdigest()[:12]
    return cache_base() / f"aarch64-env-{key}"


class Env:
    """A prepared environment: ``command(argv)`` is an aarch64 ``python3 argv...`` under qemu."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.info = json.loads((root / "env.json").read_text())
        self.python = root / "sysroot" / "usr" / "bin" / f"python{self.info['python']}"

    def command(self, argv: list[str], cpu: str | None = None) -> list[str]:
        return [QEMU, "-L", str(self.root / "sysroot"), *(["-cpu", cpu] if cpu else []), str(self.python), *argv]

    def environ(self, threads: int | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
        if threads:
            keep["TVM_NUM_THREADS"] = str(threads)
        return {**keep, "PYTHONPATH": str(self.root / "site"), "PYTHONNOUSERSITE": "1", "TVM_USE_RUNTIME_LIB": "1"}

    def run(self, argv: list[str], *, cpu: str | None = None, timeout: float | None = None,
            threads: int | None = None):
        """Run aarch64 Python with ``argv``; returns the CompletedProcess (text, stdout/stderr captured)."""
        try:
            return subprocess.run(self.command(argv, cpu), env=self.environ(threads), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EmulationError(f"the emulated run did not finish in {timeout:.0f} s") from None


def prepare(log=None) -> Env:
    """The aarch64 environment, prepared on first use (a minute or two; about 150 MB) and then reused."""
    check_tools()
    final = env_dir()
    if (final / "env.json").is_file():
        return Env(final)
    log = log or (lambda msg: print(f"graphopt: {msg}", file=sys.stderr, flush=True))
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / "aarch64-env.lock"):
        if (final / "env.json").is_file():  # another process prepared it meanwhile
            return Env(final)
        log(f"preparing the aarch64 runtime environment in {final} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=".aarch64-env.tmp-", dir=final.parent))
        try:
            _build(tmp, final, log)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Env(final)


def _tool(argv: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise EmulationError(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def _build(tmp: Path, final: Path, log) -> None:
    state = tmp / "apt"
    for d in ("lists/partial", "cache/archives/partial"):
        (state / d).mkdir(parents=True)
    apt_opts = [f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state / 'cache'}",
                "-oAPT::Architecture=arm64", "-oAPT::Architectures::=arm64", "-oDebug::NoLocking=1", "-q"]
    log("fetching the arm64 package lists (apt, private state)")
    _tool(["apt-get", *apt_opts, "update"], "apt-get update for arm64")
    shown = _tool(["apt-cache", *apt_opts, "show", "python3-minimal:arm64"], "apt-cache show python3-minimal:arm64")
    found = re.search(r"python3\.(\d+)-minimal", shown)
    if not found:
        raise EmulationError("the arm64 package lists name no python3.X-minimal")
    py = f"3.{found.group(1)}"
    names = [n.format(PY=py) for n in DEBS]
    debs = tmp / "debs"
    debs.mkdir()
    log(f"downloading {len(names)} Debian arm64 packages (CPython {py} and its libraries)")
    if subprocess.run(["apt-get", *apt_opts, "download", *(f"{n}:arm64" for n in names)], cwd=debs,
                      capture_output=True).returncode != 0:  # one missing name stops the batch: one by one
        for n in names:
            subprocess.run(["apt-get", *apt_opts, "download", f"{n}:arm64"], cwd=debs, capture_output=True)
    got = {p.name.split("_")[0] for p in debs.glob("*.deb")}
    missing = [n.format(PY=py) for n in ESSENTIAL if n.format(PY=py) not in got]
    if missing:
        raise EmulationError(f"could not download the arm64 packages {', '.join(missing)} from this host's apt sources")
    sysroot = tmp / "sysroot"
    for deb in sorted(debs.glob("*.deb")):
        _tool(["dpkg-deb", "-x", str(deb), str(sysroot)], f"dpkg-deb -x {deb.name}")
    pins = wheel_pins()
    wheels = tmp / "wheels"
    log(f"downloading aarch64 wheels: {', '.join(pins)}")
    _tool([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--platform",
           WHEEL_PLATFORM, "--python-version", py, "--implementation", "cp", "--abi", f"cp{py.replace('.', '')}",
           "-d", str(wheels), *pins], "pip download of the aarch64 wheels")
    site = tmp / "site"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in z.infolist():
                if not member.filename.startswith(SKIPPED):
                    z.extract(member, site)
                    if member.external_attr >> 16 & 0o111:
                        os.chmod(site / member.filename, 0o755)
    if sys.version_info[:2] == tuple(int(x) for x in py.split(".")):  # .pyc files are the same on every CPU
        import compileall

        compileall.compile_dir(str(site), quiet=2, stripdir=str(tmp), prependdir=str(final))
    for d in (state, debs, wheels):
        shutil.rmtree(d)
    info = {"python": py, "wheels": pins, "platform": WHEEL_PLATFORM, "debs": sorted(got),
            "bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and not f.is_symlink())}
    (tmp / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    env = Env(tmp)
    check = env.run(["-c", "import numpy, tvm_ffi, platform; print(platform.machine())"], timeout=300)
    if check.returncode != 0 or check.stdout.strip() != "aarch64":
        raise EmulationError(f"the prepared aarch64 Python does not start: {_last_line(check.stderr)}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


__all__ = ["EmulationError", "Env", "bundle_arch", "check_tools", "needs_emulation", "prepare"]
