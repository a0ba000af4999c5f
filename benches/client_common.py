"""What the Python benchmark clients (idle_client.py, load_client.py) share."""

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    """One line naming an error: SQLSTATE (when the server sent one) and message."""
    sqlstate = getattr(e, "sqlstate", None)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}{f' [{sqlstate}]' if sqlstate else ''}: {first}"
