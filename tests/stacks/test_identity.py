"""Identity: Keycloak and its PostgreSQL, hardened, with the rendered realm and narrow traffic."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sovereign.render.keycloak import realm
from stacks import config
from stacks.components import base
from stacks.components.identity import Identity, IdentityArgs
from tests.stacks.harness import SECRETS, datacenter_config, synth

NS = config.IDENTITY_NAMESPACE
IMAGE = re.compile(r"registry\.dc1\.internal:5000/[a-z0-9._/-]+@sha256:[0-9a-f]{64}")
POSTGRES_IMAGE = "registry.dc1.internal:5000/library/postgres@sha256:"
KEYCLOAK_IMAGE = "registry.dc1.internal:5000/keycloak/keycloak@sha256:"


class Built:
    def __init__(self, flat: dict[str, str] | None = None) -> None:
        self.values: dict[str, Any] = {}

        def make(settings: config.StackSettings) -> None:
            self.settings = settings
            identity = Identity("identity", IdentityArgs(settings))
            self.values["issuer_host"] = identity.issuer_host
            identity.service_ip.apply(lambda ip: self.values.__setitem__("service_ip", ip))

        self.resources = synth(make, flat)
        self.manifests = [r.manifest() for r in self.resources if r.is_kubernetes]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [
            m for m in self.manifests if m["kind"] == kind and m["metadata"]["name"] == name
        ]
        return found

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]


@pytest.fixture(scope="module")
def built() -> Built:
    return Built()


def with_profile(**changes: Any) -> dict[str, str]:
    """The committed config with `changes` (dotted path -> value; None deletes) applied."""
    flat = datacenter_config()
    profile = json.loads(flat["sovereign:profile"])
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = profile
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    flat["sovereign:profile"] = json.dumps(profile)
    return flat


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_of(workload)["containers"]
    return container  # type: ignore[no-any-return]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container["volumeMounts"]}


def volumes_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in pod_of(workload)["volumes"]}


def secret_ref(name: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key}}


def test_component_type_token(built: Built) -> None:
    components = [r for r in built.resources if not r.custom]
    assert [(r.type, r.name) for r in components] == [("sovereign:identity:Identity", "identity")]


def test_inventory(built: Built) -> None:
    found = sorted((m["kind"], m["metadata"]["name"]) for m in built.manifests)
    assert found == sorted(
        [
            ("Secret", "keycloak-db"),
            ("Secret", "keycloak-admin"),
            ("StatefulSet", "keycloak-db"),
            ("Service", "keycloak-db"),
            ("Service", "keycloak-db-headless"),
            ("NetworkPolicy", "keycloak-db"),
            ("ConfigMap", "keycloak-realm"),
            ("Deployment", "keycloak"),
            ("Service", "keycloak"),
            ("PodDisruptionBudget", "keycloak"),
            ("Ingress", "keycloak"),
            ("NetworkPolicy", "keycloak"),
        ]
    )


def test_every_resource_is_named_labelled_and_in_the_identity_namespace(built: Built) -> None:
    for resource in built.resources:
        if not resource.is_kubernetes:
            continue
        meta = resource.manifest()["metadata"]
        assert meta["namespace"] == NS, resource.name
        assert resource.name == f"{NS}-{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "sovereign"
        assert meta["labels"]["app.kubernetes.io/component"] == "identity"
    keys = [(r.type, r.name) for r in built.resources]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    ("kind", "name", "uid"), [("StatefulSet", "keycloak-db", 999), ("Deployment", "keycloak", 1000)]
)
def test_pods_are_hardened(built: Built, kind: str, name: str, uid: int) -> None:
    workload = built.one(kind, name)
    pod = pod_of(workload)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["runtimeClassName"] == "kata"  # the committed profile's sandbox.runtime
    assert pod["priorityClassName"] == base.PRIORITY_CONTROL
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod
    assert "hostPID" not in pod
    assert "initContainers" not in pod
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == uid
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["privileged"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) >= {"cpu", "memory"}, bound
        assert IMAGE.fullmatch(container["image"]), container["image"]
    # The selector picks exactly this workload's pods.
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"] == base.selector(name)
    assert labels.items() >= base.selector(name).items()


def test_runtime_class_follows_the_profile() -> None:
    # A datacenter profile must sandbox (config validation refuses runc); GPU runtime aside.
    # The GPU operator's Kata class applies only with kata: cleared (None deletes it).
    gvisor = Built(
        with_profile(
            sandbox__runtime="gvisor",
            cluster__gpu_runtime="runc",
            cluster__gpu_runtime_class=None,
            cluster__gpu_resource="nvidia.com/gpu",
        )
    )
    for name, kind in (("keycloak", "Deployment"), ("keycloak-db", "StatefulSet")):
        assert pod_of(gvisor.one(kind, name))["runtimeClassName"] == "gvisor"


def test_secrets_carry_the_configured_passwords(built: Built) -> None:
    database = built.one("Secret", "keycloak-db")
    admin = built.one("Secret", "keycloak-admin")
    assert database["stringData"]["password"] == SECRETS["keycloakDatabasePassword"]
    assert admin["stringData"]["password"] == SECRETS["keycloakAdminPassword"]
    for secret in (database, admin):
        assert secret["type"] == "Opaque"
        assert "data" not in secret


def test_no_secret_is_in_plaintext_outside_the_secrets(built: Built) -> None:
    for manifest in built.manifests:
        if manifest["kind"] == "Secret":
            manifest = {k: v for k, v in manifest.items() if k != "stringData"}
        text = json.dumps(manifest)
        for value in SECRETS.values():
            assert value not in text, (manifest["kind"], manifest["metadata"]["name"])


def test_database_statefulset(built: Built) -> None:
    database = built.one("StatefulSet", "keycloak-db")
    assert database["spec"]["replicas"] == 1
    # The governing Service is headless (stable per-pod names); clients keep keycloak-db.
    governing = built.one("Service", database["spec"]["serviceName"])
    assert governing["metadata"]["name"] == "keycloak-db-headless"
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"] == base.selector("keycloak-db")
    assert [(p["name"], p["port"]) for p in governing["spec"]["ports"]] == [("postgres", 5432)]
    clients = built.one("Service", "keycloak-db")
    assert clients["spec"].get("clusterIP") != "None"
    assert clients["spec"]["selector"] == governing["spec"]["selector"]
    # One NetworkPolicy guards the pods behind both Services.
    policy = built.one("NetworkPolicy", "keycloak-db")["spec"]
    assert policy["podSelector"]["matchLabels"] == governing["spec"]["selector"]
    container = container_of(database)
    assert container["image"].startswith(POSTGRES_IMAGE)
    env = env_of(container)
    assert env["POSTGRES_PASSWORD"] == secret_ref("keycloak-db", "password")
    assert env["POSTGRES_USER"] == secret_ref("keycloak-db", "username")
    assert env["POSTGRES_DB"] == "keycloak"
    mounts = mounts_of(container)
    data_mount = next(m for m in mounts.values() if m["name"] == "data")
    # PGDATA is a directory inside the volume, never its root (lost+found).
    assert env["PGDATA"].startswith(data_mount["mountPath"] + "/")
    volumes = volumes_of(database)
    for path in ("/var/run/postgresql", "/tmp"):
        assert mounts[path]["readOnly"] is False
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    (claim,) = database["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "local-nvme",
        "resources": {"requests": {"storage": "20Gi"}},
    }
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[0] == "pg_isready"
    assert container["livenessProbe"]["exec"]["command"][0] == "pg_isready"
    assert container["ports"] == [{"name": "postgres", "containerPort": 5432}]


def test_database_storage_follows_the_profile() -> None:
    bigger = Built(
        with_profile(cluster__keycloak_database_storage="50Gi", cluster__storage_class="ceph-rbd")
    )
    (claim,) = bigger.one("StatefulSet", "keycloak-db")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "ceph-rbd"


def test_database_service(built: Built) -> None:
    service = built.one("Service", "keycloak-db")
    assert service["spec"]["ports"] == [
        {"name": "postgres", "port": 5432, "targetPort": "postgres"}
    ]
    assert service["spec"]["selector"] == base.selector("keycloak-db")
    assert service["spec"]["type"] == "ClusterIP"


def test_keycloak_deployment(built: Built) -> None:
    keycloak = built.one("Deployment", "keycloak")
    assert keycloak["spec"]["replicas"] == 2
    container = container_of(keycloak)
    assert container["image"].startswith(KEYCLOAK_IMAGE)
    assert container["args"] == ["start", "--optimized", "--import-realm"]
    assert "command" not in container
    env = env_of(container)
    assert env["KC_DB"] == "postgres"
    assert (
        env["KC_DB_URL"]
        == "jdbc:postgresql://keycloak-db.sovereign-identity.svc.cluster.local:5432/keycloak"
    )
    assert env["KC_DB_USERNAME"] == secret_ref("keycloak-db", "username")
    assert env["KC_DB_PASSWORD"] == secret_ref("keycloak-db", "password")
    assert env["KC_HOSTNAME"] == "https://auth.dc1.internal"
    assert env["KC_HTTPS_PORT"] == "8443"
    assert env["KC_HTTP_ENABLED"] == "false"
    assert env["KC_HEALTH_ENABLED"] == "true"
    assert env["KC_BOOTSTRAP_ADMIN_USERNAME"] == secret_ref("keycloak-admin", "username")
    assert env["KC_BOOTSTRAP_ADMIN_PASSWORD"] == secret_ref("keycloak-admin", "password")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "https": 8443,
        "management": 9000,
    }


def test_every_secret_reference_resolves(built: Built) -> None:
    secrets = {s["metadata"]["name"]: s["stringData"] for s in built.kinds("Secret")}
    for workload in (built.one("Deployment", "keycloak"), built.one("StatefulSet", "keycloak-db")):
        for item in container_of(workload)["env"]:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]], item["name"]


def test_keycloak_mounts(built: Built) -> None:
    keycloak = built.one("Deployment", "keycloak")
    container = container_of(keycloak)
    mounts = mounts_of(container)
    volumes = volumes_of(keycloak)
    env = env_of(container)

    realm_mount = mounts["/opt/keycloak/data/import"]
    assert realm_mount["readOnly"] is True
    assert volumes[realm_mount["name"]]["configMap"]["name"] == "keycloak-realm"

    tls_dir = env["KC_HTTPS_CERTIFICATE_FILE"].rsplit("/", 1)[0]
    assert env["KC_HTTPS_CERTIFICATE_FILE"] == f"{tls_dir}/tls.crt"
    assert env["KC_HTTPS_CERTIFICATE_KEY_FILE"] == f"{tls_dir}/tls.key"
    assert mounts[tls_dir]["readOnly"] is True
    assert volumes[mounts[tls_dir]["name"]]["secret"]["secretName"] == "keycloak-tls"

    # Keycloak 25+ writes data/transaction-logs and data/tmp: the whole data directory is
    # an emptyDir, with the realm import mounted read-only inside it.
    for path in ("/opt/keycloak/data", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    paths = [m["mountPath"] for m in container["volumeMounts"]]
    assert paths.index("/opt/keycloak/data") < paths.index("/opt/keycloak/data/import")
    for written in ("/opt/keycloak/data/transaction-logs", "/opt/keycloak/data/tmp"):
        under = [p for p in mounts if written.startswith(p.rstrip("/") + "/")]
        deepest = max(under, key=len)
        assert not mounts[deepest].get("readOnly"), written
        assert "emptyDir" in volumes[mounts[deepest]["name"]], written
    # Nothing else is writable on the read-only root.
    writable = {path for path, mount in mounts.items() if not mount.get("readOnly")}
    assert writable == {"/opt/keycloak/data", "/tmp"}


def test_keycloak_probes_use_https_on_the_management_port(built: Built) -> None:
    container = container_of(built.one("Deployment", "keycloak"))
    expected = {"readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get == {"path": path, "port": 9000, "scheme": "HTTPS"}, probe
    assert container["startupProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_realm_config_map_is_the_rendered_realm(built: Built) -> None:
    config_map = built.one("ConfigMap", "keycloak-realm")
    (document,) = config_map["data"].values()
    (key,) = config_map["data"]
    assert key.endswith(".json")
    assert "/" not in key
    assert json.loads(document) == realm(built.settings.profile)
    assert json.loads(document)["realm"] == "sovereign"


def test_keycloak_service(built: Built) -> None:
    service = built.one("Service", "keycloak")
    (port,) = service["spec"]["ports"]
    assert port == {"name": "https", "port": 443, "targetPort": "https"}
    container = container_of(built.one("Deployment", "keycloak"))
    target = {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]]
    assert target == 8443
    assert service["spec"]["selector"] == base.selector("keycloak")


def test_ingress(built: Built) -> None:
    ingress = built.one("Ingress", "keycloak")
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"
    }
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["auth.dc1.internal"], "secretName": "keycloak-tls"}]
    (rule,) = spec["rules"]
    assert rule["host"] == "auth.dc1.internal"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/"
    assert path["pathType"] == "Prefix"
    assert path["backend"] == {"service": {"name": "keycloak", "port": {"name": "https"}}}


def test_ingress_without_a_class_leaves_the_default() -> None:
    built = Built(with_profile(cluster__ingress__class_name=None))
    assert "ingressClassName" not in built.one("Ingress", "keycloak")["spec"]


def test_pdb(built: Built) -> None:
    pdb = built.one("PodDisruptionBudget", "keycloak")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == base.selector("keycloak")
    # One pod may go while the other serves.
    assert built.one("Deployment", "keycloak")["spec"]["replicas"] > pdb["spec"]["minAvailable"]


def peer(namespace: str, app: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    if app is not None:
        found["podSelector"] = {"matchLabels": base.selector(app)}
    return found


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def test_keycloak_network_policy(built: Built) -> None:
    policy = built.one("NetworkPolicy", "keycloak")["spec"]
    assert policy["podSelector"] == {"matchLabels": base.selector("keycloak")}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    replicas = [peer(NS, "keycloak")]
    assert policy["ingress"] == [
        {
            "from": [peer(config.GATEWAY_NAMESPACE, "sovereign-gateway"), peer("ingress-nginx")],
            "ports": tcp(8443),
        },
        # The replicas' Infinispan cluster, between themselves only.
        {"from": replicas, "ports": tcp(7800, 57800)},
    ]
    assert policy["egress"] == [
        DNS,
        {"to": [peer(NS, "keycloak-db")], "ports": tcp(5432)},
        {"to": replicas, "ports": tcp(7800, 57800)},
    ]


def test_ingress_controller_namespace_follows_the_profile() -> None:
    built = Built(with_profile(cluster__ingress__controller_namespace="traefik"))
    policy = built.one("NetworkPolicy", "keycloak")["spec"]
    assert peer("traefik") in policy["ingress"][0]["from"]
    assert peer("ingress-nginx") not in policy["ingress"][0]["from"]


def test_database_network_policy(built: Built) -> None:
    policy = built.one("NetworkPolicy", "keycloak-db")["spec"]
    assert policy == {
        "podSelector": {"matchLabels": base.selector("keycloak-db")},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [peer(NS, "keycloak")], "ports": tcp(5432)}],
    }


def test_outputs(built: Built) -> None:
    assert built.values["issuer_host"] == "auth.dc1.internal"
    service = next(r for r in built.resources if r.name == f"{NS}-keycloak" and "Service" in r.type)
    assert "clusterIP" not in service.inputs["spec"]
    assert re.fullmatch(r"10\.96\.0\.\d+", built.values["service_ip"])


def test_issuer_with_a_port_other_than_443_is_refused() -> None:
    """The gateway reaches Keycloak's Service, and people its Ingress, both on 443."""
    flat = with_profile(identity__issuer="https://auth.dc1.internal:8443/realms/sovereign")
    with pytest.raises(config.ConfigError, match=r"identity\.issuer: .*:8443/realms/sovereign"):
        Built(flat)


def test_issuer_with_port_443_named() -> None:
    built = Built(with_profile(identity__issuer="https://auth.dc1.internal:443/realms/sovereign"))
    env = env_of(container_of(built.one("Deployment", "keycloak")))
    # The profile's URL drops https' default port, so Keycloak's hostname (and the issuer
    # its tokens carry) is the same as without it.
    assert env["KC_HOSTNAME"] == "https://auth.dc1.internal"
    assert built.values["issuer_host"] == "auth.dc1.internal"
    ingress = built.one("Ingress", "keycloak")["spec"]
    assert ingress["rules"][0]["host"] == "auth.dc1.internal"
    assert ingress["tls"][0]["hosts"] == ["auth.dc1.internal"]


def test_issuer_under_a_path_prefix_is_refused() -> None:
    flat = with_profile(identity__issuer="https://auth.dc1.internal/auth/realms/sovereign")
    with pytest.raises(config.ConfigError, match=r"identity\.issuer: .*/auth/realms/sovereign"):
        Built(flat)
