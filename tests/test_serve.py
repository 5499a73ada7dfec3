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
    assert client.get("/login?name=<script>").status_code == 400
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
    app = serve.make_app(str(tmp_path), host="0.0.0.0", tokens=serve.read_tokens(str(tmp_path / "tokens.json")))
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
    reply = chat(client, csrf_of(client.get("/chat").text), "The film").json()
    assert reply["compare"] and isinstance(reply["left"], str)
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
