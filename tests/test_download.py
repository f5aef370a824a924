"""Tests for charrnn.download: URL layout, Gutenberg stripping, and downloads from a loopback HTTP server."""

import ast
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from charrnn import download as dl
from charrnn.errors import CharrnnError, UsageError

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
RAW_FILES = [
    "gutenberg-27200-raw.txt",
    "gutenberg-1597-raw.txt",
    "gutenberg-1597-0-utf8bom-raw.txt",
    "gutenberg-1597-hcaft10-1999-raw.txt",
    "anna.txt",
    "andersen.txt",
]

NEW_STYLE = (
    "\ufeffThe Project Gutenberg eBook of Tiny Tales\r\n"
    "\r\n"
    "This ebook is for the use of anyone anywhere in the United States.\r\n"
    "\r\n"
    "Title: Tiny Tales\r\n"
    "\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK TINY TALES ***\r\n"
    "\r\n"
    "Produced by A. Volunteer and the Online Distributed\r\n"
    "Proofreading Team.\r\n"
    "\r\n"
    "\r\n"
    "TINY TALES\r\n"
    "\r\n"
    "\u201cOnce,\u201d said the stork, \u2018there was a pond.\u2019\r\n"
    "The end.\r\n"
    "\r\n"
    "\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK TINY TALES ***\r\n"
    "\r\n"
    "Updated editions will replace the previous one.\r\n"
    "*** START: FULL LICENSE ***\r\n"
    "THE FULL PROJECT GUTENBERG LICENSE\r\n"
)
NEW_STYLE_BODY = "TINY TALES\n\n\u201cOnce,\u201d said the stork, \u2018there was a pond.\u2019\nThe end.\n"


def corpus(name: str) -> str:
    path = CORPORA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    text, warning = dl.decode_bytes(path.read_bytes())
    assert warning is None
    return text


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


# --- book names and URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "book_id, folder",
    [(1597, "1/5/9/1597"), (27200, "2/7/2/0/27200"), (11, "1/11"), (5, "0/5"), (100, "1/0/100")],
)
def test_candidate_urls_mirror_layout(book_id, folder):
    base = "http://mirror.example/gutenberg"
    assert dl.candidate_urls(book_id, base + "/") == [
        f"{base}/{folder}/{book_id}-0.txt",
        f"{base}/{folder}/{book_id}.txt",
        f"{base}/cache/epub/{book_id}/pg{book_id}.txt",
    ]


def test_candidate_urls_default_tries_mirror_then_public_site():
    assert dl.candidate_urls(1597, None) == [
        dl.DEFAULT_MIRROR + "1/5/9/1597/1597-0.txt",
        dl.DEFAULT_MIRROR + "1/5/9/1597/1597.txt",
        "https://www.gutenberg.org/cache/epub/1597/pg1597.txt",
    ]
    assert "gutenberg.org" not in dl.DEFAULT_MIRROR.replace("aleph.gutenberg.org", "")


def test_candidate_urls_env_mirror(monkeypatch):
    monkeypatch.setenv(dl.MIRROR_ENV, "http://env.example")
    assert dl.candidate_urls(11, None)[0] == "http://env.example/1/11/11-0.txt"
    assert dl.candidate_urls(11, "http://arg.example")[0] == "http://arg.example/1/11/11-0.txt"


@pytest.mark.parametrize("mirror", ["aleph.gutenberg.org", "file:///srv/gutenberg", "ftp://ftp.example/gutenberg"])
def test_candidate_urls_rejects_non_http_mirror(mirror, monkeypatch):
    with pytest.raises(UsageError, match=r"not an http\(s\) URL: give one like https://") as info:
        dl.candidate_urls(11, mirror)
    assert mirror in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv(dl.MIRROR_ENV, mirror)
    with pytest.raises(UsageError, match=r"not an http\(s\) URL"):
        dl.candidate_urls(11, None)


def test_resolve_book():
    assert dl.resolve_book("andersen") == (27200, "andersen")
    assert dl.resolve_book("Andersen-Short") == (1597, "andersen-short")
    assert dl.resolve_book("1399") == (1399, "1399")
    assert dl.ALIASES["war-and-peace"] == 2600 and dl.ALIASES["shakespeare"] == 100 and dl.ALIASES["alice"] == 11
    assert dl.DEFAULT_BOOK in dl.ALIASES


@pytest.mark.parametrize("typo, nearest", [("andersn", "andersen"), ("war-and-peas", "war-and-peace"), ("0", None)])
def test_unknown_alias_suggests_nearest(typo, nearest):
    with pytest.raises(UsageError) as info:
        dl.resolve_book(typo)
    message = str(info.value)
    assert "\n" not in message and "charrnn download --list" in message and info.value.exit_code == 2
    if nearest:
        assert f"'{nearest}'" in message


def test_format_book_list_names_every_alias():
    listing = dl.format_book_list()
    for alias, (book_id, title) in dl.BOOKS.items():
        assert alias in listing and str(book_id) in listing and title in listing


# --- stripping the real corpora ------------------------------------------------------------------


@pytest.mark.parametrize("name", RAW_FILES)
def test_strip_corpora_invariants(name):
    text = corpus(name)
    body, stripped = dl.strip_gutenberg(text)
    assert stripped
    assert "\r" not in body and not body.startswith(("\ufeff", "\n")) and body.endswith("\n")
    assert not body.endswith("\n\n") and len(body) <= len(text)
    assert "END OF TH" not in body and "START OF TH" not in body
    lines = body.split("\n")
    assert not any(line.startswith(("Produced by", "Etext prepared by", "End of ")) for line in lines)


def test_strip_27200_matches_pg_stripped_andersen():
    andersen = corpus("andersen.txt").split("\n")
    title = andersen.index("FAIRY TALES OF HANS CHRISTIAN ANDERSEN")
    trailer = next(i for i, line in enumerate(andersen) if line.startswith("End of the Project Gutenberg EBook"))
    expected = "\n".join(andersen[title:trailer]).rstrip("\n") + "\n"
    body, _ = dl.strip_gutenberg(corpus("gutenberg-27200-raw.txt"))
    assert body == expected
    assert body.endswith('must be all wrong."\n')


@pytest.mark.parametrize("name", ["gutenberg-1597-raw.txt", "gutenberg-1597-0-utf8bom-raw.txt"])
def test_strip_1597_stops_before_licence(name):
    body, _ = dl.strip_gutenberg(corpus(name))
    assert body.startswith("ANDERSEN'S FAIRY TALES\n")
    assert body.endswith("no one asked after the RED SHOES.\n")
    assert "FULL LICENSE" not in body and "Project Gutenberg" not in body


def test_strip_1999_small_print_format():
    body, _ = dl.strip_gutenberg(corpus("gutenberg-1597-hcaft10-1999-raw.txt"))
    assert body.startswith("ANDERSEN'S FAIRY TALES\n")
    assert body.endswith("the RED SHOES.\n")
    assert "SMALL PRINT" not in body.upper() and "Project Gutenberg" not in body


def test_strip_footer_only_anna():
    body, _ = dl.strip_gutenberg(corpus("anna.txt"))
    assert body.startswith("Chapter 1\n")
    assert body.endswith('which I have the power to put into\nit."\n')


def test_strip_already_stripped_andersen_drops_trailer():
    body, stripped = dl.strip_gutenberg(corpus("andersen.txt"))
    assert stripped and body.startswith("FAIRY TALES OF HANS CHRISTIAN ANDERSEN\n")
    assert body.endswith('must be all wrong."\n') and "Project Gutenberg" not in body


# --- stripping small texts -----------------------------------------------------------------------


def test_strip_new_style_fixture():
    assert dl.strip_gutenberg(NEW_STYLE) == (NEW_STYLE_BODY, True)


def test_strip_lowercase_markers_and_wrapped_title():
    text = (
        "header\n*** start of the project gutenberg ebook the complete works of\n"
        "william shakespeare ***\n\nBody line.\n\n*** end of the project gutenberg ebook x ***\nlicence\n"
    )
    assert dl.strip_gutenberg(text) == ("Body line.\n", True)


def test_strip_without_markers_only_normalises():
    assert dl.strip_gutenberg("\ufeff\r\n\r\nFirst line\r\nsecond\rthird\r\n\r\n\r\n") == (
        "First line\nsecond\nthird\n",
        False,
    )
    assert dl.strip_gutenberg("Plain text.\n") == ("Plain text.\n", False)
    assert dl.strip_gutenberg("no newline") == ("no newline", False)  # never longer than the input
    assert dl.strip_gutenberg("") == ("", False)


def test_strip_keeps_end_of_lines_inside_the_story():
    text = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nEnd of Project Gutenberg talk.\n\nReal ending.\n"
    assert dl.strip_gutenberg(text) == ("End of Project Gutenberg talk.\n\nReal ending.\n", True)


@pytest.mark.parametrize(
    "text",
    [
        "\r",
        "\ufeff",
        "x\r",
        "\n \r\n\t",
        "*** START OF THE PROJECT GUTENBERG EBOOK",
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***",
        "End of the Project Gutenberg",
        "*END*THE SMALL PRINT!\nProduced by\n\nx",
        "\ud800*** start of this project gutenberg etext\n\n\n",
    ],
)
def test_strip_odd_inputs_never_grow(text):
    body, _ = dl.strip_gutenberg(text)
    assert len(body) <= len(text) and "\r" not in body and not body.startswith("\ufeff")


def test_decode_bytes():
    assert dl.decode_bytes("\ufeffcaf\u00e9".encode()) == ("caf\u00e9", None)
    text, warning = dl.decode_bytes("caf\u00e9".encode("latin-1"))
    assert text == "caf\u00e9" and "Latin-1" in warning


def test_looks_like_gutenberg():
    assert dl.looks_like_gutenberg(NEW_STYLE)
    assert not dl.looks_like_gutenberg("<!DOCTYPE html><html><title>Project Gutenberg</title></html>")
    assert not dl.looks_like_gutenberg("\n  <HTML><body>Project Gutenberg</body></HTML>")
    assert not dl.looks_like_gutenberg("Service unavailable")


# --- downloads from a loopback server ------------------------------------------------------------


def respond(body: bytes, status: int = 200, content_length: int | None = None, content_type: str = "text/plain"):
    """A route that sends `body`; a `content_length` larger than the body simulates a cut transfer."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        handler.end_headers()
        handler.wfile.write(body)

    return route


@pytest.fixture
def server():
    """An http.server on 127.0.0.1 (port 0); unrouted paths get 404; every request path is recorded."""
    routes, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            user_agents.append(self.headers.get("User-Agent", ""))
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, *args):
            pass

    user_agents = []
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{httpd.server_port}", routes=routes, requests=requests, user_agents=user_agents
    )
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def fetch(server, book, out, messages=None, **options):
    log = messages.append if messages is not None else lambda message: None
    return dl.download_book(book, out, mirror=server.url, timeout=5, progress=False, log=log, backoff=0, **options)


def test_download_falls_back_to_cache_layout_then_skips_existing(server, tmp_path):
    raw = CORPORA / "gutenberg-27200-raw.txt"
    if not raw.is_file():
        pytest.skip(f"{raw} is not here")
    server.routes["/cache/epub/27200/pg27200.txt"] = respond(raw.read_bytes())
    out = tmp_path / "data"
    path = fetch(server, "andersen", out)
    assert path == out / "andersen.txt"
    assert server.requests == ["/2/7/2/0/27200/27200-0.txt", "/2/7/2/0/27200/27200.txt", "/cache/epub/27200/pg27200.txt"]
    assert all(agent.startswith("charrnn/") for agent in server.user_agents)
    body = path.read_text(encoding="utf-8")
    assert body.startswith("FAIRY TALES OF HANS CHRISTIAN ANDERSEN\n") and body.endswith('must be all wrong."\n')
    assert body == dl.strip_gutenberg(corpus("andersen.txt"))[0]
    assert sorted(p.name for p in out.iterdir()) == ["andersen.txt"]

    server.requests.clear()
    messages = []
    assert fetch(server, "andersen", out, messages) == path
    assert server.requests == [] and "already exists" in messages[0]

    path.write_text("stale\n")
    fetch(server, "andersen", out, force=True)
    assert len(server.requests) == 3 and path.read_text(encoding="utf-8") == body


def test_download_new_style_from_mirror_layout(server, tmp_path):
    server.routes["/1/11/11-0.txt"] = respond(NEW_STYLE.encode())
    messages = []
    path = fetch(server, "alice", tmp_path / "new" / "dir", messages)
    assert server.requests == ["/1/11/11-0.txt"]
    assert path.read_text(encoding="utf-8") == NEW_STYLE_BODY
    assert not any("warning" in message for message in messages)


def test_download_404_everywhere_names_urls_and_leaves_nothing(server, tmp_path):
    with pytest.raises(CharrnnError) as info:
        fetch(server, "1597", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "--mirror" in message and str(tmp_path / "1597.txt") in message
    for url in dl.candidate_urls(1597, server.url):
        assert url in message
    assert "HTTP 404" in message
    assert len(server.requests) == 3  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_download_truncated_transfer_fails_after_one_retry(server, tmp_path):
    body = NEW_STYLE.encode()
    for url in dl.candidate_urls(11, server.url):
        server.routes[url.removeprefix(server.url)] = respond(body, content_length=len(body) + 1000)
    with pytest.raises(CharrnnError, match="cut short"):
        fetch(server, "11", tmp_path)
    assert len(server.requests) == 6  # each URL tried twice
    assert list(tmp_path.iterdir()) == []


def test_download_retries_a_cut_transfer_and_a_5xx(server, tmp_path):
    body = NEW_STYLE.encode()
    attempts = []

    def flaky(handler):
        attempts.append(1)
        if len(attempts) == 1:
            respond(body, content_length=len(body) + 1000)(handler)
        elif len(attempts) == 2:
            respond(b"busy", status=503)(handler)
        else:
            respond(body)(handler)

    server.routes["/1/11/11-0.txt"] = flaky
    server.routes["/1/11/11.txt"] = flaky
    path = fetch(server, "11", tmp_path)
    assert server.requests == ["/1/11/11-0.txt", "/1/11/11-0.txt", "/1/11/11.txt"]
    assert path.read_text(encoding="utf-8") == NEW_STYLE_BODY
    assert list(tmp_path.iterdir()) == [path]


def test_download_refuses_html_page(server, tmp_path):
    page = b"<!DOCTYPE html><html><body>Project Gutenberg: please log in</body></html>"
    for url in dl.candidate_urls(11, server.url):
        server.routes[url.removeprefix(server.url)] = respond(page, content_type="text/html")
    with pytest.raises(CharrnnError, match="not a Project Gutenberg text"):
        fetch(server, "alice", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_latin1_warns(server, tmp_path):
    text = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nCaf\u00e9 na\u00efve.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    server.routes["/0/5/5.txt"] = respond(text.encode("latin-1"))
    messages = []
    path = fetch(server, "5", tmp_path, messages)
    assert path.read_text(encoding="utf-8") == "Caf\u00e9 na\u00efve.\n"
    assert any("warning" in message and "Latin-1" in message for message in messages)


def test_download_without_markers_warns(server, tmp_path):
    server.routes["/0/5/5-0.txt"] = respond(b"A Project Gutenberg text whose header was cut.\n")
    messages = []
    path = fetch(server, "5", tmp_path, messages)
    assert path.read_text(encoding="utf-8") == "A Project Gutenberg text whose header was cut.\n"
    assert any("warning" in message and "no Project Gutenberg header" in message for message in messages)


def test_download_ascii_transliterates(server, tmp_path):
    server.routes["/1/11/11-0.txt"] = respond(NEW_STYLE.encode())
    body = fetch(server, "alice", tmp_path, ascii=True).read_text(encoding="utf-8")
    assert body.isascii() and "\"Once,\" said the stork, 'there was a pond.'" in body


def test_download_books_defaults_to_default_book(server, tmp_path):
    (tmp_path / f"{dl.DEFAULT_BOOK}.txt").write_text("already here\n")
    (tmp_path / "alice.txt").write_text("already here\n")
    options = dict(out_dir=tmp_path, mirror=server.url, progress=False, log=lambda message: None)
    assert dl.download_books([], **options) == [tmp_path / f"{dl.DEFAULT_BOOK}.txt"]
    assert dl.download_books(["alice", "andersen"], **options) == [tmp_path / "alice.txt", tmp_path / "andersen.txt"]
    assert server.requests == []


def test_download_imports_only_stdlib_tqdm_unidecode():
    """`charrnn download` must start without loading torch."""
    tree = ast.parse(Path(dl.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    allowed = set(sys.stdlib_module_names) | {"tqdm", "unidecode", "charrnn"}
    assert {name.split(".")[0] for name in modules} <= allowed


def test_failed_write_leaves_no_temp_file(server, tmp_path, monkeypatch):
    server.routes["/1/11/11-0.txt"] = respond(NEW_STYLE.encode())

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dl.os, "replace", disk_full)
    with pytest.raises(CharrnnError, match="cannot write .*No space left"):
        fetch(server, "alice", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- hostile mirrors: redirects and size -----------------------------------------------------------


def redirect(location: str, status: int = 302):
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


@pytest.mark.parametrize("absolute", [True, False])
def test_download_follows_http_redirect(server, tmp_path, absolute):
    server.routes["/1/11/11-0.txt"] = redirect((server.url if absolute else "") + "/moved/alice.txt")
    server.routes["/moved/alice.txt"] = respond(NEW_STYLE.encode())
    path = fetch(server, "alice", tmp_path)
    assert server.requests == ["/1/11/11-0.txt", "/moved/alice.txt"]
    assert path.read_text(encoding="utf-8") == NEW_STYLE_BODY


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1:1/11-0.txt"])
def test_download_refuses_redirect_off_http(server, tmp_path, target):
    for url in dl.candidate_urls(11, server.url):
        server.routes[url.removeprefix(server.url)] = redirect(target, status=301)
    with pytest.raises(CharrnnError) as info:
        fetch(server, "alice", tmp_path)
    message = str(info.value)
    assert f"redirected to {target}; only http and https redirects are followed" in message and "\n" not in message
    assert "HTTP 30" not in message and len(server.requests) == 3  # refused at once, not retried
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_content_length_over_cap_before_reading(server, tmp_path):
    body = NEW_STYLE.encode()
    server.routes["/1/11/11-0.txt"] = respond(body, content_length=10**9)  # the short body would read as cut short
    with pytest.raises(CharrnnError) as info:
        fetch(server, "alice", tmp_path, max_bytes=len(body))
    message = str(info.value)
    assert "1,000,000,000 bytes, over the" in message and "--max-mb" in message and "cut short" not in message
    assert len(server.requests) == 3 and list(tmp_path.iterdir()) == []


def test_download_stops_reading_a_stream_past_the_cap(server, tmp_path):
    """A 32 MB body without Content-Length: charrnn must hang up after the cap, not read it all and then refuse."""
    hung_up = []

    def stream(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        chunk = b"Project Gutenberg " * 4096
        try:
            for _ in range(32 * dl.MB // len(chunk)):
                handler.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            hung_up.append(True)

    server.routes["/1/11/11-0.txt"] = stream
    with pytest.raises(CharrnnError, match=r"11-0\.txt \(over the 0\.0625 MB download cap; raise it with --max-mb"):
        fetch(server, "alice", tmp_path, max_bytes=dl.MB // 16)
    assert hung_up == [True] and list(tmp_path.iterdir()) == []


def test_download_cap_admits_a_body_of_exactly_the_cap(server, tmp_path):
    body = NEW_STYLE.encode()
    server.routes["/1/11/11-0.txt"] = respond(body)
    assert fetch(server, "alice", tmp_path, max_bytes=len(body)).read_text(encoding="utf-8") == NEW_STYLE_BODY


def test_download_books_max_mb(server, tmp_path):
    body = NEW_STYLE.encode() + b"x" * (dl.MB // 2)
    server.routes["/1/11/11-0.txt"] = respond(body)
    options = dict(out_dir=tmp_path, mirror=server.url, progress=False, log=lambda message: None, backoff=0)
    with pytest.raises(CharrnnError, match="over the 0.5 MB download cap"):
        dl.download_books(["alice"], max_mb=0.5, **options)
    assert list(tmp_path.iterdir()) == []
    assert dl.download_books(["alice"], **options) == [tmp_path / "alice.txt"]  # the default cap is 64 MB


@pytest.mark.parametrize("max_mb", [0, -1, float("nan"), float("inf"), "64"])
def test_download_books_refuses_bad_max_mb(max_mb, tmp_path):
    with pytest.raises(UsageError, match=r"^--max-mb must be a positive number of megabytes \(got .*\), e\.g\."):
        dl.download_books(["alice"], max_mb=max_mb, out_dir=tmp_path, mirror="http://127.0.0.1:9")
    assert dl.DEFAULT_MAX_MB == 64
