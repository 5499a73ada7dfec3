"""The labelling web app over HTTP (Starlette's TestClient, and a real uvicorn process for the
kill -9 case): escaping, unknown ids, bad fields, tokens off 127.0.0.1, CSRF, the recorded
order, N annotators, chat-and-compare with a tiny policy, and no label lost or doubled by a kill."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from rlhf_jax.apps import serve
from rlhf_jax.people import labelers  # noqa: E402
from rlhf_jax.people import label_store as LS  # noqa: E402
from rlhf_jax.runtime.config import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "<script>alert('x')</script>&<b>"


def write_pairs(data_dir, n=3, **overrides):
    pairs = [{"id": f"p{i}", "prompt": f"prompt {i}", "response_a": f"A{i}", "response_b": f"B{i}", **overrides}
             for i in range(n)]
    labelers.write_pairs(str(data_dir), pairs)
    return pairs


def client_for(app, name):
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.get(f"/login?name={name}", follow_redirects=False).status_code == 303
    return client


def csrf_of(page_html):
    return re.search(r"name=csrf-token content='([0-9a-f]+)'", page_html).group(1)


def pair_on(page_html):
    match = re.search(r"data-pair-id='([^']*)'", page_html)
    return match and match.group(1)


def post_answer(client, csrf, pair_id, position, request_id="request-0001"):
    return client.post("/api/answer", json={"pair_id": pair_id, "position": position, "request_id": request_id},
                       headers={"X-CSRF-Token": csrf})


def test_pairs_render_as_text_and_the_shown_order_is_recorded(tmp_path):
    write_pairs(tmp_path, 2, prompt=EVIL, response_a=EVIL + " a", response_b="plain")
    app = serve.make_app(str(tmp_path), seed=3)
    client = client_for(app, "alice")
    page = client.get("/").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&lt;b&gt;" in page
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]
    left = re.search(r"<pre id=left>(.*?)</pre>", page, re.S).group(1)
    pair_id = pair_on(page)
    assert post_answer(client, csrf_of(page), pair_id, "left").json()["saved"]
    [answer] = app.state.store.answers()
    # The person clicked "left"; which response that was is the order the server recorded.
    assert answer.position == "left" and answer.annotator == "alice"
    assert answer.choice == ("a" if answer.shown == "ab" else "b")
    assert (left == "plain") == (answer.shown == "ba")
    assert "1 of 2 labelled" in client.get("/").text


def test_bad_requests_get_4xx_and_write_nothing(tmp_path):
    write_pairs(tmp_path, 2)
    app = serve.make_app(str(tmp_path))
    anonymous = TestClient(app, base_url="http://127.0.0.1")
    assert anonymous.get("/", follow_redirects=False).status_code == 303  # to /login
    assert anonymous.post("/api/answer", json={}).status_code == 401
    client = client_for(app, "alice")
    page = client.get("/").text
    csrf, pair_id = csrf_of(page), pair_on(page)
    assert post_answer(client, "0" * 64, pair_id, "left").status_code == 403  # wrong CSRF token
    assert client.post("/api/answer", json={"pair_id": pair_id, "position": "left", "request_id": "request-0001"}
                       ).status_code == 403  # no CSRF header
    assert post_answer(client, csrf, "no-such-pair", "left").status_code == 404
    assert post_answer(client, csrf, "p1", "left").status_code == 409  # not shown to alice
    assert post_answer(client, csrf, pair_id, "up").status_code == 400
    assert post_answer(client, csrf, pair_id, "left", request_id="x").status_code == 400
    assert post_answer(client, csrf, pair_id, 3).status_code == 400
    assert post_answer(client, csrf, ["p0"], "left").status_code == 400
    bad = [client.post("/api/answer", content=b"{not json", headers={"X-CSRF-Token": csrf,
                                                                     "Content-Type": "application/json"}),
           client.post("/api/answer", data={"pair_id": pair_id}, headers={"X-CSRF-Token": csrf}),  # a form post
           client.post("/api/answer", json={"pair_id": pair_id, "position": "left", "request_id": "request-0001",
                                            "extra": 1}, headers={"X-CSRF-Token": csrf}),
           client.post("/api/answer", json={"pair_id": "p" * 20000, "position": "left", "request_id": "request-01"},
                       headers={"X-CSRF-Token": csrf})]
    assert [r.status_code for r in bad] == [400, 415, 400, 413]
    assert client.get("/login?name=bell%07").status_code == 400  # control characters are no name
    assert client.get("/login?name=%E2%80%AEevil").status_code == 400  # nor a right-to-left override
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/static/secret.py").status_code == 404
    assert client.post("/api/chat", json={"prompt": "hi"}, headers={"X-CSRF-Token": csrf}).status_code == 404
    assert app.state.store.answers() == []
    # A good answer, then the same request again: one answer.
    assert post_answer(client, csrf, pair_id, "right").status_code == 200
    assert post_answer(client, csrf, pair_id, "right").status_code == 200
    assert len(app.state.store.answers()) == 1
    assert post_answer(client, csrf, pair_id, "left", request_id="request-0002").status_code == 409


def test_non_local_binding_needs_tokens(tmp_path):
    write_pairs(tmp_path, 2)
    with pytest.raises(ConfigError, match="tokens"):
        serve.make_app(str(tmp_path), host="0.0.0.0")
    by_name = serve.write_new_tokens(str(tmp_path / "tokens.json"), ["alice", "bob"])
    assert oct(os.stat(tmp_path / "tokens.json").st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="--public_name"):  # every address: which name is ours?
        serve.make_app(str(tmp_path), host="0.0.0.0", tokens=serve.read_tokens(str(tmp_path / "tokens.json")))
    app = serve.make_app(str(tmp_path), host="0.0.0.0", tokens=serve.read_tokens(str(tmp_path / "tokens.json")),
                         public_names=("10.0.0.1",))
    client = TestClient(app, base_url="http://10.0.0.1")
    assert client.get("/login?name=alice", follow_redirects=False).status_code == 401  # names do not log in
    assert client.get("/login?token=" + "x" * 32).status_code == 403
    client.cookies.set(serve.SESSION_COOKIE, "alice")  # a forged cookie is no session
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.get("/stats").status_code == 401
    client.cookies.clear()
    response = client.get(f"/login?token={by_name['bob']}", follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/").text
    assert "bob" in page and pair_on(page) == "p0"
    assert post_answer(client, csrf_of(page), "p0", "tie").status_code == 200
    assert app.state.store.answers()[0].annotator == "bob"
    with open(tmp_path / "bad.json", "w") as f:
        json.dump({"eve": "short"}, f)
    with pytest.raises(ConfigError, match=">= 16"):
        serve.read_tokens(str(tmp_path / "bad.json"))


def test_two_annotators_at_once_each_pair_asked_n_times(tmp_path):
    write_pairs(tmp_path, 3)
    app = serve.make_app(str(tmp_path), answers_per_pair=2)
    alice, bob, carol = (client_for(app, n) for n in ("alice", "bob", "carol"))
    pages = {n: c.get("/").text for n, c in (("alice", alice), ("bob", bob), ("carol", carol))}
    assert pair_on(pages["alice"]) == pair_on(pages["bob"]) == "p0" and pair_on(pages["carol"]) == "p1"
    for name, client in (("alice", alice), ("bob", bob)):
        assert post_answer(client, csrf_of(pages[name]), "p0", "left", f"request-{name}").status_code == 200
    assert pair_on(alice.get("/").text) == "p1" and pair_on(carol.get("/").text) == "p1"
    stats = bob.get("/stats").text
    assert "pairwise agreement" in stats and "alice" in stats


def fake_sampler(prompt, num, temperature, max_new_tokens, seed=0):
    return [f"{prompt} <i>answer {k}</i> seed {seed}" for k in range(num)]


def chat(client, csrf, prompt):
    return client.post("/api/chat", json={"prompt": prompt}, headers={"X-CSRF-Token": csrf})


def test_chat_every_kth_turn_asks_for_a_comparison(tmp_path):
    app = serve.make_app(str(tmp_path), sampler=fake_sampler, policy="runs/x",
                         chat=serve.ChatSettings(compare_every=2, temperature=0.7, max_new_tokens=8), seed=0)
    client = client_for(app, "alice")
    page = client.get("/chat").text
    csrf = csrf_of(page)
    first = chat(client, csrf, "Hello").json()
    assert first["compare"] is False and first["response"].startswith("Hello <i>")  # JSON; the page uses textContent
    second = chat(client, csrf, EVIL).json()
    assert second["compare"] is True and {second["left"], second["right"]} == {
        f"{EVIL} <i>answer 0</i> seed 2", f"{EVIL} <i>answer 1</i> seed 2"}
    assert chat(client, csrf, "").status_code == 400 and chat(client, csrf, "x" * 3000).status_code in (400, 413)
    # The comparison is not in anyone's labelling queue, and is answered like a queued pair.
    assert "Nothing left to label" in client_for(app, "bob").get("/").text
    assert post_answer(client, csrf, second["pair_id"], "right").status_code == 200
    [answer] = app.state.store.answers()
    pair = app.state.store.pair(second["pair_id"])
    assert pair.source == "chat" and pair.prompt == EVIL
    assert pair.metadata["policy"] == "runs/x" and pair.metadata["annotator"] == "alice"
    assert pair.metadata["sampling"] == {"compare_every": 2, "temperature": 0.7, "max_new_tokens": 8}
    chosen = app.state.store.preferences()[0]["chosen"]
    assert chosen == second["right"] and answer.annotator == "alice"


def test_chat_with_a_tiny_policy(tmp_path):
    """The real loading path (runs.PolicySampler, as `rlhf-jax sample`) on a random-init micro model."""
    from test_reward import fake_sft_run

    from rlhf_jax.stages import runs

    fake_sft_run(tmp_path / "sft", tmp_path / "data")
    sampler = runs.PolicySampler(str(tmp_path / "sft"))
    app = serve.make_app(str(tmp_path / "labels"), sampler=sampler, policy=str(tmp_path / "sft"),
                         chat=serve.ChatSettings(compare_every=1, max_new_tokens=6))
    client = client_for(app, "alice")
    csrf = csrf_of(client.get("/chat").text)
    reply = chat(client, csrf, "The film").json()
    assert reply["compare"] and isinstance(reply["left"], str)
    # The window less the answer's tokens is all the prompt the policy reads: a longer one is refused.
    limit = sampler.model_config.max_len - 6
    refused = chat(client, csrf, "x" * (limit + 1))
    assert refused.status_code == 400 and f"at most {limit}" in refused.json()["error"]
    assert chat(client, csrf, "x" * limit).status_code == 200
    assert app.state.store.pair(reply["pair_id"]).metadata["policy"] == str(tmp_path / "sft")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.apps.serve", f"--data={data_dir}", f"--port={port}"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
    raise AssertionError("server did not start")


def test_kill_9_loses_and_duplicates_no_confirmed_label(tmp_path):
    import httpx

    write_pairs(tmp_path, 4)
    port = free_port()
    proc = start_server(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, follow_redirects=True) as client:
            client.get("/login?name=alice")
            page = client.get("/").text
            assert post_answer(client, csrf_of(page), pair_on(page), "left", "request-first").status_code == 200
            page = client.get("/").text  # the second pair is on the screen when the server dies
            second = pair_on(page)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc = start_server(tmp_path, port)
            # The page still open in the browser answers (the cookie and CSRF token survive a restart);
            # the confirmed first answer, retried, is not written twice.
            assert post_answer(client, csrf_of(page), second, "right", "request-second").status_code == 200
            assert post_answer(client, csrf_of(page), "p0", "left", "request-first").status_code == 200
            assert pair_on(client.get("/").text) == "p2"  # the queue goes on where it stopped
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    answers = LS.LabelStore(str(tmp_path / LS.STORE_FILE)).answers()
    assert [(a.pair_id, a.position) for a in answers] == [("p0", "left"), ("p1", "right")]


def test_cli_serve_refuses_a_public_address_without_tokens_and_labels_reports(tmp_path, capsys):
    from rlhf_jax.apps import cli

    write_pairs(tmp_path, 2)
    assert cli.main(["serve", f"--data={tmp_path}", "--host=0.0.0.0"]) == 2
    assert "--host=0.0.0.0 is reachable from other machines" in capsys.readouterr().err
    store = LS.open_data_dir(str(tmp_path), answers_per_pair=2)
    for name, position in (("alice", "left"), ("bob", "right")):
        store.answer("p0", name, position, "ab")
    store.answer("p1", "alice", "left", "ab")
    assert cli.main(["labels", f"--data={tmp_path}", "--answers_per_pair=2",
                     f"--export_jsonl={tmp_path / 'all.jsonl'}", f"--export_tfds={tmp_path / 'tfds'}"]) == 0
    out = capsys.readouterr().out
    assert "| alice | 2 | 0 | 0 | 0 | 2 |" in out and "alice|bob: 0/1 agree" in out
    assert "pairwise agreement 0.000" in out and "3 answers written" in out
    assert "'train': 1" in out  # p0 is split 1-1 (dropped); p1 is alice's


SECURITY = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy", "cache-control")


def test_deep_json_and_huge_numbers_are_400_and_every_response_has_the_security_headers(tmp_path):
    write_pairs(tmp_path, 2)
    app = serve.make_app(str(tmp_path))
    client = client_for(app, "alice")
    page = client.get("/").text
    headers = {"X-CSRF-Token": csrf_of(page), "Content-Type": "application/json"}
    deep = b"[" * 5000 + b"]" * 5000  # 10 KB: under the size cap, over Python's recursion limit
    huge = b'{"pair_id": "p0", "position": "left", "request_id": ' + b"9" * 5000 + b"}"
    for body in (deep, huge):
        response = client.post("/api/answer", content=body, headers=headers)
        assert response.status_code == 400 and "error" in response.json()
        assert all(h in response.headers for h in SECURITY)
    # Starlette's own answers: no route, wrong method, and an exception inside a handler.
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/api/answer").status_code == 405
    for response in (client.get("/no/such/page"), client.get("/api/answer"), client.get("/login?name=bell%07")):
        assert all(h in response.headers for h in SECURITY), response.headers

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    app.state.store.progress = broken
    failing = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    failing.cookies.set(serve.SESSION_COOKIE, "alice")
    response = failing.get("/")
    assert response.status_code == 500 and all(h in response.headers for h in SECURITY)
    assert app.state.store.answers() == []


def test_host_and_origin_are_checked(tmp_path):
    write_pairs(tmp_path, 2)
    app = serve.make_app(str(tmp_path))
    # DNS rebinding: attacker.example resolves to 127.0.0.1, but the Host header still says attacker.example.
    rebound = TestClient(app, base_url="http://attacker.example:8000")
    for response in (rebound.get("/login?name=alice", follow_redirects=False), rebound.get("/"),
                     rebound.post("/api/answer", json={})):
        assert response.status_code == 421 and all(h in response.headers for h in SECURITY)
    for base in ("http://localhost:8000", "http://[::1]:8000", "http://127.0.0.1:8000"):
        assert TestClient(app, base_url=base).get("/login").status_code == 200
    client = client_for(app, "alice")
    page = client.get("/").text
    csrf, pair_id = csrf_of(page), pair_on(page)
    body = {"pair_id": pair_id, "position": "left", "request_id": "request-0001"}
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:9999"):
        response = client.post("/api/answer", json=body, headers={"X-CSRF-Token": csrf, "Origin": origin})
        assert response.status_code == 403 and "Origin" in response.json()["error"]
    assert app.state.store.answers() == []
    assert client.post("/api/answer", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://127.0.0.1"}
                       ).status_code == 200
    # Behind a proxy: the public name is the server's name too, and only it.
    proxied = serve.make_app(str(tmp_path / "other"), sampler=fake_sampler, public_names=("labels.example.org",))
    assert TestClient(proxied, base_url="https://labels.example.org").get("/login").status_code == 200
    assert TestClient(proxied, base_url="https://other.example.org").get("/login").status_code == 421
    with pytest.raises(ConfigError, match="public_name=https://x"):
        serve.make_app(str(tmp_path), public_names=("https://x",))


def test_pair_ids_are_checked_at_import_with_the_apis_rule(tmp_path):
    for bad_id, why in (("x" * 201, "1 to 200 characters"), ("  ", "not all blank"), ("a\nb", "control")):
        folder = tmp_path / str(len(bad_id))
        folder.mkdir()
        with open(folder / LS.PAIRS_FILE, "w") as f:
            f.write(json.dumps({"id": "ok", "prompt": "p", "response_a": "a", "response_b": "b"}) + "\n\n")
            f.write(json.dumps({"id": bad_id, "prompt": "p", "response_a": "a", "response_b": "b"}) + "\n")
        with pytest.raises(LS.DataError, match=rf"pairs.jsonl line 3: pair id .*{why}"):
            serve.make_app(str(folder))
        assert LS.pair_id_error(bad_id) is not None
    # The API refuses exactly what the import refuses, with the same words.
    write_pairs(tmp_path, 1)
    app = serve.make_app(str(tmp_path))
    client = client_for(app, "alice")
    response = post_answer(client, csrf_of(client.get("/").text), "x" * 201, "left")
    assert response.status_code == 400 and LS.pair_id_error("x" * 201) in response.json()["error"]


def test_new_tokens_keeps_existing_ones(tmp_path, capsys):
    path = str(tmp_path / "tokens.json")
    first = serve.write_new_tokens(path, ["alice", "bob"])
    assert set(first) == {"alice", "bob"}
    again = serve.write_new_tokens(path, ["alice", "bob", "Zoë"])  # a restart, one person more
    assert set(again) == {"Zoë"}
    tokens = serve.read_tokens(path)
    assert tokens[first["alice"]] == "alice" and tokens[first["bob"]] == "bob" and tokens[again["Zoë"]] == "Zoë"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="control"):
        serve.write_new_tokens(path, ["eve\x1b[31m"])
    assert serve.read_tokens(path) == tokens


def test_undo_gives_the_last_pair_back_and_the_new_answer_supersedes(tmp_path):
    write_pairs(tmp_path, 3)
    app = serve.make_app(str(tmp_path), seed=0)
    client = client_for(app, "alice")
    page = client.get("/").text
    csrf = csrf_of(page)
    assert "id=saved" not in page and client.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf}
                                                  ).status_code == 409  # nothing to undo yet
    assert post_answer(client, csrf, "p0", "left", "request-first").status_code == 200
    page = client.get("/").text
    assert pair_on(page) == "p1" and "Saved: Left is better" in page  # the store's own confirmation
    assert client.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf}).json() == {"reopened": "p0"}
    page = client.get("/").text
    assert pair_on(page) == "p0" and "replaces" in page
    assert post_answer(client, csrf, "p0", "right", "request-again").status_code == 200
    store = app.state.store
    [live] = store.answers()
    assert live.position == "right" and live.supersedes is not None
    assert [a.position for a in store.answers(superseded=True)] == ["left", "right"]  # nothing deleted
    assert store.answers(superseded=True)[0].seq == live.supersedes
    assert post_answer(client, csrf, "p0", "tie", "request-third").status_code == 409  # no undo, no second answer
    assert pair_on(client.get("/").text) == "p1"


def test_skips_names_instructions_and_private_files(tmp_path):
    write_pairs(tmp_path, 3)
    app = serve.make_app(str(tmp_path))
    client = client_for(app, "J%C3%BCrgen%20M%C3%BCller")  # "Jürgen Müller": any script
    page = client.get("/").text
    assert "Jürgen Müller" in page and "How to label" in page and "s to skip" in page
    assert post_answer(client, csrf_of(page), pair_on(page), "skip").status_code == 200
    assert "0 of 2 labelled, 1 skipped" in client.get("/").text  # a skip is not a label
    # The decomposed spelling (u + combining diaeresis) is the same person.
    assert "J\u00fcrgen" in app.state.store.answers()[0].annotator
    assert "Jürgen Müller" in client_for(app, "Ju%CC%88rgen%20Mu%CC%88ller").get("/").text
    import sqlite3

    held = sqlite3.connect(str(tmp_path / LS.STORE_FILE))  # the WAL files exist while a connection is open
    held.execute("SELECT COUNT(*) FROM answers").fetchone()
    for name in (LS.STORE_FILE, LS.STORE_FILE + "-wal", LS.STORE_FILE + "-shm", serve.SECRET_FILE):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == "0o600", name
    held.close()
    app.state.store.export_jsonl(str(tmp_path / "answers.jsonl"))
    assert oct(os.stat(tmp_path / "answers.jsonl").st_mode & 0o777) == "0o600"
    with open(tmp_path / serve.INSTRUCTIONS_FILE, "w") as f:
        f.write("Prefer the <b>kinder</b> review.")
    page = client_for(serve.make_app(str(tmp_path)), "bob").get("/login").text
    assert "Prefer the &lt;b&gt;kinder&lt;/b&gt; review." in page


class LimitedPolicy:
    """A sampler with what PolicySampler exposes: a byte tokenizer and a 16-token window."""

    def __init__(self):
        from types import SimpleNamespace

        from rlhf_jax.models.tokenizer import ByteTokenizer

        self.tokenizer, self.model_config = ByteTokenizer(), SimpleNamespace(max_len=16)

    def __call__(self, prompt, num, temperature, max_new_tokens, seed=0):
        assert len(self.tokenizer.encode(prompt)) + max_new_tokens <= 16
        return fake_sampler(prompt, num, temperature, max_new_tokens, seed)


def test_chat_refuses_a_prompt_longer_than_the_policy_reads_and_offers_pending_comparisons_again(tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens=16"):
        serve.make_app(str(tmp_path), sampler=LimitedPolicy(), chat=serve.ChatSettings(max_new_tokens=16))
    app = serve.make_app(str(tmp_path), sampler=LimitedPolicy(),
                         chat=serve.ChatSettings(compare_every=1, max_new_tokens=6))
    client = client_for(app, "alice")
    page = client.get("/chat").text
    assert "up to 10 tokens" in page
    csrf = csrf_of(page)
    refused = chat(client, csrf, "ü" * 6)  # 12 bytes: the policy would have seen 10 of them
    assert refused.status_code == 400 and "12 tokens" in refused.json()["error"] and "at most 10" in refused.json()[
        "error"]
    assert app.state.store.pairs() == []
    reply = chat(client, csrf, "0123456789").json()
    assert app.state.store.pair(reply["pair_id"]).prompt == "0123456789"  # what the policy saw, whole
    # A reload (or a server restart) offers the unanswered comparison again, in the same order.
    again = serve.make_app(str(tmp_path), sampler=LimitedPolicy(),
                           chat=serve.ChatSettings(compare_every=1, max_new_tokens=6))
    client = client_for(again, "alice")
    page = client.get("/chat").text
    assert f"data-pair-id='{reply['pair_id']}'" in page
    # (the newline after <pre> is the one the HTML parser drops, so a response's own first newline shows)
    assert re.search(r"<pre class=left>\n(.*?)</pre>", page, re.S).group(1) == serve._text(reply["left"])
    assert post_answer(client, csrf_of(page), reply["pair_id"], "left").status_code == 200
    assert "data-pair-id" not in client.get("/chat").text
    assert "data-pair-id" not in client_for(again, "bob").get("/chat").text
