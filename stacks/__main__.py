"""`pulumi up` runs this: check the whole config, then build the stack."""

import sys
from pathlib import Path

# Pulumi runs this directory as a script; the project root makes `stacks` importable.
PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from stacks.program import main  # noqa: E402

main(PROJECT_DIR)
