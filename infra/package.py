"""Build the deployable artefacts into infra/build/:

    python infra/package.py                      # stage prod, CloudFormation/SAM and Terraform
    python infra/package.py --stage dev --format cloudformation

- rtqcc-layer.zip          the shared library as a Lambda layer (infra/build_layer.py)
- stream.zip               the streaming SSE function: functions/stream/stream_function.py, with
                           infra/lambda/stream_server.py and run.sh for the Lambda Web Adapter
- cloudformation/          `chalice package --merge-template infra/cloudformation/extra.json`:
                           sam.json + deployment.zip, with the two zips beside them
- terraform/               `chalice package --pkg-format terraform`: chalice.tf.json + deployment.zip,
                           infra/terraform/*.tf.json, a generated rtqcc_override.tf.json (runtime,
                           layer, environment and VPC of Chalice's functions), and the two zips

Chalice runs on a copy of functions/api, so its deployment cache never lands in the source tree.
Like the layer, the functions' zips ship the bytecode of the Lambda runtime's Python for each of
their modules, since nothing can write it under /var/task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_layer import (BUILD_DIR, LAMBDA_RUNTIME, LAYER_ZIP_NAME, ROOT, TASK_ROOT_ON_LAMBDA,  # noqa: E402
                         build_layer, compile_bytecode, runtime_python_or_exit, zip_entry)

API_DIR = ROOT / "functions" / "api"
STREAM_FILES = {
    "stream_function.py": ROOT / "functions" / "stream" / "stream_function.py",
    "stream_server.py": ROOT / "infra" / "lambda" / "stream_server.py",
    "run.sh": ROOT / "infra" / "lambda" / "run.sh",
}
MERGE_TEMPLATE = ROOT / "infra" / "cloudformation" / "extra.json"
TERRAFORM_DIR = ROOT / "infra" / "terraform"
STREAM_ZIP_NAME = "stream.zip"
FORMATS = ("cloudformation", "terraform")


def add_bytecode(zip_path: Path, interpreter: str) -> None:
    """Add to a function's zip the bytecode of its modules, compiled by `interpreter` (the
    runtime's version): /var/task is read-only, so without it every cold start compiles them
    again (Chalice's own runtime, chalice/app.py, ships in deployment.zip as source: about 25 ms)."""
    with tempfile.TemporaryDirectory(prefix="rtqcc-bytecode-") as tmp, zipfile.ZipFile(zip_path, "a") as archive:
        code = Path(tmp)
        archive.extractall(code)
        compile_bytecode(code, interpreter, TASK_ROOT_ON_LAMBDA)
        shipped = set(archive.namelist())
        for path in sorted(code.rglob("*.pyc")):
            name = path.relative_to(code).as_posix()
            if name not in shipped:
                archive.writestr(zip_entry(name), path.read_bytes())


def build_stream_zip(out_dir: Path, *, bytecode_python: str) -> Path:
    path = out_dir / STREAM_ZIP_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in sorted(STREAM_FILES.items()):
            archive.writestr(zip_entry(name, executable=name.endswith(".sh")), source.read_bytes())
    add_bytecode(path, bytecode_python)
    return path


def chalice_package(out: Path, *, stage: str, pkg_format: str, bytecode_python: str) -> Path:
    """Run `chalice package` on a copy of functions/api, its deployment.zip with the bytecode of
    `bytecode_python`; return the output folder."""
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ)
    # Chalice asks for a region to name service principals; the templates themselves use the
    # deploying account's region (${AWS::Region}, data.aws_region).
    env.setdefault("AWS_DEFAULT_REGION", env.get("AWS_REGION") or "us-east-1")
    # app.py imports rtqcc: from the installed project, else from the source tree.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "layers"), env.get("PYTHONPATH")]))
    args = ["package", "--stage", stage]
    if pkg_format == "cloudformation":
        args += ["--merge-template", str(MERGE_TEMPLATE)]
    else:
        args += ["--pkg-format", "terraform"]
    with tempfile.TemporaryDirectory(prefix="rtqcc-chalice-") as tmp:
        project = Path(tmp) / "api"
        shutil.copytree(API_DIR, project, ignore=shutil.ignore_patterns("__pycache__", "deployments"))
        subprocess.run([sys.executable, "-c", "import sys; from chalice.cli import main; sys.exit(main())",
                        "--project-dir", str(project), *args, str(out)], check=True, env=env)
    add_bytecode(out / "deployment.zip", bytecode_python)
    return out


# The functions that queue jobs, and so may ask for a consumer invocation (bus/consumer_wakeup.py).
QUEUEING_FUNCTIONS = ("api_handler", "sweeper")


def terraform_override(chalice_tf: dict) -> dict:
    """Give each of Chalice's functions the runtime, layer, VPC and environment of rtqcc.tf.json,
    keeping the variables Chalice's config.json sets (an override replaces a whole block)."""
    functions = {}
    for name, function in chalice_tf["resource"]["aws_lambda_function"].items():
        own = function.get("environment", {}).get("variables", {})
        literal = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(own.items()))
        shared = "local.rtqcc_environment" + (", local.consumer_wakeup_environment" if name in QUEUEING_FUNCTIONS else "")
        functions[name] = {
            "runtime": "${local.lambda_runtime}",
            "layers": ["${aws_lambda_layer_version.rtqcc.arn}"],
            "environment": {"variables": "${merge(%s, {%s})}" % (shared, literal)},
            "vpc_config": {"subnet_ids": "${var.subnet_ids}", "security_group_ids": "${var.security_group_ids}"},
        }
    return {"resource": {"aws_lambda_function": functions}}


def package(out_dir: Path = BUILD_DIR, *, stage: str = "prod", formats: tuple[str, ...] = FORMATS,
            layer_zip: Path | None = None, layer_deps: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    interpreter = runtime_python_or_exit()  # compiles the layer's and the functions' bytecode
    if layer_zip is None:
        layer_zip = build_layer(out_dir, deps=layer_deps, bytecode_python=interpreter)
    stream_zip = build_stream_zip(out_dir, bytecode_python=interpreter)
    built = {"layer": layer_zip, "stream": stream_zip}
    for pkg_format in formats:
        target = chalice_package(out_dir / pkg_format, stage=stage, pkg_format=pkg_format, bytecode_python=interpreter)
        shutil.copy2(layer_zip, target / LAYER_ZIP_NAME)
        shutil.copy2(stream_zip, target / STREAM_ZIP_NAME)
        if pkg_format == "terraform":
            for extra in sorted(TERRAFORM_DIR.glob("*.tf.json")):
                shutil.copy2(extra, target / extra.name)
            chalice_tf = json.loads((target / "chalice.tf.json").read_text())
            (target / "rtqcc_override.tf.json").write_text(json.dumps(terraform_override(chalice_tf), indent=2) + "\n")
        built[pkg_format] = target
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="prod", help="Chalice stage (functions/api/.chalice/config.json)")
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=BUILD_DIR)
    parser.add_argument("--layer-zip", type=Path, default=None, help="use this layer zip instead of building one")
    parser.add_argument("--layer-no-deps", action="store_true", help="build the layer without dependencies (checks only)")
    args = parser.parse_args(argv)
    formats = FORMATS if args.format == "all" else (args.format,)
    built = package(args.out.resolve(), stage=args.stage, formats=formats,
                    layer_zip=args.layer_zip.resolve() if args.layer_zip else None, layer_deps=not args.layer_no_deps)
    for what, path in built.items():
        print(f"{what:>15}: {path}")
    print(f"Lambda runtime {LAMBDA_RUNTIME}; deploy with the commands in README.md, 'Deploy to AWS'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
