"""How every script starts: typed arguments from a function signature, and one-line errors for users."""

import os
import sys
from typing import Any, Callable

from jsonargparse import CLI


def run(function: Callable[..., Any]) -> Any:
    """Parse the command line into `function`'s arguments (jsonargparse: --help, --config file.yaml)
    and call it. Problems with the user's input (missing or corrupt files, bad values) are raised
    as OSError/ValueError (a diverged training run as FloatingPointError) and printed as one line;
    set LIT_LORA_DEBUG=1 for the full traceback."""
    try:
        return CLI(function, as_positional=False)
    except (OSError, ValueError, FloatingPointError) as error:
        if os.environ.get("LIT_LORA_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
