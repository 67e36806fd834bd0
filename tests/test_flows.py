"""Prefect flows on a real Prefect server: the retrain flow end to end on the production
stack (a Prefect worker, real dvc with an S3 remote, Ray Train on two `ray start` nodes
reading from S3, an MLflow server and the Optuna study on PostgreSQL), its skip, retry and
bad-data behaviour, and the deployment definitions."""

import hashlib
import json
import os
import shutil

import boto3
import httpx
import pytest
import yaml
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import TaskRunSort
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_RETRY_EXTRA_CODES,
    temporary_settings,
)

from flows.retrain import retrain
from flows.tasks import BadData, StageFailed, dvc, exit_code, failure, retryable, stage_env
from tests.conftest import (
    RAY_GROUP,
    REPO,
    S3_ENV,
    MlflowServer,
    PrefectServer,
    clone_repo,
    free_port,
    run_cmd,
    tiny_pipeline,
)

# the first retrain (search with 2 Ray Train trials, then phase 2) takes minutes; only the
# tests of that retrain use the session's Ray cluster (RAY_GROUP), the rest run beside them
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def prefect_api(postgres, tmp_path_factory):
    """A real Prefect server process on PostgreSQL; this test process is one of its
    clients (flows called here report to it)."""
    server = PrefectServer(postgres.database("prefect"), tmp_path_factory.mktemp("prefect"))
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api,
                                         PREFECT_CLIENT_RETRY_EXTRA_CODES: {500}}):
            yield server
    finally:
        server.stop()


def _task_runs(flow_state) -> dict[str, list]:
    """{task run name: its runs}, of a flow run (or of the flow run of a final state)."""
    run_id = (flow_state.id if isinstance(flow_state, FlowRun)
              else flow_state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    return by_name


def _wait_for_run(run_id, done, timeout: float = 1400):
    """Poll the flow run until ``done(flow run)``; returns it."""
    import time

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if done(run) or run.state.is_final() or time.time() > deadline:
                return run
            time.sleep(3)


@pytest.fixture(scope="module")
def stack(postgres, s3, ray_cluster, tmp_path_factory):
    """The production stack on loopback, as `infra/compose.yaml` wires it: one S3 bucket
    `fusion` (moto) for the DVC remote, the training data, Ray checkpoints and MLflow
    artifacts; an MLflow server on PostgreSQL; the Optuna study in PostgreSQL; the
    two-node `ray start` cluster. ``env``: what a client of the stack sets (the service
    addresses of infra/params.production.yaml's comment)."""
    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket="fusion")
    home = tmp_path_factory.mktemp("mlflow")
    mlflow = MlflowServer(home / "server.db", artifacts="s3://fusion/mlflow",
                          env={"MLFLOW_S3_ENDPOINT_URL": s3.url},
                          backend=postgres.database("mlflow"))
    mlflow.start()
    env = {"MLFLOW_TRACKING_URI": mlflow.uri, "AWS_ENDPOINT_URL": s3.url,
           "OPTUNA_STORAGE": postgres.database("optuna"), "RAY_ADDRESS": ray_cluster.address}
    yield env
    mlflow.kill(15)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, prefect_api, postgres, stack, ray_cluster, tiny_run):
    """A fresh clone with a tiny config, retrained once on the production stack (`stack`)
    as a scheduled retrain is: a deployment on a process work pool with
    infra/params.production.yaml as its params file, started through Prefect's API and run
    by a Prefect worker whose environment names the services. Warm-started from a trained
    model (phase 1 passed through, phase 2 fine-tuned), searching first (2 trials, each a
    Ray Train run, then the best weights trained). Once phase 2 training has started,
    PostgreSQL (Prefect's, MLflow's and Optuna's database) restarts (down 5 s)."""
    import time

    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    repo = clone_repo(tmp_path_factory.mktemp("retrain"))
    tiny_pipeline(repo, "", init=str(tiny_run.train.phase_out(2)))
    production = yaml.safe_load((REPO / "infra/params.production.yaml").read_text())
    production["ray"].update(cpus_per_worker=1.0)  # two workers on the 2-CPU nodes
    (repo / "stack.yaml").write_text(yaml.safe_dump(production, sort_keys=False))
    run_cmd("dvc", "remote", "add", "-d", "-f", "stack", "s3://fusion/dvc", cwd=repo)
    run_cmd("dvc", "remote", "modify", "stack", "endpointurl", stack["AWS_ENDPOINT_URL"],
            cwd=repo)
    run_cmd("git", "add", "-A", cwd=repo)
    run_cmd("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone",
            cwd=repo)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name="fusion-process", type="process",
            base_job_template=ProcessWorker.get_default_base_job_template()), overwrite=True)
    retrain.from_source(str(repo), "flows/retrain.py:retrain").to_deployment(
        name="tiny", work_pool_name="fusion-process",
        parameters={"repo": str(repo), "params_file": "stack.yaml",
                    "search_first": True}).apply()
    prefect_api.worker("fusion-process", cwd=repo.parent, env=stack)
    run = run_deployment("fusion-retrain/tiny", timeout=0)
    run = _wait_for_run(run.id, lambda r: "dvc repro train_phase2" in _task_runs(r))
    assert not run.state.is_final(), run.state  # the outage hits a running flow
    postgres.stop()
    time.sleep(5)
    postgres.start()
    return repo, _wait_for_run(run.id, lambda r: False)


def _keys(stack: dict, prefix: str) -> list[str]:
    """Object keys under ``prefix`` in the stack's bucket."""
    client = boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="fusion", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@RAY_GROUP
def test_retrain_flow_end_to_end_produces_a_champion_and_a_report(retrained, stack):
    """Run by a worker, through a PostgreSQL restart: completed, with every stage once."""
    repo, run = retrained
    assert run.state.is_completed(), run.state.message
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["promoted"] and promotion["champion"] == "1"
    record = json.loads((repo / "reports/registered.json").read_text())
    assert record["version"] == "1" and record["tracking_uri"] == stack["MLFLOW_TRACKING_URI"]
    runs = _task_runs(run)
    for name in ("dvc pull --allow-missing", "dvc repro prepare", "dvc repro train_phase1",
                 "dvc repro train_phase2", "dvc repro evaluate", "dvc repro register",
                 "fusion promote --json reports/promotion.json", "dvc push"):
        assert [r.state.type.value for r in runs[name]] == ["COMPLETED"], name
    reply = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["fusion-retrain"]}}, "sort": "CREATED_DESC",
        "limit": 1, "offset": 0})  # (this Prefect's sync client sends nulls the API rejects)
    markdown = reply.raise_for_status().json()[0]["data"]
    assert "version 1 promoted to champion" in markdown
    assert "| tno | model |" in markdown and "| tno | mean |" in markdown
    assert f"runs:/{record['run_id']}/model_card/model_card.md" in markdown
    # dvc.lock is the record: the pipeline is up to date and its outputs were pushed
    env = {**os.environ, **stack}
    assert "Data and pipelines are up to date" in run_cmd("dvc", "repro", cwd=repo, env=env)
    assert "tno" in run_cmd("dvc", "metrics", "show", cwd=repo)
    run_cmd("dvc", "plots", "show", "-o", str(repo.parent / "plots"), cwd=repo)
    assert (repo.parent / "plots" / "index.html").exists()
    # the git tree: the run's record (dvc.lock, and params.yaml with the stack's params
    # and the search's best weights) is modified for the user to commit, nothing is
    # staged or left untracked
    assert sorted(run_cmd("git", "status", "--porcelain", cwd=repo).splitlines()) == [
        " M dvc.lock", " M params.yaml"]


@RAY_GROUP
def test_the_production_stack_holds_every_output(retrained, stack):
    """Every output is where the production stack keeps it: the champion in the
    PostgreSQL-backed registry with its artifacts in S3, the DVC cache, the training data
    and the Ray checkpoints in S3, the study in PostgreSQL; training ran on both Ray nodes
    (two DDP workers, SPREAD) from the S3 copy of the data."""
    import optuna
    from ray.util.state import list_actors, list_jobs, list_tasks

    repo, _ = retrained
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    record = json.loads((repo / "reports/registered.json").read_text())
    champion = client.get_model_version_by_alias(record["model_name"], "champion")
    assert champion.version == "1"
    artifacts = _keys(stack, "mlflow/")
    assert any(k.endswith("/MLmodel") for k in artifacts), artifacts[:20]
    assert any(k.endswith("model.safetensors") for k in artifacts), artifacts[:20]
    assert _keys(stack, "dvc/files/md5/")
    assert not (repo.parent / "fusion-dvc-store").exists()  # the S3 remote, not the local one
    shards = _keys(stack, "prepared/patches/")
    assert shards and all(k.split("/")[-1].startswith(("train-", "val-")) for k in shards)
    manifest = boto3.client("s3", endpoint_url=stack["AWS_ENDPOINT_URL"]).get_object(
        Bucket="fusion", Key="prepared/manifest.parquet")["Body"].read()
    tags = client.get_run(record["run_id"]).data.tags  # the dataset the model came from
    assert tags["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert any(k.endswith("/state.pt") for k in _keys(stack, "ray/"))
    best = json.loads((repo / "reports/search/best.json").read_text())
    study = optuna.load_study(study_name=best["study"], storage=stack["OPTUNA_STORAGE"])
    assert len(study.trials) == 2 and best["storage"].startswith("postgresql://")
    # the phase 2 run (its own Ray job, `fusion train --phase 2`): two DDP workers, one on
    # each node, fed from the S3 copy (its export records the source it read)
    (job,) = [j.job_id for j in list_jobs(detail=True)
              if "train --phase 2" in (j.entrypoint or "")]
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job)],
                          limit=1000, detail=True)
    assert len({w.node_id for w in workers}) == 2, workers
    # Ray Data's S3 reads of that job finished (where they ran is Ray Data's choice: the
    # blocks reach both workers through the object store)
    reads = [t for t in list_tasks(filters=[("job_id", "=", job)], limit=10000, detail=True)
             if t.name.startswith("ReadParquet")]
    assert reads and all(t.state == "FINISHED" for t in reads), reads
    config = json.loads((repo / "models/phase2/config.json").read_text())
    assert config["data"] == "s3://fusion/prepared", config


def _task_log(task_run) -> list[str]:
    reply = httpx.post(f"{PREFECT_API_URL.value()}/logs/filter", json={
        "logs": {"task_run_id": {"any_": [str(task_run.id)]}}, "sort": "TIMESTAMP_ASC",
        "limit": 200, "offset": 0})
    return [log["message"] for log in reply.raise_for_status().json()]


@RAY_GROUP
def test_training_log_shows_each_step_once_without_ray_noise(retrained):
    """The Ray Train stage's log as a person reads it: each step line once, no Ray Train
    per-report INFO line, no Ray Data execution lines, no colour codes (not a TTY)."""
    _, run = retrained
    (task_run,) = _task_runs(run)["dvc repro train_phase2"]
    lines = _task_log(task_run)
    steps = [line for line in lines if "phase 2 step " in line]
    assert len(steps) == 2 and len(set(steps)) == 2, lines  # 10 steps, logged every 5
    assert not [line for line in lines if "Reporting training result" in line
                or "Dataset train" in line or "\x1b[" in line], lines


@RAY_GROUP
def test_search_first_logs_trials_and_trains_the_best_weights(retrained, stack):
    repo, _ = retrained
    best = json.loads((repo / "reports/search/best.json").read_text())
    assert (best["trials_before"], best["trials_run"], best["trials"]) == (0, 2, 2)
    trained = json.loads((repo / "models/phase2/config.json").read_text())
    written = yaml.safe_load((repo / "params.yaml").read_text())["model"]["dae-fuse"]
    for key, value in best["best"].items():  # written where dvc repro reads it ...
        section, weight = key.split(".")
        assert written[section][weight] == pytest.approx(value)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    locked = lock["stages"]["train_phase2"]["params"]["params.yaml"]["model.dae-fuse.phase2"]
    assert best["best"] and all(key.startswith("phase2.") for key in best["best"])
    for key, value in best["best"].items():  # ... and what dvc repro trained with
        assert locked[key.removeprefix("phase2.")] == pytest.approx(value)
    assert trained["phase"] == 2
    client = MlflowClient(tracking_uri=stack["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fusion")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "attributes.run_name = 'search-tiny'")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all("score" in c.data.metrics for c in children)
    assert set(best["best"]) <= set(children[0].data.params)  # each trial logs its weights


@RAY_GROUP
def test_retrain_flow_skips_training_when_nothing_changed(retrained, stack, monkeypatch):
    """Second run, searching first again: the study resumes (its 2 trials are there, none
    is rerun), the best weights are unchanged, so training is skipped."""
    repo, _ = retrained
    for key, value in stack.items():  # this process is now the stack's client
        monkeypatch.setenv(key, value)
    state = retrain(repo=str(repo), search_first=True, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["skipped"] is True and result["status"]["champion"] == "1"
    best = json.loads((repo / "reports/search/best.json").read_text())
    assert (best["trials_before"], best["trials_run"], best["trials"]) == (2, 0, 2)
    runs = _task_runs(state)
    assert "dvc repro prepare" in runs
    assert not any(name.startswith(("dvc repro train", "fusion promote")) for name in runs)
    # a changed phase II weight would retrain from phase II on, not prepare or phase I
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["dae-fuse"]["phase2"]["w_text"] = 2.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = run_cmd("dvc", "repro", "--dry", cwd=repo)
    assert "Running stage 'train_phase2'" in dry
    assert "Running stage 'prepare'" not in dry and "Running stage 'train_phase1'" not in dry


def test_bad_data_fails_the_flow_with_its_reason_and_is_not_retried(tmp_path, prefect_api):
    """Fails at `prepare`, before any training: no Ray cluster is needed."""
    repo = clone_repo(tmp_path)
    params = tiny_pipeline(repo, "")
    params["data"]["strict"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for side in ("ir", "vi"):
        (repo / "data/sample/roadscene" / side / "broken_0001.png").write_bytes(b"not a png")
    state = retrain(repo=str(repo), return_state=True)
    assert state.is_failed()
    assert "broken_0001.png" in state.message and "exit 2" in state.message
    runs = _task_runs(state)
    (prepare,) = runs["dvc repro prepare"]
    assert prepare.state.type.value == "FAILED" and prepare.run_count == 1
    assert not (repo / "models/phase1").exists()


def test_transient_failure_is_retried(tmp_path, prefect_api, s3_server):
    """`dvc push` to an S3 endpoint that is down: the first attempt fails, the retry
    policy allows another, the endpoint comes up (moto on that port), the retry succeeds."""
    from moto.server import ThreadedMotoServer

    repo = clone_repo(tmp_path)
    run_cmd("dvc", "repro", "prepare", cwd=repo)
    port = free_port()
    run_cmd("dvc", "remote", "add", "flaky", "s3://flaky/store", cwd=repo)
    run_cmd("dvc", "remote", "modify", "flaky", "endpointurl", f"http://127.0.0.1:{port}",
            cwd=repo)
    verdicts, servers = [], []

    def retry_when_allowed(task, task_run, state):
        verdict = retryable(task, task_run, state)
        verdicts.append(verdict)
        if verdict and not servers:  # the outage ends
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[0].start()
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                         **{k.lower(): v for k, v in S3_ENV.items()
                            if k != "AWS_DEFAULT_REGION"}).create_bucket(Bucket="flaky")
        return verdict

    push = dvc.with_options(retry_delay_seconds=1, retry_condition_fn=retry_when_allowed)

    @flow
    def push_flow():
        return push(repo, ["push", "-r", "flaky"], stage_env())

    try:
        state = push_flow(return_state=True)
    finally:
        for server in servers:
            server.stop()
    assert state.is_completed(), state.message
    assert verdicts == [True]
    (run,) = _task_runs(state)["dvc push -r flaky"]
    assert run.run_count == 2


def test_failure_classification():
    out = ["ERROR: failed to reproduce 'prepare': failed to run: fusion prepare, exited with 2"]
    assert exit_code(out, 1) == 2 and exit_code(["boom"], 1) == 1
    assert isinstance(failure("dvc repro prepare", 1, out), BadData)
    lost = failure("dvc repro train_phase1", 1, ["RayActorError: node died", "exited with 1"])
    assert type(lost) is StageFailed
    assert type(failure("fusion status", 75, ["error: server unreachable"])) is StageFailed


def test_deployments_carry_the_cron_schedule():
    from flows.deploy import WEEKLY, deployments

    retrain_dep, search_dep = deployments(repo="/srv/fusion", cron="15 2 * * 0",
                                          timezone="Europe/Berlin")
    (schedule,) = retrain_dep.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 2 * * 0",
                                                                    "Europe/Berlin")
    assert retrain_dep.flow_name == "fusion-retrain" and retrain_dep.parameters["repo"] == \
        "/srv/fusion"
    assert search_dep.flow_name == "fusion-search" and not search_dep.schedules
    (weekly,) = deployments()[0].schedules
    assert weekly.schedule.cron == WEEKLY


def test_profiles_and_params_files_merge_into_params_yaml(tmp_path):
    from flows.retrain import apply_params
    from fusion.errors import FusionError
    from fusion.family import get_family
    from fusion.params import load_params

    repo = tmp_path
    shutil.copy2(REPO / "params.yaml", repo / "params.yaml")
    before = (repo / "params.yaml").read_text()
    (repo / "override.yaml").write_text("model: {dae-fuse: {phase2: {w_adv: 0.3}}}\n")
    apply_params(repo, "override.yaml", "quality,tiny,hour")
    params = load_params(repo / "params.yaml")
    hour = get_family("dae-fuse").profiles["hour"]["train"]["steps"]
    assert params.config.phase2.w_adv == 0.3 and params.train.steps == hour
    assert params.data.raw == ["../shared/data/roadscene"] and params.train.init == ""
    assert params.config.net.channels == 8  # the family's tiny profile
    assert "# lossless pixel-unshuffle" in (repo / "params.yaml").read_text()  # comments kept
    (repo / "params.yaml").write_text(before)
    (repo / "bad.yaml").write_text("model: {dae-fuse: {phase1: {sigma: 3.0}}}\n")
    with pytest.raises(FusionError, match="sigma"):
        apply_params(repo, "bad.yaml", "quality")
    assert (repo / "params.yaml").read_text() == before  # untouched on a bad override
    with pytest.raises(FusionError, match="profiles"):
        apply_params(repo, "params.yaml", "nope")


def test_the_retrain_report_links_the_model_card():
    """The flow's markdown names the card's MLflow URI and, for a tracking server, links
    the version's page in the MLflow UI (credentials in the URI left out)."""
    from flows.retrain import card_links

    record = {"run_id": "0123abcd", "model_name": "dae-fuse", "version": "3",
              "tracking_uri": "https://reader:dummy-token@mlflow.example:8443/prefix/"}
    line = card_links(record)
    assert "`runs:/0123abcd/model_card/model_card.md`" in line
    assert "(https://mlflow.example:8443/prefix/#/models/dae-fuse/versions/3)" in line
    assert "dummy-token" not in line and "reader" not in line
    local = card_links({**record, "tracking_uri": "sqlite:///mlflow.db"})
    assert local == "- model card: `runs:/0123abcd/model_card/model_card.md`"
