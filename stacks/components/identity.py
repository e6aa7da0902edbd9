"""Identity: Keycloak, the OIDC issuer whose tokens the gateway accepts, with its PostgreSQL.

The realm (roles, clients, users without passwords) is the one `sovereign render` writes,
imported at start from a ConfigMap. Keycloak terminates TLS itself with the issuer host's
certificate, so the ingress controller re-encrypts to it and the gateway can fetch the
JWKS over HTTPS inside the cluster. The database accepts Keycloak alone and talks to nobody.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import pulumi
import pulumi_kubernetes as k8s

from sovereign.render.keycloak import realm
from stacks import config
from stacks.components import base
from stacks.config import StackSettings

COMPONENT = "identity"
NAMESPACE = config.IDENTITY_NAMESPACE

KEYCLOAK = config.KEYCLOAK_SERVICE
KEYCLOAK_UID = 1000  # the user the Keycloak image is built for
HTTPS_PORT = base.KEYCLOAK_HTTPS_PORT
MANAGEMENT_PORT = 9000
SERVICE_PORT = 443
# Infinispan's JGroups transport and its failure detection: the replicas share
# authentication sessions over these, or a sign-in breaks when it lands on the other pod.
CLUSTER_PORTS = (7800, 57800)
REALM_CONFIG = "keycloak-realm"
# Keycloak writes below its data directory at run time: the transaction recovery log
# (data/transaction-logs, Keycloak 25+) and data/tmp. An emptyDir makes it writable on the
# read-only root; the realm import is a read-only mount nested inside it.
KEYCLOAK_DATA_DIR = "/opt/keycloak/data"
REALM_DIR = f"{KEYCLOAK_DATA_DIR}/import"
TLS_DIR = "/etc/keycloak/tls"
ADMIN_CREDENTIALS = "keycloak-admin"
ADMIN_USER = "admin"

DATABASE = "keycloak-db"
# The StatefulSet's governing Service must be headless (stable per-pod DNS); clients keep
# the ClusterIP Service DATABASE. Both select the same pods, so one NetworkPolicy covers both.
DATABASE_HEADLESS = f"{DATABASE}-headless"
DATABASE_UID = 999  # `postgres` in the official image
DATABASE_PORT = 5432
DATABASE_NAME = "keycloak"
DATABASE_USER = "keycloak"
DATABASE_CREDENTIALS = "keycloak-db"
DATA_DIR = "/var/lib/postgresql/data"


def issuer_origin(settings: StackSettings) -> tuple[str, str]:
    """The issuer's `scheme://host[:port]` (Keycloak's hostname) and its bare host name."""
    issuer = str(settings.profile.identity.issuer)
    parts = urlsplit(issuer)
    realm_path = f"/realms/{settings.profile.identity.realm}"
    # Keycloak serves realms at the root; a prefix would need a relative path and an
    # ingress rewrite this stack does not set up, and tokens would name another issuer.
    if not parts.hostname or parts.path.rstrip("/") != realm_path:
        raise config.ConfigError(
            f"{config.NAMESPACE}:{config.PROFILE_KEY}.identity.issuer: {issuer} is not "
            f"https://HOST{realm_path}, which the cluster's Keycloak serves"
        )
    return f"{parts.scheme}://{parts.netloc}", parts.hostname


def secret_env(name: str, secret: str, key: str) -> k8s.core.v1.EnvVarArgs:
    return k8s.core.v1.EnvVarArgs(
        name=name,
        value_from=k8s.core.v1.EnvVarSourceArgs(
            secret_key_ref=k8s.core.v1.SecretKeySelectorArgs(name=secret, key=key)
        ),
    )


def env(name: str, value: str) -> k8s.core.v1.EnvVarArgs:
    return k8s.core.v1.EnvVarArgs(name=name, value=value)


@dataclass(frozen=True)
class IdentityArgs:
    settings: StackSettings


class Identity(pulumi.ComponentResource):
    service_ip: pulumi.Output[str]
    issuer_host: str

    def __init__(
        self, name: str, args: IdentityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:identity:Identity", name, None, opts)
        settings = args.settings
        origin, self.issuer_host = issuer_origin(settings)

        k8s.core.v1.Secret(
            f"{NAMESPACE}-{DATABASE_CREDENTIALS}",
            metadata=base.metadata(DATABASE_CREDENTIALS, NAMESPACE, COMPONENT, DATABASE),
            type="Opaque",
            string_data={
                "username": DATABASE_USER,
                "password": settings.secrets["keycloakDatabasePassword"],
            },
            opts=base.child(self),
        )
        k8s.core.v1.Secret(
            f"{NAMESPACE}-{ADMIN_CREDENTIALS}",
            metadata=base.metadata(ADMIN_CREDENTIALS, NAMESPACE, COMPONENT, KEYCLOAK),
            type="Opaque",
            string_data={
                "username": ADMIN_USER,
                "password": settings.secrets["keycloakAdminPassword"],
            },
            opts=base.child(self),
        )
        self._database(settings)
        self._keycloak(settings, origin)

        # Port 443 reaches the container port named https (8443).
        service = base.service(
            KEYCLOAK, NAMESPACE, COMPONENT, [("https", SERVICE_PORT)], self, app=KEYCLOAK
        )
        self.service_ip = service.spec.cluster_ip
        self.register_outputs({"service_ip": self.service_ip, "issuer_host": self.issuer_host})

    def _database(self, settings: StackSettings) -> None:
        cluster = settings.cluster
        container = base.container(
            "postgres",
            settings.image("postgres"),
            base.Resources(cpu="250m", memory="512Mi", cpu_limit="1", memory_limit="1Gi"),
            ports=[("postgres", DATABASE_PORT)],
            env=[
                env("POSTGRES_DB", DATABASE_NAME),
                secret_env("POSTGRES_USER", DATABASE_CREDENTIALS, "username"),
                secret_env("POSTGRES_PASSWORD", DATABASE_CREDENTIALS, "password"),
                # A subdirectory: the volume's root may hold lost+found, which initdb refuses.
                env("PGDATA", f"{DATA_DIR}/pgdata"),
            ],
            mounts=[
                base.volume_mount("data", DATA_DIR),
                base.volume_mount("run", "/var/run/postgresql"),
                base.volume_mount("tmp", "/tmp"),  # noqa: S108 (an emptyDir)
            ],
            readiness=_pg_isready(period=5),
            liveness=_pg_isready(period=15, failures=6),
            run_as_user=DATABASE_UID,
        )
        k8s.apps.v1.StatefulSet(
            f"{NAMESPACE}-{DATABASE}",
            metadata=base.metadata(DATABASE, NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.StatefulSetSpecArgs(
                replicas=1,
                service_name=DATABASE_HEADLESS,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(DATABASE)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, DATABASE)),
                    spec=base.pod_spec(
                        [container],
                        runtime_class=settings.runtime_class(),
                        priority_class=base.PRIORITY_CONTROL,
                        run_as_user=DATABASE_UID,
                        volumes=[base.empty_dir("run", "16Mi"), base.empty_dir("tmp", "256Mi")],
                        # A clean shutdown checkpoints; a killed one replays WAL at start.
                        termination_grace_seconds=60,
                    ),
                ),
                volume_claim_templates=[
                    k8s.core.v1.PersistentVolumeClaimArgs(
                        metadata=k8s.meta.v1.ObjectMetaArgs(
                            name="data", labels=base.labels(COMPONENT, DATABASE)
                        ),
                        spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                            access_modes=["ReadWriteOnce"],
                            storage_class_name=cluster.storage_class,
                            resources=k8s.core.v1.VolumeResourceRequirementsArgs(
                                requests={"storage": cluster.keycloak_database_storage}
                            ),
                        ),
                    )
                ],
            ),
            opts=base.child(self, protect=settings.protect),
        )
        base.service(DATABASE, NAMESPACE, COMPONENT, [("postgres", DATABASE_PORT)], self)
        base.service(
            DATABASE_HEADLESS,
            NAMESPACE,
            COMPONENT,
            [("postgres", DATABASE_PORT)],
            self,
            app=DATABASE,
            headless=True,
        )
        base.allow(
            DATABASE,
            NAMESPACE,
            DATABASE,
            COMPONENT,
            self,
            ingress=[
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[base.pod_peer(NAMESPACE, KEYCLOAK)], ports=base.tcp(DATABASE_PORT)
                )
            ],
        )

    def _keycloak(self, settings: StackSettings, origin: str) -> None:
        cluster = settings.cluster
        document = json.dumps(realm(settings.profile), indent=2, sort_keys=True) + "\n"
        k8s.core.v1.ConfigMap(
            f"{NAMESPACE}-{REALM_CONFIG}",
            metadata=base.metadata(REALM_CONFIG, NAMESPACE, COMPONENT, KEYCLOAK),
            data={f"{settings.profile.identity.realm}-realm.json": document},
            opts=base.child(self),
        )
        database_host = f"{DATABASE}.{NAMESPACE}.svc.cluster.local"
        container = base.container(
            KEYCLOAK,
            settings.image("keycloak"),
            base.Resources(cpu="500m", memory="1536Mi", cpu_limit="2", memory_limit="1536Mi"),
            # The image is built with the postgres driver and health checks (`kc.sh build`),
            # so it starts without rebuilding, which a read-only root could not do anyway.
            args=["start", "--optimized", "--import-realm"],
            ports=[("https", HTTPS_PORT), ("management", MANAGEMENT_PORT)],
            env=[
                env("KC_DB", "postgres"),
                env(
                    "KC_DB_URL",
                    f"jdbc:postgresql://{database_host}:{DATABASE_PORT}/{DATABASE_NAME}",
                ),
                secret_env("KC_DB_USERNAME", DATABASE_CREDENTIALS, "username"),
                secret_env("KC_DB_PASSWORD", DATABASE_CREDENTIALS, "password"),
                env("KC_HOSTNAME", origin),
                env("KC_HTTPS_CERTIFICATE_FILE", f"{TLS_DIR}/tls.crt"),
                env("KC_HTTPS_CERTIFICATE_KEY_FILE", f"{TLS_DIR}/tls.key"),
                env("KC_HTTPS_PORT", str(HTTPS_PORT)),
                env("KC_HTTP_ENABLED", "false"),
                env("KC_HEALTH_ENABLED", "true"),
                secret_env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_CREDENTIALS, "username"),
                secret_env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_CREDENTIALS, "password"),
            ],
            mounts=[
                # The parent before the nested realm mount inside it.
                base.volume_mount("data", KEYCLOAK_DATA_DIR),
                base.volume_mount("realm", REALM_DIR, read_only=True),
                base.volume_mount("tls", TLS_DIR, read_only=True),
                base.volume_mount("tmp", "/tmp"),  # noqa: S108 (an emptyDir)
            ],
            # The management interface inherits Keycloak's TLS, so the kubelet speaks HTTPS.
            # The realm import and the schema migration run before /health/started.
            startup=base.http_probe(
                "/health/started", MANAGEMENT_PORT, period=5, failures=60, scheme="HTTPS"
            ),
            readiness=base.http_probe("/health/ready", MANAGEMENT_PORT, scheme="HTTPS"),
            liveness=base.http_probe("/health/live", MANAGEMENT_PORT, failures=6, scheme="HTTPS"),
            run_as_user=KEYCLOAK_UID,
        )
        k8s.apps.v1.Deployment(
            f"{NAMESPACE}-{KEYCLOAK}",
            metadata=base.metadata(KEYCLOAK, NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=2,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(KEYCLOAK)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, KEYCLOAK)),
                    spec=base.pod_spec(
                        [container],
                        runtime_class=settings.runtime_class(),
                        priority_class=base.PRIORITY_CONTROL,
                        run_as_user=KEYCLOAK_UID,
                        volumes=[
                            base.config_map_volume("realm", REALM_CONFIG),
                            base.secret_volume("tls", cluster.ingress.identity_tls_secret),
                            base.empty_dir("data", "512Mi"),
                            base.empty_dir("tmp", "256Mi"),
                        ],
                    ),
                ),
            ),
            opts=base.child(self),
        )
        base.pdb(KEYCLOAK, NAMESPACE, COMPONENT, self, min_available=1)
        base.ingress(
            KEYCLOAK,
            NAMESPACE,
            COMPONENT,
            self,
            host=self.issuer_host,
            tls_secret=cluster.ingress.identity_tls_secret,
            class_name=cluster.ingress.class_name,
            port_name="https",
            # Keycloak serves TLS only; the controller re-encrypts to it.
            annotations={"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},
        )
        peers = [base.pod_peer(NAMESPACE, KEYCLOAK)]
        base.allow(
            KEYCLOAK,
            NAMESPACE,
            KEYCLOAK,
            COMPONENT,
            self,
            ingress=[
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[
                        base.pod_peer(config.GATEWAY_NAMESPACE, base.GATEWAY_APP),
                        base.namespace_peer(cluster.ingress.controller_namespace),
                    ],
                    ports=base.tcp(HTTPS_PORT),
                ),
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=peers, ports=base.tcp(*CLUSTER_PORTS)
                ),
            ],
            egress=[
                base.dns_egress(),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=[base.pod_peer(NAMESPACE, DATABASE)], ports=base.tcp(DATABASE_PORT)
                ),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=peers, ports=base.tcp(*CLUSTER_PORTS)
                ),
            ],
        )


def _pg_isready(*, period: int, failures: int = 3) -> k8s.core.v1.ProbeArgs:
    return k8s.core.v1.ProbeArgs(
        exec_=k8s.core.v1.ExecActionArgs(
            command=["pg_isready", "-h", "127.0.0.1", "-U", DATABASE_USER, "-d", DATABASE_NAME]
        ),
        period_seconds=period,
        failure_threshold=failures,
        timeout_seconds=5,
    )
