# Gateway clearance.
# The highest classification a subject's roles may see, from the per-role clearances
# in data.sovereign.config, and whether a request's resource is within it.
# (The package-wide METADATA annotation lives in decision.rego; OPA allows one.)
package gateway

# METADATA
# title: Classifications, lowest first
# description: From the rendered data; the built-in order when the data leaves it out.
default classifications := ["public", "internal", "confidential", "secret"]

classifications := data.sovereign.config.classifications if is_array(data.sovereign.config.classifications)

# METADATA
# title: Maximum classification
# description: The highest clearance among the subject's roles; public when none has one.
default max_classification := "public"

max_classification := classifications[max(_clearance_ranks)] if count(_clearance_ranks) > 0

# METADATA
# title: Clearance allows
# description: True when the request names no resource or one at or below the clearance.
default clearance_allowed := false

clearance_allowed if _resource == null

clearance_allowed if _classification_rank[_resource_level] <= _classification_rank[max_classification]

# METADATA
# title: Clearance refusals
# description: Why the resource is out of reach, safe to show to the caller.
clearance_reasons contains "resource classification is missing or unknown" if {
	is_object(_resource)
	not _classification_rank[_resource_level]
}

clearance_reasons contains reason if {
	_classification_rank[_resource_level] > _classification_rank[max_classification]
	reason := concat("", ["resource classification ", _resource_level, " is above the caller's clearance ", max_classification])
}

_classification_rank := {level: rank | some rank, level in classifications}

# Written as iterations only: regorus's compiled program does not stop at an assignment
# from a missing key (it binds "undefined" and goes on), so no lookup is assigned here.
_clearance_ranks contains rank if {
	some role, level in data.sovereign.config.clearances
	role in _roles
	some rank, known in classifications
	known == level
}

_resource_level := object.get(_resource, "classification", null) if is_object(_resource)
