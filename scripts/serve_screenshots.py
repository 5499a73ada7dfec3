"""Screenshots of the labelling web app's two modes (experiments/results/serve_{queue,chat}.png).

    python scripts/serve_screenshots.py --policy=runs/default/ppo --pairs=<dir with pairs.jsonl> \
        --out=experiments/results

Starts `rlhf-jax serve` on a copy of the pairs (the original folder is not written), opens it in
headless Chromium (Debian's chromium + chromium-driver, and selenium from the test extra), labels
nothing, and saves one screenshot of the queue and one of a chat turn that asks for a comparison.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--pairs", required=True, help="a folder with pairs.jsonl")
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
    parser.add_argument("--prompt", default="Review the film:")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = tempfile.mkdtemp()
    shutil.copy(os.path.join(args.pairs, "pairs.jsonl"), data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "rlhf_jax.apps.serve", f"--data={data}", f"--port={port}",
                               f"--policy={args.policy}", "--compare_every=1", "--max_new_tokens=96",
                               "--temperature=0.7"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,760"):
        options.add_argument(flag)
    driver = None
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with status {server.returncode}")
                time.sleep(0.2)
        driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
        driver.get(f"http://127.0.0.1:{port}/login?name=alice")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "pair"))
        os.makedirs(args.out, exist_ok=True)
        driver.save_screenshot(os.path.join(args.out, "serve_queue.png"))
        driver.get(f"http://127.0.0.1:{port}/chat")
        driver.find_element(By.ID, "chat-prompt").send_keys(args.prompt)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.ID, "chat-left"))
        driver.save_screenshot(os.path.join(args.out, "serve_chat.png"))
        print(f"wrote {args.out}/serve_queue.png and serve_chat.png")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
