"""Fetch Project Gutenberg books for training: `charrnn download --gutenberg`.

This module owns the book aliases, the mirror URL layout, the HTTP download
(http(s) only, redirects included; retry, progress bar, truncation check, size
cap), decoding, stripping the Project Gutenberg header and licence footer, and
the atomic write of `<out>/<name>.txt`.
It must stay free of torch so that `charrnn download` starts fast.
"""

from __future__ import annotations

import difflib
import http.client
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Callable

from tqdm import tqdm
from unidecode import unidecode

from .errors import CharrnnError, UsageError
from .files import write_atomic

BOOKS: dict[str, tuple[int, str]] = {
    "andersen": (27200, "Fairy Tales of Hans Christian Andersen"),
    "andersen-short": (1597, "Andersen's Fairy Tales (18 tales)"),
    "anna-karenina": (1399, "Anna Karenina, by Leo Tolstoy"),
    "war-and-peace": (2600, "War and Peace, by Leo Tolstoy"),
    "shakespeare": (100, "The Complete Works of William Shakespeare"),
    "alice": (11, "Alice's Adventures in Wonderland, by Lewis Carroll"),
}
ALIASES: dict[str, int] = {alias: book_id for alias, (book_id, _) in BOOKS.items()}
DEFAULT_BOOK = "andersen"

# Project Gutenberg asks programs to download from a mirror, not from www.gutenberg.org.
DEFAULT_MIRROR = "https://aleph.gutenberg.org/"
PUBLIC_SITE = "https://www.gutenberg.org/"
MIRROR_ENV = "CHARRNN_GUTENBERG_MIRROR"

_CHUNK = 64 * 1024
MB = 1024 * 1024
# Books are a few MB; the cap stops a wrong mirror (a disk image, an endless stream) from filling memory and disk.
DEFAULT_MAX_MB = 64
_SCHEMES = ("http", "https")

# "*** START OF THE/THIS PROJECT GUTENBERG EBOOK <title> ***"; a long title may wrap onto a second line.
_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"(?:[^\n]*\*\*\*|[^\n*]*\n[^\n*]*\*\*\*)?[^\n]*",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)",
    re.IGNORECASE | re.MULTILINE,
)
# 1999 format: the licence ("small print") closes the header, there are no START/END markers.
_SMALL_PRINT_END = re.compile(r"^[ \t]*\*END\*?[ \t]*THE SMALL PRINT[^\n]*", re.IGNORECASE | re.MULTILINE)
# "End of the Project Gutenberg EBook of ...", "End of Project Gutenberg's ...", "End of the Project Gutenberg etext of ..."
_TRAILER = re.compile(r"[ \t]*END OF (?:THE )?PROJECT GUTENBERG", re.IGNORECASE)
_CREDIT = re.compile(r"(?:PRODUCED|(?:E-?TEXT )?PREPARED|TRANSCRIBED) (?:BY|FROM)\b", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def format_book_list() -> str:
    """The aliases `charrnn download --list` prints, one per line: alias, Gutenberg id, title."""
    width = max(map(len, BOOKS))
    lines = [f"{alias:<{width}}  {book_id:>6}  {title}" for alias, (book_id, title) in BOOKS.items()]
    lines.append(f"(default: {DEFAULT_BOOK}; any other Gutenberg ebook number works too)")
    return "\n".join(lines)


def resolve_book(book: str) -> tuple[int, str]:
    """Map an alias or a Gutenberg ebook number to (id, output file name without .txt)."""
    key = book.strip().lower()
    if re.fullmatch(r"[0-9]+", key) and int(key) > 0:
        return int(key), str(int(key))
    if key in ALIASES:
        return ALIASES[key], key
    nearest = difflib.get_close_matches(key, ALIASES, n=1, cutoff=0.0)
    hint = f"did you mean '{nearest[0]}'? " if nearest else ""
    raise UsageError(
        f"unknown book '{book}': {hint}run 'charrnn download --list' for the aliases, or give a Gutenberg ebook number"
    )


def candidate_urls(book_id: int, mirror: str | None = None) -> list[str]:
    """The URLs to try for one book, best first.

    Mirrors keep books in digit folders (1597 -> 1/5/9/1597/, 11 -> 1/11/, 5 -> 0/5/)
    as `ID-0.txt` (UTF-8) or `ID.txt` (older ASCII/Latin-1), and also in `cache/epub/ID/pgID.txt`.
    Without `mirror` (and without $CHARRNN_GUTENBERG_MIRROR) this tries the digit folders on
    DEFAULT_MIRROR, then www.gutenberg.org's cache/epub URL as a last resort. With a mirror,
    only that mirror is asked (both layouts): a user who names a mirror does not want the
    public site hit behind their back.
    """
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    digits = str(book_id)
    folder = "/".join(digits[:-1]) if len(digits) > 1 else "0"
    mirror_layout = [f"{folder}/{book_id}/{book_id}-0.txt", f"{folder}/{book_id}/{book_id}.txt"]
    cache_layout = f"cache/epub/{book_id}/pg{book_id}.txt"
    if mirror is None:
        return [DEFAULT_MIRROR + path for path in mirror_layout] + [PUBLIC_SITE + cache_layout]
    if urllib.parse.urlsplit(mirror).scheme not in _SCHEMES:
        raise UsageError(f"mirror '{mirror}' is not an http(s) URL: give one like {DEFAULT_MIRROR}")
    base = mirror.rstrip("/") + "/"
    return [base + path for path in mirror_layout + [cache_layout]]


def decode_bytes(data: bytes) -> tuple[str, str | None]:
    """Decode a download as UTF-8 (BOM dropped); old Gutenberg files that are not UTF-8 are Latin-1.

    Returns (text, warning); the warning is None unless the Latin-1 fallback was used.
    """
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return data.decode("latin-1"), "the text is not valid UTF-8; read it as Latin-1, some characters may be wrong"


def looks_like_gutenberg(text: str) -> bool:
    """Whether a download is plain text that mentions Gutenberg, not an HTML error or login page."""
    head = text[:2000].lstrip("\ufeff \t\r\n").lower()
    if head.startswith(("<!doctype", "<html", "<?xml")) or "<html" in head:
        return False
    return "gutenberg" in text.lower()


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Cut the Project Gutenberg header, licence footer and "End of the Project Gutenberg ..." trailer.

    Knows the current `*** START OF THE PROJECT GUTENBERG EBOOK ... ***` markers, the older
    `... OF THIS ...` ones (a later `*** START: FULL LICENSE ***` is not a start), the 1999
    "SMALL PRINT" header, and footer-only files; a "Produced by" credit right after the header
    goes too. The text is normalised either way: BOM dropped, CRLF and CR made LF, blank lines
    at both ends trimmed, one final newline. Returns (body, whether any marker was found).
    Never raises, and never returns more characters than it got (so a text without markers
    and without a final newline does not gain one).
    """
    norm = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(norm) or _SMALL_PRINT_END.search(norm)
    begin = start.end() if start else 0
    end = _END.search(norm, begin)
    body = _LEADING_BLANK_LINES.sub("", norm[begin : end.start() if end else len(norm)])
    if start and _CREDIT.match(body):
        credit_end = _BLANK_LINE.search(body)
        if credit_end:
            body = _LEADING_BLANK_LINES.sub("", body[credit_end.end() :])
    lines = body.rstrip().split("\n")
    trailer = False
    for i in range(len(lines) - 1, -1, -1):  # the trailer is in the last paragraph
        if not lines[i].strip():
            break
        if _TRAILER.match(lines[i]):
            lines, trailer = lines[:i], True
            break
    body = "\n".join(lines).rstrip()
    if body and len(body) < len(text):
        body += "\n"
    return body, bool(start or end or trailer)


def _user_agent() -> str:
    try:
        version = metadata.version("charrnn")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"charrnn/{version} (character-level LSTM trainer; Python-urllib)"


class _Refused(Exception):
    """A response no retry will fix (too large, redirected off http(s)); the message says why."""


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: a mirror must not point charrnn at a local file or an FTP server."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urllib.parse.urlsplit(target).scheme not in _SCHEMES:
            fp.close()
            raise _Refused(f"redirected to {target}; only http and https redirects are followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_HttpRedirectsOnly)


def _too_large(max_bytes: int) -> str:
    return f"over the {max_bytes / MB:g} MB download cap; raise it with --max-mb if the book really is that big"


def _get(url: str, timeout: float, progress: bool, desc: str, max_bytes: int) -> bytes:
    """One GET of at most `max_bytes`, refused up front when Content-Length is larger and stopped as soon as
    the stream passes it; raises http.client.IncompleteRead when fewer bytes arrive than Content-Length promised."""
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    with _OPENER.open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise _Refused(f"{expected:,} bytes, {_too_large(max_bytes)}")
        data = bytearray()
        with tqdm(
            total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise _Refused(_too_large(max_bytes))
                bar.update(len(chunk))
    if expected is not None and len(data) != expected:
        raise http.client.IncompleteRead(bytes(data), expected - len(data))
    return bytes(data)


def _fetch(url: str, timeout: float, progress: bool, desc: str, backoff: float, log: Callable[[str], None],
           max_bytes: int) -> bytes:
    """GET with one retry after `backoff` seconds on network errors and 5xx (a 404 will not change)."""
    try:
        return _get(url, timeout, progress, desc, max_bytes)
    except (OSError, http.client.HTTPException) as error:
        if isinstance(error, urllib.error.HTTPError) and error.code < 500:
            raise
        log(f"{url}: {_describe(error)}; retrying in {backoff:g} s")
    time.sleep(backoff)
    return _get(url, timeout, progress, desc, max_bytes)


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, http.client.IncompleteRead):
        return "transfer cut short"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def download_book(
    book: str,
    out_dir: str | Path = "data",
    mirror: str | None = None,
    force: bool = False,
    ascii: bool = False,
    timeout: float = 30,
    progress: bool = True,
    log: Callable[[str], None] = _log_stderr,
    backoff: float = 1.0,
    max_bytes: int = DEFAULT_MAX_MB * MB,
) -> Path:
    """Download one book (alias or Gutenberg number) to `out_dir/<name>.txt`, stripped of the PG licence.

    An existing file is kept unless `force`. Each candidate URL is tried in turn (see
    candidate_urls); a response over `max_bytes`, an HTML page or a redirect off http(s) fails
    that URL. `ascii` transliterates with unidecode. Raises CharrnnError when no URL gives a
    Gutenberg text, UsageError for an unknown alias or a mirror that is not http(s).
    """
    book_id, name = resolve_book(book)
    path = Path(out_dir) / f"{name}.txt"
    if path.exists() and not force:
        log(f"{path} already exists; not downloading (use --force to download it again)")
        return path
    failures = []
    for url in candidate_urls(book_id, mirror):
        log(f"fetching {name} (Gutenberg #{book_id}) from {url}")
        try:
            data = _fetch(url, timeout, progress, name, backoff, log, max_bytes)
        except (OSError, http.client.HTTPException) as error:
            failures.append(f"{url} ({_describe(error)})")
            continue
        except _Refused as error:
            failures.append(f"{url} ({error})")
            continue
        text, warning = decode_bytes(data)
        if not looks_like_gutenberg(text):
            failures.append(f"{url} (not a Project Gutenberg text)")
            continue
        if warning:
            log(f"warning: {url}: {warning}")
        body, stripped = strip_gutenberg(text)
        if not stripped:
            log(f"warning: {url}: no Project Gutenberg header or footer found; saved the text as it is")
        if ascii:
            body = unidecode(body)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, body.encode("utf-8"))
        except OSError as error:
            raise CharrnnError(f"cannot write {path}: {error.strerror or error}; check the --out folder") from error
        log(f"saved {path} ({len(body):,} characters)")
        return path
    raise CharrnnError(
        f"could not download {name} (Gutenberg #{book_id}); tried {', '.join(failures)}. "
        f"Check your connection, try another mirror with --mirror URL, or save the plain-text book as {path} by hand"
    )


def download_books(books: list[str], max_mb: float = DEFAULT_MAX_MB, **options) -> list[Path]:
    """Download each book in turn (DEFAULT_BOOK when `books` is empty), each capped at `max_mb` MB
    (the CLI's --max-mb); `options` go to download_book."""
    if not (isinstance(max_mb, (int, float)) and max_mb > 0 and math.isfinite(max_mb)):
        raise UsageError(f"--max-mb must be a positive number of megabytes (got {max_mb!r}), e.g. --max-mb 64")
    return [download_book(book, max_bytes=int(max_mb * MB), **options) for book in books or [DEFAULT_BOOK]]
