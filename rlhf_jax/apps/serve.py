"""`rlhf-jax serve`: the labelling web app. People pick the better of two responses in a browser.

    rlhf-jax serve --data=<dir> [--port=8000] [--policy=<run>] [--host=127.0.0.1]
                   [--public_name=labels.example.org] [--tokens=<file.json>]
                   [--new_tokens=alice,bob] [--answers_per_pair=1] [--compare_every=3]

Two modes write to the same label store (<dir>/labels.sqlite, rlhf_jax.people.label_store), which the
terminal labeler (`rlhf-jax label`) and the preference stage read too:

  /       labelling queue: the prompt and two responses side by side, in a random order that is
          recorded with the answer; buttons and keys (1 or <- left, 2 or -> right, t tie, s skip,
          u undo the last answer; keys with Ctrl / Alt / Meta are the browser's); a progress
          count (skips are not labels); short instructions, <dir>/instructions.txt when present. Pairs: <dir>/pairs.jsonl (imported at start) and whatever else was
          added to the store (a round's pairs, `rlhf-jax rounds`).
  /chat   with --policy: the person types a prompt and the policy answers (loaded like
          `rlhf-jax sample`: runs.PolicySampler); every `compare_every`-th turn it answers twice
          and asks which is better. The comparison is a pair of the store (source 'chat', with
          the policy run, sampling settings, annotator and time) and the answer goes through the
          same endpoint as the queue's. A prompt longer than the policy reads (its window less
          the answer's tokens) is refused, saying so; a comparison not answered yet is offered
          again when the page is reloaded.
  /stats  answers per annotator and inter-annotator agreement.

Security model (the app never trusts its input):
  * It binds to 127.0.0.1 unless --host says otherwise; any other address needs per-annotator
    tokens (--tokens, a JSON file {name: token}; --new_tokens=alice,bob writes one with fresh
    tokens and prints each person's login link). With tokens, every request needs the session
    cookie set by /login?token=...; without them (local only) a person picks a name (any script,
    NFC-normalised, no control characters). --new_tokens keeps the tokens already in the file.
  * A request whose Host is not the server's own name is refused (a page of another site that
    made its name resolve to 127.0.0.1, DNS rebinding, gets nothing): the bound address, the
    local names when bound locally, and --public_name (the name a proxy forwards). A POST whose
    Origin is another site's is refused.
  * Every text from a model or a person is rendered as text: HTML-escaped on the server, and set
    with textContent (never innerHTML) by the page's script; a strict Content-Security-Policy
    allows no inline script at all.
  * State changes are JSON POSTs carrying an X-CSRF-Token header derived from the session (a
    cross-site form cannot set it, nor send application/json without CORS); the session cookie is
    HttpOnly and SameSite=Strict.
  * Every field is checked (type, allowed values, length; bodies over 16 KiB are refused; deep
    nesting or a huge number is a 400); an unknown pair id is 404, a pair not shown to this
    annotator 409, a bad field 400/413/415, a missing session 401/403 -- and none of them writes
    anything. Every response, errors and Starlette's own 404/405/500 included, carries the
    security headers.
  * An answer is durable when the page says it is saved (the store commits with synchronous=FULL
    before the reply); a resubmitted request (same request id) is not written twice, so a
    kill -9 and restart loses and duplicates nothing, and the queue continues where it stopped.
  * Files holding answers or tokens (the store, tokens.json, .serve_secret) are mode 0600.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import html
import json
import os
import random
import re
import secrets
import sys
import threading
import urllib.parse
import uuid
from typing import Callable, Optional

from rlhf_jax.people import label_store
from rlhf_jax.runtime.config import ConfigError, DataError
from rlhf_jax.stages import runs

try:  # The web stack is an optional extra (pip install -e '.[serve]'); `rlhf-jax --help` works without it.
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    _MISSING_WEB_STACK = None
except ImportError as e:  # pragma: no cover - depends on the install
    _MISSING_WEB_STACK = e

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, and an optional port.
HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
MAX_BODY_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 2000
MAX_ID_CHARS = label_store.MAX_ID_CHARS
INSTRUCTIONS_FILE = "instructions.txt"
MAX_INSTRUCTIONS_CHARS = 4000
DEFAULT_INSTRUCTIONS = ("Read the prompt and both responses, then pick the better response: 1 or \u2190 for the "
                        "left one, 2 or \u2192 for the right one, t when they are equally good, s to skip a pair "
                        "you cannot judge (a skip is not a label). u undoes your last answer.")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
SESSION_COOKIE = "rlhf_session"
# No inline script or style, no framing, no sniffing; pages are per person, never cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SECRET_FILE = ".serve_secret"


class HTTPError(Exception):
    """A request refused with `status` and a message for the person (nothing was written)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """How chat mode samples; stored with every chat comparison."""

    compare_every: int = 3  # every k-th turn of a person shows two answers to compare
    temperature: float = 1.0
    max_new_tokens: int = 64


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


def name_error(name) -> Optional[str]:
    """What is wrong with an annotator name (label_store's rule), or None."""
    return label_store.annotator_error(name)


def read_tokens(path: str) -> dict:
    """{token: annotator} from a JSON file {annotator: token}; names and tokens are checked."""
    by_name = _read_token_file(path)
    if not by_name:
        raise ConfigError(f"--tokens={path}: expected a JSON object {{annotator name: token}}")
    return {token: name for name, token in by_name.items()}


def _read_token_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            by_name = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--tokens={path}: no such file (write one with --new_tokens=alice,bob)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--tokens={path}: not valid JSON ({e})") from None
    if not isinstance(by_name, dict):
        raise ConfigError(f"--tokens={path}: expected a JSON object {{annotator name: token}}")
    for name, token in by_name.items():
        error = name_error(name)
        if error:
            raise ConfigError(f"--tokens={path}: annotator name {name!r}: {error}")
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"--tokens={path}: the token of {name!r} must be a string of >= 16 characters")
    return by_name


def write_new_tokens(path: str, names: list[str]) -> dict:
    """Add a fresh random token for each name not yet in the tokens file at `path` (created when
    missing); tokens already there are kept, so a restart with the same --new_tokens logs no one
    out and the links handed out keep working. Returns {name: token} of the names added. The
    file is written whole and renamed into place, readable by the owner only."""
    names = [label_store.normalise_name(n) for n in names]
    for name in names:
        error = name_error(name)
        if error:
            raise ConfigError(f"--new_tokens: annotator name {name!r}: {error}")
    by_name = _read_token_file(path) if os.path.exists(path) else {}
    added = {name: secrets.token_urlsafe(24) for name in dict.fromkeys(names) if name not in by_name}
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({**by_name, **added}, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    os.chmod(path, 0o600)  # an older file may have been readable by others
    return added


def host_name(value: str) -> Optional[str]:
    """The name in a Host header value ('Example.org:8000' -> 'example.org', '[::1]:80' -> '::1'),
    or None when it is not one."""
    match = HOST_HEADER.fullmatch(value or "")
    return match.group(1).strip("[]").rstrip(".").lower() if match else None


def _server_secret(data_dir: str) -> bytes:
    """A per-data-dir secret for CSRF tokens, kept on disk so pages open across a restart stay valid."""
    path = os.path.join(data_dir, SECRET_FILE)
    if not os.path.exists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # another server started at the same moment
    with open(path) as f:
        return f.read().strip().encode()


# ----------------------------------------------------------------------------- the app


def make_app(data_dir: str, *, host: str = "127.0.0.1", tokens: Optional[dict] = None,
             answers_per_pair: int = 1, sampler: Optional[Callable] = None, policy: str = "",
             chat: ChatSettings = ChatSettings(), seed: Optional[int] = None,
             public_names: tuple = ()) -> "Guard":
    """The labelling app on <data_dir>'s store.

    tokens: {token: annotator} (read_tokens); required when `host` is not local. sampler:
    sampler(prompt, num, temperature, max_new_tokens, seed=...) -> [str] for chat mode (a
    runs.PolicySampler of `policy`; its `tokenizer` and `model_config.max_len`, when it has them,
    bound the prompt); None: no chat. seed: the shown order (tests). public_names: the host
    names people reach the server by besides `host` (a proxy's); required when `host` is a
    wildcard (0.0.0.0, ::).
    """
    if _MISSING_WEB_STACK is not None:
        raise ConfigError("rlhf-jax serve needs the 'serve' extra: pip install -e '.[serve]' (starlette, "
                          f"uvicorn): {_MISSING_WEB_STACK}")
    if not is_local(host) and not tokens:
        raise ConfigError(f"--host={host} is reachable from other machines: give per-annotator tokens "
                          "(--tokens=<file> or --new_tokens=alice,bob)")
    if chat.compare_every < 1:
        raise ConfigError(f"--compare_every={chat.compare_every}: expected an integer >= 1")
    public_names = tuple(public_names)
    for name in public_names:
        match = HOST_HEADER.fullmatch(name)
        if not match or match.group(2):
            raise ConfigError(f"--public_name={name}: expected a host name without scheme or port "
                              "(labels.example.org)")
    if host in WILDCARD_HOSTS and not public_names:
        raise ConfigError(f"--host={host} listens on every address: name the one people open with "
                          "--public_name=<name> (requests for any other Host are refused)")
    # The names a Host header may carry (as host_name reads them: lower case, IPv6 without brackets).
    own_names = {host_name(n) for n in public_names} | (set(LOCAL_HOSTS) if is_local(host) else
                                                          set() if host in WILDCARD_HOSTS else {host.strip("[]").lower()})
    # Chat: the policy reads the prompt's last (window - max_new_tokens) tokens. Rather than store a
    # prompt it did not see, a longer one is refused (prompt_limit).
    tokenizer = getattr(sampler, "tokenizer", None)
    window = getattr(getattr(sampler, "model_config", None), "max_len", None)
    prompt_limit = None
    if sampler is not None and tokenizer is not None and window is not None:
        prompt_limit = int(window) - chat.max_new_tokens
        if prompt_limit < 1:
            raise ConfigError(f"--max_new_tokens={chat.max_new_tokens}: the policy's window (model.max_len) is "
                              f"{window} tokens, prompt included; ask for fewer")
    os.makedirs(data_dir, exist_ok=True)
    has_pairs = os.path.exists(os.path.join(data_dir, label_store.PAIRS_FILE))
    if not has_pairs and not os.path.exists(os.path.join(data_dir, label_store.STORE_FILE)) and sampler is None:
        raise DataError(f"{os.path.join(data_dir, label_store.PAIRS_FILE)} does not exist and there is no "
                        "label store or --policy: nothing to label")
    store = label_store.open_data_dir(data_dir, answers_per_pair=answers_per_pair, seed=seed)
    instructions = _read_instructions(data_dir)
    secret = _server_secret(data_dir)
    rng = secrets.SystemRandom() if seed is None else random.Random(seed)  # the chat shown order
    sample_lock = threading.Lock()  # one sampling call at a time (JAX on few cores)
    turns: dict = {}  # chat turns per annotator since the server started

    def annotator_of(request: Request) -> Optional[str]:
        session = request.cookies.get(SESSION_COOKIE, "")
        if tokens:
            for token, name in tokens.items():  # constant-time comparison against each token
                if hmac.compare_digest(token.encode(), session.encode()):
                    return name
            return None
        # The cookie holds the name percent-encoded (cookies are ASCII); an ASCII name is itself.
        try:
            name = urllib.parse.unquote(session, errors="strict")
        except UnicodeDecodeError:
            return None
        return name if name_error(name) is None else None

    def csrf_token(request: Request) -> str:
        session = request.cookies.get(SESSION_COOKIE, "")
        return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()

    def require_annotator(request: Request) -> str:
        name = annotator_of(request)
        if name is None:
            raise HTTPError(401, "not logged in: open /login" + ("?token=<your token>" if tokens else ""))
        return name

    def check_csrf(request: Request) -> None:
        given = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(given.encode(), csrf_token(request).encode()):
            raise HTTPError(403, "missing or wrong X-CSRF-Token (reload the page)")

    async def read_json(request: Request, fields: dict) -> dict:
        """The JSON object body with exactly `fields` {name: check(value) -> error or None}."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPError(415, "expected Content-Type: application/json")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HTTPError(400, "the body is not valid JSON") from None
        except RecursionError:  # a few thousand nested [ fit in 16 KiB
            raise HTTPError(400, "the body is nested too deeply") from None
        except ValueError as e:  # an integer of more than 4,300 digits (int_max_str_digits)
            raise HTTPError(400, f"the body has a number Python will not read: {e}"[:200]) from None
        if not isinstance(data, dict):
            raise HTTPError(400, "expected a JSON object")
        unknown = sorted(set(data) - set(fields))
        missing = sorted(set(fields) - set(data))
        if unknown or missing:
            raise HTTPError(400, f"fields: unknown {unknown}, missing {missing}; expected {sorted(fields)}")
        for name, check in fields.items():
            error = check(data[name])
            if error:
                raise HTTPError(400, f"{name}: {error}")
        return data

    def text_field(max_chars: int, pattern=None):
        def check(value):
            if not isinstance(value, str):
                return f"expected a string, got {type(value).__name__}"
            if not value.strip() or len(value) > max_chars:
                return f"expected 1 to {max_chars} characters"
            if pattern is not None and not pattern.fullmatch(value):
                return f"expected to match {pattern.pattern}"
            return None
        return check

    def one_of(allowed):
        return lambda value: None if value in allowed else f"expected one of {list(allowed)}"

    def guarded(handler):
        """Errors become a JSON (API) or plain-text page with the status; nothing else leaks."""
        async def endpoint(request: Request):
            try:
                response = await handler(request)
            except HTTPError as e:
                if request.url.path.startswith("/api/"):
                    response = JSONResponse({"error": e.message}, status_code=e.status)
                else:
                    response = HTMLResponse(page("Error", f"<p class=error>{_text(e.message)}</p>"),
                                            status_code=e.status)
            return response
        return endpoint

    # ------------------------------------------------------------------------- pages

    def page(title: str, body: str, request: Optional[Request] = None) -> str:
        csrf = csrf_token(request) if request is not None else ""
        who = annotator_of(request) if request is not None else None
        nav = (f"<nav><a href='/'>Label</a>{' <a href=/chat>Chat</a>' if sampler else ''} <a href='/stats'>Stats</a>"
               f"<span class=who>{_text(who or '')}</span></nav>")
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_text(title)}</title>"
                f"<meta name=viewport content='width=device-width, initial-scale=1'>"
                f"<meta name=csrf-token content='{_text(csrf)}'><link rel=stylesheet href='/static/app.css'>"
                f"<script src='/static/app.js' defer></script></head><body>{nav}<main>{body}</main></body></html>")

    def instructions_block(element_id: str = "instructions") -> str:
        return f"<details id={element_id} open><summary>How to label</summary><p>{_text(instructions)}</p></details>"

    async def index(request: Request):
        name = annotator_of(request)
        if name is None:
            return RedirectResponse("/login", status_code=303)
        lease = await run_in_threadpool(store.next_pair, name)
        done, total = await run_in_threadpool(store.progress, name)
        skipped = await run_in_threadpool(store.num_skipped, name)
        last = await run_in_threadpool(store.last_answer, name)
        progress = (f"<p id=progress>{done} of {total} labelled"
                    f"{f', {skipped} skipped' if skipped else ''}</p>")
        # The confirmation comes from the store, not from the page that sent the answer: what is
        # shown here is what was committed.
        saved = ""
        if last is not None and (lease is None or last.pair_id != lease.pair_id):
            saved = (f"<p id=saved>Saved: {_text(_POSITION_WORDS[last.position])}, for the previous pair. "
                     "<button id=undo type=button>Undo (u)</button></p>")
        elif last is not None:  # the pair on screen is the one they undid
            saved = (f"<p id=saved>Answer this pair again: your new answer replaces "
                     f"&ldquo;{_text(_POSITION_WORDS[last.position])}&rdquo;.</p>")
        if lease is None:
            return HTMLResponse(page("Done", progress + saved + "<p id=done>Nothing left to label. Thank you!</p>",
                                     request))
        body = (progress + saved + instructions_block() +
                f"<section id=pair data-pair-id='{_text(lease.pair_id)}'>"
                f"<h2>Prompt</h2>{_pre('id=prompt', lease.pair.prompt)}"
                "<div class=sides>"
                f"<div class=side><h3>Left <kbd>1</kbd></h3>{_pre('id=left', lease.left)}</div>"
                f"<div class=side><h3>Right <kbd>2</kbd></h3>{_pre('id=right', lease.right)}</div></div>"
                "<div class='buttons bar' id=bar>"
                "<button id=btn-left data-position=left>Left is better (1, &larr;)</button>"
                "<button id=btn-tie data-position=tie>Tie (t)</button>"
                "<button id=btn-right data-position=right>Right is better (2, &rarr;)</button>"
                "<button id=btn-skip data-position=skip>Skip (s)</button>"
                "<span id=status role=status></span></div></section>")
        return HTMLResponse(page("Which is better?", body, request))

    async def login(request: Request):
        if tokens:
            token = request.query_params.get("token", "")
            if not token:
                return HTMLResponse(page("Log in", "<p>Open the login link you were given "
                                                  "(<code>/login?token=...</code>).</p>" + instructions_block()),
                                    status_code=401)
            if not any(hmac.compare_digest(t.encode(), token.encode()) for t in tokens):
                raise HTTPError(403, "unknown token")
            session = token
        else:
            name = label_store.normalise_name(request.query_params.get("name", ""))
            if not name:
                return HTMLResponse(page("Your name", "<form method=get action=/login><label>Your name "
                                                      "<input name=name id=name maxlength=64 required></label> "
                                                      "<button id=go>Start</button></form>" + instructions_block()))
            error = name_error(name)
            if error:
                raise HTTPError(400, f"name: {error}")
            session = urllib.parse.quote(name, safe="")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", path="/",
                            max_age=30 * 24 * 3600, secure=request.url.scheme == "https")
        return response

    async def stats_page(request: Request):
        require_annotator(request)
        stats = await run_in_threadpool(store.stats)
        rows = "".join(f"<tr><td>{_text(name)}</td>" + "".join(f"<td>{c[k]}</td>" for k in
                                                             ("a", "b", "tie", "skip", "total")) + "</tr>"
                       for name, c in sorted(stats.answers_per_annotator.items()))
        pairs_rows = "".join(f"<tr><td>{_text(k.replace('|', ' & '))}</td><td>{ok}/{n}</td></tr>"
                             for k, (ok, n) in sorted(stats.agreement_by_pair_of_annotators.items()))
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
        body = (f"<h2>Answers</h2><p>{stats.num_pairs} pairs, {stats.num_complete} with "
                f"{store.answers_per_pair} answers.</p>"
                "<table id=counts><tr><th>annotator</th><th>a</th><th>b</th><th>tie</th><th>skip</th><th>total</th>"
                f"</tr>{rows}</table><h2>Agreement</h2><p id=agreement>pairwise agreement "
                f"{fmt(stats.pairwise_agreement)}, Fleiss' kappa {fmt(stats.fleiss_kappa)}</p>"
                f"<table><tr><th>annotators</th><th>agree</th></tr>{pairs_rows}</table>")
        return HTMLResponse(page("Stats", body, request))

    async def chat_page(request: Request):
        if sampler is None:
            raise HTTPError(404, "chat needs a policy: start the server with --policy=<run>")
        name = annotator_of(request)
        if name is None:
            return RedirectResponse("/login", status_code=303)
        # Comparisons sampled before a reload (or a restart) and not answered yet are asked again.
        pending = "".join(
            f"<div class='turn pending' data-pair-id='{_text(lease.pair_id)}'>{_pre('class=you', lease.pair.prompt)}"
            f"<div class=sides>{_pre('class=left', lease.left)}{_pre('class=right', lease.right)}"
            "</div><div class='buttons bar'>" + "".join(
                f"<button data-position={position}>{_text(_POSITION_WORDS[position])}</button>"
                for position in label_store.POSITIONS) + "</div></div>"
            for lease in await run_in_threadpool(store.held_comparisons, name))
        limit = ("" if prompt_limit is None else
                 f" The policy reads prompts of up to {prompt_limit} tokens; a longer one is refused.")
        body = (f"<section id=chat><div id=turns>{pending}</div>"
                "<form id=chat-form><textarea id=chat-prompt maxlength=2000 rows=3 required "
                "placeholder='Write a prompt'></textarea><button id=send>Send</button></form>"
                "<p class=note>" + ("Every turn shows" if chat.compare_every == 1 else
                                    f"Every {chat.compare_every} turns, one shows") +
                f" two answers: pick the better one.{limit}</p>"
                "<p id=status role=status></p></section>")
        return HTMLResponse(page("Chat", body, request))

    # ------------------------------------------------------------------------- the API

    async def api_answer(request: Request):
        name = require_annotator(request)
        check_csrf(request)
        data = await read_json(request, {"pair_id": label_store.pair_id_error,
                                         "position": one_of(label_store.POSITIONS),
                                         "request_id": text_field(64, REQUEST_ID_PATTERN)})

        def save():
            earlier = store.answer_by_request(data["request_id"])
            if earlier is not None:  # the same click again (a retry after a lost reply)
                if (earlier.pair_id, earlier.annotator) != (data["pair_id"], name):
                    raise HTTPError(409, "request_id was used for another answer")
                return earlier
            try:
                store.pair(data["pair_id"])
            except label_store.UnknownPair:
                raise HTTPError(404, "no such pair") from None
            lease = store.lease(data["pair_id"], name)
            if lease is None:
                raise HTTPError(409, "this pair is not on your screen (already answered, or shown to someone "
                                     "else): reload the page")
            try:
                return store.answer(data["pair_id"], name, data["position"], lease.shown,
                                    request_id=data["request_id"], metadata={"via": "web"})
            except label_store.AnswerRefused as e:
                raise HTTPError(409, str(e)) from None

        answer = await run_in_threadpool(save)
        return JSONResponse({"saved": True, "seq": answer.seq, "choice": answer.choice})

    async def api_undo(request: Request):
        """Give the person the pair of their last answer back; the answer they give then supersedes it."""
        name = require_annotator(request)
        check_csrf(request)
        await read_json(request, {})
        lease = await run_in_threadpool(store.reopen, name)
        if lease is None:
            raise HTTPError(409, "nothing to undo: you have not answered a pair yet")
        return JSONResponse({"reopened": lease.pair_id})

    async def api_chat(request: Request):
        if sampler is None:
            raise HTTPError(404, "chat needs a policy: start the server with --policy=<run>")
        name = require_annotator(request)
        check_csrf(request)
        data = await read_json(request, {"prompt": text_field(MAX_PROMPT_CHARS)})
        prompt = data["prompt"]
        if prompt_limit is not None:
            n = len(tokenizer.encode_prompt(prompt))
            if n > prompt_limit:
                raise HTTPError(400, f"prompt: {n} tokens, and the policy reads at most {prompt_limit} (its window of "
                                     f"{window} tokens less the {chat.max_new_tokens} of its answer): shorten it")

        def reply():
            with sample_lock:
                turn = turns.get(name, 0) + 1
                turns[name] = turn
                compare = turn % chat.compare_every == 0
                sample_seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed + turn
                texts = sampler(prompt, 2 if compare else 1, chat.temperature, chat.max_new_tokens,
                                seed=sample_seed)
            if not compare:
                return {"compare": False, "turn": turn, "response": texts[0]}
            pair_id = f"chat-{uuid.uuid4().hex}"
            store.add_pairs([{"id": pair_id, "prompt": prompt, "response_a": texts[0], "response_b": texts[1],
                              "policy": policy, "annotator": name, "time": label_store.now(), "seed": sample_seed,
                              "sampling": dataclasses.asdict(chat)}], source="chat", queued=False)
            lease = store.hold(pair_id, name, rng.choice(label_store.SHOWN_ORDERS))
            return {"compare": True, "turn": turn, "pair_id": pair_id, "left": lease.left, "right": lease.right}

        return JSONResponse(await run_in_threadpool(reply))

    async def static(request: Request):
        name = request.path_params["name"]
        if name not in _STATIC:
            raise HTTPError(404, "no such file")
        media, text = _STATIC[name]
        return Response(text, media_type=media)

    routes = [Route("/", guarded(index)), Route("/login", guarded(login)), Route("/stats", guarded(stats_page)),
              Route("/chat", guarded(chat_page)), Route("/api/answer", guarded(api_answer), methods=["POST"]),
              Route("/api/undo", guarded(api_undo), methods=["POST"]),
              Route("/api/chat", guarded(api_chat), methods=["POST"]),
              Route("/static/{name}", guarded(static))]
    app = Starlette(routes=routes)
    app.state.store = store
    return Guard(app, own_names, {host_name(n) for n in public_names})


class Guard:
    """The outermost layer, around Starlette's own error handling, so that every response -- the
    app's, and Starlette's own 404 / 405 / 500 -- carries SECURITY_HEADERS; and the checks that
    hold for every request: the Host is one of the server's own names (a page of another site
    whose name was made to resolve to this address -- DNS rebinding -- is the same origin to the
    browser, and would read pages and CSRF tokens); a POST's Origin, when the browser sends one
    (it always does on a POST), is this server."""

    def __init__(self, app, own_names: set, public_names: set):
        self.app = app
        self.state = app.state
        self.own_names = own_names
        self.public_names = public_names
        self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    def refusal(self, scope) -> Optional[tuple[int, str]]:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host_name(host) not in self.own_names:
            return 421, ("this server does not answer for that host name; open it by its own name "
                         "(behind a proxy, start it with --public_name=<the name people open>)")
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None:
            parts = urllib.parse.urlsplit(origin)
            if not (parts.scheme in ("http", "https") and
                    (parts.netloc.lower() == host.lower() or host_name(parts.netloc) in self.public_names)):
                return 403, "this request comes from a page of another site (Origin)"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                ours = {k for k, _ in self._headers}
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if k.lower() not in ours] + self._headers}
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            status, message = refused
            response = (JSONResponse({"error": message}, status_code=status) if scope["path"].startswith("/api/")
                        else PlainTextResponse(message, status_code=status))
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def _read_instructions(data_dir: str) -> str:
    """<data_dir>/instructions.txt (plain text, shown as text), or the default short instructions."""
    path = os.path.join(data_dir, INSTRUCTIONS_FILE)
    if not os.path.exists(path):
        return DEFAULT_INSTRUCTIONS
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text or len(text) > MAX_INSTRUCTIONS_CHARS:
        raise DataError(f"{path}: expected 1 to {MAX_INSTRUCTIONS_CHARS} characters of instructions, "
                        f"got {len(text)}")
    return text


_POSITION_WORDS = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "skip": "Skip"}


def _text(value) -> str:
    """Any text as HTML text or a quoted attribute's value: <, >, &, quotes escaped, so a response
    with <script> shows as typed.
    A carriage return becomes a character reference: the HTML parser turns a literal CR (or CRLF)
    into LF, and a sampled response may hold one."""
    return html.escape(str(value), quote=True).replace("\r", "&#13;")


def _pre(attributes: str, value) -> str:
    """A <pre> showing `value` exactly: the HTML parser drops one newline right after <pre>, so
    one is put there for it to drop (a response may begin with a newline of its own)."""
    return f"<pre {attributes}>\n{_text(value)}</pre>"


# ----------------------------------------------------------------------------- static files

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 70rem; padding: 1rem; }
nav { display: flex; gap: 1rem; border-bottom: 1px solid #ccc; padding-bottom: .5rem; }
nav .who { margin-left: auto; color: #555; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .75rem; border-radius: 4px; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.buttons { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: 1rem; align-items: center; }
/* However long the responses, the choices stay on screen: the bar sticks to the bottom. */
.bar { position: sticky; bottom: 0; background: #fff; padding: .5rem 0; border-top: 1px solid #ccc; }
button { font-size: 1rem; padding: .5rem 1rem; }
#saved { background: #e8f5e9; border: 1px solid #7cb342; padding: .5rem; border-radius: 4px; }
#status { font-weight: bold; }
.error { color: #a00; }
#chat textarea { width: 100%; font-size: 1rem; }
.turn { border-bottom: 1px solid #eee; padding: .5rem 0; }
pre.you::before { content: "You: "; font-weight: bold; }
pre.policy::before, #chat .sides pre::before { content: "Policy: "; font-weight: bold; }
/* Phones: one column, the left answer above the right one. */
@media (max-width: 40rem) { .sides { grid-template-columns: 1fr; } body { padding: .5rem; } }
"""

# No inline script anywhere (the CSP forbids it): this file is the page's only code. Model and
# person text is always put into the page with textContent.
_JS = r"""
"use strict";
const csrf = () => document.querySelector("meta[name=csrf-token]").content;
const status = (text) => { const s = document.getElementById("status"); if (s) s.textContent = text; };
const newRequestId = () => {
  const bytes = new Uint8Array(16); crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
};
async function post(url, body) {
  const response = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({error: "bad reply"}));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
let busy = false;
async function answer(pairId, position, requestId, after) {
  if (busy) return; busy = true; status("saving...");
  for (let attempt = 0; ; attempt++) {  // the same request id on a retry: saved at most once
    try { await post("/api/answer", {pair_id: pairId, position: position, request_id: requestId});
          status("saved"); busy = false; after(); return; }
    catch (e) { if (attempt >= 2 || !(e instanceof TypeError)) { status("not saved: " + e.message); busy = false; return; }
                await new Promise((r) => setTimeout(r, 1000)); }
  }
}
async function undo() {
  if (busy) return; busy = true; status("undoing...");
  try { await post("/api/undo", {}); window.location.reload(); }
  catch (e) { status("not undone: " + e.message); busy = false; }
}
function setupQueue() {
  const undoButton = document.getElementById("undo");
  if (undoButton) undoButton.addEventListener("click", undo);
  const pair = document.getElementById("pair");
  const pairId = pair && pair.dataset.pairId;
  const requestId = newRequestId();
  const pick = (position) => answer(pairId, position, requestId, () => window.location.reload());
  if (pair) for (const button of pair.querySelectorAll("button[data-position]"))
    button.addEventListener("click", () => pick(button.dataset.position));
  document.addEventListener("keydown", (event) => {
    // Ctrl+S, Alt+Left (Back), Cmd+1 ... are the browser's shortcuts, never answers.
    if (event.ctrlKey || event.altKey || event.metaKey) return;
    if (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT") return;
    if (event.key === "u" && undoButton) { event.preventDefault(); undo(); return; }
    const key = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right",
                 "t": "tie", "s": "skip"}[event.key];
    if (key && pair) { event.preventDefault(); pick(key); }
  });
}
function addTurn(parts) {
  const turns = document.getElementById("turns");
  const div = document.createElement("div"); div.className = "turn";
  for (const [cls, text] of parts) {
    const pre = document.createElement("pre"); pre.className = cls; pre.textContent = text; div.appendChild(pre);
  }
  turns.appendChild(div);
  return div;
}
// A comparison on the chat page (just sampled, or offered again after a reload): its buttons answer
// its pair through the queue's endpoint.
function wireComparison(div) {
  const requestId = newRequestId();
  const buttons = div.querySelector(".buttons");
  for (const b of buttons.querySelectorAll("button[data-position]")) {
    const position = b.dataset.position;
    b.addEventListener("click", () => answer(div.dataset.pairId, position, requestId, () => {
      div.removeAttribute("id"); div.classList.remove("pending"); buttons.remove();
      const note = document.createElement("p"); note.className = "picked"; note.textContent = "you picked: " + position;
      div.appendChild(note);
    }));
  }
}
function setupChat() {
  const form = document.getElementById("chat-form");
  if (!form) return;
  for (const div of document.querySelectorAll(".turn.pending")) wireComparison(div);
  const input = document.getElementById("chat-prompt");
  const send = document.getElementById("send");
  let sending = false;  // a double-click on Send sends once
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (sending) return;
    const prompt = input.value;
    if (!prompt.trim()) return;
    sending = true; send.disabled = true; status("thinking...");
    let reply;
    try { reply = await post("/api/chat", {prompt: prompt}); }
    catch (e) { status("error: " + e.message); return; }
    finally { sending = false; send.disabled = false; }
    status("");
    input.value = "";
    if (!reply.compare) { addTurn([["you", prompt], ["policy", reply.response]]); return; }
    const div = addTurn([["you", prompt]]);
    div.id = "compare"; div.dataset.pairId = reply.pair_id; div.classList.add("pending");
    const sides = document.createElement("div"); sides.className = "sides";
    for (const [id, text] of [["left", reply.left], ["right", reply.right]]) {
      const pre = document.createElement("pre"); pre.id = "chat-" + id; pre.className = id; pre.textContent = text;
      sides.appendChild(pre);
    }
    div.appendChild(sides);
    const buttons = document.createElement("div"); buttons.className = "buttons bar";
    const names = {left: "Left is better", right: "Right is better", tie: "Tie", skip: "Skip"};
    for (const position of ["left", "right", "tie", "skip"]) {
      const b = document.createElement("button"); b.id = "chat-btn-" + position; b.textContent = names[position];
      b.dataset.position = position; b.type = "button"; buttons.appendChild(b);
    }
    div.appendChild(buttons);
    wireComparison(div);
  });
}
setupQueue();
setupChat();
"""

_STATIC = {"app.js": ("text/javascript", _JS), "app.css": ("text/css", _CSS)}


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder with pairs.jsonl and/or the label store labels.sqlite")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; not local: needs --tokens")
    p.add_argument("--public_name", default="", help="host name(s) people open, comma-separated (behind a proxy, "
                                                    "or with --host=0.0.0.0); requests for other names are refused")
    p.add_argument("--policy", default="", help="a run with a policy: enables /chat")
    p.add_argument("--tokens", default="", help="JSON file {annotator: token}; required off 127.0.0.1")
    p.add_argument("--new_tokens", default="", help="alice,bob: add fresh tokens for names not yet in --tokens "
                                                   "(default <data>/tokens.json; existing ones are kept) and "
                                                   "print their login links")
    p.add_argument("--answers_per_pair", type=int, default=1, help="N annotators asked each pair")
    p.add_argument("--compare_every", type=int, default=3, help="chat: every k-th turn asks for a comparison")
    p.add_argument("--temperature", type=float, default=1.0, help="chat sampling temperature")
    p.add_argument("--max_new_tokens", type=int, default=64, help="chat: tokens per answer")


def serve(args) -> None:
    """`rlhf-jax serve`: check everything, then run uvicorn until Ctrl-C."""
    import uvicorn

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port={args.port}: expected 1..65535")
    if args.answers_per_pair < 1:
        raise ConfigError(f"--answers_per_pair={args.answers_per_pair}: expected an integer >= 1")
    if not (args.temperature > 0 and args.max_new_tokens >= 1):
        raise ConfigError("--temperature must be > 0 and --max_new_tokens >= 1")
    tokens = None
    public_names = tuple(n.strip() for n in args.public_name.split(",") if n.strip())
    if args.new_tokens:
        path = args.tokens or os.path.join(args.data, "tokens.json")
        os.makedirs(args.data, exist_ok=True)
        added = write_new_tokens(path, [n.strip() for n in args.new_tokens.split(",") if n.strip()])
        where = public_names[0] if public_names else f"{args.host}:{args.port}"
        print(f"tokens in {path}; " + ("login links of the names added:" if added else
                                       "every name already had one (their links still work)"))
        for name, token in added.items():
            print(f"  {name}: http://{where}/login?token={urllib.parse.quote(token)}")
        args.tokens = path
    if args.tokens:
        tokens = read_tokens(args.tokens)
    sampler = None
    if args.policy:
        sampler = runs.PolicySampler(args.policy)
    app = make_app(args.data, host=args.host, tokens=tokens, answers_per_pair=args.answers_per_pair,
                   sampler=sampler, policy=args.policy, public_names=public_names,
                   chat=ChatSettings(args.compare_every, args.temperature, args.max_new_tokens))
    print(f"labelling {args.data} at http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-jax serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    serve(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
