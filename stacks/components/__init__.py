"""One ComponentResource per part of the stack; `base` holds what every pod shares."""
