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
from build_layer import BUILD_DIR, LAMBDA_RUNTIME, LAYER_ZIP_NAME, ROOT, build_layer  # noqa: E402

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


def build_stream_zip(out_dir: Path) -> Path:
    path = out_dir / STREAM_ZIP_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, source in sorted(STREAM_FILES.items()):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            archive.writestr(info, source.read_bytes())
    return path


def chalice_package(out: Path, *, stage: str, pkg_format: str) -> Path:
    """Run `chalice package` on a copy of functions/api; return the output folder."""
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
    return out


def terraform_override(chalice_tf: dict) -> dict:
    """Give each of Chalice's functions the runtime, layer, VPC and environment of rtqcc.tf.json,
    keeping the variables Chalice's config.json sets (an override replaces a whole block)."""
    functions = {}
    for name, function in chalice_tf["resource"]["aws_lambda_function"].items():
        own = function.get("environment", {}).get("variables", {})
        literal = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(own.items()))
        functions[name] = {
            "runtime": "${local.lambda_runtime}",
            "layers": ["${aws_lambda_layer_version.rtqcc.arn}"],
            "environment": {"variables": "${merge(local.rtqcc_environment, {%s})}" % literal},
            "vpc_config": {"subnet_ids": "${var.subnet_ids}", "security_group_ids": "${var.security_group_ids}"},
        }
    return {"resource": {"aws_lambda_function": functions}}


def package(out_dir: Path = BUILD_DIR, *, stage: str = "prod", formats: tuple[str, ...] = FORMATS,
            layer_zip: Path | None = None, layer_deps: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if layer_zip is None:
        layer_zip = build_layer(out_dir, deps=layer_deps)
    stream_zip = build_stream_zip(out_dir)
    built = {"layer": layer_zip, "stream": stream_zip}
    for pkg_format in formats:
        target = chalice_package(out_dir / pkg_format, stage=stage, pkg_format=pkg_format)
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
