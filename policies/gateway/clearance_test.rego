package gateway_test

import data.gateway

test_max_classification_user_is_internal if {
	level := gateway.max_classification with input as request({}) with data.sovereign.config as config
	level == "internal"
}

test_max_classification_is_the_highest_of_the_roles if {
	req := request({"subject": subject(["user", "admin"], false)})
	level := gateway.max_classification with input as req with data.sovereign.config as config
	level == "secret"
}

test_max_classification_is_public_for_roles_without_clearance if {
	req := request({"subject": subject(["ghost"], false)})
	level := gateway.max_classification with input as req with data.sovereign.config as config
	level == "public"
}

test_max_classification_is_public_without_input if {
	level := gateway.max_classification with data.sovereign.config as config
	level == "public"
}

test_classifications_default_when_the_data_lacks_them if {
	levels := gateway.classifications with data.sovereign.config as object.remove(config, ["classifications"])
	levels == ["public", "internal", "confidential", "secret"]
}

test_clearance_allowed_without_a_resource if {
	gateway.clearance_allowed with input as request({}) with data.sovereign.config as config
}

test_clearance_allowed_resource_at_the_clearance if {
	req := request({"resource": {"classification": "internal"}})
	gateway.clearance_allowed with input as req with data.sovereign.config as config
}

test_clearance_allowed_resource_below_the_clearance if {
	req := request({"resource": {"classification": "public"}})
	gateway.clearance_allowed with input as req with data.sovereign.config as config
}

test_clearance_allowed_denies_a_resource_above_the_clearance if {
	req := request({"resource": {"classification": "confidential"}})
	not gateway.clearance_allowed with input as req with data.sovereign.config as config
	reasons := gateway.clearance_reasons with input as req with data.sovereign.config as config
	reasons == {"resource classification confidential is above the caller's clearance internal"}
}

test_clearance_allowed_admin_sees_secret if {
	req := request({"resource": {"classification": "secret"}, "subject": subject(["admin"], false)})
	gateway.clearance_allowed with input as req with data.sovereign.config as config
}

test_clearance_allowed_denies_an_unknown_classification if {
	req := request({"resource": {"classification": "cosmic"}})
	not gateway.clearance_allowed with input as req with data.sovereign.config as config
	reasons := gateway.clearance_reasons with input as req with data.sovereign.config as config
	reasons == {"resource classification is missing or unknown"}
}

test_clearance_allowed_denies_a_resource_without_classification if {
	req := request({"resource": {"owner": "ada"}})
	not gateway.clearance_allowed with input as req with data.sovereign.config as config
	reasons := gateway.clearance_reasons with input as req with data.sovereign.config as config
	reasons == {"resource classification is missing or unknown"}
}
