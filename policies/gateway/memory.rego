# Gateway memory access.
# Which stored documents a subject may read (the filter the vector store applies inside
# its index), and who may store or delete a document under which owner.
# (The package-wide METADATA annotation lives in decision.rego; OPA allows one.)
package gateway

# METADATA
# title: Memory access
# description: |
#   The retrieval filter: a chunk is readable when its classification is listed here
#   and either its owner is the subject or it carries none of the denied tags.
#   Malformed input reads nothing.
default memory_access := {"classifications": [], "subject": "", "denied_tags": []}

memory_access := {
	"classifications": _readable_classifications,
	"subject": _subject_text,
	"denied_tags": sort(_denied_tags),
} if _input_ok

# METADATA
# title: Document actions
# description: The actions that name a document's owner in their resource.
document_actions := {"ingest", "delete"}

# METADATA
# title: Memory allows
# description: True unless a document action names an owner the caller may not act for.
default memory_allowed := false

memory_allowed if not _owner_refused

# METADATA
# title: Memory refusals
# description: Why a document action is refused, safe to show to the caller.
memory_reasons contains reason if {
	_owner_refused
	reason := concat("", [
		"the document's owner ", _resource_owner,
		" is not the caller; only an admin may ",
		input.action, " a document for another owner",
	])
}

_readable_classifications := [level |
	some rank, level in classifications
	rank <= _classification_rank[max_classification]
]

_subject_text := input.subject.sub

_denied_tags contains tag if {
	some tag, roles in data.sovereign.config.restricted_tags
	not _holds_any(roles)
}

_holds_any(roles) if {
	some role in roles
	role in _roles
}

_is_admin if {
	some role in _roles
	"admin" in data.sovereign.config.roles[role]
}

_resource_owner := object.get(_resource, "owner", null) if is_object(_resource)

_owner_refused if {
	input.action in document_actions
	is_string(_resource_owner)
	_resource_owner != input.subject.sub
	not _is_admin
}
