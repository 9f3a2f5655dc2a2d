"""What the lookup service and the console do alike over HTTP, defined once so the two cannot drift apart: access-log
fields, metric labels from fixed sets, API key lists and digests, logging set up and the package version. Standard
library only.
"""

import hashlib
import json
import logging
from collections.abc import Set as AbstractSet
from importlib import metadata
from typing import Any
from urllib.parse import unquote_plus

# Label values come from these fixed sets only: a client can send any method and path, and each new label
# value is a new series kept for the life of the process (and a bigger scrape).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
UNMATCHED_ROUTE = "unmatched"
# The access logs' fields that carry what a client sent are cut to this many characters.
LOGGED_TEXT_CHARS = 512
# What a query parameter the app does not read is logged as: `name=REDACTED`, or just this without a `=`.
REDACTED = "REDACTED"
# `;` separates parameters too for some servers and proxies (and Python's parse_qsl before 3.10).


def logged_method(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def loggable_query(query_string: bytes, logged: AbstractSet[str]) -> str:
    """The query string as it may be logged: the values of the parameters named in `logged` (the app's own,
    none a secret) as sent, every other one's whole value (to the next `&`, as the apps read it) replaced by
    REDACTED, the name kept, and a part without a `=` by REDACTED whole. An allowlist: credentials come under
    any name (`?key=`, `?api-key=`, `?sig=`, `?code=`, ...). Inside a logged value, a `;name=...` piece whose
    name is not logged is REDACTED too: a proxy or server in front may split parameters at `;`. Pass the
    result through `bounded`."""
    parts = query_string.decode("latin-1").split("&")
    for index, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if not part:
            continue
        if unquote_plus(name) not in logged:
            parts[index] = f"{name}={REDACTED}" if equals else REDACTED
        elif ";" in value:
            first, *pieces = value.split(";")
            parts[index] = f"{name}={';'.join([first, *(_logged_piece(piece, logged) for piece in pieces)])}"
    return "&".join(parts)


def _logged_piece(piece: str, logged: AbstractSet[str]) -> str:
    name, equals, _ = piece.partition("=")
    return f"{name}={REDACTED}" if equals and unquote_plus(name) not in logged else piece


def bounded(text: str) -> str:
    """`text` cut at LOGGED_TEXT_CHARS, saying how much was left out."""
    if len(text) <= LOGGED_TEXT_CHARS:
        return text
    return f"{text[:LOGGED_TEXT_CHARS]}...[{len(text) - LOGGED_TEXT_CHARS} more characters]"


def split_keys(value: Any) -> Any:
    """A key list as settings take it (`a,b`, a JSON list, or a sequence): stripped, blanks and repeats
    dropped, in order; anything else is left for validation to refuse."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = text.split(",")
        else:
            value = text.split(",")
    if isinstance(value, list | tuple | set | frozenset):
        keys = [key.strip() if isinstance(key, str) else key for key in value]
        return tuple(dict.fromkeys(key for key in keys if key != ""))
    return value


# Keys are checked without a limit on tries (a lockout after failed tries would let anyone who can reach
# the service lock its product backends out, all of them behind a proxy): a key must be long enough that
# guessing is hopeless. A shorter key is warned about, not refused, so an upgrade never stops a service.
MIN_KEY_CHARS = 16


def short_keys_warning(keys: tuple[str, ...], variable: str) -> str | None:
    """What to log at start when some of `keys` (from `variable`) are too short to be safe from guessing."""
    short = sum(len(key) < MIN_KEY_CHARS for key in keys)
    if not short:
        return None
    return (
        f"{short} of the {len(keys)} keys in {variable} are shorter than {MIN_KEY_CHARS} characters: keys are "
        "checked without a limit on tries, so use long random ones (`openssl rand -hex 16`)"
    )


def key_digest(key: str) -> bytes:
    """What keys are compared by (in constant time): equal lengths whatever the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def configure_logging() -> None:
    # The server configures only its own loggers; give ours a handler unless the host (CLI) already did.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def overnight_version() -> str:
    try:
        return metadata.version("overnight")
    except metadata.PackageNotFoundError:
        return "0+unknown"
