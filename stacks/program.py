"""The whole datacenter stack, component by component, in dependency order."""

from __future__ import annotations

from pathlib import Path

import pulumi

from stacks import config
from stacks.components.gateway import Gateway, GatewayArgs
from stacks.components.identity import Identity, IdentityArgs
from stacks.components.memory import Memory, MemoryArgs
from stacks.components.platform import Platform, PlatformArgs
from stacks.components.policy import Policy, PolicyArgs
from stacks.components.runtime import Runtime, RuntimeArgs
from stacks.components.workload_identity import WorkloadIdentity, WorkloadIdentityArgs


def deploy(settings: config.StackSettings) -> None:
    platform = Platform("platform", PlatformArgs(settings))
    after = pulumi.ResourceOptions(depends_on=[platform])
    identity = Identity("identity", IdentityArgs(settings), after)
    policy = Policy("policy", PolicyArgs(settings), after)
    workload_identity = WorkloadIdentity("workload-identity", WorkloadIdentityArgs(settings), after)
    memory = Memory("memory", MemoryArgs(settings), after)
    runtime = Runtime("runtime", RuntimeArgs(settings), after)
    gateway = Gateway(
        "gateway",
        GatewayArgs(settings, keycloak_ip=identity.service_ip),
        pulumi.ResourceOptions(
            depends_on=[platform, identity, policy, workload_identity, memory, runtime]
        ),
    )
    pulumi.export("gateway_url", gateway.url)
    pulumi.export("issuer", str(settings.profile.identity.issuer))
    pulumi.export("models", runtime.service_urls)


def main(project_dir: Path) -> None:
    try:
        settings = config.load(pulumi.Config(config.NAMESPACE), pulumi.get_stack(), project_dir)
    except config.ConfigError as error:
        # RunError prints its message alone: a user error, not a program crash.
        raise pulumi.RunError(str(error)) from None
    deploy(settings)
