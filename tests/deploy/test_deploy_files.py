"""The deployment files, checked by the tools that understand them.

hadolint lints the Dockerfile, the Compose specification's schema checks the Compose files,
kubernetes-validate the core Kubernetes manifests, the Prometheus Operator's CRD schemas (the part
vendored in schemas/) the ServiceMonitor and the PrometheusRule, and systemd-analyze the unit. On
top, the files are checked against each other (names, ports, paths, keys) and against the exporter
(its configuration parser, its health endpoints), since nothing here builds an image, starts a
container or applies a manifest: there may be no container engine or cluster where tests run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import yaml
from packaging.requirements import Requirement

from exporter import __version__
from exporter.config import parse_config, parse_duration
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILES = (DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.account.yml")
KUBE = DEPLOY / "kubernetes"
KUSTOMIZATIONS = (KUBE, KUBE / "shards")
RENDER_SCRIPT = KUBE / "render_prometheusrule.py"
PROMETHEUSRULE = KUBE / "prometheusrule.yaml"
UNIT = DEPLOY / "systemd" / "signalwire-exporter.service"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# The monitoring configuration is written alongside the deployment files, by its own hand; the
# Compose file mounts it. When one is missing, the tests that need it say which, and why.
MONITORING_FILES = (
    "deploy/prometheus/prometheus.yml",
    "deploy/prometheus/signalwire.rules.yml",
    "deploy/prometheus/signalwire.alerts.yml",
    "deploy/alertmanager/alertmanager.yml",
    "grafana/dashboards/signalwire-exporter.json",
    "grafana/provisioning/datasources/prometheus.yml",
    "grafana/provisioning/dashboards/signalwire.yml",
)
RULE_FILES = (ROOT / MONITORING_FILES[1], ROOT / MONITORING_FILES[2])
CUSTOM_GROUPS = ("monitoring.coreos.com/", "kustomize.config.k8s.io/")
UID = 10001
STATE_DIR = "/var/lib/signalwire-exporter"
CONFIG_FILE = "/etc/signalwire-exporter/config.yaml"


# --- helpers ------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A test tool: the virtual environment's (next to this Python) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed (looked next to {sys.executable} and on PATH): run "
            "`make test`, which installs the test tools"
        )
    return found


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def shown(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    return f"$ {shlex.join(result.args)}\n(exit {result.returncode})\n{output}"


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def monitoring_file(relative: str) -> Path:
    """One of the monitoring configuration files; a clear failure while it does not exist yet."""
    path = ROOT / relative
    if not path.is_file():
        pytest.fail(
            f"{relative} does not exist. It belongs to the monitoring configuration (Prometheus "
            "rules, Alertmanager, Grafana) written alongside the deployment files; "
            "deploy/docker-compose.yml mounts it."
        )
    return path


def rule_files_exist() -> bool:
    return all(path.is_file() for path in RULE_FILES)


def load_render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_prometheusrule", RENDER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kube_documents(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(directory.glob("*.yaml")):
        for doc in documents(path):
            yield path, doc


def by_kind(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in kube_documents(directory) if doc.get("kind") == kind]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    result = run([tool("hadolint"), "--no-color", "--failure-threshold", "style", rel(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), shown(result)


def test_dockerfile_builds_a_non_root_image_with_state_volume_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    args = dict(value.split("=", 1) for kw, value in instructions if kw == "ARG")
    stages = [value for kw, value in instructions if kw == "FROM"]
    assert len(stages) >= 2, "multi-stage: a builder, then the runtime"
    runtime = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    last = {kw: value for kw, value in runtime}
    base = stages[-1].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
    assert base.startswith("python:3.11-slim"), base
    assert any(kw == "COPY" and "--from=builder" in value for kw, value in runtime)
    assert last["USER"] == f"{UID}:{UID}", "a fixed, numeric non-root user (runAsNonRoot checks it)"
    assert last["WORKDIR"] == STATE_DIR
    assert json.loads(last["VOLUME"]) == [STATE_DIR]
    assert last["EXPOSE"] == "9797"
    assert json.loads(last["ENTRYPOINT"]) == ["signalwire-exporter"]
    assert json.loads(last["CMD"]) == ["--config.file", CONFIG_FILE]
    assert "/-/healthy" in last["HEALTHCHECK"]
    assert args["VERSION"] == __version__, "deploy/Dockerfile: ARG VERSION is the package version"
    assert 'org.opencontainers.image.version="${VERSION}"' in last["LABEL"]


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves `path` out, by the rules of .dockerignore: the last
    matching pattern wins, `!` re-includes, and a pattern matching a directory covers its files.
    """
    excluded = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


KEPT_OUT = (
    ".venv/bin/python",
    ".git/HEAD",
    ".pytest_cache/README.md",
    ".mypy_cache/3.11/exporter",
    ".ruff_cache/CACHEDIR.TAG",
    ".hypothesis/examples",
    "tests/unit/test_cli.py",
    "exporter/__pycache__/cli.cpython-311.pyc",
    "signalwire-exporter.db",
)


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    for path in KEPT_OUT:
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"
    copied = [
        source
        for keyword, value in dockerfile_instructions()
        if keyword == "COPY" and "--from=" not in value
        for source in value.split()[:-1]
    ]
    assert copied, "no COPY from the build context found"
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py")
        for path in (rel(f) for f in files if "__pycache__" not in f.parts):
            assert not dockerignore_excludes(path), f".dockerignore leaves out {path}, copied"


def test_healthcheck_and_probes_answer_on_a_running_exporter(tmp_path: Path) -> None:
    """The HEALTHCHECK command (standard library only) and the Deployments' probe paths, against
    the real exporter (the demo, on a free loopback port instead of 9797)."""
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"], command
    port = free_port()
    probe = [sys.executable, "-c", command[2].replace(":9797/", f":{port}/")]
    assert probe[2] != command[2], "the HEALTHCHECK does not ask port 9797"
    paths = {
        container[probe_kind]["httpGet"]["path"]
        for directory in KUSTOMIZATIONS
        for deployment in by_kind(directory, "Deployment")
        for container in deployment["spec"]["template"]["spec"]["containers"]
        for probe_kind in ("livenessProbe", "readinessProbe")
    }
    assert paths == {"/-/healthy", "/-/ready"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--web.listen-address", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for(lambda: run(probe, timeout=10).returncode == 0, 30, "the HEALTHCHECK to pass")
        for path in sorted(paths):
            url = f"http://127.0.0.1:{port}{path}"
            wait_for(lambda u=url: requests.get(u, timeout=2).status_code == 200, 30, f"200 {url}")
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=30)
    assert run(probe, timeout=10).returncode != 0, "the HEALTHCHECK passes with no exporter"


# --- Compose ------------------------------------------------------------------------------------


def compose(path: Path = COMPOSE_FILES[0]) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def bind_mounts() -> list[tuple[str, str, str, str]]:
    """(compose file, service, host path relative to deploy/, container path) of bind mounts."""
    mounts = []
    for path in COMPOSE_FILES:
        for service, spec in compose(path)["services"].items():
            for volume in spec.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith((".", "/")):
                    mounts.append((path.name, service, source, target))
    return mounts


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", rel(path)])
    assert result.returncode == 0, shown(result)


def test_compose_runs_the_demo_with_prometheus_alertmanager_and_grafana() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"signalwire-exporter", "prometheus", "alertmanager", "grafana"}
    exporter = services["signalwire-exporter"]
    build = exporter["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert exporter["command"] == ["demo", "--web.listen-address", "0.0.0.0:9797"]
    assert exporter["image"] == f"signalwire-exporter:{__version__}"
    state = [v for v in exporter["volumes"] if v.endswith(f":{STATE_DIR}")]
    assert state and state[0].split(":")[0] in data["volumes"], "a named volume for the state"
    account = compose(COMPOSE_FILES[1])["services"]["signalwire-exporter"]
    assert account["command"] == ["--config.file", CONFIG_FILE]
    assert set(account["environment"]) == {
        "SIGNALWIRE_SPACE",
        "SIGNALWIRE_PROJECT_ID",
        "SIGNALWIRE_API_TOKEN",
    }
    assert f"../config.yaml:{CONFIG_FILE}:ro" in account["volumes"]


@pytest.mark.parametrize(
    "compose_file,service,source,target",
    [pytest.param(*mount, id=f"{mount[1]}:{mount[2]}") for mount in bind_mounts()],
)
def test_compose_mounts_exist_in_the_repository(
    compose_file: str, service: str, source: str, target: str
) -> None:
    host = (DEPLOY / source).resolve()
    missing = [f for f in MONITORING_FILES if (ROOT / f).resolve().is_relative_to(host)]
    for relative in missing:
        monitoring_file(relative)
    assert host.exists(), f"{compose_file}: service {service} mounts {source}, which does not exist"
    assert host.is_relative_to(ROOT), f"{compose_file}: {source} is outside the repository"


def test_compose_wiring_matches_the_monitoring_configuration() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load(monitoring_file(MONITORING_FILES[0]).read_text(encoding="utf-8"))
    mounted = {target: source for _, _, source, target in bind_mounts()}
    prometheus_dir = DEPLOY / mounted["/etc/prometheus"]
    for rule_file in prometheus["rule_files"]:
        assert (prometheus_dir / rule_file).is_file(), f"prometheus.yml: rule file {rule_file}"
    targets = [
        target
        for job in prometheus["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ] + [
        target
        for manager in prometheus["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    assert "signalwire-exporter:9797" in targets
    for target in targets:
        assert target.split(":")[0] in services, f"prometheus.yml: {target} is no Compose service"
    datasources = yaml.safe_load(monitoring_file(MONITORING_FILES[5]).read_text(encoding="utf-8"))
    for source in datasources["datasources"]:
        host = re.sub(r"^https?://", "", source["url"]).split(":")[0]
        assert host in services, f"Grafana datasource {source['url']}: no such Compose service"
    providers = yaml.safe_load(monitoring_file(MONITORING_FILES[6]).read_text(encoding="utf-8"))
    for provider in providers["providers"]:
        path = provider["options"]["path"]
        assert path in mounted, f"Grafana reads dashboards from {path}: not mounted by Compose"
    monitoring_file(MONITORING_FILES[4])
    monitoring_file(MONITORING_FILES[3])


# --- Kubernetes ---------------------------------------------------------------------------------


def core_manifests() -> list[Path]:
    """Manifest files whose every document is a core Kubernetes resource."""
    paths = []
    for directory in KUSTOMIZATIONS:
        for path in sorted(directory.glob("*.yaml")):
            versions = {doc.get("apiVersion", "") for doc in documents(path)}
            custom = {v for v in versions if v.startswith(CUSTOM_GROUPS)}
            assert not custom or custom == versions, f"{rel(path)} mixes core and custom resources"
            if not custom:
                paths.append(path)
    return paths


def test_core_manifests_pass_kubernetes_validate() -> None:
    paths = core_manifests()
    result = run([tool("kubernetes-validate"), "--strict", *map(rel, paths)])
    assert result.returncode == 0, shown(result)
    passed = [line for line in result.stdout.splitlines() if " passed for resource " in line]
    expected = sum(len(documents(path)) for path in paths)
    assert len(passed) == expected, f"{expected} documents, {len(passed)} validated:\n" + shown(
        result
    )


def schema_errors(instance: Any, schema_name: str) -> list[str]:
    try:
        from jsonschema import Draft202012Validator
    except ImportError:
        pytest.fail("jsonschema is not installed (it comes with check-jsonschema): run `make test`")
    schema = json.loads((SCHEMAS / schema_name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


def test_servicemonitor_matches_the_operator_schema_and_the_prometheus_job() -> None:
    [monitor] = documents(KUBE / "servicemonitor.yaml")
    assert schema_errors(monitor, "servicemonitor.schema.json") == []
    spec = monitor["spec"]
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] == "metrics"
        assert parse_duration(endpoint["scrapeTimeout"]) <= parse_duration(endpoint["interval"])
    wanted = spec["selector"]["matchLabels"].items()
    services = [s for d in KUSTOMIZATIONS for s in by_kind(d, "Service")]
    assert len(services) >= 3, "the single instance and the shards"
    for service in services:
        assert wanted <= service["metadata"]["labels"].items(), service["metadata"]["name"]
    # The alerts select up{job="signalwire"}: the same job name as in prometheus.yml.
    relabelings = [r for endpoint in spec["endpoints"] for r in endpoint["relabelings"]]
    [job] = [r["replacement"] for r in relabelings if r["targetLabel"] == "job"]
    prometheus = yaml.safe_load(monitoring_file(MONITORING_FILES[0]).read_text(encoding="utf-8"))
    jobs = [
        c["job_name"]
        for c in prometheus["scrape_configs"]
        if any("signalwire-exporter:9797" in s["targets"] for s in c.get("static_configs", []))
    ]
    assert jobs == [job], f"prometheus.yml scrapes the exporter as {jobs}, Kubernetes as {job!r}"


def test_operator_schemas_reject_mistakes() -> None:
    """The vendored schemas catch what the API server would silently prune or reject."""
    [monitor] = documents(KUBE / "servicemonitor.yaml")
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "30s"
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    errors = schema_errors(monitor, "servicemonitor.schema.json")
    assert len(errors) == 2 and "scrapeInterval" in " ".join(errors), errors
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"name": "g", "rules": [{"record": "a:b", "for": "5m"}]}]},
    }
    assert len(schema_errors(rule, "prometheusrule.schema.json")) == 2  # no expr; `for` on a record


@pytest.fixture()
def rules_required() -> None:
    if not rule_files_exist():
        pytest.skip(
            "deploy/prometheus/signalwire.rules.yml and signalwire.alerts.yml do not exist yet: "
            "the PrometheusRule is built from them by deploy/kubernetes/render_prometheusrule.py"
        )


@pytest.mark.usefixtures("rules_required")
def test_prometheusrule_is_generated_from_the_current_rule_files() -> None:
    fix = "run: python deploy/kubernetes/render_prometheusrule.py"
    assert PROMETHEUSRULE.is_file(), f"{rel(PROMETHEUSRULE)} does not exist: {fix}"
    expected = load_render_script().render()
    assert PROMETHEUSRULE.read_text(encoding="utf-8") == expected, f"out of date: {fix}"


@pytest.mark.usefixtures("rules_required")
def test_prometheusrule_matches_the_operator_schema() -> None:
    [rule] = documents(PROMETHEUSRULE)
    assert schema_errors(rule, "prometheusrule.schema.json") == []
    names = [group["name"] for group in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), f"group names must be unique (the CRD's key): {names}"
    sources = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == sources, "out of date: run render_prometheusrule.py"


def render_command(rules_dir: Path, output: Path) -> list[str]:
    return [sys.executable, str(RENDER_SCRIPT), f"--rules-dir={rules_dir}", f"--output={output}"]


def test_render_script_fails_clearly_without_rule_files(tmp_path: Path) -> None:
    output = tmp_path / "prometheusrule.yaml"
    result = run(render_command(tmp_path, output))
    assert result.returncode == 1, shown(result)
    assert "signalwire.rules.yml does not exist" in result.stderr, shown(result)
    assert not output.exists()


def test_render_script_wraps_the_groups_unchanged(tmp_path: Path) -> None:
    recording = {"name": "rec", "rules": [{"record": "a:b:sum", "expr": "sum(b)"}]}
    alerting = {
        "name": "alerts",
        "rules": [
            {
                "alert": "A",
                "expr": "a:b:sum\n  > 1",
                "for": "5m",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "{{ $labels.project }}: 'quoted' \"text\""},
            }
        ],
    }
    (tmp_path / "signalwire.rules.yml").write_text(yaml.safe_dump({"groups": [recording]}))
    (tmp_path / "signalwire.alerts.yml").write_text(yaml.safe_dump({"groups": [alerting]}))
    output = tmp_path / "prometheusrule.yaml"
    args = render_command(tmp_path, output)
    assert run(args).returncode == 0
    [rule] = documents(output)
    assert rule["spec"]["groups"] == [recording, alerting]
    assert schema_errors(rule, "prometheusrule.schema.json") == []
    assert "expr: |-\n" in output.read_text(), "multi-line PromQL stays a readable block"
    result = run([*args, "--check"])
    assert result.returncode == 0, shown(result)
    output.write_text(output.read_text() + "# edited\n")
    result = run([*args, "--check"])
    assert result.returncode == 1 and "out of date" in result.stderr, shown(result)
    (tmp_path / "signalwire.alerts.yml").write_text(yaml.safe_dump({"groups": [recording]}))
    result = run(args)
    assert result.returncode == 1, shown(result)
    assert "group name 'rec' is also used" in result.stderr, shown(result)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: rel(d))
def test_kustomization_lists_every_manifest_but_the_placeholder_secret(directory: Path) -> None:
    [kustomization] = documents(directory / "kustomization.yaml")
    resources = kustomization["resources"]
    files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    if directory == KUBE and not PROMETHEUSRULE.exists() and not rule_files_exist():
        files.add(PROMETHEUSRULE.name)  # generated once the rule files exist
    assert sorted(resources) == sorted(files)
    assert "secret.yaml" not in resources, "apply -k would overwrite the real Secret"
    assert (directory / "secret.yaml").is_file(), "a placeholder Secret, showing the keys"
    images = {image["name"]: image for image in kustomization["images"]}
    used = {
        container["image"]
        for deployment in by_kind(directory, "Deployment")
        for container in deployment["spec"]["template"]["spec"]["containers"]
    }
    assert used == {f"signalwire-exporter:{__version__}"}
    assert images["signalwire-exporter"]["newTag"] == __version__


def mounts_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> the volume mounted there, for the pod's single container."""
    [container] = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


@pytest.mark.parametrize(
    "directory,name",
    [
        pytest.param(d, name, id=name)
        for d in KUSTOMIZATIONS
        for name in (dep["metadata"]["name"] for dep in by_kind(d, "Deployment"))
    ],
)
def test_deployment_is_wired_to_its_config_state_and_secret(
    directory: Path, name: str, tmp_path: Path
) -> None:
    [deployment] = [d for d in by_kind(directory, "Deployment") if d["metadata"]["name"] == name]
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "one instance per state file"
    assert spec["strategy"] == {"type": "Recreate"}, "the old pod releases the state first"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == UID and security["fsGroup"] == UID
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["ports"] == [{"name": "metrics", "containerPort": 9797, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"

    mounts = mounts_of(pod)
    config_arg = container["args"][container["args"].index("--config.file") + 1]
    config_volume = mounts[str(Path(config_arg).parent)]
    [config_map] = [
        c
        for c in by_kind(directory, "ConfigMap")
        if c["metadata"]["name"] == config_volume["configMap"]["name"]
    ]
    [secret] = by_kind(directory, "Secret")
    secret_data = secret["stringData"]
    environ = {}
    for variable in container["env"]:
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], variable
        assert ref["key"] in secret_data, f"{variable['name']}: no key {ref['key']} in the Secret"
        environ[variable["name"]] = secret_data[ref["key"]]

    claims = {c["metadata"]["name"] for c in by_kind(directory, "PersistentVolumeClaim")}
    assert mounts[STATE_DIR]["persistentVolumeClaim"]["claimName"] in claims
    assert "emptyDir" in mounts["/tmp"], "a writable /tmp, the root filesystem being read-only"

    # The configuration the pod would load, through the exporter's own parser: every ${VAR} set,
    # the state on the volume, each token file a key of the mounted Secret.
    text = config_map["data"][Path(config_arg).name]
    data = yaml.safe_load(text)
    assert Path(data["state_path"]).parent == Path(STATE_DIR)
    for project in data["projects"]:
        token = Path(project["api_token_file"])
        volume = mounts[str(token.parent)]["secret"]
        assert volume["secretName"] == secret["metadata"]["name"]
        assert token.name in {item["path"] for item in volume["items"]}
        [key] = [item["key"] for item in volume["items"] if item["path"] == token.name]
        assert key in secret_data
        local = tmp_path / token.name
        local.write_text(secret_data[key])
        project["api_token_file"] = str(local)
    source = f"{rel(directory)}: ConfigMap {config_map['metadata']['name']}"
    config = parse_config(data, source, environ)
    assert [p.name for p in config.projects] == [p["name"] for p in data["projects"]]

    [service] = [s for s in by_kind(directory, "Service") if s["metadata"]["name"] == name]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9797, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_shards_split_the_projects_and_each_has_its_own_state() -> None:
    shards = by_kind(KUBE / "shards", "Deployment")
    assert len(shards) >= 2
    claims, config_maps, projects = [], [], []
    for deployment in shards:
        mounts = mounts_of(deployment["spec"]["template"]["spec"])
        claims.append(mounts[STATE_DIR]["persistentVolumeClaim"]["claimName"])
        config_maps.append(mounts["/etc/signalwire-exporter"]["configMap"]["name"])
    for config_map in by_kind(KUBE / "shards", "ConfigMap"):
        config = yaml.safe_load(config_map["data"]["config.yaml"])
        projects += [p["name"] for p in config["projects"]]
    assert len(set(claims)) == len(shards), f"each shard its own state volume: {claims}"
    assert len(set(config_maps)) == len(shards), config_maps
    assert len(set(projects)) == len(projects), f"each project in exactly one shard: {projects}"


# --- systemd ------------------------------------------------------------------------------------


def unit_settings() -> list[tuple[str, str]]:
    settings = []
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


@pytest.fixture()
def checkable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stub: systemd-analyze verify insists that the binary
    exists and is executable, and /opt/signalwire-exporter is not installed where tests run."""
    binary = "/opt/signalwire-exporter/bin/signalwire-exporter"
    stub = tmp_path / "bin" / "signalwire-exporter"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text(encoding="utf-8")
    assert f"\nExecStart={binary} " in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"\nExecStart={binary} ", f"\nExecStart={stub} "))
    return unit


def test_systemd_unit_passes_systemd_analyze_verify(checkable_unit: Path) -> None:
    result = run([tool("systemd-analyze"), "verify", "--recursive-errors=no", str(checkable_unit)])
    # Unknown or misspelt settings are only warnings (exit 0): any output counts as a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), shown(result)


def test_systemd_unit_is_hardened(checkable_unit: Path) -> None:
    # --threshold is in tenths: the check fails above an exposure of 2.0 ("OK" is below 4.0).
    analyze = [tool("systemd-analyze"), "security", "--offline=true", "--threshold=20"]
    result = run([*analyze, "--no-pager", str(checkable_unit)])
    if "--offline" in result.stderr and result.returncode != 0 and "Overall" not in result.stdout:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr.strip()}")
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert score, shown(result)
    assert result.returncode == 0 and float(score.group(1)) <= 2.0, shown(result)


def test_systemd_unit_runs_the_exporter_as_a_dynamic_user_with_its_state_directory() -> None:
    settings = dict(unit_settings())
    assert settings["ExecStart"] == (
        f"/opt/signalwire-exporter/bin/signalwire-exporter --config.file {CONFIG_FILE}"
    )
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "signalwire-exporter"
    assert settings["WorkingDirectory"] == STATE_DIR, "state_path is relative to it"
    assert settings["EnvironmentFile"] == "-/etc/signalwire-exporter/env"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2", "a configuration error: no restart loop"
    assert settings["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert settings["CapabilityBoundingSet"] == ""
    env_example = DEPLOY / "systemd" / "signalwire-exporter.env.example"
    names = {line.split("=")[0] for line in env_example.read_text().splitlines() if "=" in line}
    assert {"SIGNALWIRE_SPACE", "SIGNALWIRE_PROJECT_ID", "SIGNALWIRE_API_TOKEN"} <= names


# --- lock file -----------------------------------------------------------------------------------

LOCK = DEPLOY / "requirements.lock"


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) of deploy/requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = LOCK.read_text(encoding="utf-8")
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            name = match.group(1).lower().replace("_", "-")
            pins[name] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_the_lock_pins_every_dependency_within_its_range_with_hashes() -> None:
    pins = _locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in {LOCK.name}: regenerate it (see deploy/Dockerfile)"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (name, version)
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no hash"


def test_the_image_installs_from_the_lock_with_hashes_checked() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--require-hashes" in text and "requirements.lock" in text
    assert "pip install --no-deps ." in text, "the exporter itself adds no unlocked dependency"
