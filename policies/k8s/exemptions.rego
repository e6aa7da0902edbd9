# Guardrail exemptions: the only deviations the guardrails accept, each tied to one
# workload by kind, namespace and name. The SPIRE agent and the SPIFFE CSI driver are node
# agents: the agent attests workloads through the host PID namespace and serves the
# Workload API on a host socket directory, the driver mounts that socket into pods through
# the kubelet's plugin and pod directories with Bidirectional propagation, which needs
# privilege. No exemption covers resources, a writable root file system, seccomp, AppArmor,
# sysctls, procMount, host ports or images. (The package's METADATA lives in
# guardrails.rego; OPA allows one.)
package k8s.guardrails

# METADATA
# title: Exempt workloads
# description: |
#   deviations: any of hostPID, root (runAsUser 0 / runAsNonRoot false) and
#   runtimeClassName (may be omitted, so the pod runs under runc); host_paths: the hostPath
#   volumes allowed, path -> type, each matched exactly (so `/` or a parent directory is
#   still refused); privileged_containers: the containers (in `containers`, not init or
#   ephemeral ones) that may be privileged. The paths and types are those
#   stacks/components/workload_identity.py mounts.
exemptions := [
	{
		"kind": "DaemonSet",
		"namespace": "sovereign-spire-node",
		"name": "spire-agent",
		"deviations": {"hostPID", "root", "runtimeClassName"},
		"host_paths": {"/run/spire/agent-sockets": "DirectoryOrCreate"},
		"privileged_containers": set(),
	},
	{
		"kind": "DaemonSet",
		"namespace": "sovereign-spire-node",
		"name": "spiffe-csi-driver",
		"deviations": {"root", "runtimeClassName"},
		"host_paths": {
			"/run/spire/agent-sockets": "DirectoryOrCreate",
			"/var/lib/kubelet/plugins/csi.spiffe.io": "DirectoryOrCreate",
			"/var/lib/kubelet/plugins_registry": "Directory",
			"/var/lib/kubelet/pods": "Directory",
		},
		"privileged_containers": {"spiffe-csi-driver"},
	},
]

# METADATA
# title: Privileged namespaces
# description: The only namespaces that may enforce Pod Security `privileged`; every other Namespace must enforce `restricted`.
privileged_namespaces := {"sovereign-spire-node"}
