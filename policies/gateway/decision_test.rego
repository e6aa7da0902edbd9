package gateway_test

import data.gateway

malformed := {
	"allow": false,
	"reasons": ["request input is missing or malformed"],
	"redactions": [],
	"obligations": {
		"dlp_findings": [],
		"max_classification": "public",
		"memory_access": {"classifications": [], "subject": "", "denied_tags": []},
	},
}

user_access := {"classifications": ["public", "internal"], "subject": "u-1", "denied_tags": []}

test_decision_denies_missing_input if {
	decision := gateway.decision with data.sovereign.config as config
	decision == malformed
}

test_decision_denies_empty_input if {
	decision := gateway.decision with input as {} with data.sovereign.config as config
	decision == malformed
}

test_decision_denies_input_that_is_not_an_object if {
	decision := gateway.decision with input as ["chat"] with data.sovereign.config as config
	decision == malformed
}

test_decision_denies_a_text_that_is_not_a_string if {
	decision := gateway.decision with input as request({"texts": ["ok", 7]}) with data.sovereign.config as config
	decision.allow == false
	decision.reasons == ["request input is missing or malformed"]
}

test_decision_denies_an_empty_subject if {
	req := request({"subject": {"sub": "", "roles": ["user"], "service": false}})
	decision := gateway.decision with input as req with data.sovereign.config as config
	decision.reasons == ["request input is missing or malformed"]
}

test_decision_denies_missing_texts if {
	decision := gateway.decision with input as object.remove(request({}), ["texts"])
		with data.sovereign.config as config
	decision.reasons == ["request input is missing or malformed"]
}

test_decision_allows_a_permitted_request if {
	decision := gateway.decision with input as request({"texts": ["hello"]}) with data.sovereign.config as config
	decision == {
		"allow": true,
		"reasons": [],
		"redactions": [],
		"obligations": {
			"dlp_findings": [],
			"max_classification": "internal",
			"memory_access": user_access,
		},
	}
}

test_decision_collects_every_reason_sorted if {
	req := request({
		"action": "embed",
		"subject": subject(["user"], false),
		"resource": {"classification": "secret"},
		"texts": ["ada@example.org"],
	})
	decision := gateway.decision with input as req with data.sovereign.config as config
	decision.allow == false
	decision.reasons == [
		"/embed accepts only service clients",
		"dlp: email found in the request (mode block)",
		"resource classification secret is above the caller's clearance internal",
		"role(s) user lack permission embed",
	]
}

test_decision_block_mode_denies_a_permitted_request_with_findings if {
	req := request({"texts": ["mail ada@example.org"]})
	decision := gateway.decision with input as req with data.sovereign.config as with_mode("block")
	decision == {
		"allow": false,
		"reasons": ["dlp: email found in the request (mode block)"],
		"redactions": [],
		"obligations": {
			"dlp_findings": [{"type": "email", "count": 1}],
			"max_classification": "internal",
			"memory_access": user_access,
		},
	}
}

test_decision_redact_mode_allows_and_lists_redactions if {
	req := request({"texts": ["card 4111 1111 1111 1111"]})
	decision := gateway.decision with input as req with data.sovereign.config as with_mode("redact")
	decision == {
		"allow": true,
		"reasons": [],
		"redactions": [{"type": "payment_card", "text": "4111 1111 1111 1111"}],
		"obligations": {
			"dlp_findings": [{"type": "payment_card", "count": 1}],
			"max_classification": "internal",
			"memory_access": user_access,
		},
	}
}

test_decision_redact_mode_still_denies_what_rbac_denies if {
	req := request({"action": "audit:read", "texts": ["ada@example.org"]})
	decision := gateway.decision with input as req with data.sovereign.config as with_mode("redact")
	decision.allow == false
	decision.reasons == ["role(s) user lack permission audit:read"]
	decision.obligations.dlp_findings == [{"type": "email", "count": 1}]
}

test_decision_log_mode_reports_findings_only if {
	req := request({"texts": ["ada@example.org"]})
	decision := gateway.decision with input as req with data.sovereign.config as with_mode("log")
	decision == {
		"allow": true,
		"reasons": [],
		"redactions": [],
		"obligations": {
			"dlp_findings": [{"type": "email", "count": 1}],
			"max_classification": "internal",
			"memory_access": user_access,
		},
	}
}

test_allow_is_false_by_default if {
	not gateway.allow with data.sovereign.config as config
}

test_reasons_empty_when_allowed if {
	reasons := gateway.reasons with input as request({}) with data.sovereign.config as config
	reasons == []
}
