package gateway_test

import data.gateway

# Secret-looking samples are assembled with concat so that secret scanners reading the
# repository do not flag the test data itself.
pem_header(kind) := concat("", ["-----BEGIN ", kind, "PRIVATE ", "KEY-----"])

pem_footer(kind) := concat("", ["-----END ", kind, "PRIVATE ", "KEY-----"])

rsa_key := concat("\n", [
	pem_header("RSA "),
	"MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu",
	"KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==",
	pem_footer("RSA "),
])

openai_key := concat("", ["sk-", "proj-", "Q2x5dGhlcm9ub3RhcmVhbGtleTEyMzQ1Njc4OTA"])

aws_key := concat("", ["AKIA", "IOSFODNN7EXAMPLE"])

github_token := concat("", ["ghp", "_", "abcdefghijklmnopqrstuvwxyz0123456789"])

github_pat := concat("", ["github", "_pat_", "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"])

slack_token := concat("", ["xox", "b-", "1234567890-abcdefghijkl"])

jwt := concat(".", ["eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiIxMjM0NTY3ODkwIn0", "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"])

with_mode(mode) := object.union(config, {"dlp": {"mode": mode}})

# [type, substring] for every match in `texts`, as redact mode reports them.
found(texts) := {[r.type, r.text] | some r in redacted} if {
	redacted := gateway.redactions with input as request({"texts": texts})
		with data.sovereign.config as with_mode("redact")
}

# Positive and negative samples per detector.

test_dlp_findings_email_found if {
	found(["write to ada.lovelace@example.org or bob+tag@mail.co.uk."]) == {
		["email", "ada.lovelace@example.org"],
		["email", "bob+tag@mail.co.uk"],
	}
}

test_dlp_findings_email_needs_a_domain_with_a_dot if {
	found(["ada@localhost, @handle, a@b.c, ada@"]) == set()
}

test_dlp_findings_us_ssn_found if {
	found(["SSN 123-45-6789, again:078-05-1120"]) == {["us_ssn", "123-45-6789"], ["us_ssn", "078-05-1120"]}
}

test_dlp_findings_us_ssn_never_issued_numbers_are_ignored if {
	found(["000-12-3456 666-12-3456 912-34-5678 123-00-4567 123-45-0000"]) == set()
}

test_dlp_findings_us_ssn_needs_its_exact_shape if {
	found(["123456789 1234-56-7890 123-45-67890 123-45-6789-1 12-345-6789"]) == set()
}

test_dlp_findings_payment_card_found if {
	found(["4111 1111 1111 1111; 5500-0000-0000-0004; 378282246310005; 6011111111111117"]) == {
		["payment_card", "4111 1111 1111 1111"],
		["payment_card", "5500-0000-0000-0004"],
		["payment_card", "378282246310005"],
		["payment_card", "6011111111111117"],
	}
}

test_dlp_findings_payment_card_must_pass_luhn if {
	found(["4111 1111 1111 1112 and 4111111111111121"]) == set()
}

test_dlp_findings_payment_card_rejects_other_shapes if {
	# 12 digits, 20 digits, dots, and a space and a dash in one number.
	found(["411111111111 41111111111111111111 4111.1111.1111.1111 4111 1111-1111 1111"]) == set()
}

test_dlp_findings_iban_found if {
	found(["DE89 3704 0044 0532 0130 00; GB29NWBK60161331926819; NL91 ABNA 0417 1643 00"]) == {
		["iban", "DE89 3704 0044 0532 0130 00"],
		["iban", "GB29NWBK60161331926819"],
		["iban", "NL91 ABNA 0417 1643 00"],
	}
}

test_dlp_findings_iban_stops_before_a_following_word if {
	found(["pay BE68 5390 0754 7034 EUR today"]) == {["iban", "BE68 5390 0754 7034"]}
}

test_dlp_findings_iban_must_pass_mod_97 if {
	found(["DE89 3704 0044 0532 0130 01"]) == set()
}

test_dlp_findings_iban_must_have_the_country_length if {
	found(["DE89 3704 0044 0532 0130 0 and XX89 3704 0044 0532 0130 00"]) == set()
}

test_dlp_findings_phone_found if {
	found(["+14155552671, +44 20 7946 0958, (555) 123-4567, (555)123.4567, 555-123-4567, 555.987.6543, 1-800-555-0199"]) == {
		["phone", "+14155552671"],
		["phone", "+44 20 7946 0958"],
		["phone", "(555) 123-4567"],
		["phone", "(555)123.4567"],
		["phone", "555-123-4567"],
		["phone", "555.987.6543"],
		["phone", "1-800-555-0199"],
	}
}

test_dlp_findings_phone_splits_numbers_joined_by_a_space if {
	found(["555-123-4567 555-987-6543"]) == {["phone", "555-123-4567"], ["phone", "555-987-6543"]}
}

test_dlp_findings_phone_rejects_other_shapes if {
	found(["+1234567 555-1234 2024-01-15 555-123-45678 (555) 1234-567 555-123.4567 +1234567890123456"]) == set()
}

test_dlp_findings_private_key_found_whole_block if {
	found([concat("\n", ["key:", rsa_key, "end"])]) == {["private_key", rsa_key]}
}

test_dlp_findings_private_key_without_end_line if {
	truncated := concat("\n", [pem_header(""), "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "BKcwggSjAgEAAoIBAQC7"])
	found([concat("", [truncated, "\n\nwhat is this?"])]) == {["private_key", truncated]}
}

test_dlp_findings_private_key_not_public_material if {
	found(["-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY----- and -----BEGIN CERTIFICATE-----"]) == set()
}

test_dlp_findings_api_key_found if {
	text := concat(" ", ["keys:", openai_key, aws_key, github_token, github_pat, slack_token])
	found([text]) == {
		["api_key", openai_key],
		["api_key", aws_key],
		["api_key", github_token],
		["api_key", github_pat],
		["api_key", slack_token],
	}
}

test_dlp_findings_api_key_rejects_look_alikes if {
	# An sk- inside a word, too short, no digit, one character short, too short, too short.
	look_alikes := [
		"disk-abcdefghijklmnopqrstuvwxyz0123",
		"sk-short1",
		"sk-only-words-without-any-digit-at-all",
		substring(aws_key, 0, 19),
		"ghp_tooShort123",
		"xoxb-123",
	]
	found([concat(" ", look_alikes)]) == set()
}

test_dlp_findings_jwt_found if {
	found([concat("", ["Authorization: Bearer ", jwt])]) == {["jwt", jwt]}
}

test_dlp_findings_jwt_needs_header_and_payload if {
	found(["eyJhbGciOiJIUzI1NiJ9 alone; eyJhbGciOiJIUzI1NiJ9.notapayload.sig"]) == set()
}

test_dlp_findings_empty_for_plain_text if {
	findings := gateway.dlp_findings with input as request({"texts": ["The outage lasted 40 minutes in 2024."]})
		with data.sovereign.config as config
	findings == []
}

test_dlp_findings_counts_every_match_by_type if {
	req := request({"texts": ["ada@example.org, ada@example.org", "123-45-6789"]})
	findings := gateway.dlp_findings with input as req with data.sovereign.config as with_mode("log")
	findings == [{"type": "email", "count": 2}, {"type": "us_ssn", "count": 1}]
}

test_dlp_blocks_in_block_mode if {
	req := request({"texts": ["ada@example.org and 123-45-6789"]})
	gateway.dlp_blocks with input as req with data.sovereign.config as with_mode("block")
	reasons := gateway.dlp_reasons with input as req with data.sovereign.config as with_mode("block")
	reasons == {
		"dlp: email found in the request (mode block)",
		"dlp: us_ssn found in the request (mode block)",
	}
	redactions := gateway.redactions with input as req with data.sovereign.config as with_mode("block")
	redactions == []
}

test_dlp_blocks_nothing_without_findings if {
	not gateway.dlp_blocks with input as request({"texts": ["hello"]}) with data.sovereign.config as with_mode("block")
}

test_redactions_list_each_distinct_match_in_redact_mode if {
	req := request({"texts": ["ada@example.org, ada@example.org"]})
	redactions := gateway.redactions with input as req with data.sovereign.config as with_mode("redact")
	redactions == [{"type": "email", "text": "ada@example.org"}]
	not gateway.dlp_blocks with input as req with data.sovereign.config as with_mode("redact")
}

test_redactions_empty_in_log_mode if {
	req := request({"texts": ["ada@example.org"]})
	redactions := gateway.redactions with input as req with data.sovereign.config as with_mode("log")
	redactions == []
	not gateway.dlp_blocks with input as req with data.sovereign.config as with_mode("log")
	reasons := gateway.dlp_reasons with input as req with data.sovereign.config as with_mode("log")
	reasons == set()
}

test_dlp_mode_unknown_fails_closed_to_block if {
	mode := gateway.dlp_mode with data.sovereign.config as with_mode("off")
	mode == "block"
}

test_dlp_mode_missing_fails_closed_to_block if {
	mode := gateway.dlp_mode with data.sovereign.config as object.remove(config, ["dlp"])
	mode == "block"
}
