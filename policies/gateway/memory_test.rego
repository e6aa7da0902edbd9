package gateway_test

import data.gateway

memory_config := object.union(config, {
	"roles": {
		"admin": ["admin", "chat", "ingest", "query"],
		"user": ["chat", "ingest", "query"],
		"hr": ["chat", "ingest", "query"],
		"service": ["embed", "query"],
	},
	"clearances": {"admin": "secret", "hr": "confidential", "service": "secret", "user": "internal"},
	"restricted_tags": {"hr": ["admin", "hr"], "legal": ["admin"]},
})

access_for(roles) := access if {
	access := gateway.memory_access with input as request({"action": "query", "subject": subject(roles, false)})
		with data.sovereign.config as memory_config
}

test_memory_access_user_reads_to_internal_without_restricted_tags if {
	access_for(["user"]) == {
		"classifications": ["public", "internal"],
		"subject": "u-1",
		"denied_tags": ["hr", "legal"],
	}
}

test_memory_access_hr_reads_confidential_and_hr_tags if {
	access_for(["hr"]) == {
		"classifications": ["public", "internal", "confidential"],
		"subject": "u-1",
		"denied_tags": ["legal"],
	}
}

test_memory_access_takes_the_highest_of_several_roles if {
	access_for(["user", "admin"]) == {
		"classifications": ["public", "internal", "confidential", "secret"],
		"subject": "u-1",
		"denied_tags": [],
	}
}

test_memory_access_without_known_roles_reads_public_only if {
	access_for(["ghost"]) == {
		"classifications": ["public"],
		"subject": "u-1",
		"denied_tags": ["hr", "legal"],
	}
}

test_memory_access_is_in_the_decision_obligations if {
	req := request({"action": "query", "subject": subject(["hr"], false)})
	decision := gateway.decision with input as req with data.sovereign.config as memory_config
	decision.allow
	decision.obligations.memory_access.classifications == ["public", "internal", "confidential"]
}

test_memory_refuses_ingest_for_another_owner if {
	req := request({"action": "ingest", "resource": {"classification": "internal", "owner": "bob", "tags": []}})
	decision := gateway.decision with input as req with data.sovereign.config as memory_config
	decision.allow == false
	decision.reasons == ["the document's owner bob is not the caller; only an admin may ingest a document for another owner"]
}

test_memory_allows_ingest_for_oneself if {
	req := request({"action": "ingest", "resource": {"classification": "internal", "owner": "u-1", "tags": ["hr"]}})
	decision := gateway.decision with input as req with data.sovereign.config as memory_config
	decision.allow
}

test_memory_allows_an_admin_to_delete_for_another_owner if {
	req := request({
		"action": "delete",
		"subject": subject(["admin"], false),
		"resource": {"classification": "secret", "owner": "bob", "tags": []},
	})
	decision := gateway.decision with input as req with data.sovereign.config as memory_config
	decision.allow
}

test_memory_refuses_ingest_above_clearance if {
	req := request({"action": "ingest", "resource": {"classification": "confidential", "owner": "u-1", "tags": []}})
	decision := gateway.decision with input as req with data.sovereign.config as memory_config
	decision.reasons == ["resource classification confidential is above the caller's clearance internal"]
}
