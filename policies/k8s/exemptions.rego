# Guardrail exemptions: the only deviations the guardrails accept, each tied to one
# workload by kind, namespace and name. The SPIRE agent and the SPIFFE CSI driver are node
# agents: the agent attests workloads through the host PID namespace and the kubelet's
# socket, the driver mounts the Workload API into pods with Bidirectional propagation,
# which needs privilege. No exemption covers resources, a writable root file system,
# seccomp or images. (The package's METADATA lives in guardrails.rego; OPA allows one.)
package k8s.guardrails

# METADATA
# title: Exempt workloads
# description: |
#   deviations: any of hostPID, hostPath, root (runAsUser 0 / runAsNonRoot false) and
#   runtimeClassName (may be omitted, so the pod runs under runc); privileged_containers:
#   the containers (in `containers`, not init or ephemeral ones) that may be privileged.
exemptions := [
	{
		"kind": "DaemonSet",
		"namespace": "sovereign-spire-node",
		"name": "spire-agent",
		"deviations": {"hostPID", "hostPath", "root", "runtimeClassName"},
		"privileged_containers": set(),
	},
	{
		"kind": "DaemonSet",
		"namespace": "sovereign-spire-node",
		"name": "spiffe-csi-driver",
		"deviations": {"hostPath", "root", "runtimeClassName"},
		"privileged_containers": {"spiffe-csi-driver"},
	},
]

# METADATA
# title: Privileged namespaces
# description: Namespaces that may enforce Pod Security `privileged` instead of `restricted`.
privileged_namespaces := {"sovereign-spire-node"}
