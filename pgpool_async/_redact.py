"""Keep passwords out of messages built from libpq's connection-string errors.

libpq's parse errors quote the text they choke on: the whole URI for an unclosed
``[``, the password itself for a bad percent-escape, the second word of an
unquoted password with a space. :func:`dsn_error_message` never echoes them:
it blanks every password out of the arguments first (even a malformed one),
parses again and reports *that* error; if the blanked arguments parse, the
password itself was malformed, which is said without quoting it. A last pass
scrubs anything that still looks like a password, or is one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

import psycopg2
import psycopg2.extensions

__all__ = [
    "connect_args_error",
    "dsn_error_message",
    "redact",
    "redact_connect_args",
    "redacted_connect_error",
    "secrets_in",
]

MASK = "***"

# "password = value": quoted (up to the closing quote, or the end if unclosed) or
# bare; a bare value runs on over spaces up to the next "keyword=" (an unquoted
# password with a space in it: libpq would choke on its second word).
_KEYWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*(?:'|\\?\Z)|.*?(?=\s+[A-Za-z_]\w*\s*=|\s*\Z))",
    re.IGNORECASE | re.DOTALL,
)
# Whatever follows "password=" to the end, unless the value is properly quoted:
# its words are scrubbed from messages too.
_TAIL = re.compile(r"\bpassword\s*=\s*(?!'(?:[^'\\]|\\.)*'(?:\s|\Z))(?P<value>.*)", re.IGNORECASE | re.DOTALL)
# Whatever follows "password=" up to the next "keyword=", quoted or not. Words after
# a quoted value are likely password too (a quote inside it, unescaped, closed it
# early): libpq complains about them ("missing = after ..."), so they are scrubbed.
_LOOSE = re.compile(
    r"\bpassword\s*=\s*(?P<value>.*?)(?=\s+[A-Za-z_]\w*\s*=|\s*\Z)", re.IGNORECASE | re.DOTALL
)
# A URI's userinfo: scheme://user:password@ (the last '@' ends it: libpq's own
# rule is the first '@' before a '/', but a password with an unencoded '/' or
# '@' must be caught too).
_URI = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)(?P<value>.*)@", re.DOTALL)
_URI_PARAM = re.compile(r"(?P<head>[?&]password=)(?P<value>[^&#\s]*)", re.IGNORECASE)
MALFORMED_PASSWORD = (
    "the password is malformed: in a keyword DSN quote a password that has spaces or quotes "
    "in single quotes (a quote inside as \\'), in a URI percent-encode it, or pass it as the "
    "password keyword argument"
)
MASKED_NEAR_PASSWORD = (
    "*** is text next to the password, masked in case it is part of it: a keyword there may "
    "lack its '=', or a quote inside the password ended it early (inside single quotes "
    "write \\')"
)
_WORDS = re.compile(r"[\s'\\=&@:/\"]+")
# Words of a secret shorter than this are not scrubbed from free text (too many
# false hits); a whole secret is from 3 characters.
_MIN_WORD = 4
_MIN_WHOLE = 3


def secrets_in(text: str) -> list[str]:
    """Every password-looking value in a DSN (as written and decoded), and what
    follows ``password=``; longest first."""
    found: set[str] = set()
    for pattern in (_KEYWORD, _TAIL, _LOOSE, _URI, _URI_PARAM):
        for match in pattern.finditer(text):
            value = match.group("value")
            found.update((value, value.strip().strip("'")))
            with contextlib.suppress(UnicodeDecodeError):
                found.add(unquote(value, errors="strict"))
    return sorted((s for s in found if s), key=len, reverse=True)


def _blank(text: str) -> str:
    for pattern in (_KEYWORD, _URI_PARAM):
        text = pattern.sub(lambda m: m.group("head") + MASK, text)
    return _URI.sub(lambda m: m.group("head") + MASK + "@", text)


def redact(message: str, secrets: Iterable[str] = ()) -> str:
    """``message`` with password values masked, and each of ``secrets`` (from 3
    characters), and each word of one (from 4), removed wherever it appears."""
    message = _blank(message)
    scrub: set[str] = set()
    for secret in secrets:
        if len(secret) >= _MIN_WHOLE:
            scrub.add(secret)
        scrub.update(word for word in _WORDS.split(secret) if len(word) >= _MIN_WORD)
    for text in sorted(scrub, key=len, reverse=True):
        message = message.replace(text, MASK)
    return message


def dsn_error_message(
    dsn: str | None, passwords: Iterable[str], reparse: Callable[[str | None], str | None]
) -> str:
    """libpq's complaint about ``dsn``, without any password in it.

    ``passwords``: other passwords given (keyword arguments); ``reparse(dsn)``
    returns libpq's error for a DSN, or None if it parses.
    """
    secrets = [*secrets_in(dsn or ""), *(p for p in passwords if p)]
    error = reparse(None if dsn is None else _blank(dsn))
    if error is None:  # only the password was malformed: say so, never quote it
        return MALFORMED_PASSWORD
    message = redact(error, secrets)
    if message != redact(error):  # words near a password were masked: say where to look
        message += f"; {MASKED_NEAR_PASSWORD}"
    return message


def connect_args_error(dsn: str | None, libpq_kwargs: dict[str, Any]) -> str:
    """Why ``make_dsn(dsn, **libpq_kwargs)`` does not parse, without any password."""

    def reparse(candidate: str | None) -> str | None:
        try:
            psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(candidate, **libpq_kwargs))
        except psycopg2.ProgrammingError as exc:
            return str(exc).strip()
        except UnicodeDecodeError:  # psycopg2 decodes libpq's percent-decoded values
            return "a value decodes to invalid UTF-8 (check its percent-escapes)"
        except Exception as exc:  # e.g. a value make_dsn cannot quote: name its type only
            return f"{type(exc).__name__} from make_dsn"
        return None

    passwords = [str(libpq_kwargs.get("password") or "")]
    return dsn_error_message(dsn, passwords, reparse)


def redact_connect_args(text: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``text`` (e.g. ``dbname@host:port`` for a repr) without any password of the
    connection arguments: a URI password with an unencoded ``/`` is read by libpq
    as the port, and must not show there either."""
    dsn = args[0] if args else kwargs.get("dsn")
    secrets = secrets_in(dsn) if isinstance(dsn, str) else []
    password = kwargs.get("password")
    return redact(text, [*secrets, *([str(password)] if password else [])])


URI_PASSWORD_HINT = (
    "a password in a postgresql:// URI that has '/', '@', ':' or '%' in it must be "
    "percent-encoded (urllib.parse.quote(password, safe='')), or passed as the password "
    "keyword argument"
)


def redacted_connect_error(
    exc: psycopg2.Error, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> psycopg2.Error | None:
    """A copy of ``exc`` (a failed ``psycopg2.connect(*args, **kwargs)``) whose
    message holds no password of the arguments, or None when it holds none.

    libpq quotes what it could not use, and a URI password with an unencoded
    ``/`` or ``@`` is read as the port or the host: its pieces then appear in
    libpq's message ("invalid integer value ... for connection option
    \"port\"", "could not translate host name ..."). The copy is of the same
    class, its message masked and followed by how to write the password."""
    text = str(exc)
    dsn = args[0] if args else kwargs.get("dsn")
    secrets = secrets_in(dsn) if isinstance(dsn, str) else []
    password = kwargs.get("password")
    if password:
        secrets.append(str(password))
    cleaned = redact(text, secrets)
    if cleaned == text:
        return None
    hint = URI_PASSWORD_HINT if isinstance(dsn, str) and "://" in dsn else MALFORMED_PASSWORD
    return type(exc)(f"{cleaned.strip()} ({hint})")
