# METADATA
# title: Kubernetes guardrails
# description: |
#   What an admission controller enforces on every object of the datacenter stack. The
#   input is either the rendered stack, {"items": [manifest, ...]}, or an AdmissionReview,
#   {"request": {"object": manifest}}. `deny` holds one message per violation, each
#   starting with its rule id. The default-deny NetworkPolicy rules need the whole set, so
#   they run on the first form only. Parameters come from data.k8s.guardrails: `registry`
#   (the only registry images may come from; unset refuses every image) and
#   `gpu_runc_allowed` (a GPU pod may omit runtimeClassName; default false).
# entrypoint: true
package k8s.guardrails

sandbox_runtimes := {"gvisor", "kata"}

seccomp_profiles := {"RuntimeDefault", "Localhost"}

pod_security_label := "pod-security.kubernetes.io/enforce"

default _registry := ""

_registry := data.k8s.guardrails.registry

_gpu_runc_allowed if data.k8s.guardrails.gpu_runc_allowed == true

_objects contains obj if {
	some obj in input.items
	is_object(obj)
}

_objects contains obj if {
	obj := input.request.object
	is_object(obj)
}

_template_kinds := {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

_pod_spec(obj) := obj.spec if obj.kind == "Pod"

_pod_spec(obj) := obj.spec.template.spec if obj.kind in _template_kinds

_pod_spec(obj) := obj.spec.jobTemplate.spec.template.spec if obj.kind == "CronJob"

# An AdmissionReview may carry the namespace beside the object rather than in it.
_namespace(obj) := ns if {
	ns := obj.metadata.namespace
} else := ns if {
	ns := input.request.namespace
} else := "default"

_name(obj) := object.get(obj, ["metadata", "name"], "<unnamed>")

_exemption(kind, ns, name) := e if {
	some e in exemptions
	e.kind == kind
	e.namespace == ns
	e.name == name
} else := {"deviations": set(), "privileged_containers": set()}

_workloads contains w if {
	some obj in _objects
	spec := _pod_spec(obj)
	ns := _namespace(obj)
	name := _name(obj)
	exemption := _exemption(obj.kind, ns, name)
	w := {
		"id": sprintf("%s %s/%s", [obj.kind, ns, name]),
		"spec": spec,
		"allowed": exemption.deviations,
		"privileged_containers": exemption.privileged_containers,
	}
}

_container_fields := {
	"containers": "container",
	"initContainers": "initContainer",
	"ephemeralContainers": "ephemeralContainer",
}

_containers contains [w, field, c] if {
	some w in _workloads
	some field, _ in _container_fields
	some c in object.get(w.spec, field, [])
	is_object(c)
}

_cid(w, field, c) := sprintf("%s %s %s", [w.id, _container_fields[field], object.get(c, "name", "<unnamed>")])

# The container's securityContext wins over the pod's.
_effective(w, c, key) := v if {
	v := c.securityContext[key]
} else := v if {
	v := w.spec.securityContext[key]
}

# Named rules, not `not f(...) == x`: OPA evaluates a call inside `not` outside the
# negation, so an undefined result would make the whole rule undefined, not true.
_non_root(w, c) if _effective(w, c, "runAsNonRoot") == true

_confined(w, c) if _effective(w, c, "seccompProfile").type in seccomp_profiles

_privilege_exempt(w, field, c) if {
	field == "containers"
	c.name in w.privileged_containers
}

# METADATA
# title: Denials
# description: One message per violation, starting with the rule id and name.
deny contains msg if {
	some [w, field, c] in _containers
	c.securityContext.privileged == true
	not _privilege_exempt(w, field, c)
	msg := sprintf("K8S-001 privileged: %s is privileged", [_cid(w, field, c)])
}

deny contains msg if {
	some [w, field, c] in _containers
	not "root" in w.allowed
	not _non_root(w, c)
	msg := sprintf("K8S-002 run-as-non-root: %s does not set runAsNonRoot: true", [_cid(w, field, c)])
}

deny contains msg if {
	some [w, field, c] in _containers
	not "root" in w.allowed
	_effective(w, c, "runAsUser") == 0
	msg := sprintf("K8S-002 run-as-non-root: %s runs as uid 0", [_cid(w, field, c)])
}

deny contains msg if {
	some [w, field, c] in _containers
	not c.securityContext.readOnlyRootFilesystem == true
	msg := sprintf("K8S-003 read-only-root-filesystem: %s has a writable root file system", [_cid(w, field, c)])
}

# A privileged container cannot set allowPrivilegeEscalation false (the API refuses it)
# and holds every capability anyway; only the exempt privileged container skips these.
deny contains msg if {
	some [w, field, c] in _containers
	not _privilege_exempt(w, field, c)
	not c.securityContext.allowPrivilegeEscalation == false
	msg := sprintf("K8S-004 privilege-escalation: %s does not set allowPrivilegeEscalation: false", [_cid(w, field, c)])
}

deny contains msg if {
	some [w, field, c] in _containers
	not _privilege_exempt(w, field, c)
	not "ALL" in object.get(c, ["securityContext", "capabilities", "drop"], [])
	msg := sprintf("K8S-005 capabilities: %s does not drop ALL capabilities", [_cid(w, field, c)])
}

deny contains msg if {
	some [w, field, c] in _containers
	added := object.get(c, ["securityContext", "capabilities", "add"], [])
	count(added) > 0
	msg := sprintf("K8S-005 capabilities: %s adds capabilities %v", [_cid(w, field, c), added])
}

deny contains msg if {
	some [w, field, c] in _containers
	not _confined(w, c)
	msg := sprintf("K8S-006 seccomp: %s has no RuntimeDefault or Localhost seccomp profile", [_cid(w, field, c)])
}

# Ephemeral containers cannot carry resources (the API refuses them); every other
# container must bound what it takes from the node.
deny contains msg if {
	some [w, field, c] in _containers
	field != "ephemeralContainers"
	some kind in ["requests", "limits"]
	some resource in ["cpu", "memory"]
	object.get(c, ["resources", kind, resource], null) == null
	msg := sprintf("K8S-007 resources: %s sets no %s.%s", [_cid(w, field, c), kind, resource])
}

deny contains msg if {
	some w in _workloads
	some key in ["hostPID", "hostIPC", "hostNetwork"]
	w.spec[key] == true
	not key in w.allowed
	msg := sprintf("K8S-008 host-namespaces: %s sets %s", [w.id, key])
}

deny contains msg if {
	some w in _workloads
	some volume in object.get(w.spec, "volumes", [])
	"hostPath" in object.keys(volume)
	not "hostPath" in w.allowed
	msg := sprintf("K8S-009 host-path: %s mounts hostPath volume %s", [w.id, object.get(volume, "name", "<unnamed>")])
}

deny contains msg if {
	some w in _workloads
	rc := object.get(w.spec, "runtimeClassName", null)
	rc != null
	not rc in sandbox_runtimes
	msg := sprintf("K8S-010 runtime-class: %s uses runtimeClassName %s, not gvisor or kata", [w.id, rc])
}

deny contains msg if {
	some w in _workloads
	object.get(w.spec, "runtimeClassName", null) == null
	not _may_omit_runtime_class(w)
	msg := sprintf("K8S-010 runtime-class: %s sets no runtimeClassName (gvisor or kata)", [w.id])
}

_may_omit_runtime_class(w) if "runtimeClassName" in w.allowed

_may_omit_runtime_class(w) if {
	_gpu_runc_allowed
	_requests_gpu(w)
}

_requests_gpu(w) if {
	some [cw, _, c] in _containers
	cw == w
	some kind in ["requests", "limits"]
	quantity := c.resources[kind]["nvidia.com/gpu"]
	not quantity in {0, "0"}
}

deny contains msg if {
	some [w, field, c] in _containers
	image := object.get(c, "image", "")
	not regex.match(`@sha256:[0-9a-f]{64}$`, image)
	msg := sprintf("K8S-011 image-digest: %s image %q is not pinned by sha256 digest", [_cid(w, field, c), image])
}

deny contains msg if {
	some [w, field, c] in _containers
	image := object.get(c, "image", "")
	not _from_registry(image)
	msg := sprintf("K8S-012 image-registry: %s image %q is not from registry %q", [_cid(w, field, c), image, _registry])
}

_from_registry(image) if {
	_registry != ""
	startswith(image, concat("", [_registry, "/"]))
}

_sovereign_namespaces contains name if {
	some obj in _objects
	obj.kind == "Namespace"
	name := _name(obj)
	startswith(name, "sovereign-")
}

_pod_security_levels(name) := {"restricted", "privileged"} if {
	name in privileged_namespaces
} else := {"restricted"}

deny contains msg if {
	some obj in _objects
	obj.kind == "Namespace"
	name := _name(obj)
	name in _sovereign_namespaces
	level := object.get(obj, ["metadata", "labels", pod_security_label], "<unset>")
	not level in _pod_security_levels(name)
	msg := sprintf("K8S-013 pod-security: Namespace %s enforces Pod Security %q, not restricted", [name, level])
}

_directions := {
	"Ingress": {"id": "K8S-014", "rules": "ingress"},
	"Egress": {"id": "K8S-015", "rules": "egress"},
}

deny contains msg if {
	is_array(input.items)
	some name in _sovereign_namespaces
	some direction, rule in _directions
	not _default_deny(name, direction, rule.rules)
	msg := sprintf(
		"%s default-deny-%s: Namespace %s has no NetworkPolicy selecting every pod with policyTypes %s and no %s rules",
		[rule.id, rule.rules, name, direction, rule.rules],
	)
}

_default_deny(ns, direction, rules) if {
	some policy in input.items
	policy.kind == "NetworkPolicy"
	_namespace(policy) == ns
	_selects_every_pod(object.get(policy, ["spec", "podSelector"], {}))
	direction in object.get(policy, ["spec", "policyTypes"], [])
	count(object.get(policy, ["spec", rules], [])) == 0
}

_selects_every_pod(selector) if {
	count(object.get(selector, "matchLabels", {})) == 0
	count(object.get(selector, "matchExpressions", [])) == 0
}
