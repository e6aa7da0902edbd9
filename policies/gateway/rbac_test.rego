package gateway_test

import data.gateway

config := {
	"profile": "test",
	"kind": "personal",
	"roles": {
		"admin": ["admin", "audit:read", "chat", "query"],
		"user": ["chat", "embeddings", "ingest", "models:read"],
		"service": ["embed", "query"],
	},
	"models": {
		"open-model": {"allowed_roles": ["admin", "user"]},
		"admin-model": {"allowed_roles": ["admin"]},
	},
	"service_clients": ["sovereign-memory"],
	"dlp": {"mode": "block"},
	"classifications": ["public", "internal", "confidential", "secret"],
	"clearances": {"admin": "secret", "service": "secret", "user": "internal"},
}

request(overrides) := object.union(
	{
		"action": "chat",
		"path": "/v1/chat/completions",
		"subject": {"sub": "u-1", "client": "cli", "roles": ["user"], "service": false},
		"model": null,
		"texts": [],
		"resource": null,
	},
	overrides,
)

subject(roles, service) := {"sub": "u-1", "client": "cli", "roles": roles, "service": service}

test_rbac_allowed_user_chat if {
	gateway.rbac_allowed with input as request({}) with data.sovereign.config as config
}

test_rbac_allowed_user_with_a_model_open_to_users if {
	gateway.rbac_allowed with input as request({"model": "open-model"}) with data.sovereign.config as config
}

test_rbac_allowed_denies_a_missing_permission if {
	not gateway.rbac_allowed with input as request({"action": "audit:read"}) with data.sovereign.config as config
}

test_rbac_reasons_names_roles_and_permission if {
	reasons := gateway.rbac_reasons with input as request({"action": "audit:read"})
		with data.sovereign.config as config
	reasons == {"role(s) user lack permission audit:read"}
}

test_rbac_reasons_lists_several_roles_sorted if {
	req := request({"action": "ingest", "subject": subject(["service", "admin"], true)})
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"role(s) admin, service lack permission ingest"}
}

test_rbac_allowed_denies_a_subject_without_roles if {
	req := request({"subject": subject([], false)})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"role(s) (none) lack permission chat"}
}

test_rbac_reasons_ignore_roles_that_are_not_strings if {
	req := request({"action": "audit:read", "subject": subject([["admin"], 7, "user"], false)})
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"role(s) user lack permission audit:read"}
}

test_rbac_allowed_ignores_roles_the_config_lacks if {
	req := request({"subject": subject(["ghost", "user"], false)})
	gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_denies_a_model_not_allowed_for_the_role if {
	req := request({"model": "admin-model"})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"model admin-model is not allowed for role(s) user"}
}

test_rbac_allowed_admin_uses_the_admin_model if {
	req := request({"model": "admin-model", "subject": subject(["admin"], false)})
	gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_denies_an_unknown_model if {
	req := request({"model": "gpt-9"})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"model gpt-9 is not available on this node"}
}

test_rbac_allowed_service_client_embeds if {
	req := request({"action": "embed", "subject": subject(["service"], true)})
	gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_service_client_queries if {
	req := request({"action": "query", "subject": subject(["service"], true)})
	gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_admin_session_queries if {
	req := request({"action": "query", "subject": subject(["admin"], false)})
	gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_denies_query_without_the_permission if {
	req := request({"action": "query"})
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"role(s) user lack permission query"}
}

test_rbac_allowed_delete_takes_the_ingest_permission if {
	gateway.rbac_allowed with input as request({"action": "delete"}) with data.sovereign.config as config
	req := request({"action": "delete", "subject": subject(["service"], true)})
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"role(s) service lack permission ingest"}
}

test_rbac_allowed_denies_embed_from_a_user_session if {
	req := request({"action": "embed", "subject": subject(["admin", "service"], false)})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
	reasons := gateway.rbac_reasons with input as req with data.sovereign.config as config
	reasons == {"/embed accepts only service clients"}
}

test_rbac_allowed_denies_embed_when_the_service_flag_is_absent if {
	req := request({"action": "embed", "subject": {"sub": "svc", "roles": ["service"]}})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_denies_a_service_client_chatting if {
	req := request({"subject": subject(["service"], true)})
	not gateway.rbac_allowed with input as req with data.sovereign.config as config
}

test_rbac_allowed_denies_everything_without_config if {
	not gateway.rbac_allowed with input as request({}) with data.sovereign.config as {}
}
