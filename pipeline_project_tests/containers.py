"""The scale-out deployment in real containers (podman's Docker API), for the container test.

Everything runs from the project's own image
(deploy/Dockerfile built on a Debian bookworm base made offline with mmdebstrap): PostgreSQL from
the pgserver wheel, moto's S3 server, the code server, the daemon (which launches every run as
its own container through the DockerRunLauncher) and the webserver. No volume is shared: the
only mount is the podman socket in the daemon's container. The init job's command is
deploy/compose.yaml's, the instance file deploy/dagster.yaml (with shorter polls).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline_project_tests.helpers import terminate

REPO = Path(__file__).resolve().parents[1]
LABEL = "pipeline-test"  # on every container and network the test makes: teardown by label
BASE_IMAGE = "localhost/pipeline-base:bookworm"
IMAGE = "localhost/pipeline-project:test"
# The rootfs of the base image, kept between runs (podman's storage may be wiped, this is not).
ROOTFS_CACHE = Path(os.environ.get("PIPELINE_ROOTFS_CACHE", "/var/cache/pipeline-ci"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# podman's settings for the test (CONTAINERS_CONF; the machine's /etc/containers is left alone):
# runc, since crun refuses this kind of host's hybrid cgroups; limits the sandbox allows (podman's
# defaults are higher than it lets a container raise); netavark with aardvark-dns, so that
# containers on a network find each other by name. The API service applies them to every
# container it creates, the run containers too.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]

[network]
network_backend = "netavark"

[engine]
runtime = "runc"
"""
PG_USER, PG_PASSWORD = "pipeline", "pg-Secret-7f3a9c-never-logged"
# The catalog's own user, not a superuser (compose's init creates it).
LAKE_USER, LAKE_PASSWORD = "pipeline_lake", "lake-Secret-52e1-never-logged"
S3_KEY_ID, S3_SECRET = "AKIAPIPELINETEST", "s3-Secret-41d9-never-logged"
BUCKETS = ("landing", "lake", "dagster-logs")
PG_BIN = "/opt/venv/lib/python3.11/site-packages/pgserver/pginstall/bin"
DAGSTER_HOME = "/opt/dagster/dagster_home"

# PostgreSQL from the pgserver wheel, on the container's network with password authentication
# (pgserver itself only ever listens on a unix socket): initdb with a scram-sha-256 password
# read from a file that is deleted at once, pg_hba open to every address by password only.
POSTGRES_SCRIPT = f"""
set -e
export PGDATA=/home/pipeline/pgdata
umask 077
printf '%s' "$POSTGRES_PASSWORD" > /tmp/pwfile
{PG_BIN}/initdb --auth=scram-sha-256 --pwfile=/tmp/pwfile -U "$POSTGRES_USER" -E UTF8 >/dev/null
rm -f /tmp/pwfile
echo 'host all all 0.0.0.0/0 scram-sha-256' >> "$PGDATA/pg_hba.conf"
exec {PG_BIN}/postgres -h '*' -p 5432 -k /tmp -c max_connections=300 -c fsync=off
"""


# Run inside a container of the image: every row of the validation stage's tables as JSON in
# /tmp/tables.json (sorted, without the times rows were written).
TABLES_SCRIPT = """
import json, os
from pipeline_project.definitions import build_resources
from pipeline_project.settings import Settings
from pipeline_project.tables import BATCH_TABLES_BY_STAGE

TIME_COLUMNS = {"ingested_at", "detected_at", "created_at", "trained_at", "replayed_at",
                "arrived_at", "validated_at", "published_at", "loaded_at", "applied_at"}
settings = Settings.from_env()
warehouse = build_resources(settings)["warehouse"]
if warehouse.is_lakehouse:  # the secrets Dagster would resolve for a step
    warehouse = warehouse.model_copy(update={
        "ducklake_password": os.environ["PIPELINE_DUCKLAKE_PASSWORD"],
        "s3_access_key_id": os.environ["PIPELINE_S3_ACCESS_KEY_ID"],
        "s3_secret_access_key": os.environ["PIPELINE_S3_SECRET_ACCESS_KEY"],
    })
found = {}
with warehouse.get_connection() as conn:
    for table in ["raw_customers", *BATCH_TABLES_BY_STAGE["validation"]]:
        described = conn.execute(f"DESCRIBE {table}").fetchall()
        columns = [c for c, *_ in described if c not in TIME_COLUMNS]
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL").fetchall()
        found[table] = [[round(v, 9) if isinstance(v, float) else v for v in row] for row in rows]
with open("/tmp/tables.json", "w") as out:
    json.dump(found, out, default=str, sort_keys=True)
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def timed(label: str, timings: dict[str, float]):
    @contextmanager
    def _timer():
        start = time.monotonic()
        yield
        timings[label] = round(time.monotonic() - start, 1)

    return _timer()


# ---------------------------------------------------------------- images ------------------------


def base_image() -> str:
    """Debian bookworm with python3, venv and the CA certificates, from Debian's packages only:
    mmdebstrap's rootfs tarball (cached under ROOTFS_CACHE), imported into podman."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return BASE_IMAGE
    tarball = ROOTFS_CACHE / "bookworm-python3.tar"
    if not tarball.exists():
        ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        run(["nice", "mmdebstrap", "--variant=minbase",
             "--include=python3,python3-venv,ca-certificates", "bookworm", str(partial),
             "deb http://deb.debian.org/debian bookworm main",
             "deb http://deb.debian.org/debian bookworm-updates main",
             "deb http://deb.debian.org/debian-security bookworm-security main"],
            stdout=subprocess.DEVNULL)  # fmt: skip
        partial.rename(tarball)
    run(["podman", "import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE],
        stdout=subprocess.DEVNULL)  # fmt: skip
    return BASE_IMAGE


def project_image(log: Path) -> str:
    """deploy/Dockerfile on the base image, with the test's servers (extra `services`). Cached
    by podman's layers: a code change rebuilds only the code layer (seconds)."""
    cmd = ["nice", "podman", "build", "--from", base_image(), "-f", "deploy/Dockerfile",
           "--build-arg", "EXTRAS=scale-out,services", "-t", IMAGE, "."]  # fmt: skip
    if HOST_CA.exists():  # pip behind the host's TLS-inspecting proxy; never stored in the image
        cmd[3:3] = ["--secret", f"id=build_ca,src={HOST_CA}"]
    with log.open("w") as out:
        run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return IMAGE


# ---------------------------------------------------------------- the podman service ------------


@contextmanager
def podman_service(root: Path) -> Iterator[str]:
    """`podman system service` on a socket of its own (the Docker API, v1.41); stopped after."""
    sock = root / "podman.sock"
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=(root / "podman-service.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no podman service"
            time.sleep(0.1)
        yield f"unix://{sock}"
    finally:
        terminate(proc)


# ---------------------------------------------------------------- the deployment -----------------


def env_example() -> dict[str, str]:
    text = (REPO / "deploy" / ".env.example").read_text()
    return dict(re.findall(r"^(PIPELINE_[A-Z0-9_]+)=(.*)$", text, re.M))


def instance_yaml(network: str, poll_seconds: int = 5) -> str:
    """deploy/dagster.yaml as the test runs it: no volume, compute logs on S3, short polls."""
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    monitoring = config["run_monitoring"]
    monitoring["poll_interval_seconds"] = poll_seconds
    monitoring["free_slots_after_run_end_seconds"] = poll_seconds
    monitoring["start_timeout_seconds"] = 120
    launcher = config["run_launcher"]["config"]
    launcher["network"] = network
    launcher["container_kwargs"] = {"labels": {LABEL: "run"}}
    return yaml.safe_dump(config, sort_keys=False)


def tar_of(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o644, 1000, 1000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Deployment:
    client: object  # docker.DockerClient on the podman service
    socket: str
    network: str
    env: dict[str, str]
    instance_yaml: str
    containers: dict[str, object] = field(default_factory=dict)

    def ip(self, name: str) -> str:
        container = self.containers[name]
        container.reload()
        return container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def start(self, name: str, command, *, alias: str | None = None, user: str | None = None,
              volumes: dict | None = None, env: dict | None = None):  # fmt: skip
        """A container of the image on the network, reachable by `alias` (default: name), with
        the test's dagster.yaml as $DAGSTER_HOME/dagster.yaml (copied in before it starts: no
        volume)."""
        container = self.client.containers.create(
            IMAGE,
            command=command,
            name=f"{self.network}-{name}",
            hostname=alias or name,
            environment=env if env is not None else compose_environment(name, self.env),
            labels={LABEL: self.network},
            user=user,
            volumes=volumes or {},
            network=self.network,
            networking_config={
                self.network: self.client.api.create_endpoint_config(aliases=[alias or name])
            },
            detach=True,
        )
        container.put_archive(DAGSTER_HOME, tar_of({"dagster.yaml": self.instance_yaml}))
        self.containers[name] = container
        container.start()
        return container

    def logs(self, name: str) -> str:
        return self.containers[name].logs().decode(errors="replace")

    def wait_exit(self, name: str, timeout: float = 300) -> int:
        return self.containers[name].wait(timeout=timeout)["StatusCode"]


def remove_everything(client) -> None:
    """Every container (run containers too) and network the test made, also after a crash."""
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        with suppress(Exception):
            container.remove(force=True)
    for network in client.networks.list(filters={"label": LABEL}):
        with suppress(Exception):
            network.remove()


def wait_for(what: str, check, timeout: float = 120, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        with suppress(Exception):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


@contextmanager
def deployment(socket: str, timings: dict[str, float]) -> Iterator[Deployment]:
    import docker

    client = docker.DockerClient(base_url=socket, timeout=120)
    remove_everything(client)
    network = f"pipeline-{uuid.uuid4().hex[:6]}"
    client.networks.create(network, driver="bridge", labels={LABEL: network})
    env = {
        **{name: "" for name in env_example()},
        "PIPELINE_DAGSTER_PG_HOST": "postgres",
        "PIPELINE_DAGSTER_PG_PORT": "5432",
        "PIPELINE_DAGSTER_PG_USER": PG_USER,
        "PIPELINE_DAGSTER_PG_PASSWORD": PG_PASSWORD,
        "PIPELINE_DAGSTER_PG_DB": "pipeline_dagster",
        "PIPELINE_WAREHOUSE_BACKEND": "ducklake",
        "PIPELINE_DUCKLAKE_CATALOG": f"host=postgres port=5432 user={LAKE_USER}"
        " dbname=pipeline_lake",
        "PIPELINE_DUCKLAKE_PASSWORD": LAKE_PASSWORD,
        # Nothing shared but PostgreSQL and object storage.
        "PIPELINE_DUCKLAKE_DATA_PATH": "s3://lake/data",
        "PIPELINE_DUCKDB_PATH": "/tmp/warehouse/warehouse.duckdb",
        "PIPELINE_WRITER_POOL_LIMIT": "4",
        "PIPELINE_INFERENCE_POOL_LIMIT": "4",
        "PIPELINE_LANDING_DIR": "/tmp/landing",
        "PIPELINE_LANDING_S3_PREFIX": "s3://landing/in/",
        "PIPELINE_S3_ENDPOINT": "http://s3:5000",
        "PIPELINE_S3_REGION": "us-east-1",
        "PIPELINE_S3_ACCESS_KEY_ID": S3_KEY_ID,
        "PIPELINE_S3_SECRET_ACCESS_KEY": S3_SECRET,
        "PIPELINE_CATALOG_PATH": "s3://landing/catalog.csv",
        "PIPELINE_ALERTS_DUCKDB_PATH": "/tmp/alerts/alerts.duckdb",
        "PIPELINE_EMBEDDING_BACKEND": "hashing",
        "PIPELINE_EMBEDDING_DIMENSIONS": "32",
        "PIPELINE_COMPUTE_LOGS_BUCKET": "dagster-logs",
    }
    dep = Deployment(client, socket, network, env, instance_yaml(network))
    try:
        with timed("servers (postgres, s3) up", timings):
            dep.start("postgres", ["sh", "-c", POSTGRES_SCRIPT],
                      env={"POSTGRES_USER": PG_USER, "POSTGRES_PASSWORD": PG_PASSWORD})  # fmt: skip
            dep.start("s3", ["moto_server", "-H", "0.0.0.0", "-p", "5000"], env={})
            pg_ip, s3_ip = dep.ip("postgres"), dep.ip("s3")
            import psycopg2

            wait_for("PostgreSQL", lambda: psycopg2.connect(
                host=pg_ip, port=5432, user=PG_USER, password=PG_PASSWORD, dbname="postgres",
                connect_timeout=2).close() or True)  # fmt: skip
            wait_for("moto", lambda: urllib.request.urlopen(f"http://{s3_ip}:5000", timeout=2))
            s3 = dep.s3_client = s3_client(f"http://{s3_ip}:5000")
            for bucket in BUCKETS:
                s3.create_bucket(Bucket=bucket)
        with timed("init (databases, pools)", timings):
            dep.start("init", init_command())
            code = dep.wait_exit("init")
            assert code == 0, dep.logs("init")
        with timed("code server, daemon, webserver up", timings):
            dep.start("code-server", ["dagster", "code-server", "start", "-h", "0.0.0.0",
                      "-p", "4000", "-m", "pipeline_project.definitions", "--location-name",
                      "pipeline_project", "--container-image", IMAGE])  # fmt: skip
            wait_for("the code server", lambda: dep.containers["code-server"].exec_run(
                ["dagster", "api", "grpc-health-check", "-p", "4000"]).exit_code == 0,
                timeout=180, interval=2)  # fmt: skip
            sock_path = socket.removeprefix("unix://")
            # The one mount of the test: the daemon's launcher reaches podman's Docker API.
            socket_mount = {sock_path: {"bind": "/var/run/docker.sock", "mode": "rw"}}
            dep.start("daemon", ["dagster-daemon", "run", "-w", "/deploy/workspace.yaml"],
                      user="root", volumes=socket_mount)  # fmt: skip
            dep.start("webserver", ["dagster-webserver", "-w", "/deploy/workspace.yaml",
                      "-h", "0.0.0.0", "-p", "3000"])  # fmt: skip
            web = f"http://{dep.ip('webserver')}:3000"
            dep.web = web
            wait_for("the webserver", lambda: urllib.request.urlopen(f"{web}/server_info",
                     timeout=2), timeout=180, interval=1)  # fmt: skip
        yield dep
    finally:
        if os.environ.get("PIPELINE_TEST_KEEP_CONTAINERS") != "1":
            remove_everything(client)
        client.close()


def tables_of(container) -> dict:
    """The JSON the tables script left in the container (a long line would be split in logs)."""
    stream, _ = container.get_archive("/tmp/tables.json")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        return json.load(tar.extractfile("tables.json"))


def lake_tables(dep: Deployment) -> dict:
    """The lake's tables, read from the code server's container."""
    done = dep.containers["code-server"].exec_run(["python", "-c", TABLES_SCRIPT])
    assert done.exit_code == 0, done.output.decode()[-3000:]
    return tables_of(dep.containers["code-server"])


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET, region_name="us-east-1")  # fmt: skip


_REFERENCE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def compose_environment(service: str, values: dict[str, str]) -> dict[str, str]:
    """The environment compose.yaml gives `service`, its ${NAME} references filled from
    `values` (as Compose fills them from deploy/.env): each service gets only its secrets."""
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    environment = compose["services"][service]["environment"]
    return {key: _REFERENCE.sub(lambda m: values.get(m.group(1), ""), str(value))
            for key, value in environment.items()}  # fmt: skip


def init_command() -> list[str]:
    """compose.yaml's init command as the container's shell receives it ($$ is Compose's $)."""
    command = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]["init"]
    return [part.replace("$$", "$") for part in command["command"]]


def graphql(web: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{web}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


def stop_sensor(web: str, name: str) -> None:
    """Stop a sensor through the webserver's GraphQL API (the CLI takes 15 s to load)."""
    found = graphql(web, """query ($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
        __typename ... on Sensor { id } ... on PythonError { message } } }""",
        {"s": {"repositoryLocationName": "pipeline_project", "repositoryName": "__repository__",
               "sensorName": name}})["sensorOrError"]  # fmt: skip
    assert found["__typename"] == "Sensor", found
    stopped = graphql(web, """mutation ($id: String) { stopSensor(id: $id) { __typename
        ... on StopSensorMutationResult { instigationState { status } }
        ... on PythonError { message } } }""", {"id": found["id"]})["stopSensor"]  # fmt: skip
    assert stopped.get("instigationState", {}).get("status") == "STOPPED", stopped
