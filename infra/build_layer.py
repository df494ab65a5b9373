"""Build the shared library into a Lambda layer.

    python infra/build_layer.py                 # infra/build/layer/python + infra/build/rtqcc-layer.zip
    python infra/build_layer.py --no-deps       # only the project itself (fast; for checks)
    python infra/build_layer.py --bytecode-python /path/to/python3.13
    python infra/build_layer.py --no-bytecode   # source only (each cold start compiles it again)

The layer is what `pip install --target python/ <the project>` makes (no extras), for the Lambda
runtime rather than for this machine: compiled dependencies (pydantic-core, ...) come as manylinux
wheels for LAMBDA_PYTHON_VERSION. Dependencies published only as source (pure Python) are built
into wheels here first, so the cross-platform install can take them; Chalice's command-line
tools are taken out again (CHALICE_CLI_ONLY), since no function imports them. The zip is
deterministic (sorted entries, fixed timestamps), so an unchanged layer uploads as an unchanged
object.

The layer ships its bytecode, compiled by an interpreter of the Lambda runtime's version (this
one, `python3.13` on PATH, or one pyenv installed): Lambda's /opt is read-only, so CPython cannot
cache what it compiles there, and without it every cold start compiles boto3, pydantic and the
rest again (bench/cold_start.py measures both).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "infra" / "build"
LAYER_ZIP_NAME = "rtqcc-layer.zip"
# The one Lambda runtime every function uses; infra/cloudformation/extra.json and
# infra/terraform/*.tf.json name the same one (tests/test_infra.py checks they agree).
LAMBDA_RUNTIME = "python3.13"
LAMBDA_PYTHON_VERSION = LAMBDA_RUNTIME.removeprefix("python")
LAMBDA_PLATFORM = "manylinux2014_x86_64"
# Lambda layers are unpacked under /opt; python/ is on the runtime's sys.path. A function's own
# code is unpacked in its task root.
LAYER_PATH_ON_LAMBDA = "/opt/python"
TASK_ROOT_ON_LAMBDA = "/var/task"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIPPED_DIRS = {"__pycache__", "bin"}
# Chalice's command line (`chalice package`, `chalice deploy`) needs these; a function imports
# only Chalice's runtime, `chalice/app.py`, which needs none of them. Taken out of the layer (about
# 30 MB of Lambda's 250), each by its own record of the files it installed.
CHALICE_CLI_ONLY = ("click", "editor", "inquirer", "blessed", "jinxed", "pip", "pyyaml", "readchar", "runs",
                    "setuptools", "wcwidth", "wheel", "xmod")


class NoRuntimePython(SystemExit):
    """No interpreter of the Lambda runtime's version to compile the layer's bytecode with."""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


# What the wheel is built from: setuptools builds in the source tree's build/, so a copy of these
# in a folder of the build's own keeps two builds at once (two test runs) from removing each
# other's files.
_WHEEL_SOURCES = ("pyproject.toml", "README.md", "layers", "emulator")


def project_wheel(wheel_dir: Path) -> Path:
    """The project as a wheel (isolation is skipped when setuptools is already importable)."""
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    with tempfile.TemporaryDirectory(prefix="rtqcc-source-") as tmp:
        source = Path(tmp)
        for name in _WHEEL_SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif (ROOT / name).exists():
                shutil.copy2(ROOT / name, source / name)
        _pip("wheel", "--no-deps", *isolation, "-w", str(wheel_dir), str(source))
    wheels = sorted(wheel_dir.glob("rtqcc-*.whl"))
    if not wheels:
        raise SystemExit(f"build_layer: no rtqcc wheel was built in {wheel_dir}")
    return wheels[-1]


def install(target: Path, *, deps: bool = True, python_version: str = LAMBDA_PYTHON_VERSION,
            platform: str = LAMBDA_PLATFORM) -> None:
    """`pip install --target target <the project>` for the Lambda runtime's interpreter and platform."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rtqcc-wheels-") as tmp:
        wheels = Path(tmp)
        wheel = project_wheel(wheels)
        cross = ["--platform", platform, "--python-version", python_version, "--implementation", "cp"]
        if deps:
            # Wheels for every dependency as this machine would install them: this turns the
            # source-only ones into wheels (they are pure Python), which the install below can take.
            _pip("wheel", "--prefer-binary", "-w", str(wheels), str(wheel))
            _pip("install", "--no-compile", "--target", str(target), *cross, "--only-binary=:all:",
                 "--find-links", str(wheels), str(wheel))
        else:
            _pip("install", "--no-compile", "--no-deps", "--target", str(target), *cross, str(wheel))
    for skipped in _SKIPPED_DIRS:
        shutil.rmtree(target / skipped, ignore_errors=True)
    for name in CHALICE_CLI_ONLY:
        uninstall(target, name)


def distribution_name(name: str) -> str:
    """A distribution's name as pip compares them (PyYAML, pyyaml), from the name or its
    `<name>-<version>.dist-info` folder."""
    return re.sub(r"[-_.]+", "-", name.removesuffix(".dist-info").split("-")[0]).lower()


def uninstall(target: Path, name: str) -> None:
    """Remove distribution `name` from a `pip install --target` folder: the files its RECORD
    lists, then the folders that leaves empty (pip cannot uninstall from a target folder)."""
    root = target.resolve()
    for dist_info in root.glob("*.dist-info"):
        if distribution_name(dist_info.name) != distribution_name(name):
            continue
        with open(dist_info / "RECORD", newline="") as record:
            files = [(root / row[0]).resolve() for row in csv.reader(record) if row]
        folders = set()
        for path in files:
            if path.is_relative_to(root) and path.is_file():  # not a script pip put in ../bin
                path.unlink()
                folders.update(folder for folder in path.parents if folder.is_relative_to(root) and folder != root)
        for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()


def bytecode_tag(python_version: str = LAMBDA_PYTHON_VERSION) -> str:
    """The cache tag of the runtime's bytecode files: `cpython-313` in `x.cpython-313.pyc`."""
    return "cpython-" + python_version.replace(".", "")


def _version_of(interpreter: str) -> str | None:
    try:
        done = subprocess.run([interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_runtime_python(python_version: str = LAMBDA_PYTHON_VERSION) -> str | None:
    """An interpreter of `python_version`: this one, `pythonX.Y` on PATH, or the newest pyenv
    install of it. Each is run once to check, since a pyenv shim is on PATH even when the version
    it names is not active."""
    candidates = [sys.executable, shutil.which(f"python{python_version}")]
    pyenv = shutil.which("pyenv")
    root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip() if pyenv else ""
    if root:
        installs = Path(root, "versions").glob(f"{python_version}.*")
        newest_first = sorted(installs, key=lambda p: [int(n) if n.isdigit() else -1 for n in p.name.split(".")],
                              reverse=True)
        candidates += [str(p / "bin" / f"python{python_version}") for p in newest_first]
    for candidate in filter(None, candidates):
        if _version_of(candidate) == python_version:
            return candidate
    return None


def compile_bytecode(python_dir: Path, interpreter: str, path_on_lambda: str = LAYER_PATH_ON_LAMBDA) -> None:
    """Compile every module of python_dir with `interpreter` (the runtime's version). Unchecked
    hash-based files: a layer never changes under its bytecode, and a timestamp check would fail
    against the zip's fixed times. Each file records `path_on_lambda`/... (where Lambda unpacks it)
    as its source, so the bytes do not depend on the build folder."""
    subprocess.run([interpreter, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                    "-s", str(python_dir), "-p", path_on_lambda, str(python_dir)], check=True)


def zip_entry(name: str, *, executable: bool = False) -> zipfile.ZipInfo:
    """A deflated zip entry with a fixed time, so the same files always make the same zip."""
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o755 if executable else 0o644) << 16
    return info


def zip_layer(layer_dir: Path, zip_path: Path, *, python_version: str = LAMBDA_PYTHON_VERSION) -> Path:
    """Zip `layer_dir` (which holds python/) deterministically, with the bytecode of the runtime's
    version (any other an import on this machine left behind stays out)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    runtime_bytecode = f".{bytecode_tag(python_version)}.pyc"
    files = []
    for root, dirs, names in os.walk(layer_dir):
        dirs[:] = sorted(d for d in dirs if d != "bin")
        files.extend(Path(root) / name for name in names
                     if not name.endswith(".pyc") or name.endswith(runtime_bytecode))
    tmp_path = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files, key=lambda p: p.relative_to(layer_dir).as_posix()):
            archive.writestr(zip_entry(path.relative_to(layer_dir).as_posix(), executable=os.access(path, os.X_OK)),
                             path.read_bytes())
    tmp_path.replace(zip_path)
    return zip_path


def runtime_python_or_exit(python_version: str = LAMBDA_PYTHON_VERSION) -> str:
    found = find_runtime_python(python_version)
    if found is None:
        raise NoRuntimePython(
            f"build_layer: the layer's bytecode must be compiled by Python {python_version} (the Lambda runtime's),"
            f" and none was found (this interpreter is {sys.version_info[0]}.{sys.version_info[1]}; no working"
            f" python{python_version} on PATH or under pyenv). Install one, pass --bytecode-python PATH,"
            " or --no-bytecode to ship source only (every cold start then compiles it).")
    return found


def build_layer(out_dir: Path = BUILD_DIR, *, deps: bool = True, python_version: str = LAMBDA_PYTHON_VERSION,
                platform: str = LAMBDA_PLATFORM, bytecode: bool = True, bytecode_python: str | None = None) -> Path:
    """Build out_dir/layer/python, with its bytecode unless `bytecode` is false (compiled by
    `bytecode_python`, else by an interpreter find_runtime_python finds), and zip it to
    out_dir/rtqcc-layer.zip; return the zip's path."""
    interpreter = None
    if bytecode:  # found before the install, so a missing interpreter fails fast
        interpreter = bytecode_python or runtime_python_or_exit(python_version)
        if _version_of(interpreter) != python_version:
            raise NoRuntimePython(f"build_layer: {interpreter} is not Python {python_version}, the Lambda runtime's")
    layer_dir = out_dir / "layer"
    install(layer_dir / "python", deps=deps, python_version=python_version, platform=platform)
    if interpreter:
        compile_bytecode(layer_dir / "python", interpreter)
    return zip_layer(layer_dir, out_dir / LAYER_ZIP_NAME, python_version=python_version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help="build folder (default: infra/build)")
    parser.add_argument("--no-deps", action="store_true",
                        help="only the project itself, without its dependencies (fast; not deployable alone)")
    parser.add_argument("--python-version", default=LAMBDA_PYTHON_VERSION)
    parser.add_argument("--platform", default=LAMBDA_PLATFORM)
    parser.add_argument("--bytecode-python", default=None,
                        help="the interpreter (of --python-version) that compiles the layer's bytecode (default: found)")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="ship source only: slower cold starts, as nothing can cache bytecode under /opt")
    args = parser.parse_args(argv)
    zip_path = build_layer(args.out.resolve(), deps=not args.no_deps, python_version=args.python_version,
                           platform=args.platform, bytecode=not args.no_bytecode,
                           bytecode_python=args.bytecode_python)
    print(f"{zip_path} ({zip_path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
