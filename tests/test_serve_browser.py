"""The labelling web app in a real browser: headless Chromium driven by Selenium against
`rlhf-jax serve` (uvicorn) on 127.0.0.1 with a tiny policy. Labels pairs by clicking and by
keyboard, chats one turn that asks for a comparison, and checks the label store.

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them) and the `test`
extra (selenium); without them the test is skipped, saying what is missing. Screenshots of both
modes go to $RLHF_SCREENSHOTS when set (experiments/results/serve_*.png were made so).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax.people import label_store as LS, labelers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "<script>alert('owned')</script> & <b>bold?</b>"

webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra (selenium) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium / chromedriver missing (apt-get install chromium chromium-driver; scripts/test.sh does)",
                allow_module_level=True)

from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    from test_reward import fake_sft_run

    fake_sft_run(tmp_path / "sft", tmp_path / "data")
    data = tmp_path / "labels"
    labelers.write_pairs(str(data), [
        {"id": "p0", "prompt": EVIL, "response_a": "A first <i>answer</i>", "response_b": "B first answer"},
        {"id": "p1", "prompt": "The film was", "response_a": "\nA\r\nsecond\r", "response_b": "B second"},
        {"id": "p2", "prompt": "The acting", "response_a": "A third", "response_b": "B third"},
        {"id": "p3", "prompt": "A long one", "response_a": "long answer. " * 2000, "response_b": "short"}])
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.apps.serve", f"--data={data}", f"--port={port}",
                             f"--policy={tmp_path / 'sft'}", "--compare_every=1", "--max_new_tokens=8"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(open(tmp_path / "server.log").read())
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", data
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture()
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def progress(driver):
    # Read in one script call: the page reloads after each answer, so an element found a moment
    # ago may be gone (stale) by the time its text is asked for.
    return driver.execute_script("const p = document.getElementById('progress'); return p ? p.textContent : '';")


def wait_for(driver, condition, timeout=60):
    """Poll `condition` until true; an element the page replaced between finding and reading it
    (stale) just means "not yet", so the poll goes on."""
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d))


def no_alert(driver):
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def screenshot(driver, name):
    folder = os.environ.get("RLHF_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, name))


def test_label_by_click_and_keyboard_then_chat_and_compare(server, browser):
    base, data = server
    browser.get(base + "/")  # not logged in: asked for a name
    browser.find_element(By.ID, "name").send_keys("alice")
    browser.find_element(By.ID, "go").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "pair"))
    assert progress(browser) == "0 of 4 labelled"
    assert "How to label" in browser.find_element(By.ID, "instructions").text
    # The prompt with <script> shows as typed, and runs nothing.
    assert browser.find_element(By.ID, "prompt").text == EVIL and no_alert(browser)
    assert "A first <i>answer</i>" in (browser.find_element(By.ID, "left").text,
                                       browser.find_element(By.ID, "right").text)
    screenshot(browser, "serve_queue.png")
    shown_left = [browser.execute_script("return document.getElementById('left').textContent;")]

    browser.find_element(By.ID, "btn-left").click()  # by clicking
    wait_for(browser, lambda d: progress(d) == "1 of 4 labelled")
    assert "Saved: Left is better" in browser.find_element(By.ID, "saved").text  # visibly confirmed
    shown_left.append(browser.execute_script("return document.getElementById('left').textContent;"))
    shown_right = browser.execute_script("return document.getElementById('right').textContent;")
    assert {shown_left[1], shown_right} == {"\nA\r\nsecond\r", "B second"}  # exactly: a leading newline, CRs too
    store = LS.LabelStore(str(data / LS.STORE_FILE))
    # Browser shortcuts are not answers: Ctrl+S (save page), Alt+2, Ctrl+Right.
    body = browser.find_element(By.TAG_NAME, "body")
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    ActionChains(browser).key_down(Keys.ALT).send_keys("2").key_up(Keys.ALT).perform()
    ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ARROW_RIGHT).key_up(Keys.CONTROL).perform()
    time.sleep(1.0)
    assert len(store.answers()) == 1 and progress(browser) == "1 of 4 labelled"
    body.send_keys("2")  # by keyboard: right
    wait_for(browser, lambda d: progress(d) == "2 of 4 labelled")
    # Undo (u): the pair comes back, and the new answer supersedes the old one.
    browser.find_element(By.TAG_NAME, "body").send_keys("u")
    wait_for(browser, lambda d: progress(d) == "1 of 4 labelled" or "replaces" in d.find_element(By.ID, "saved").text)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('left').textContent;")
             == shown_left[1])
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    wait_for(browser, lambda d: progress(d) == "2 of 4 labelled" and "Saved" in d.find_element(By.ID, "saved").text)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)  # by keyboard: left
    wait_for(browser, lambda d: progress(d) == "3 of 4 labelled")

    # A phone: the long response does not push the choices off screen, and the answers stack.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    browser.refresh()
    wait_for(browser, lambda d: d.find_elements(By.ID, "btn-skip"))
    geometry = browser.execute_script(
        "const r = (id) => document.getElementById(id).getBoundingClientRect();"
        "return [r('btn-skip').top, r('btn-skip').bottom, window.innerHeight, r('left').top, r('right').top,"
        "        r('left').left, r('right').left];")
    skip_top, skip_bottom, height, left_top, right_top, left_x, right_x = geometry
    assert 0 <= skip_top and skip_bottom <= height, geometry  # the bar is on screen
    assert right_top > left_top and abs(left_x - right_x) < 1, geometry  # one column
    screenshot(browser, "serve_queue_phone.png")
    browser.find_element(By.ID, "btn-skip").click()
    wait_for(browser, lambda d: progress(d) == "3 of 3 labelled, 1 skipped" and d.find_elements(By.ID, "done"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    answers = store.answers()
    assert [(a.pair_id, a.position, a.annotator) for a in answers] == [
        ("p0", "left", "alice"), ("p1", "right", "alice"), ("p2", "left", "alice"), ("p3", "skip", "alice")]
    assert answers[1].supersedes is not None and len(store.answers(superseded=True)) == 5
    # What the person saw on the left is what the store says they preferred (the order was recorded).
    prefs = {p["metadata"]["id"]: p for p in store.preferences()}
    assert prefs["p0"]["chosen"] == shown_left[0]
    assert prefs["p1"]["rejected"] == shown_left[1]

    # Chat: one turn, which (compare_every=1) shows two sampled answers and asks which is better.
    browser.get(base + "/chat")
    # A prompt longer than the policy reads is refused, saying so on the page, and nothing is stored.
    browser.find_element(By.ID, "chat-prompt").send_keys("x" * 1000)
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: "shorten it" in d.find_element(By.ID, "status").text, timeout=120)
    assert not [p for p in store.pairs() if p.source == "chat"]
    browser.find_element(By.ID, "chat-prompt").clear()
    browser.find_element(By.ID, "chat-prompt").send_keys(EVIL)
    ActionChains(browser).double_click(browser.find_element(By.ID, "send")).perform()  # sends once
    wait_for(browser, lambda d: d.find_elements(By.ID, "chat-left"), timeout=120)
    time.sleep(1.0)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn")) == 1
    assert len([p for p in store.pairs() if p.source == "chat"]) == 1
    # A reload before answering offers the comparison again.
    browser.refresh()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.pending pre.left"))
    # textContent: exactly what was put on the page (Selenium's .text normalises whitespace).
    left_text, right_text = browser.execute_script(
        "return ['left', 'right'].map((c) => document.querySelector('.turn.pending pre.' + c).textContent);")
    assert browser.find_element(By.CSS_SELECTOR, ".turn.pending pre.you").text == EVIL and no_alert(browser)
    screenshot(browser, "serve_chat.png")
    browser.find_element(By.CSS_SELECTOR, ".turn.pending button[data-position=right]").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".picked"))

    chat_answers = [a for a in store.answers() if a.pair_id.startswith("chat-")]
    assert len(chat_answers) == 1 and chat_answers[0].annotator == "alice" and chat_answers[0].position == "right"
    pair = store.pair(chat_answers[0].pair_id)
    assert pair.prompt == EVIL and pair.source == "chat" and pair.metadata["sampling"]["max_new_tokens"] == 8
    assert {left_text, right_text} == {pair.response_a, pair.response_b}
    if left_text != right_text:  # (two random samples of 8 tokens: equal only by a fluke)
        [chosen] = [p for p in store.preferences() if p["metadata"]["id"] == pair.id]
        assert chosen["chosen"] == right_text and chosen["rejected"] == left_text
