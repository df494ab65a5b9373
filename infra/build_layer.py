"""Build the shared library into a Lambda layer.

    python infra/build_layer.py                 # infra/build/layer/python + infra/build/rtqcc-layer.zip
    python infra/build_layer.py --no-deps       # only the project itself (fast; for checks)

The layer is what `pip install --target python/ <the project>` makes (no extras), for the Lambda
runtime rather than for this machine: compiled dependencies (pydantic-core, ...) come as manylinux
wheels for LAMBDA_PYTHON_VERSION. Dependencies published only as source (pure Python) are built
into wheels here first, so the cross-platform install can take them. The zip is deterministic
(sorted entries, fixed timestamps), so an unchanged layer uploads as an unchanged object.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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
# Lambda layers are unpacked under /opt; python/ is on the runtime's sys.path.
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIPPED_DIRS = {"__pycache__", "bin"}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def project_wheel(wheel_dir: Path) -> Path:
    """The project as a wheel (isolation is skipped when setuptools is already importable)."""
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _pip("wheel", "--no-deps", *isolation, "-w", str(wheel_dir), str(ROOT))
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


def zip_layer(layer_dir: Path, zip_path: Path) -> Path:
    """Zip `layer_dir` (which holds python/) deterministically."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for root, dirs, names in os.walk(layer_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        files.extend(Path(root) / name for name in names if not name.endswith(".pyc"))
    tmp_path = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files, key=lambda p: p.relative_to(layer_dir).as_posix()):
            info = zipfile.ZipInfo(path.relative_to(layer_dir).as_posix(), date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            archive.writestr(info, path.read_bytes())
    tmp_path.replace(zip_path)
    return zip_path


def build_layer(out_dir: Path = BUILD_DIR, *, deps: bool = True, python_version: str = LAMBDA_PYTHON_VERSION,
                platform: str = LAMBDA_PLATFORM) -> Path:
    """Build out_dir/layer/python and zip it to out_dir/rtqcc-layer.zip; return the zip's path."""
    layer_dir = out_dir / "layer"
    install(layer_dir / "python", deps=deps, python_version=python_version, platform=platform)
    return zip_layer(layer_dir, out_dir / LAYER_ZIP_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help="build folder (default: infra/build)")
    parser.add_argument("--no-deps", action="store_true",
                        help="only the project itself, without its dependencies (fast; not deployable alone)")
    parser.add_argument("--python-version", default=LAMBDA_PYTHON_VERSION)
    parser.add_argument("--platform", default=LAMBDA_PLATFORM)
    args = parser.parse_args(argv)
    zip_path = build_layer(args.out.resolve(), deps=not args.no_deps, python_version=args.python_version,
                           platform=args.platform)
    print(f"{zip_path} ({zip_path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
