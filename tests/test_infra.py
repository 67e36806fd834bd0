"""infra/ checked against the code without a container engine (none runs here): every file
parses, every command names a real CLI stage, flag and params key, every service another one
names exists, and no credential is written down."""

from __future__ import annotations

import inspect
import re
import shlex
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from fusion.cli import build_parser
from fusion.params import load_params
from tests.conftest import PrefectServer

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_fusion_command(command: str | list[str]) -> None:
    """A `fusion ...` command line parses with the CLI's own parser, and its --set keys
    load with the repository's params."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[0] == "fusion", argv
    parser, _ = build_parser()
    args = parser.parse_args(argv[1:])
    load_params(REPO / "params.yaml", list(args.overrides))


def test_dockerfile_copies_what_exists_and_matches_the_project():
    text = (INFRA / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    base = re.search(r"^FROM python:(\d+\.\d+)", text, re.M)
    requires = re.search(r'requires-python = "([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert base and requires and base.group(1) in requires.group(1)
    assert "uv sync --frozen" in text  # the image uses the committed lock
    assert "RAY_ENABLE_UV_RUN_RUNTIME_ENV=0" in text


def test_compose_services_are_wired_to_each_other():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"minio", "postgres", "mlflow", "prefect-server", "prefect-worker", "ray-head",
            "ray-worker"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    # the worker is a client of every service; the others name only those they use
    env = services["prefect-worker"]["environment"]
    host = lambda url: re.match(r"\w+://([^:/]+)", url).group(1)  # noqa: E731
    for url in (env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env["AWS_ENDPOINT_URL"]):
        assert host(url) in services, url
    assert env["RAY_ADDRESS"].split(":")[0] in services
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "@postgres:5432/mlflow" in mlflow_cmd and "s3://" in mlflow_cmd
    assert "@postgres:5432/prefect" in services["prefect-server"]["environment"][
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    # the worker retries as the one of the loopback test (tests/test_flows.py) does
    worker_env = services["prefect-worker"]["environment"]
    client_env = PrefectServer("postgresql://x@h/prefect", REPO).client_env
    for key in ("PREFECT_CLIENT_RETRY_EXTRA_CODES", "PREFECT_CLIENT_MAX_RETRIES"):
        assert str(worker_env[key]) == client_env[key], key
    init = (INFRA / "postgres/init.sql").read_text()
    for db in ("mlflow", "prefect", "optuna"):
        assert f"CREATE DATABASE {db};" in init
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]


def test_no_credentials_in_infra():
    """Every secret is a ${VAR} listed (without a value) in .env.example."""
    text = (INFRA / "compose.yaml").read_text()
    variables = set(re.findall(r"\$\{(\w+)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text()
                   .splitlines() if line and not line.startswith("#"))
    assert variables == set(example) and not any(example.values())
    for path in INFRA.rglob("*"):
        if path.is_file():
            body = path.read_text()
            secret = r"(PASSWORD|SECRET[A-Z_]*)[ \t]*[:=][ \t]*[\"']?(?!\$)\w"
            assert not re.search(secret, body), path
            assert not re.search(r"://\w+:(?!\$\{)[^@/\s]+@", body), path


def test_kuberay_cluster_and_job():
    (cluster,) = _yaml_docs(INFRA / "k8s/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(g["replicas"] >= 2 for g in groups)
    lock = (REPO / "uv.lock").read_text()
    ray_version = re.search(r'name = "ray"\nversion = "([^"]+)"', lock).group(1)
    assert cluster["spec"]["rayVersion"] == ray_version  # the image's Ray, or workers refuse
    (job,) = _yaml_docs(INFRA / "k8s/rayjob-train.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    _check_fusion_command(job["spec"]["entrypoint"])
    assert "train.data=s3://" in job["spec"]["entrypoint"]
    # token authentication (Ray's default under `ray start`): the cluster's secret, and
    # the same token in the job's submitter, as compose.yaml shares RAY_AUTH_TOKEN
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in submitter["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": auth["secretName"], "key": "auth_token"}


def test_prefect_deployments_name_real_flows_and_parameters():
    config = yaml.safe_load((INFRA / "prefect/prefect.yaml").read_text())
    pools = set()
    for deployment in config["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file()
        flow = getattr(import_module(path[:-3].replace("/", ".")), func)
        accepted = inspect.signature(flow.fn).parameters
        assert set(deployment.get("parameters", {})) <= set(accepted), deployment["name"]
        params_file = deployment.get("parameters", {}).get("params_file")
        if params_file:
            overrides = yaml.safe_load((REPO / params_file).read_text())
            sets = [f"{section}.{key}={yaml.safe_dump(value).strip()}"
                    for section, values in overrides.items() for key, value in values.items()]
            load_params(REPO / "params.yaml", sets)
        pools.add(deployment["work_pool"]["name"])
    assert {"fusion-process", "fusion-k8s"} <= pools
    compose = (INFRA / "compose.yaml").read_text()
    assert "--pool fusion-process" in compose


def test_kubernetes_flow_pods_carry_the_ray_token_and_the_s3_secret():
    """The fusion-k8s pool's base job template: every placeholder is a declared variable,
    and the flow container takes the RayCluster's token secret and the S3 secret (its pods
    are Ray and S3 clients; a deployment's `env` cannot reference secrets)."""
    import json

    path = INFRA / "prefect/k8s-base-job-template.json"
    assert path.name in (INFRA / "prefect/prefect.yaml").read_text()
    template = json.loads(path.read_text())
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"]
    env = {e["name"]: e for e in container["env"]}
    (cluster,) = _yaml_docs(INFRA / "k8s/raycluster.yaml")
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    # S3 and MLflow clients, with the pipeline's own S3 user (the Ray pods have theirs)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    secrets = {ref["secretRef"]["name"] for ref in container["envFrom"]}
    assert secrets == {"fusion-s3-pipeline", "fusion-mlflow-pipeline"}
    assert {ref["secretRef"]["name"] for ref in head["envFrom"]} == {
        "fusion-s3-ray", "fusion-mlflow-pipeline"}


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix()
                                        for p in INFRA.rglob("*.yaml")))
def test_every_yaml_file_parses(path):
    assert _yaml_docs(INFRA / path)
