package k8s.guardrails_test

import data.k8s.guardrails

registry := "registry.test:5000"

image := concat("", [registry, "/sovereign/app@sha256:", digest])

digest := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

resources := {"cpu": "100m", "memory": "64Mi"}

container(name) := {
	"name": name,
	"image": image,
	"resources": {"requests": resources, "limits": resources},
	"securityContext": {
		"runAsNonRoot": true,
		"runAsUser": 65532,
		"allowPrivilegeEscalation": false,
		"readOnlyRootFilesystem": true,
		"privileged": false,
		"capabilities": {"drop": ["ALL"]},
		"seccompProfile": {"type": "RuntimeDefault"},
	},
}

pod_spec(containers) := {
	"containers": containers,
	"runtimeClassName": "gvisor",
	"securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
}

template(name, spec) := {"metadata": {"labels": {"app": name}}, "spec": spec}

workload(kind, ns, name, spec) := {
	"apiVersion": "apps/v1",
	"kind": kind,
	"metadata": {"name": name, "namespace": ns},
	"spec": {"selector": {"matchLabels": {"app": name}}, "template": template(name, spec)},
}

deployment(spec) := workload("Deployment", "sovereign-app", "app", spec)

namespace(name, level) := {
	"apiVersion": "v1",
	"kind": "Namespace",
	"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": level}},
}

network_policy(ns, name, spec) := {
	"apiVersion": "networking.k8s.io/v1",
	"kind": "NetworkPolicy",
	"metadata": {"name": name, "namespace": ns},
	"spec": spec,
}

default_deny(ns) := network_policy(ns, "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})

base_set := [namespace("sovereign-app", "restricted"), default_deny("sovereign-app")]

good_set := array.concat(base_set, [deployment(pod_spec([container("app")]))])

denials(items) := msgs if {
	msgs := guardrails.deny with input as {"items": items} with data.k8s.guardrails.registry as registry
}

admission(obj) := msgs if {
	msgs := guardrails.deny with input as {"request": {"object": obj}} with data.k8s.guardrails.registry as registry
}

ids(msgs) := {split(m, " ")[0] | some m in msgs}

# The ids a good Deployment with one container patched (deep merge) or pod spec patched gets.
container_ids(patch) := ids(denials(array.concat(base_set, [deployment(pod_spec([object.union(container("app"), patch)]))])))

pod_ids(patch) := ids(denials(array.concat(base_set, [deployment(object.union(pod_spec([container("app")]), patch))])))

spec_ids(spec) := ids(denials(array.concat(base_set, [deployment(spec)])))

# --- the positive set -------------------------------------------------------------

test_good_set_passes if {
	count(denials(good_set)) == 0
}

test_good_objects_pass_as_admission_reviews if {
	every obj in good_set {
		count(admission(obj)) == 0
	}
}

test_message_names_rule_and_object if {
	msgs := denials(array.concat(base_set, [deployment(pod_spec([object.union(container("x"), {"securityContext": {"privileged": true}})]))]))
	"K8S-001 privileged: Deployment sovereign-app/app container x is privileged" in msgs
}

# --- K8S-001 privileged -------------------------------------------------------------

test_privileged_container_denied if {
	container_ids({"securityContext": {"privileged": true}}) == {"K8S-001"}
}

test_privileged_init_container_denied if {
	init := object.union(container("init"), {"securityContext": {"privileged": true}})
	"K8S-001" in spec_ids(object.union(pod_spec([container("app")]), {"initContainers": [init]}))
}

test_privileged_ephemeral_container_denied if {
	debug := object.union(container("debug"), {"securityContext": {"privileged": true}})
	"K8S-001" in spec_ids(object.union(pod_spec([container("app")]), {"ephemeralContainers": [debug]}))
}

test_privileged_admission_review_denied if {
	obj := deployment(pod_spec([object.union(container("app"), {"securityContext": {"privileged": true}})]))
	ids(admission(obj)) == {"K8S-001"}
}

test_privileged_false_allowed if {
	not "K8S-001" in container_ids({"securityContext": {"privileged": false}})
}

# Every pod-carrying kind is checked, not only Deployments.
test_every_pod_kind_checked if {
	bad := pod_spec([object.union(container("app"), {"securityContext": {"privileged": true}})])
	pod := {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "sovereign-app"}, "spec": bad}
	job := {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "sovereign-app"}, "spec": {"template": template("j", bad)}}
	cron := {
		"apiVersion": "batch/v1",
		"kind": "CronJob",
		"metadata": {"name": "c", "namespace": "sovereign-app"},
		"spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": template("c", bad)}}},
	}
	objects := [
		pod,
		job,
		cron,
		workload("StatefulSet", "sovereign-app", "s", bad),
		workload("DaemonSet", "sovereign-app", "d", bad),
		workload("ReplicaSet", "sovereign-app", "r", bad),
	]
	every obj in objects {
		ids(admission(obj)) == {"K8S-001"}
	}
}

test_namespace_from_admission_request if {
	obj := json.remove(deployment(pod_spec([object.union(container("x"), {"securityContext": {"privileged": true}})])), ["metadata/namespace"])
	msgs := guardrails.deny with input as {"request": {"namespace": "sovereign-app", "object": obj}}
		with data.k8s.guardrails.registry as registry
	msgs == {"K8S-001 privileged: Deployment sovereign-app/app container x is privileged"}
}

# --- K8S-002 run-as-non-root --------------------------------------------------------

test_run_as_non_root_false_denied if {
	container_ids({"securityContext": {"runAsNonRoot": false}}) == {"K8S-002"}
}

test_run_as_non_root_unset_denied if {
	spec := json.remove(pod_spec([json.remove(container("app"), ["securityContext/runAsNonRoot"])]), ["securityContext/runAsNonRoot"])
	spec_ids(spec) == {"K8S-002"}
}

test_run_as_non_root_from_pod_allowed if {
	spec_ids(pod_spec([json.remove(container("app"), ["securityContext/runAsNonRoot"])])) == set()
}

test_container_overrides_pod_run_as_non_root if {
	spec_ids(object.union(pod_spec([container("app")]), {"securityContext": {"runAsNonRoot": false, "runAsUser": 0}})) == set()
}

test_run_as_uid_zero_denied if {
	container_ids({"securityContext": {"runAsUser": 0}}) == {"K8S-002"}
}

test_run_as_uid_zero_from_pod_denied if {
	spec := object.union(pod_spec([json.remove(container("app"), ["securityContext/runAsUser"])]), {"securityContext": {"runAsUser": 0}})
	spec_ids(spec) == {"K8S-002"}
}

# --- K8S-003 read-only-root-filesystem ----------------------------------------------

test_writable_root_denied if {
	container_ids({"securityContext": {"readOnlyRootFilesystem": false}}) == {"K8S-003"}
}

test_unset_read_only_root_denied if {
	spec_ids(pod_spec([json.remove(container("app"), ["securityContext/readOnlyRootFilesystem"])])) == {"K8S-003"}
}

# --- K8S-004 privilege-escalation ---------------------------------------------------

test_privilege_escalation_true_denied if {
	container_ids({"securityContext": {"allowPrivilegeEscalation": true}}) == {"K8S-004"}
}

test_privilege_escalation_unset_denied if {
	spec_ids(pod_spec([json.remove(container("app"), ["securityContext/allowPrivilegeEscalation"])])) == {"K8S-004"}
}

# --- K8S-005 capabilities -----------------------------------------------------------

test_capabilities_not_dropped_denied if {
	container_ids({"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}) == {"K8S-005"}
}

test_capabilities_added_denied if {
	container_ids({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}) == {"K8S-005"}
}

test_no_security_context_denies_everything_it_must if {
	spec := json.remove(pod_spec([json.remove(container("app"), ["securityContext"])]), ["securityContext"])
	spec_ids(spec) == {"K8S-002", "K8S-003", "K8S-004", "K8S-005", "K8S-006"}
}

# --- K8S-006 seccomp ----------------------------------------------------------------

test_seccomp_unset_denied if {
	spec := json.remove(pod_spec([json.remove(container("app"), ["securityContext/seccompProfile"])]), ["securityContext/seccompProfile"])
	spec_ids(spec) == {"K8S-006"}
}

test_seccomp_from_pod_allowed if {
	spec_ids(pod_spec([json.remove(container("app"), ["securityContext/seccompProfile"])])) == set()
}

test_seccomp_unconfined_container_overrides_pod_denied if {
	container_ids({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}) == {"K8S-006"}
}

test_seccomp_localhost_allowed if {
	container_ids({"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}}) == set()
}

# --- K8S-007 resources --------------------------------------------------------------

test_missing_limits_denied if {
	msgs := denials(array.concat(base_set, [deployment(pod_spec([json.remove(container("app"), ["resources/limits"])]))]))
	msgs == {
		"K8S-007 resources: Deployment sovereign-app/app container app sets no limits.cpu",
		"K8S-007 resources: Deployment sovereign-app/app container app sets no limits.memory",
	}
}

test_missing_memory_request_denied if {
	container_ids({"resources": {"requests": {"cpu": "1", "memory": null}}}) == {"K8S-007"}
}

test_init_container_without_resources_denied if {
	init := json.remove(container("init"), ["resources"])
	spec_ids(object.union(pod_spec([container("app")]), {"initContainers": [init]})) == {"K8S-007"}
}

# The API refuses resources on ephemeral containers, so they are not asked for.
test_ephemeral_container_without_resources_allowed if {
	debug := json.remove(container("debug"), ["resources"])
	spec_ids(object.union(pod_spec([container("app")]), {"ephemeralContainers": [debug]})) == set()
}

# --- K8S-008 host-namespaces --------------------------------------------------------

test_host_namespaces_denied if {
	every key in ["hostPID", "hostIPC", "hostNetwork"] {
		pod_ids({key: true}) == {"K8S-008"}
	}
}

test_host_namespaces_false_allowed if {
	pod_ids({"hostPID": false, "hostIPC": false, "hostNetwork": false}) == set()
}

# --- K8S-009 host-path --------------------------------------------------------------

test_host_path_denied if {
	pod_ids({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}) == {"K8S-009"}
}

test_empty_dir_allowed if {
	pod_ids({"volumes": [{"name": "tmp", "emptyDir": {}}]}) == set()
}

# --- K8S-010 runtime-class ----------------------------------------------------------

test_runtime_class_missing_denied if {
	spec_ids(object.remove(pod_spec([container("app")]), ["runtimeClassName"])) == {"K8S-010"}
}

test_runtime_class_runc_denied if {
	pod_ids({"runtimeClassName": "runc"}) == {"K8S-010"}
}

test_runtime_class_kata_allowed if {
	pod_ids({"runtimeClassName": "kata"}) == set()
}

gpu_spec := object.remove(
	pod_spec([object.union(container("vllm"), {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}})]),
	["runtimeClassName"],
)

test_gpu_pod_without_runtime_class_denied_by_default if {
	spec_ids(gpu_spec) == {"K8S-010"}
}

test_gpu_pod_without_runtime_class_denied_when_runc_not_allowed if {
	msgs := denials(array.concat(base_set, [deployment(gpu_spec)])) with data.k8s.guardrails.gpu_runc_allowed as false
	ids(msgs) == {"K8S-010"}
}

test_gpu_pod_without_runtime_class_allowed_when_runc_allowed if {
	msgs := denials(array.concat(base_set, [deployment(gpu_spec)])) with data.k8s.guardrails.gpu_runc_allowed as true
	count(msgs) == 0
}

test_cpu_pod_without_runtime_class_denied_even_when_runc_allowed if {
	spec := object.remove(pod_spec([container("app")]), ["runtimeClassName"])
	msgs := denials(array.concat(base_set, [deployment(spec)])) with data.k8s.guardrails.gpu_runc_allowed as true
	ids(msgs) == {"K8S-010"}
}

test_zero_gpu_request_does_not_unlock_runc if {
	spec := object.remove(
		pod_spec([object.union(container("app"), {"resources": {"limits": {"nvidia.com/gpu": "0"}}})]),
		["runtimeClassName"],
	)
	msgs := denials(array.concat(base_set, [deployment(spec)])) with data.k8s.guardrails.gpu_runc_allowed as true
	ids(msgs) == {"K8S-010"}
}

test_gpu_pod_still_cannot_name_another_runtime if {
	spec := object.union(gpu_spec, {"runtimeClassName": "nvidia"})
	msgs := denials(array.concat(base_set, [deployment(spec)])) with data.k8s.guardrails.gpu_runc_allowed as true
	ids(msgs) == {"K8S-010"}
}

# --- K8S-011 image-digest / K8S-012 image-registry ----------------------------------

test_tag_pinned_image_denied if {
	container_ids({"image": concat("", [registry, "/sovereign/app:1.0"])}) == {"K8S-011"}
}

test_tag_and_short_digest_denied if {
	container_ids({"image": concat("", [registry, "/sovereign/app@sha256:abc"])}) == {"K8S-011"}
}

test_missing_image_denied if {
	spec_ids(pod_spec([object.remove(container("app"), ["image"])])) == {"K8S-011", "K8S-012"}
}

test_other_registry_denied if {
	container_ids({"image": concat("", ["docker.io/sovereign/app@sha256:", digest])}) == {"K8S-012"}
}

test_registry_prefix_lookalike_denied if {
	container_ids({"image": concat("", [registry, ".evil.example/app@sha256:", digest])}) == {"K8S-012"}
}

test_unset_registry_refuses_every_image if {
	msgs := guardrails.deny with input as {"items": good_set}
	ids(msgs) == {"K8S-012"}
}

test_init_container_image_checked if {
	init := object.union(container("init"), {"image": "busybox:latest"})
	spec_ids(object.union(pod_spec([container("app")]), {"initContainers": [init]})) == {"K8S-011", "K8S-012"}
}

# --- K8S-013 pod-security -----------------------------------------------------------

test_namespace_without_pod_security_denied if {
	ns := json.remove(namespace("sovereign-app", "restricted"), ["metadata/labels"])
	ids(denials([ns, default_deny("sovereign-app")])) == {"K8S-013"}
}

test_namespace_baseline_denied if {
	ids(admission(namespace("sovereign-app", "baseline"))) == {"K8S-013"}
}

test_namespace_privileged_denied if {
	ids(admission(namespace("sovereign-app", "privileged"))) == {"K8S-013"}
}

test_spire_node_namespace_may_be_privileged if {
	count(admission(namespace("sovereign-spire-node", "privileged"))) == 0
}

test_spire_node_namespace_may_not_be_baseline if {
	ids(admission(namespace("sovereign-spire-node", "baseline"))) == {"K8S-013"}
}

# Every Namespace is checked, not only sovereign-*: any other would hold workloads the
# namespace rules never see.
test_other_namespaces_checked_too if {
	ids(denials([json.remove(namespace("ingress-nginx", "privileged"), ["metadata/labels"])])) == {"K8S-013", "K8S-014", "K8S-015"}
	ids(admission(namespace("ingress-nginx", "privileged"))) == {"K8S-013"}
	ids(denials([namespace("tenant-a", "restricted"), default_deny("tenant-a")])) == set()
}

test_only_spire_node_may_be_privileged if {
	ids(admission(namespace("sovereign-spire", "privileged"))) == {"K8S-013"}
	ids(admission(namespace("kube-system", "privileged"))) == {"K8S-013"}
}

# --- K8S-014 default-deny-ingress / K8S-015 default-deny-egress ---------------------

test_namespace_without_policies_denied_both_ways if {
	msgs := denials([namespace("sovereign-app", "restricted")])
	msgs == {
		"K8S-014 default-deny-ingress: Namespace sovereign-app has no NetworkPolicy selecting every pod with policyTypes Ingress and no ingress rules",
		"K8S-015 default-deny-egress: Namespace sovereign-app has no NetworkPolicy selecting every pod with policyTypes Egress and no egress rules",
	}
}

test_ingress_only_default_deny_misses_egress if {
	only_ingress := network_policy("sovereign-app", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})
	ids(denials([namespace("sovereign-app", "restricted"), only_ingress])) == {"K8S-015"}
}

test_egress_only_default_deny_misses_ingress if {
	only_egress := network_policy("sovereign-app", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
	ids(denials([namespace("sovereign-app", "restricted"), only_egress])) == {"K8S-014"}
}

test_separate_default_deny_policies_allowed if {
	items := [
		namespace("sovereign-app", "restricted"),
		network_policy("sovereign-app", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]}),
		network_policy("sovereign-app", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
	]
	count(denials(items)) == 0
}

test_default_deny_with_allow_all_egress_rule_denied if {
	allow_all := network_policy("sovereign-app", "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "egress": [{}]})
	ids(denials([namespace("sovereign-app", "restricted"), allow_all])) == {"K8S-015", "K8S-017"}
}

test_default_deny_selecting_some_pods_denied if {
	some_pods := network_policy("sovereign-app", "default-deny", {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress", "Egress"]})
	ids(denials([namespace("sovereign-app", "restricted"), some_pods])) == {"K8S-014", "K8S-015"}
}

test_default_deny_in_another_namespace_does_not_count if {
	ids(denials([namespace("sovereign-app", "restricted"), default_deny("sovereign-other")])) == {"K8S-014", "K8S-015", "K8S-016"}
}

test_policy_types_default_not_assumed if {
	implicit := network_policy("sovereign-app", "default-deny", {"podSelector": {}})
	ids(denials([namespace("sovereign-app", "restricted"), implicit])) == {"K8S-014", "K8S-015"}
}

# A lone Namespace at admission cannot show its policies; only the whole set is checked.
test_default_deny_not_checked_on_admission if {
	count(admission(namespace("sovereign-app", "restricted"))) == 0
}

# --- exemptions ---------------------------------------------------------------------

root_container(name) := object.union(container(name), {"securityContext": {"runAsNonRoot": false, "runAsUser": 0}})

root_pod(containers, volumes) := object.remove(
	object.union(pod_spec(containers), {"securityContext": {"runAsNonRoot": false, "runAsUser": 0}, "volumes": volumes}),
	["runtimeClassName"],
)

host_path(name, path, type) := {"name": name, "hostPath": {"path": path, "type": type}}

agent_sockets := host_path("agent-sockets", "/run/spire/agent-sockets", "DirectoryOrCreate")

# As stacks/components/workload_identity.py mounts them.
agent_volumes := [agent_sockets]

csi_volumes := [
	agent_sockets,
	host_path("plugin-dir", "/var/lib/kubelet/plugins/csi.spiffe.io", "DirectoryOrCreate"),
	host_path("kubelet-pods", "/var/lib/kubelet/pods", "Directory"),
	host_path("registration", "/var/lib/kubelet/plugins_registry", "Directory"),
]

spire_agent_spec := object.union(root_pod([root_container("spire-agent")], agent_volumes), {"hostPID": true})

# As base.container_security(privileged=True) builds it: the API refuses
# allowPrivilegeEscalation false beside privileged, and capabilities mean nothing there.
csi_container := json.remove(
	object.union(root_container("spiffe-csi-driver"), {"securityContext": {"privileged": true}}),
	["securityContext/allowPrivilegeEscalation", "securityContext/capabilities"],
)

csi_driver_spec := root_pod(
	[
		csi_container,
		root_container("node-driver-registrar"),
	],
	csi_volumes,
)

spire_node_set := [
	namespace("sovereign-spire-node", "privileged"),
	default_deny("sovereign-spire-node"),
	workload("DaemonSet", "sovereign-spire-node", "spire-agent", spire_agent_spec),
	workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", csi_driver_spec),
]

test_exempt_node_agents_pass if {
	count(denials(spire_node_set)) == 0
}

test_spire_agent_in_another_namespace_denied if {
	ids(denials(array.concat(base_set, [workload("DaemonSet", "sovereign-app", "spire-agent", spire_agent_spec)]))) == {
		"K8S-002", "K8S-008", "K8S-009", "K8S-010",
	}
}

test_other_daemonset_in_spire_node_namespace_denied if {
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent-2", spire_agent_spec))) == {
		"K8S-002", "K8S-008", "K8S-009", "K8S-010",
	}
}

test_other_daemonset_with_only_host_pid_denied if {
	spec := object.union(pod_spec([container("x")]), {"hostPID": true})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "other", spec))) == {"K8S-008"}
}

test_spire_agent_as_deployment_denied if {
	ids(admission(workload("Deployment", "sovereign-spire-node", "spire-agent", spire_agent_spec))) == {
		"K8S-002", "K8S-008", "K8S-009", "K8S-010",
	}
}

test_spire_agent_may_not_be_privileged if {
	spec := object.union(spire_agent_spec, {"containers": [object.union(root_container("spire-agent"), {"securityContext": {"privileged": true}})]})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-001"}
}

test_spire_agent_may_not_use_host_network if {
	spec := object.union(spire_agent_spec, {"hostNetwork": true})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-008"}
}

test_csi_driver_may_not_use_host_pid if {
	spec := object.union(csi_driver_spec, {"hostPID": true})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", spec))) == {"K8S-008"}
}

test_only_the_csi_container_may_be_privileged if {
	registrar := object.union(root_container("node-driver-registrar"), {"securityContext": {"privileged": true}})
	spec := object.union(csi_driver_spec, {"containers": [csi_driver_spec.containers[0], registrar]})
	msgs := admission(workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", spec))
	msgs == {"K8S-001 privileged: DaemonSet sovereign-spire-node/spiffe-csi-driver container node-driver-registrar is privileged"}
}

test_csi_privilege_not_for_init_containers if {
	init := object.union(csi_driver_spec.containers[0], {"securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}})
	spec := object.union(csi_driver_spec, {"initContainers": [init]})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", spec))) == {"K8S-001"}
}

test_exemption_never_covers_resources_root_fs_seccomp_or_images if {
	bad := json.remove(
		object.union(spire_agent_spec.containers[0], {
			"image": "docker.io/spiffe/spire-agent:1.9",
			"securityContext": {"readOnlyRootFilesystem": false, "seccompProfile": {"type": "Unconfined"}},
		}),
		["resources"],
	)
	spec := object.union(spire_agent_spec, {"containers": [bad]})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {
		"K8S-003", "K8S-006", "K8S-007", "K8S-011", "K8S-012",
	}
}

test_exemption_does_not_allow_another_runtime_class if {
	spec := object.union(spire_agent_spec, {"runtimeClassName": "runc"})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-010"}
}

test_exemptions_are_exactly_the_two_node_agents if {
	{[e.kind, e.namespace, e.name] | some e in guardrails.exemptions} == {
		["DaemonSet", "sovereign-spire-node", "spire-agent"],
		["DaemonSet", "sovereign-spire-node", "spiffe-csi-driver"],
	}
	count(guardrails.exemptions) == 2
	guardrails.privileged_namespaces == {"sovereign-spire-node"}
}

# --- K8S-016 namespace-declared -----------------------------------------------------

shadow_deployment := workload("Deployment", "sovereign-shadow", "app", pod_spec([container("app")]))

test_workload_in_undeclared_namespace_denied if {
	msgs := denials(array.concat(base_set, [shadow_deployment]))
	msgs == {"K8S-016 namespace-declared: Deployment sovereign-shadow/app is in namespace sovereign-shadow, which the set does not declare"}
}

test_workload_without_namespace_lands_in_undeclared_default if {
	msgs := denials(array.concat(base_set, [json.remove(deployment(pod_spec([container("app")])), ["metadata/namespace"])]))
	msgs == {"K8S-016 namespace-declared: Deployment default/app is in namespace default, which the set does not declare"}
}

test_every_namespaced_kind_must_be_in_a_declared_namespace if {
	config_map := {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "elsewhere"}}
	unknown := {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
	policy := network_policy("elsewhere", "allow", {"podSelector": {}, "policyTypes": ["Ingress"]})
	ids(denials(array.concat(base_set, [config_map, unknown, policy]))) == {"K8S-016"}
	count(denials(array.concat(base_set, [config_map, unknown, policy]))) == 3
}

test_cluster_scoped_kinds_need_no_namespace if {
	objects := [
		{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "p"}, "value": 1000},
		{"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor"}, "handler": "runsc"},
		{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}},
	]
	count(denials(array.concat(good_set, objects))) == 0
}

# An AdmissionReview names the namespace the object is created in, which must exist.
test_undeclared_namespace_not_checked_on_admission if {
	count(admission(shadow_deployment)) == 0
}

# --- pod templates in core kinds ----------------------------------------------------

test_core_pod_template_kinds_checked if {
	bad := pod_spec([object.union(container("app"), {"securityContext": {"privileged": true}})])
	rc := {
		"apiVersion": "v1",
		"kind": "ReplicationController",
		"metadata": {"name": "rc", "namespace": "sovereign-app"},
		"spec": {"selector": {"app": "rc"}, "template": template("rc", bad)},
	}
	pod_template := {
		"apiVersion": "v1",
		"kind": "PodTemplate",
		"metadata": {"name": "pt", "namespace": "sovereign-app"},
		"template": template("pt", bad),
	}
	every obj in [rc, pod_template] {
		ids(admission(obj)) == {"K8S-001"}
	}
	denials(array.concat(base_set, [rc, pod_template])) == {
		"K8S-001 privileged: ReplicationController sovereign-app/rc container app is privileged",
		"K8S-001 privileged: PodTemplate sovereign-app/pt container app is privileged",
	}
}

test_good_core_pod_template_kinds_pass if {
	rc := {
		"apiVersion": "v1",
		"kind": "ReplicationController",
		"metadata": {"name": "rc", "namespace": "sovereign-app"},
		"spec": {"selector": {"app": "rc"}, "template": template("rc", pod_spec([container("app")]))},
	}
	count(admission(rc)) == 0
}

# --- K8S-017 network-policy-open ----------------------------------------------------

allow_policy(rules) := network_policy("sovereign-app", "allow", object.union(
	{"podSelector": {"matchLabels": {"app": "app"}}, "policyTypes": ["Ingress", "Egress"]},
	rules,
))

policy_ids(rules) := ids(admission(allow_policy(rules)))

named_ns := {"matchLabels": {"kubernetes.io/metadata.name": "sovereign-gateway"}}

app_pods := {"matchLabels": {"app": "gateway"}}

test_ingress_rule_without_from_denied if {
	policy_ids({"ingress": [{"ports": [{"port": 8080, "protocol": "TCP"}]}]}) == {"K8S-017"}
	policy_ids({"ingress": [{"from": []}]}) == {"K8S-017"}
}

test_egress_rule_without_to_denied if {
	msgs := admission(allow_policy({"egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}))
	msgs == {"K8S-017 network-policy-open: NetworkPolicy sovereign-app/allow egress rule 0 has no \"to\" peers, so it allows every peer"}
}

test_peer_selecting_every_namespace_denied if {
	policy_ids({"ingress": [{"from": [{"namespaceSelector": {}}]}]}) == {"K8S-017"}
	policy_ids({"egress": [{"to": [{"namespaceSelector": {}, "podSelector": {}}]}]}) == {"K8S-017"}
	policy_ids({"egress": [{"to": [{"namespaceSelector": {"matchLabels": {}}, "podSelector": {"matchExpressions": []}}]}]}) == {"K8S-017"}
}

test_peer_selecting_every_pod_of_its_namespace_denied if {
	policy_ids({"ingress": [{"from": [{"podSelector": {}}]}]}) == {"K8S-017"}
}

test_one_open_peer_among_explicit_ones_denied if {
	policy_ids({"ingress": [{"from": [{"namespaceSelector": named_ns, "podSelector": app_pods}, {"namespaceSelector": {}}]}]}) == {"K8S-017"}
}

test_ip_block_of_every_address_denied if {
	every cidr in ["0.0.0.0/0", "::/0", "10.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/7", "8000::/1", "fd00::/15"] {
		policy_ids({"egress": [{"to": [{"ipBlock": {"cidr": cidr}}]}]}) == {"K8S-017"}
	}
	policy_ids({"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}) == {"K8S-017"}
}

test_explicit_peers_allowed if {
	policy_ids({
		"ingress": [{"from": [{"namespaceSelector": named_ns, "podSelector": app_pods}], "ports": [{"port": 8080, "protocol": "TCP"}]}],
		"egress": [
			{"to": [{"namespaceSelector": named_ns}]},
			{"to": [{"namespaceSelector": named_ns, "podSelector": {}}]},
			{"to": [{"podSelector": app_pods}]},
			{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"ipBlock": {"cidr": "fd00::/64"}}]},
			{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}, {"ipBlock": {"cidr": "fd00::/16"}}]},
		],
	}) == set()
}

test_open_policy_denied_beside_default_deny if {
	open := network_policy("sovereign-app", "allow-all", {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]})
	ids(denials(array.concat(good_set, [open]))) == {"K8S-017"}
}

# --- K8S-009 host paths pinned per exemption ----------------------------------------

agent_with_volumes(name, spec, volumes) := workload("DaemonSet", "sovereign-spire-node", name, object.union(spec, {"volumes": volumes}))

test_exempt_agents_may_not_mount_host_root if {
	root := host_path("root", "/", "Directory")
	msgs := admission(agent_with_volumes("spire-agent", spire_agent_spec, array.concat(agent_volumes, [root])))
	msgs == {"K8S-009 host-path: DaemonSet sovereign-spire-node/spire-agent mounts hostPath volume root at \"/\" (type \"Directory\"), which no exemption allows"}
	ids(admission(agent_with_volumes("spiffe-csi-driver", csi_driver_spec, array.concat(csi_volumes, [root])))) == {"K8S-009"}
}

test_exempt_host_paths_are_per_agent if {
	kubelet_pods := host_path("kubelet-pods", "/var/lib/kubelet/pods", "Directory")
	ids(admission(agent_with_volumes("spire-agent", spire_agent_spec, [agent_sockets, kubelet_pods]))) == {"K8S-009"}
}

test_exempt_host_paths_match_exactly if {
	every volume in [
		host_path("agent-sockets", "/run/spire/agent-sockets/..", "DirectoryOrCreate"),
		host_path("agent-sockets", "/run/spire", "DirectoryOrCreate"),
		host_path("agent-sockets", "/run/spire/agent-sockets", "Socket"),
		{"name": "agent-sockets", "hostPath": {"path": "/run/spire/agent-sockets"}},
	] {
		ids(admission(agent_with_volumes("spire-agent", spire_agent_spec, [volume]))) == {"K8S-009"}
	}
}

# --- exempt agents' own Pods ----------------------------------------------------------

owner(kind, name, controller) := {
	"apiVersion": "apps/v1",
	"kind": kind,
	"name": name,
	"uid": "00000000-0000-0000-0000-000000000001",
	"controller": controller,
}

agent_pod(ns, refs, spec) := {
	"apiVersion": "v1",
	"kind": "Pod",
	"metadata": {"generateName": "spire-agent-", "namespace": ns, "ownerReferences": refs},
	"spec": spec,
}

test_agent_pods_created_by_their_daemonsets_pass if {
	count(admission(agent_pod("sovereign-spire-node", [owner("DaemonSet", "spire-agent", true)], spire_agent_spec))) == 0
	count(admission(agent_pod("sovereign-spire-node", [owner("DaemonSet", "spiffe-csi-driver", true)], csi_driver_spec))) == 0
	pod := agent_pod("sovereign-spire-node", [owner("DaemonSet", "spire-agent", true)], spire_agent_spec)
	count(denials(array.concat(spire_node_set, [pod]))) == 0
}

test_agent_pod_claiming_owner_elsewhere_denied if {
	pod := agent_pod("sovereign-app", [owner("DaemonSet", "spire-agent", true)], spire_agent_spec)
	ids(admission(pod)) == {"K8S-002", "K8S-008", "K8S-009", "K8S-010"}
}

test_agent_pod_needs_a_single_controller_daemonset_reference if {
	every refs in [
		[owner("DaemonSet", "spire-agent", false)],
		[object.remove(owner("DaemonSet", "spire-agent", true), ["controller"])],
		[owner("ReplicaSet", "spire-agent", true)],
		[object.union(owner("DaemonSet", "spire-agent", true), {"apiVersion": "example.com/v1"})],
		[owner("DaemonSet", "spire-agent-2", true)],
		[owner("DaemonSet", "spire-agent", true), owner("DaemonSet", "spiffe-csi-driver", true)],
		[],
	] {
		ids(admission(agent_pod("sovereign-spire-node", refs, spire_agent_spec))) == {"K8S-002", "K8S-008", "K8S-009", "K8S-010"}
	}
}

# The Pod gets its owner's exemption, not another agent's.
test_agent_pod_gets_only_its_owners_exemption if {
	ids(admission(agent_pod("sovereign-spire-node", [owner("DaemonSet", "spiffe-csi-driver", true)], spire_agent_spec))) == {"K8S-008"}
}

# --- K8S-018 host-port ----------------------------------------------------------------

test_host_port_denied if {
	container_ids({"ports": [{"containerPort": 8080, "hostPort": 8080}]}) == {"K8S-018"}
	init := object.union(container("init"), {"ports": [{"containerPort": 53, "hostPort": 53, "protocol": "UDP"}]})
	spec_ids(object.union(pod_spec([container("app")]), {"initContainers": [init]})) == {"K8S-018"}
}

test_host_port_zero_allowed if {
	container_ids({"ports": [{"containerPort": 8080, "hostPort": 0}, {"containerPort": 8081}]}) == set()
}

test_exempt_agent_may_not_use_host_ports if {
	agent := object.union(spire_agent_spec.containers[0], {"ports": [{"containerPort": 8081, "hostPort": 8081}]})
	spec := object.union(spire_agent_spec, {"containers": [agent]})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-018"}
}

# --- K8S-019 apparmor -----------------------------------------------------------------

with_template_annotations(obj, annotations) := object.union(obj, {"spec": {"template": {"metadata": {"annotations": annotations}}}})

test_apparmor_unconfined_denied if {
	container_ids({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}) == {"K8S-019"}
	pod_ids({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}) == {"K8S-019"}
}

test_apparmor_unconfined_annotation_denied if {
	obj := with_template_annotations(deployment(pod_spec([container("app")])), {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"})
	admission(obj) == {"K8S-019 apparmor: Deployment sovereign-app/app annotates container.apparmor.security.beta.kubernetes.io/app with AppArmor profile unconfined"}
	pod := {
		"apiVersion": "v1",
		"kind": "Pod",
		"metadata": {"name": "p", "namespace": "sovereign-app", "annotations": {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}},
		"spec": pod_spec([container("app")]),
	}
	ids(admission(pod)) == {"K8S-019"}
}

test_apparmor_confined_allowed if {
	container_ids({"securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}}) == set()
	pod_ids({"securityContext": {"appArmorProfile": {"type": "Localhost", "localhostProfile": "p"}}}) == set()
	obj := with_template_annotations(deployment(pod_spec([container("app")])), {
		"container.apparmor.security.beta.kubernetes.io/app": "runtime/default",
		"container.apparmor.security.beta.kubernetes.io/init": "localhost/p",
	})
	count(admission(obj)) == 0
}

test_exempt_agent_may_not_be_unconfined if {
	spec := object.union(csi_driver_spec, {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", spec))) == {"K8S-019"}
}

# --- K8S-020 sysctls ------------------------------------------------------------------

sysctl_ids(names) := pod_ids({"securityContext": {"sysctls": [{"name": n, "value": "1"} | some n in names]}})

test_unsafe_sysctls_denied if {
	every name in ["kernel.msgmax", "net.core.somaxconn", "vm.overcommit_memory", "kernel/msgmax", "net.ipv4.conf.all.forwarding"] {
		sysctl_ids([name]) == {"K8S-020"}
	}
}

test_safe_sysctls_allowed if {
	sysctl_ids(["net.ipv4.ip_local_port_range", "kernel.shm_rmid_forced", "net/ipv4/tcp_syncookies"]) == set()
}

test_exempt_agent_may_not_set_unsafe_sysctls if {
	spec := object.union(spire_agent_spec, {"securityContext": {"sysctls": [{"name": "kernel.core_pattern", "value": "|/x"}]}})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-020"}
}

# --- K8S-021 proc-mount ---------------------------------------------------------------

test_unmasked_proc_mount_denied if {
	container_ids({"securityContext": {"procMount": "Unmasked"}}) == {"K8S-021"}
}

test_default_proc_mount_allowed if {
	container_ids({"securityContext": {"procMount": "Default"}}) == set()
}

test_exempt_agent_may_not_unmask_proc if {
	privileged := object.union(csi_container, {"securityContext": {"procMount": "Unmasked"}})
	spec := object.union(csi_driver_spec, {"containers": [privileged, csi_driver_spec.containers[1]]})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spiffe-csi-driver", spec))) == {"K8S-021"}
}

# --- K8S-010 extra RuntimeClasses and the GPU resource ----------------------------------

test_extra_runtime_class_denied_unless_named if {
	pod_ids({"runtimeClassName": "kata-qemu-nvidia-gpu"}) == {"K8S-010"}
	msgs := denials(array.concat(base_set, [deployment(object.union(pod_spec([container("app")]), {"runtimeClassName": "kata-qemu-nvidia-gpu"}))]))
		with data.k8s.guardrails.extra_runtime_classes as ["kata-qemu-nvidia-gpu"]
	count(msgs) == 0
}

test_extra_runtime_classes_allow_only_those_named if {
	msgs := denials(array.concat(base_set, [deployment(object.union(pod_spec([container("app")]), {"runtimeClassName": "runc"}))]))
		with data.k8s.guardrails.extra_runtime_classes as ["kata-qemu-nvidia-gpu"]
	msgs == {"K8S-010 runtime-class: Deployment sovereign-app/app uses runtimeClassName runc, not one of gvisor, kata, kata-qemu-nvidia-gpu"}
}

pgpu_spec := object.remove(
	pod_spec([object.union(container("vllm"), {"resources": {"limits": {"nvidia.com/pgpu": "1"}, "requests": {"nvidia.com/pgpu": "1"}}})]),
	["runtimeClassName"],
)

test_gpu_resource_read_from_data if {
	items := array.concat(base_set, [deployment(pgpu_spec)])
	default_resource := denials(items) with data.k8s.guardrails.gpu_runc_allowed as true
	ids(default_resource) == {"K8S-010"}
	named := denials(items) with data.k8s.guardrails.gpu_runc_allowed as true
		with data.k8s.guardrails.gpu_resource as "nvidia.com/pgpu"
	count(named) == 0

	# Naming another resource takes runc away from the default one.
	other := denials(array.concat(base_set, [deployment(gpu_spec)])) with data.k8s.guardrails.gpu_runc_allowed as true
		with data.k8s.guardrails.gpu_resource as "nvidia.com/pgpu"
	ids(other) == {"K8S-010"}
}

# --- K8S-022 volume-types ---------------------------------------------------------------

test_network_and_git_volumes_denied if {
	every volume in [
		{"name": "v", "nfs": {"server": "10.0.0.1", "path": "/"}},
		{"name": "v", "gitRepo": {"repository": "https://example.invalid/r"}},
		{"name": "v", "iscsi": {"targetPortal": "10.0.0.1", "iqn": "iqn.x", "lun": 0}},
	] {
		pod_ids({"volumes": [volume]}) == {"K8S-022"}
	}
}

test_restricted_volume_types_allowed if {
	pod_ids({"volumes": [
		{"name": "a", "emptyDir": {}},
		{"name": "b", "configMap": {"name": "c"}},
		{"name": "c", "persistentVolumeClaim": {"claimName": "d"}},
		{"name": "d", "csi": {"driver": "csi.spiffe.io", "readOnly": true}},
		{"name": "e", "projected": {"sources": []}},
	]}) == set()
}

test_exempt_agent_may_not_mount_nfs if {
	volumes := array.concat(spire_agent_spec.volumes, [{"name": "share", "nfs": {"server": "10.0.0.1", "path": "/"}}])
	spec := object.union(spire_agent_spec, {"volumes": volumes})
	ids(admission(workload("DaemonSet", "sovereign-spire-node", "spire-agent", spec))) == {"K8S-022"}
}

# --- K8S-023 selinux --------------------------------------------------------------------

test_selinux_user_role_and_foreign_type_denied if {
	pod_ids({"securityContext": object.union(pod_spec([container("app")]).securityContext, {"seLinuxOptions": {"user": "system_u"}})}) == {"K8S-023"}
	container_ids({"securityContext": {"seLinuxOptions": {"role": "system_r"}}}) == {"K8S-023"}
	container_ids({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}) == {"K8S-023"}
}

test_selinux_container_types_and_level_allowed if {
	container_ids({"securityContext": {"seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"}}}) == set()
}
