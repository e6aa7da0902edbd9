# METADATA
# title: Gateway decision
# description: |
#   The one document the gateway asks for on every request: RBAC, clearance and DLP
#   combined into allow, caller-safe reasons, redactions and obligations.
# entrypoint: true
package gateway

# METADATA
# title: Allow
# description: True only for well-formed input that passes RBAC, clearance and DLP.
default allow := false

allow if {
	_input_ok
	rbac_allowed
	clearance_allowed
	memory_allowed
	not dlp_blocks
}

# METADATA
# title: Reasons
# description: Why the request is refused, sorted; empty when it is allowed.
reasons := [] if {
	# Checked first: the refusals cost as much as the decision and an allow needs none.
	allow
} else := sort(_refusals) if {
	_input_ok
} else := ["request input is missing or malformed"]

# METADATA
# title: Decision
# description: |
#   Always defined, also for missing or malformed input (then a denial), so the gateway
#   can tell "denied" from "no policy loaded".
default decision := {
	"allow": false,
	"reasons": ["request input is missing or malformed"],
	"redactions": [],
	"obligations": {
		"dlp_findings": [],
		"max_classification": "public",
		"memory_access": {"classifications": [], "subject": "", "denied_tags": []},
	},
}

decision := {
	"allow": allow,
	"reasons": reasons,
	"redactions": redactions,
	"obligations": {
		"dlp_findings": dlp_findings,
		"max_classification": max_classification,
		"memory_access": memory_access,
	},
}

_refusals contains reason if some reason in rbac_reasons

_refusals contains reason if some reason in clearance_reasons

_refusals contains reason if some reason in dlp_reasons

_refusals contains reason if some reason in memory_reasons

# The gateway always sends every key; anything else means a broken caller, so refuse.
_input_ok if {
	is_string(input.action)
	is_string(input.subject.sub)
	input.subject.sub != ""
	is_array(input.subject.roles)
	is_array(input.texts)
	type_name(_model) in {"null", "string"}
	type_name(_resource) in {"null", "object"}
	every text in input.texts {
		is_string(text)
	}
}

# An absent key reads as null; input that is not an object has neither.
_model := object.get(input, "model", null) if is_object(input)

_resource := object.get(input, "resource", null) if is_object(input)
