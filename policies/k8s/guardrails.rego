# METADATA
# title: Kubernetes guardrails
# description: |
#   What an admission controller enforces on every object of the datacenter stack. The
#   input is either the rendered stack, {"items": [manifest, ...]}, or an AdmissionReview,
#   {"request": {"object": manifest}}. `deny` holds one message per violation, each
#   starting with its rule id. The default-deny NetworkPolicy rules and the declared
#   namespace rule need the whole set, so they run on the first form only. Parameters come
#   from data.k8s.guardrails: `registry` (the only registry images may come from; unset
#   refuses every image), `gpu_runc_allowed` (a GPU pod may omit runtimeClassName; default
#   false), `gpu_resource` (the extended resource that makes a pod a GPU pod; default
#   nvidia.com/gpu) and `extra_runtime_classes` (RuntimeClass names accepted besides gvisor
#   and kata, such as the GPU operator's kata-qemu-nvidia-gpu; default none).
# entrypoint: true
package k8s.guardrails

sandbox_runtimes := {"gvisor", "kata"}

seccomp_profiles := {"RuntimeDefault", "Localhost"}

apparmor_profiles := {"RuntimeDefault", "Localhost"}

# Pod Security restricted's volume types; hostPath is K8S-009's, with its exemptions.
volume_types := {
	"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
	"persistentVolumeClaim", "projected", "secret",
}

# Pod Security baseline's SELinux types; user and role may not be set at all.
selinux_types := {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}

apparmor_annotation_prefix := "container.apparmor.security.beta.kubernetes.io/"

# The Pod Security Standards' "safe" set: namespaced by the kernel, so they cannot touch
# the node or other pods.
safe_sysctls := {
	"kernel.shm_rmid_forced",
	"net.ipv4.ip_local_port_range",
	"net.ipv4.ip_unprivileged_port_start",
	"net.ipv4.tcp_syncookies",
	"net.ipv4.ping_group_range",
	"net.ipv4.ip_local_reserved_ports",
	"net.ipv4.tcp_keepalive_time",
	"net.ipv4.tcp_fin_timeout",
	"net.ipv4.tcp_keepalive_intvl",
	"net.ipv4.tcp_keepalive_probes",
}

pod_security_label := "pod-security.kubernetes.io/enforce"

# Where each kind carries its pod template; the pod spec is at `spec` under it. Pod and
# PodTemplate are the core kinds that carry one directly, ReplicationController the core
# controller; the rest are apps/v1 and batch/v1.
pod_template_paths := {
	"Pod": [],
	"PodTemplate": ["template"],
	"ReplicationController": ["spec", "template"],
	"Deployment": ["spec", "template"],
	"StatefulSet": ["spec", "template"],
	"DaemonSet": ["spec", "template"],
	"ReplicaSet": ["spec", "template"],
	"Job": ["spec", "template"],
	"CronJob": ["spec", "jobTemplate", "spec", "template"],
}

# Kinds that live outside any namespace. Every other kind in a set must name a namespace
# the set declares: one that falls back to `default`, or names a namespace the set does not
# create, would escape the Pod Security and default-deny rules above. Unknown kinds count
# as namespaced, so a new cluster-scoped kind must be added here rather than slip through.
cluster_scoped_kinds := {
	"APIService",
	"CertificateSigningRequest",
	"ClusterFederatedTrustDomain",
	"ClusterRole",
	"ClusterRoleBinding",
	"ClusterSPIFFEID",
	"ClusterStaticEntry",
	"CSIDriver",
	"CSINode",
	"CustomResourceDefinition",
	"FlowSchema",
	"IngressClass",
	"MutatingWebhookConfiguration",
	"Namespace",
	"Node",
	"PersistentVolume",
	"PriorityClass",
	"PriorityLevelConfiguration",
	"RuntimeClass",
	"StorageClass",
	"ValidatingAdmissionPolicy",
	"ValidatingAdmissionPolicyBinding",
	"ValidatingWebhookConfiguration",
	"VolumeAttachment",
}

default _registry := ""

_registry := data.k8s.guardrails.registry

_gpu_runc_allowed if data.k8s.guardrails.gpu_runc_allowed == true

default _gpu_resource := "nvidia.com/gpu"

_gpu_resource := r if {
	r := data.k8s.guardrails.gpu_resource
	is_string(r)
	r != ""
}

_runtime_classes := sandbox_runtimes | {rc |
	some rc in data.k8s.guardrails.extra_runtime_classes
	is_string(rc)
}

_objects contains obj if {
	some obj in input.items
	is_object(obj)
}

_objects contains obj if {
	obj := input.request.object
	is_object(obj)
}

# object.get that tolerates a non-object (which the API would refuse anyway), so a
# malformed field yields the default rather than an error that hides the whole rule.
_get(o, path, default_value) := object.get(o, path, default_value) if is_object(o)

else := default_value

_array(x) := x if is_array(x)

else := []

_template(obj) := t if {
	path := pod_template_paths[obj.kind]
	count(path) > 0
	t := object.get(obj, path, null)
	is_object(t)
} else := obj if obj.kind == "Pod"

_pod_spec(obj) := spec if {
	spec := _template(obj).spec
	is_object(spec)
}

_pod_meta(obj) := _get(_template(obj), "metadata", {})

# An AdmissionReview may carry the namespace beside the object rather than in it.
_namespace(obj) := ns if {
	ns := obj.metadata.namespace
} else := ns if {
	ns := input.request.namespace
} else := "default"

_name(obj) := object.get(obj, ["metadata", "name"], "<unnamed>")

_no_exemption := {"deviations": set(), "host_paths": {}, "privileged_containers": set()}

_exemption(obj, ns, name) := e if {
	some e in exemptions
	e.kind == obj.kind
	e.namespace == ns
	e.name == name
} else := e if {
	# The DaemonSet controller creates the agents' Pods, which admission sees on their own.
	# This trusts ownerReferences, which whoever creates a Pod may write: RBAC must leave
	# Pod creation in the exempt namespace to the DaemonSet controller alone. The API
	# allows one controller reference; more than one is refused here rather than guessed.
	obj.kind == "Pod"
	controllers := [ref |
		some ref in _array(_get(obj.metadata, "ownerReferences", []))
		_get(ref, "controller", false) == true
	]
	count(controllers) == 1
	ref := controllers[0]
	ref.apiVersion == "apps/v1"
	some e in exemptions
	e.kind == ref.kind
	e.kind == "DaemonSet"
	e.namespace == ns
	e.name == ref.name
} else := _no_exemption

_workloads contains w if {
	some obj in _objects
	spec := _pod_spec(obj)
	ns := _namespace(obj)
	name := _name(obj)
	exemption := _exemption(obj, ns, name)
	w := {
		"id": sprintf("%s %s/%s", [obj.kind, ns, name]),
		"spec": spec,
		"meta": _pod_meta(obj),
		"allowed": exemption.deviations,
		"host_paths": exemption.host_paths,
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

# An exemption names each host path and type exactly: a prefix match would let `/` or
# `/var/lib/kubelet` through beside the one directory the agent needs.
deny contains msg if {
	some w in _workloads
	some volume in _array(object.get(w.spec, "volumes", []))
	"hostPath" in object.keys(volume)
	path := _get(volume.hostPath, "path", "<unset>")
	type := _get(volume.hostPath, "type", "")
	not _host_path_allowed(w, path, type)
	msg := sprintf(
		"K8S-009 host-path: %s mounts hostPath volume %s at %q (type %q), which no exemption allows",
		[w.id, _get(volume, "name", "<unnamed>"), path, type],
	)
}

_host_path_allowed(w, path, type) if w.host_paths[path] == type

deny contains msg if {
	some w in _workloads
	rc := object.get(w.spec, "runtimeClassName", null)
	rc != null
	not rc in _runtime_classes
	msg := sprintf("K8S-010 runtime-class: %s uses runtimeClassName %v, not one of %s", [w.id, rc, _runtime_class_names])
}

deny contains msg if {
	some w in _workloads
	object.get(w.spec, "runtimeClassName", null) == null
	not _may_omit_runtime_class(w)
	msg := sprintf("K8S-010 runtime-class: %s sets no runtimeClassName (one of %s)", [w.id, _runtime_class_names])
}

_runtime_class_names := concat(", ", sort(_runtime_classes))

_may_omit_runtime_class(w) if "runtimeClassName" in w.allowed

_may_omit_runtime_class(w) if {
	_gpu_runc_allowed
	_requests_gpu(w)
}

_requests_gpu(w) if {
	some [cw, _, c] in _containers
	cw == w
	some kind in ["requests", "limits"]
	quantity := c.resources[kind][_gpu_resource]
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

# The namespaces the set creates; every one of them gets the namespace rules, whatever
# its name.
_declared_namespaces contains name if {
	is_array(input.items)
	some obj in _objects
	obj.kind == "Namespace"
	name := _name(obj)
}

_pod_security_levels(name) := {"restricted", "privileged"} if {
	name in privileged_namespaces
} else := {"restricted"}

deny contains msg if {
	some obj in _objects
	obj.kind == "Namespace"
	name := _name(obj)
	level := object.get(obj, ["metadata", "labels", pod_security_label], "<unset>")
	not level in _pod_security_levels(name)
	msg := sprintf("K8S-013 pod-security: Namespace %s enforces Pod Security %q, not restricted", [name, level])
}

_directions := {
	"Ingress": {"id": "K8S-014", "rules": "ingress"},
	"Egress": {"id": "K8S-015", "rules": "egress"},
}

deny contains msg if {
	some name in _declared_namespaces
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

deny contains msg if {
	is_array(input.items)
	some obj in _objects
	kind := object.get(obj, "kind", "<no kind>")
	not kind in cluster_scoped_kinds
	ns := _namespace(obj)
	not ns in _declared_namespaces
	msg := sprintf(
		"K8S-016 namespace-declared: %s %s/%s is in namespace %s, which the set does not declare",
		[kind, ns, _name(obj), ns],
	)
}

# An ingress rule without `from` or an egress rule without `to` (or with an empty list)
# allows every peer, and one peer that selects everything does the same; either would
# silently cancel the namespace's default deny for the pods the policy selects.
_peer_fields := {"ingress": "from", "egress": "to"}

deny contains msg if {
	some obj in _objects
	obj.kind == "NetworkPolicy"
	some direction, field in _peer_fields
	some i, rule in _array(_get(obj.spec, direction, []))
	count(_array(_get(rule, field, []))) == 0
	msg := sprintf(
		"K8S-017 network-policy-open: NetworkPolicy %s/%s %s rule %d has no %q peers, so it allows every peer",
		[_namespace(obj), _name(obj), direction, i, field],
	)
}

deny contains msg if {
	some obj in _objects
	obj.kind == "NetworkPolicy"
	some direction, field in _peer_fields
	some i, rule in _array(_get(obj.spec, direction, []))
	some peer in _array(_get(rule, field, []))
	is_object(peer)
	not "ipBlock" in object.keys(peer)
	_selects_all_or_absent(peer, "podSelector")
	_selects_all_or_absent(peer, "namespaceSelector")
	msg := sprintf(
		"K8S-017 network-policy-open: NetworkPolicy %s/%s %s rule %d has a peer selecting every pod %s",
		[_namespace(obj), _name(obj), direction, i, _peer_scope(peer)],
	)
}

deny contains msg if {
	some obj in _objects
	obj.kind == "NetworkPolicy"
	some direction, field in _peer_fields
	some i, rule in _array(_get(obj.spec, direction, []))
	some peer in _array(_get(rule, field, []))
	cidr := _get(_get(peer, "ipBlock", {}), "cidr", "")
	is_string(cidr)

	# Two or more blocks as wide as 0.0.0.0/1 add up to every address; no allow this stack
	# needs is wider than a /8 (IPv4) or a /16 (IPv6).
	[address, length] := split(cidr, "/")
	widest := _widest_prefix(address)
	to_number(length) < widest
	msg := sprintf(
		"K8S-017 network-policy-open: NetworkPolicy %s/%s %s rule %d allows ipBlock %s, wider than /%d",
		[_namespace(obj), _name(obj), direction, i, cidr, widest],
	)
}

_widest_prefix(address) := 16 if contains(address, ":")

_widest_prefix(address) := 8 if not contains(address, ":")

_selects_all_or_absent(peer, key) if object.get(peer, key, null) == null

_selects_all_or_absent(peer, key) if {
	selector := peer[key]
	is_object(selector)
	_selects_every_pod(selector)
}

_peer_scope(peer) := "in every namespace" if "namespaceSelector" in object.keys(peer)

else := "in its namespace"

# hostPort 0 is the same as none (Pod Security baseline allows it).
deny contains msg if {
	some [w, field, c] in _containers
	some port in _array(object.get(c, "ports", []))
	host_port := _get(port, "hostPort", 0)
	not host_port in {0, null}
	msg := sprintf("K8S-018 host-port: %s binds host port %v", [_cid(w, field, c), host_port])
}

deny contains msg if {
	some w in _workloads
	type := w.spec.securityContext.appArmorProfile.type
	not type in apparmor_profiles
	msg := sprintf("K8S-019 apparmor: %s sets AppArmor profile %v for the pod", [w.id, type])
}

deny contains msg if {
	some [w, field, c] in _containers
	type := c.securityContext.appArmorProfile.type
	not type in apparmor_profiles
	msg := sprintf("K8S-019 apparmor: %s sets AppArmor profile %v", [_cid(w, field, c), type])
}

# The annotation predates the field and kubelets still honour it.
deny contains msg if {
	some w in _workloads
	some key, value in _get(w.meta, "annotations", {})
	startswith(key, apparmor_annotation_prefix)
	not _apparmor_annotation_confined(value)
	msg := sprintf("K8S-019 apparmor: %s annotates %s with AppArmor profile %v", [w.id, key, value])
}

_apparmor_annotation_confined(value) if value == "runtime/default"

_apparmor_annotation_confined(value) if startswith(value, "localhost/")

deny contains msg if {
	some w in _workloads
	some sysctl in _array(_get(w.spec.securityContext, "sysctls", []))
	name := _get(sysctl, "name", "<unnamed>")
	not _safe_sysctl(name)
	msg := sprintf("K8S-020 sysctls: %s sets sysctl %v, which is not in the Pod Security safe set", [w.id, name])
}

_safe_sysctl(name) if name in safe_sysctls

# The API also takes `/` as the separator, with `.` then literal inside a segment.
_safe_sysctl(name) if {
	concat(".", [replace(segment, ".", "/") | some segment in split(name, "/")]) in safe_sysctls
}

deny contains msg if {
	some [w, field, c] in _containers
	proc_mount := c.securityContext.procMount
	proc_mount != "Default"
	msg := sprintf("K8S-021 proc-mount: %s sets procMount %v, not Default", [_cid(w, field, c), proc_mount])
}

# Pod Security enforces these only where it is `restricted`; the node-agent namespace is not.
deny contains msg if {
	some w in _workloads
	some volume in _array(object.get(w.spec, "volumes", []))
	some type in object.keys(volume)
	not type in {"name", "hostPath"}
	not type in volume_types
	msg := sprintf("K8S-022 volume-types: %s uses a %s volume (%v)", [w.id, type, _get(volume, "name", "?")])
}

deny contains msg if {
	some w in _workloads
	some key, value in _get(_get(w.spec, "securityContext", {}), "seLinuxOptions", {})
	not _selinux_allowed(key, value)
	msg := sprintf("K8S-023 selinux: %s sets seLinuxOptions.%s %v for the pod", [w.id, key, value])
}

deny contains msg if {
	some [w, field, c] in _containers
	some key, value in _get(_get(c, "securityContext", {}), "seLinuxOptions", {})
	not _selinux_allowed(key, value)
	msg := sprintf("K8S-023 selinux: %s sets seLinuxOptions.%s %v", [_cid(w, field, c), key, value])
}

_selinux_allowed("level", _)

_selinux_allowed("type", value) if value in selinux_types

_selinux_allowed("type", "")
