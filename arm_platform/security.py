"""Untrusted input and secrets: name validation, joins that cannot escape their root, redaction of credentials.

- `validate_name`: run / experiment / sweep names become storage folders, so they must be one plain path segment.
- `safe_join`: join parts onto a local folder or an s3:// URI; ValueError when the result would lie outside it.
- `redact`: a copy of a string / dict / list with credentials replaced by "***" (URI user info, query-string tokens,
  values of credential-like keys, bearer tokens, AWS access key ids). `RedactingFilter` and `install_log_redaction`
  apply it to log records.

Nothing here imports boto3, Ray or MLflow, so every module (config included) can use it.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from typing import Any

MAX_NAME_LENGTH = 200
"""Longest accepted run / experiment / sweep name (folder names; most file systems allow 255 bytes)."""
MASK = "***"

# --------------------------------------------------------------------------------------------------------------------
# names and paths


def validate_name(name: object, what: str, *, allow_slash: bool = False) -> str:
    """Return `name` if it is safe as a storage path segment; ValueError naming `what` and the name otherwise.

    Refused: non-strings, empty names, names over MAX_NAME_LENGTH characters, control / line-separator characters,
    backslashes, "/" (unless `allow_slash`), and any segment that is empty, "." or ".." or starts with "." (hidden
    files, and the first step of every traversal). `allow_slash` is for MLflow experiment names, which may be
    workspace paths such as "/Users/me/arm" on Databricks; they are never used as storage paths here.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
    if bad:
        raise ValueError(f"{what} {name!r} contains control characters ({bad[0]!r}); use letters, digits, -_.=")
    if "\\" in name or ("/" in name and not allow_slash):
        raise ValueError(f"{what} {name!r} must not contain path separators ('/' or '\\')")
    segments = name[1:].split("/") if allow_slash and name.startswith("/") else name.split("/")
    for segment in segments:
        if not segment or segment.startswith("."):
            raise ValueError(
                f"{what} {name!r} is not a plain name: empty, '.' or '..' segments and names starting with '.' "
                "could resolve outside the storage path"
            )
    return name


def safe_join(root: str, *parts: str) -> str:
    """`root` + "/" + parts (leading / trailing "/" of each part stripped), refusing any result outside `root`.

    The returned string is the plain join (so callers see exactly what `storage.join` always returned); the check
    normalises it first: locally, ".." segments are resolved lexically against the absolute root (symlinks are not
    followed: they are the owner's choice); on S3, where keys are literal and never resolved, any "." or ".." segment
    in the parts is refused. Raises ValueError naming the root and the offending parts.
    """
    cleaned = [str(part).strip("/") for part in parts]
    out = root.rstrip("/")
    for part in cleaned:
        out = f"{out}/{part}"
    if root.startswith("s3://"):
        segments = [s for part in cleaned for s in part.split("/")]
        escapes = any(s in (".", "..") for s in segments)
    else:
        base = os.path.abspath(root or os.sep)
        joined = os.path.abspath(os.path.join(base, *cleaned))
        escapes = joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep)
    if escapes:
        raise ValueError(f"path {'/'.join(cleaned)!r} resolves outside {root!r}; refusing to read or write there")
    return out


def is_inside(relative: str) -> bool:
    """True if the relative path `relative` ("train/cls/a.jpg", "./train/cls/a.jpg") stays below its root.

    False for empty and absolute paths, backslashes, and any ".." segment, even one that would resolve inside
    ("a/../b"): tar members and manifest entries like that are refused, not repaired. "." segments are harmless
    (tars made with `tar cf x.tar .` start every member with "./").
    """
    if not relative or relative.startswith("/") or "\\" in relative:
        return False
    segments = [s for s in relative.split("/") if s not in ("", ".")]
    return bool(segments) and ".." not in segments


# --------------------------------------------------------------------------------------------------------------------
# redaction

_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwd", "passphrase", "token", "credential", "credentials", "signature", "sig"}
)
_SECRET_PAIRS = frozenset(
    {("access", "key"), ("api", "key"), ("private", "key"), ("secret", "key"), ("session", "key"), ("account", "key")}
)
_SECRET_NAMES = frozenset({"key", "apikey", "auth", "pass", "authorization", "sas"})
"""Whole names that are credentials by themselves (Google `?key=`, basic-auth `pass`, Azure SAS)."""
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s?#]*)(?::[^@/\s?#]*)?@")
_KEY_VALUE = re.compile(r"(?P<sep>^|[?&;\s,(\[{'\"])(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)=(?P<value>[^&#\s'\",;)\]}]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def is_secret_key(name: str) -> bool:
    """True if a dict key / query parameter / env var name looks like a credential.

    Matches whole words of the name (split at "_", "-", ".", spaces and camelCase): "aws_secret_access_key",
    "MLFLOW_TRACKING_PASSWORD", "X-Amz-Signature", "AWSAccessKeyId", "sessionToken", "sig", "key"; not
    "num_tokens", "tokenizer" or "score_attribute".
    """
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", _CAMEL.sub("_", name)) if w]
    if not words:
        return False
    if "".join(words) in _SECRET_NAMES or any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def _redact_userinfo(match: re.Match[str]) -> str:
    """`scheme://user:pass@` -> `scheme://user:***@`; `scheme://token@` -> `scheme://***@`.

    A bare user info with no password is masked whole: it is usually a token (GitHub, Databricks, `https://<pat>@`),
    and a user name is rarely what a log reader needs.
    """
    if ":" in match.group(0)[len(match.group("scheme")) :]:
        return f"{match.group('scheme')}{match.group('user')}:{MASK}@"
    return f"{match.group('scheme')}{MASK}@"


def _redact_key_value(match: re.Match[str]) -> str:
    if not is_secret_key(match.group("name").rsplit(".", 1)[-1]):
        return match.group(0)
    return f"{match.group('sep')}{match.group('name')}={MASK}"


def redact_text(text: str) -> str:
    """`text` with URI passwords, secret query / key=value parameters, bearer tokens and AWS key ids masked."""
    text = _URI_USERINFO.sub(_redact_userinfo, text)
    text = _KEY_VALUE.sub(_redact_key_value, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return _AWS_KEY_ID.sub(MASK, text)


def redact(value: Any) -> Any:
    """A redacted copy of `value`: strings via `redact_text`; dicts recursively, with the value of every
    credential-like key (`is_secret_key`, last dotted component for flattened keys such as "tracking.token")
    replaced by "***" (None and "" are kept, so an unset field stays visibly unset); lists / tuples element-wise.
    Other types are returned unchanged.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_item(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def _redact_item(key: Any, value: Any) -> Any:
    if isinstance(key, str) and is_secret_key(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return MASK
    return redact(value)


# --------------------------------------------------------------------------------------------------------------------
# logging


class RedactingFilter(logging.Filter):
    """Logging filter that rewrites each record's message (and formatted traceback) through `redact_text`.

    Attach it to handlers (`handler.addFilter(RedactingFilter())`): a filter on a logger misses records propagated
    from child loggers. `install_log_redaction` covers every record of the process instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Format `record`'s message with its args, redact it, and drop the args (in place; returns the record)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a bad format string must not break logging; keep the raw message
        message = str(record.msg)
    record.msg, record.args = redact_text(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def install_log_redaction() -> None:
    """Redact every log record created in this process from now on (idempotent; call once per process: driver,
    Ray Train workers, Tune trial actors). Wraps the log record factory, so handlers added later are covered too."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_arm_redacting", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(factory(*args, **kwargs))

    redacting_factory._arm_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)


__all__ = [
    "MASK",
    "MAX_NAME_LENGTH",
    "RedactingFilter",
    "install_log_redaction",
    "is_inside",
    "is_secret_key",
    "redact",
    "redact_record",
    "redact_text",
    "safe_join",
    "validate_name",
]
