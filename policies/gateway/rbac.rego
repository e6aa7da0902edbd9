# Gateway role-based access.
# Which subject may take which action, on which model, from the roles, permissions
# and per-model allow-lists that `sovereign render` writes to data.sovereign.config.
# (The package-wide METADATA annotation lives in decision.rego; OPA allows one.)
package gateway

# METADATA
# title: Service-only actions
# description: |
#   The raw embedding endpoint serves internal clients, never users. Retrieval (/query)
#   is open to any caller holding `query`: what it returns is filtered by memory_access.
service_only_actions := {"embed"}

# METADATA
# title: Action permissions
# description: Actions granted by another action's permission; the rest need their own.
action_permissions := {"delete": "ingest"}

# METADATA
# title: RBAC allows
# description: |
#   True when one of the subject's roles grants the action, the named model (if any)
#   is served to one of those roles, and a service-only action comes from a service client.
default rbac_allowed := false

rbac_allowed if {
	_permitted
	_model_ok
	_service_ok
}

# METADATA
# title: RBAC refusals
# description: One short reason per failed RBAC check, safe to show to the caller.
rbac_reasons contains reason if {
	is_string(input.action)
	not _permitted
	reason := concat("", ["role(s) ", _roles_text, " lack permission ", _permission])
}

rbac_reasons contains reason if {
	_model_named
	not _model_known
	reason := concat("", ["model ", input.model, " is not available on this node"])
}

rbac_reasons contains reason if {
	_model_known
	not _model_allowed
	reason := concat("", ["model ", input.model, " is not allowed for role(s) ", _roles_text])
}

rbac_reasons contains "/embed accepts only service clients" if not _service_ok

_roles contains role if {
	is_array(input.subject.roles)
	some role in input.subject.roles
	is_string(role)
}

default _roles_text := "(none)"

_roles_text := concat(", ", sort(_roles)) if count(_roles) > 0

_permission := object.get(action_permissions, input.action, input.action)

_permitted if {
	some role in _roles
	_permission in data.sovereign.config.roles[role]
}

_model_named if is_string(input.model)

_model_known if {
	_model_named
	is_object(data.sovereign.config.models[input.model])
}

_model_allowed if {
	_model_known
	some role in _roles
	role in data.sovereign.config.models[input.model].allowed_roles
}

_model_ok if _model == null

_model_ok if _model_allowed

_service_ok if {
	is_string(input.action)
	not input.action in service_only_actions
}

_service_ok if input.subject.service == true
