# Gateway data-loss prevention.
# Scans input.texts for personal data and secrets and, by data.sovereign.config.dlp.mode,
# blocks the request (block), lists the matches to mask (redact) or only reports (log).
# Patterns use only ASCII classes and no look-around, so Go (OPA) and Rust (regorus)
# regular expressions match the same substrings.
# (The package-wide METADATA annotation lives in decision.rego; OPA allows one.)
package gateway

# METADATA
# title: DLP mode
# description: block, redact or log; an unknown or missing mode blocks, failing closed.
default dlp_mode := "block"

dlp_mode := data.sovereign.config.dlp.mode if data.sovereign.config.dlp.mode in {"block", "redact", "log"}

# METADATA
# title: DLP findings
# description: How many matches of each type the texts hold, by type; filled in every mode.
dlp_findings := [{"type": kind, "count": count([1 | some found in _findings; found[0] == kind])} |
	some kind in sort({found[0] | some found in _findings})
]

# METADATA
# title: DLP blocks
# description: True in mode block when anything was found.
dlp_blocks if {
	dlp_mode == "block"
	count(_findings) > 0
}

# METADATA
# title: DLP refusals
# description: One reason per type found, in mode block.
dlp_reasons contains reason if {
	dlp_mode == "block"
	some found in _findings
	reason := concat("", ["dlp: ", found[0], " found in the request (mode block)"])
}

# METADATA
# title: Redactions
# description: |
#   In mode redact, every distinct matched substring with its type, sorted, for the
#   gateway to mask; empty in the other modes.
redactions := [{"type": pair[0], "text": pair[1]} | some pair in sort({found | some found in _findings})] if {
	dlp_mode == "redact"
} else := []

default _texts := []

_texts := input.texts if is_array(input.texts)

# Every match as [type, substring], duplicates kept so the counts are counts of matches.
_findings := [found |
	some text in _texts
	is_string(text)
	some detector in [_emails(text), _private_keys(text), _jwts(text), _api_keys(text), _numbers(text)]
	some found in detector
]

# Each detector runs a regex only when a cheap literal test says it could match: regorus
# rebuilds a pattern's matching state on every call, so skipped calls are the main saving.

_email_re := `[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}`

_emails(text) := [["email", match] |
	contains(text, "@")
	some match in regex.find_n(_email_re, text, -1)
]

# The whole PEM block when its END line is there, else the header and the base64 lines after it.
_private_key_re := `-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:(?s:.*?)-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:\r?\n[A-Za-z0-9+/=]+)*)`

_private_keys(text) := [["private_key", match] |
	contains(text, "PRIVATE KEY")
	some match in regex.find_n(_private_key_re, text, -1)
]

# Header and payload are base64url JSON objects, so both start with eyJ ('{"').
_jwt_re := `eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*`

_jwts(text) := [["jwt", match] |
	contains(text, "eyJ")
	some match in regex.find_n(_jwt_re, text, -1)
]

# The whole token-like word around a prefix, so "disk-..." is not mistaken for "sk-...":
# a key must start its word, which look-behind would say but neither engine has.
_api_key_word_re := `[A-Za-z0-9_-]*(?:sk-|AKIA|gh[pousr]_|github_pat_|xox[abpr]-)[A-Za-z0-9_-]*`

_api_key_re := `^(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}|xox[abpr]-[A-Za-z0-9-]{10,})$`

_api_keys(text) := [["api_key", word] |
	_api_key_prefix(text)
	some word in regex.find_n(_api_key_word_re, text, -1)
	_api_key_ok(word)
]

_api_key_prefix(text) if contains(text, "sk-")

_api_key_prefix(text) if contains(text, "AKIA")

_api_key_prefix(text) if contains(text, "xox")

_api_key_prefix(text) if {
	contains(text, "gh")
	contains(text, "_")
}

_api_key_ok(word) if {
	not startswith(word, "sk-")
	regex.match(_api_key_re, word)
}

# Real sk- keys are random base62 and carry digits; hyphenated prose after "sk-" does not.
_api_key_ok(word) if {
	startswith(word, "sk-")
	regex.match(_api_key_re, word)
	regex.match(`[0-9]`, word)
}

# One pass finds the IBAN-shaped (group 1), (NNN) NNN-NNNN (group 2) and digit-run
# (group 3) candidates; a run is the longest stretch of digits with single space, dot or
# dash separators holding at least 8 digits, so a match never starts or ends inside a number.
_number_re := `([A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4})+(?: ?[A-Z0-9]{1,3})?)|(\([0-9]{3}\) ?[0-9]+[ .-][0-9]+)|(\+?[0-9](?:[ .-]?[0-9]){7,})`

_numbers(text) := [found |
	# A single-class pattern is answered by a byte scan; the full pattern costs far more.
	regex.match(`[0-9]`, text)
	some match in regex.find_all_string_submatch_n(_number_re, text, -1)
	some found in _number_findings(match)
]

_number_findings(match) := [["iban", candidate] |
	some candidate in _iban_candidates(match[1])
	_iban_ok(candidate)
] if {
	match[1] != ""
} else := [["phone", match[2]] | _nanp_parenthesised(match[2])] if {
	match[2] != ""
} else := _run_findings(match[3])

# A run that is not one finding may be several joined by single spaces, as in
# "555-123-4567 555-987-6543"; then each space-separated piece is tried.
_run_findings(run) := [[kind, run]] if {
	kind := _number_kind(run)
	kind != ""
} else := [[kind, piece] |
	some piece in split(run, " ")
	kind := _number_kind(piece)
	kind != ""
]

# Total, "" for no finding: regorus's compiled program does not stop at an assignment from
# an undefined function call, so callers test the value instead.
# The length test in front of each shape skips the string work for runs it cannot be.
_number_kind(run) := "phone" if {
	startswith(run, "+")
	_e164_digits(count(_digits(run)))
} else := "us_ssn" if {
	count(run) == 11
	_us_ssn(run)
} else := "phone" if {
	count(run) in {12, 14}
	_nanp(run)
} else := "payment_card" if {
	count(run) >= 13
	_payment_card(run)
} else := ""

_digits(run) := strings.replace_n({" ": "", "-": "", ".": "", "+": ""}, run)

_e164_digits(n) if {
	n >= 8
	n <= 15
}

# NNN-NN-NNNN; area 000, 666 and 9xx, group 00 and serial 0000 are never issued.
_us_ssn(run) if {
	not contains(run, " ")
	not contains(run, ".")
	parts := split(run, "-")
	[count(part) | some part in parts] == [3, 2, 4]
	not parts[0] in {"000", "666"}
	not startswith(parts[0], "9")
	parts[1] != "00"
	parts[2] != "0000"
}

# NNN-NNN-NNNN or NNN.NNN.NNNN, optionally after a country code 1 and the same separator.
_nanp(run) if {
	not contains(run, " ")
	some separator in ["-", "."]
	parts := split(run, separator)
	_nanp_groups(parts)
}

_nanp_groups(parts) if [count(part) | some part in parts] == [3, 3, 4]

_nanp_groups(parts) if {
	parts[0] == "1"
	[count(part) | some part in parts] == [1, 3, 3, 4]
}

# (NNN) NNN-NNNN, with or without the space and with -, . or space before the last four.
_nanp_parenthesised(candidate) if {
	rest := trim_left(substring(candidate, 5, -1), " ")
	[count(part) | some part in split(strings.replace_n({" ": "-", ".": "-"}, rest), "-")] == [3, 4]
}

# 13-19 digits, all groups split by the same separator (space or dash), Luhn-valid.
_payment_card(run) if {
	not startswith(run, "+")
	not contains(run, ".")
	not _mixed_separators(run)
	digits := _digits(run)
	count(digits) >= 13
	count(digits) <= 19
	_luhn(digits)
}

_mixed_separators(run) if {
	contains(run, " ")
	contains(run, "-")
}

# Reads the reversed number two digits at a time: the first digit of each pair counts
# as is, the second doubled, which halves the work per card in both engines.
_luhn(digits) if {
	reversed := strings.reverse(digits)
	total := sum([_luhn_pair[substring(reversed, i, 2)] | some i in numbers.range_step(0, count(reversed) - 1, 2)])
	total % 10 == 0
}

# "ab" -> a + (2b with its digits summed); "a" -> a, for an odd count of digits.
_luhn_pair := {
	"0": 0, "00": 0, "01": 2, "02": 4, "03": 6, "04": 8, "05": 1, "06": 3, "07": 5, "08": 7,
	"09": 9, "1": 1, "10": 1, "11": 3, "12": 5, "13": 7, "14": 9, "15": 2, "16": 4, "17": 6,
	"18": 8, "19": 10, "2": 2, "20": 2, "21": 4, "22": 6, "23": 8, "24": 10, "25": 3, "26": 5,
	"27": 7, "28": 9, "29": 11, "3": 3, "30": 3, "31": 5, "32": 7, "33": 9, "34": 11, "35": 4,
	"36": 6, "37": 8, "38": 10, "39": 12, "4": 4, "40": 4, "41": 6, "42": 8, "43": 10, "44": 12,
	"45": 5, "46": 7, "47": 9, "48": 11, "49": 13, "5": 5, "50": 5, "51": 7, "52": 9, "53": 11,
	"54": 13, "55": 6, "56": 8, "57": 10, "58": 12, "59": 14, "6": 6, "60": 6, "61": 8, "62": 10,
	"63": 12, "64": 14, "65": 7, "66": 9, "67": 11, "68": 13, "69": 15, "7": 7, "70": 7, "71": 9,
	"72": 11, "73": 13, "74": 15, "75": 8, "76": 10, "77": 12, "78": 14, "79": 16, "8": 8, "80": 8,
	"81": 10, "82": 12, "83": 14, "84": 16, "85": 9, "86": 11, "87": 13, "88": 15, "89": 17, "9": 9,
	"90": 9, "91": 11, "92": 13, "93": 15, "94": 17, "95": 10, "96": 12, "97": 14, "98": 16, "99": 18,
}

_digit_value := {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6, "7": 7, "8": 8, "9": 9}

# The IBAN pattern may run on into a following upper-case word ("... 7034 EUR"), so every
# prefix ending at a space is a candidate; the per-country length admits at most one.
_iban_candidates(match) := [concat(" ", array.slice(groups, 0, n)) |
	groups := split(match, " ")
	some n in numbers.range(1, count(groups))
]

# ISO 13616: the country's length, then mod 97 of the rearranged, letters-as-numbers
# string is 1. The number has up to 66 digits, beyond both engines' exact integers, so
# the remainder is the sum of digit x (10^position mod 97), reduced once at the end.
_iban_ok(candidate) if {
	compact := replace(candidate, " ", "")
	_iban_lengths[substring(compact, 0, 2)] == count(compact)
	rearranged := concat("", [substring(compact, 4, -1), substring(compact, 0, 4)])
	digits := strings.replace_n(_iban_letter_digits, rearranged)
	last := count(digits) - 1
	total := sum([term |
		some i, digit in split(digits, "")
		term := _digit_value[digit] * _pow10_mod97[last - i]
	])
	total % 97 == 1
}

# 10^k mod 97 for k = 0..69.
_pow10_mod97 := [
	1, 10, 3, 30, 9, 90, 27, 76, 81, 34, 49, 5, 50, 15, 53, 45, 62, 38, 89, 17, 73, 51, 25, 56,
	75, 71, 31, 19, 93, 57, 85, 74, 61, 28, 86, 84, 64, 58, 95, 77, 91, 37, 79, 14, 43, 42, 32,
	29, 96, 87, 94, 67, 88, 7, 70, 21, 16, 63, 48, 92, 47, 82, 44, 52, 35, 59, 8, 80, 24, 46,
]

_iban_letter_digits := {
	"A": "10", "B": "11", "C": "12", "D": "13", "E": "14", "F": "15", "G": "16", "H": "17",
	"I": "18", "J": "19", "K": "20", "L": "21", "M": "22", "N": "23", "O": "24", "P": "25",
	"Q": "26", "R": "27", "S": "28", "T": "29", "U": "30", "V": "31", "W": "32", "X": "33",
	"Y": "34", "Z": "35",
}

# IBAN length per country, from the SWIFT IBAN registry.
_iban_lengths := {
	"AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
	"BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
	"DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
	"GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
	"IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
	"LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
	"MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
	"PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
	"SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
	"TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
