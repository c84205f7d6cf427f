"""Drives the web console in headless Chromium (Selenium and Debian's chromedriver) against a
running stack: URL ADMIN_KEY MODEL OTHER_KEY SCREENSHOT_DIR. Prints `console ok` at the end.

The stack has one slot (a second streamed request waits in the queue), an on-demand pool
`extra`, API keys ADMIN_KEY (marked admin) and OTHER_KEY (a plain client), and a bogus node
whose pool reports markup as its last error (it must show as text, and run nothing).
"""

import json
import os
import sys
import threading
import urllib.request

import openai
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

URL, KEY, MODEL, OTHER, SHOTS = sys.argv[1:6]
HOSTILE = "<img src=x onerror=\"document.title='pwned'\">"


def api(path, key=KEY):
    req = urllib.request.Request(URL + path, headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def pool_state(pool="default"):
    return next(p["state"] for p in api("/v2/pools")["pools"] if p["pool_id"] == pool)


def browser(width, height):
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("LLORCH_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    service = Service(os.environ.get("LLORCH_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


d = browser(1400, 1100)


def until(what, cond, limit=60):
    def probe(_):
        try:
            return cond()
        except Exception:  # an element redrawn between two reads: try again
            return False
    WebDriverWait(d, limit, poll_frequency=0.1).until(probe, message=what)


def text(css):
    return d.find_element(By.CSS_SELECTOR, css).text


def row(table, **data):
    sel = "".join(f'[data-{k}="{v}"]' for k, v in data.items())
    return d.find_element(By.CSS_SELECTOR, f"#{table} tbody tr{sel}")


def cell(table, css, **data):
    return row(table, **data).find_element(By.CSS_SELECTOR, css).text


def use_key(key):
    box = d.find_element(By.ID, "key")
    box.clear()
    box.send_keys(key)
    d.find_element(By.CSS_SELECTOR, "#credential button[type=submit]").click()


def click(table, action, **data):
    row(table, **data).find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()


try:
    # A browser asking for / lands on the console; without a credential the API's refusal shows.
    d.get(URL + "/")
    assert d.current_url == URL + "/ui/", d.current_url
    until("the 401 of a missing key", lambda: "no API key" in text("#message"))

    # A plain client key: the pools and the queue, not the nodes; actions refused as the API does.
    use_key(OTHER)
    until("the default pool ready with its one slot free",
          lambda: cell("pools", ".state", pool="default") == "ready"
          and cell("pools", ".slots", pool="default") == "0/1")
    assert d.find_element(By.ID, "nodes-note").is_displayed()
    assert "viewing as other" in text("#who"), text("#who")
    # The bogus node's markup is text: no element made of it, no script run.
    until("the hostile last error", lambda: HOSTILE in cell("pools", ".error-text", pool="evil"))
    assert not d.find_elements(By.CSS_SELECTOR, "main img")
    assert d.title == "llama-orch: overview", d.title
    click("pools", "drain", pool="default")
    until("the refused drain", lambda: "403" in text("#message") and "admin" in text("#message"))
    assert pool_state() == "ready"
    print("refused without the admin credential:", text("#message"))

    # The admin key: nodes too, and the actions work.
    use_key(KEY)
    until("the node", lambda: cell("nodes", ".state", node="node-a") == "online")
    # The credential never becomes a cookie another site's request would carry.
    assert d.get_cookies() == [], d.get_cookies()
    assert not d.find_element(By.ID, "nodes-note").is_displayed()

    # Two streamed requests on one slot: one runs, one waits in the queue.
    client = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0)
    outcomes = {}

    def stream(name, tokens):
        try:
            s = client.chat.completions.create(
                model=MODEL, stream=True, max_tokens=tokens, temperature=0,
                messages=[{"role": "user", "content": "Count from 1 to 1000, one per line."}],
                extra_body={"ignore_eos": True})
            outcomes[name] = [c.choices[0].finish_reason for c in s if c.choices][-1]
        except Exception as e:  # the cancelled one
            outcomes[name] = repr(e)

    first = threading.Thread(target=stream, args=("first", 240))
    first.start()
    until("the first request running", lambda: d.find_elements(
        By.CSS_SELECTOR, '#tasks tbody tr[data-state="running"]'))
    second = threading.Thread(target=stream, args=("second", 8))
    second.start()
    until("the second request waiting in the queue", lambda: d.find_elements(
        By.CSS_SELECTOR, "#waiting tbody tr[data-task]:not([data-task=''])")
        and d.find_elements(By.CSS_SELECTOR, '#tasks tbody tr[data-state="queued"]'))
    print("queue:", text("#queue-summary"))
    placement = d.find_element(By.CSS_SELECTOR, '#tasks tbody tr[data-state="running"]').text
    assert "default" in placement, placement
    d.save_screenshot(os.path.join(SHOTS, "overview.png"))
    # The operator cancels the waiting one from the page.
    queued = d.find_element(By.CSS_SELECTOR, '#tasks tbody tr[data-state="queued"]')
    queued_id = queued.get_attribute("data-task")
    queued.find_element(By.CSS_SELECTOR, 'button[data-action="cancel"]').click()
    until("the cancelled task", lambda: row("tasks", task=queued_id).get_attribute("data-state") == "canceled")
    second.join(30)
    first.join(120)
    assert outcomes.get("first") == "length", outcomes
    assert "cancelled" in outcomes.get("second", ""), outcomes
    until("the first request done", lambda: not d.find_elements(
        By.CSS_SELECTOR, '#tasks tbody tr[data-state="running"]'))

    # Drain and resume from the page show in /v2/pools.
    click("pools", "drain", pool="default")
    until("the drain answer", lambda: "now draining" in text("#message"))
    assert pool_state() == "draining", pool_state()
    until("draining on the page", lambda: cell("pools", ".state", pool="default") == "draining")
    click("pools", "resume", pool="default")
    until("the resume answer", lambda: "now ready" in text("#message"))
    assert pool_state() == "ready"
    # An on-demand model, loaded and unloaded from the page.
    assert cell("pools", ".state", pool="extra") == "standby"
    click("pools", "load", pool="extra")
    until("the load answer", lambda: "load pool extra: now" in text("#message"), 150)
    until("extra loaded", lambda: cell("pools", ".state", pool="extra") == "ready", 120)
    assert pool_state("extra") == "ready"
    click("pools", "unload", pool="extra")
    until("the unload answer", lambda: "unload pool extra: now standby" in text("#message"), 60)
    assert pool_state("extra") == "standby"
    until("extra unloaded", lambda: cell("pools", ".state", pool="extra") == "standby")
    click("nodes", "drain-node", node="node-a")
    until("the node drained", lambda: "drained" in text("#message"))
    assert next(n for n in api("/v2/nodes") if n["node_id"] == "node-a")["draining"]
    until("drained on the page", lambda: "drained" in cell("nodes", ".state", node="node-a"))
    click("nodes", "resume-node", node="node-a")
    until("the node resumed", lambda: "resumed" in text("#message"))
    assert not next(n for n in api("/v2/nodes") if n["node_id"] == "node-a")["draining"]

    # The playground: a streamed answer, its time to first token and speed.
    d.find_element(By.LINK_TEXT, "Playground").click()
    until("the models", lambda: MODEL in [o.text for o in Select(d.find_element(By.ID, "model")).options])
    Select(d.find_element(By.ID, "model")).select_by_value(MODEL)
    for field, value in (("temperature", "0"), ("max-tokens", "32")):
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    d.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
    d.find_element(By.ID, "send").click()
    until("the answer", lambda: d.find_element(By.ID, "stats").get_attribute("data-done") == "true")
    answer = text('#chat li[data-role="assistant"] .text')
    assert answer.strip(), "empty answer"
    stats = text("#stats")
    assert "time to first token" in stats and "tokens/s" in stats, stats
    print("playground:", repr(answer[:60]), stats)
    d.save_screenshot(os.path.join(SHOTS, "playground.png"))
    d.quit()

    # A phone-sized screen: the page never scrolls sideways (tables scroll in their boxes).
    d = browser(390, 844)
    d.get(URL + "/ui/")
    use_key(KEY)
    until("the pool on a phone", lambda: cell("pools", ".state", pool="default") == "ready")
    width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    d.save_screenshot(os.path.join(SHOTS, "overview-phone.png"))
    print("console ok")
finally:
    d.quit()
