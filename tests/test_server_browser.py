"""The page in a real headless Chromium: draw a stroke, extract, generate, and see the result and its history entry."""
import contextlib
import os
import socket
import threading
import time

import pytest
import torch

from t2iadapter.demo.world import VOCABULARY

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it)"),
]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    """uvicorn in a thread on a free loopback port, serving the tiny base with a tiny random sketch adapter."""
    import uvicorn

    from t2iadapter.bases import load_base, tiny_adapter_config
    from t2iadapter.models import build_adapter
    from t2iadapter.pipeline import AdapterPipeline
    from t2iadapter.server import Limits, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread, most of all on a busy CPU
    base = load_base("tiny")
    torch.manual_seed(0)
    pipe = AdapterPipeline(base, {"sketch": build_adapter(tiny_adapter_config(base, 1))})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, limits=Limits(max_steps=4)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    torch.set_num_threads(threads)


BROKEN = """() => [...document.images].filter((i) => getComputedStyle(i).visibility !== 'hidden'
    && i.offsetParent !== null && (!i.getAttribute('src') || (i.complete && i.naturalWidth === 0))).map((i) => i.id || i.alt)"""


def broken_images(page) -> list[str]:
    """Visible <img> elements with no picture (no src, or one that failed): the browser's broken-image icons."""
    return page.evaluate(BROKEN)


@contextlib.contextmanager
def chromium_page():
    """A headless Chromium page and the list its uncaught script errors go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def test_draw_extract_generate_in_chromium(server_url):
    from playwright.sync_api import expect

    with chromium_page() as (page, errors):
        page.goto(server_url + "/")
        expect(page.locator("#adapter-sketch")).not_to_be_checked(timeout=15_000)  # none pre-checked (issue 14)
        assert page.locator("#adapters input.use:checked").count() == 0
        assert broken_images(page) == []  # no broken-image placeholders before anything is generated
        prompt = page.locator("#prompt").input_value()
        assert prompt and set(prompt.split()) <= set(VOCABULARY), prompt  # the demo's own words
        expect(page.locator("#compose")).to_have_value("sum")
        assert page.locator("#compose option[value=fuser]").is_disabled()  # this server has no fuser
        page.check("#adapter-sketch")
        expect(page.locator("#steps")).to_have_value("4")  # clamped to the server's max_steps
        page.fill("#steps", "2")
        page.fill("#seed", "3")

        box = page.locator("#canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.7, steps=12)
        page.mouse.up()
        lit = page.evaluate("""() => {
            const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++; return n; }""")
        assert lit > 500, f"the stroke lit only {lit} pixels"

        page.select_option("#extractor", "canny")
        page.click("#extract")
        expect(page.locator("#extract-status")).to_contain_text("canny: 512x512", timeout=15_000)

        page.click("#generate")
        result = page.locator("#result")
        expect(result).to_have_attribute("src", __import__("re").compile(r"^data:image/png;base64,"), timeout=30_000)
        expect(page.locator("#status")).to_contain_text("seed 3")
        assert page.evaluate("document.getElementById('result').naturalWidth") == 64
        entry = page.locator("#history li")
        expect(entry).to_have_count(1)
        assert entry.locator("a").get_attribute("download") == "t2iadapter-3-0.png"
        assert page.locator("#sent-condition").get_attribute("src").startswith("data:image/png;base64,")
        assert broken_images(page) == []
        assert not errors, errors


def test_the_page_offers_registered_controlnets(tmp_path):
    """A ControlNet registered with the server (`serve --controlnet`) is a row on the page beside the adapters; checked,
    it goes in `controlnets` with its weight and window (the page listed the adapters only: no way to use one)."""
    import json

    import uvicorn
    from playwright.sync_api import expect

    from t2iadapter.bases import load_base, tiny_adapter_config
    from t2iadapter.generation.controlnet import controlnet_from_unet
    from t2iadapter.models import build_adapter
    from t2iadapter.pipeline import AdapterPipeline
    from t2iadapter.server import Limits, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = load_base("tiny")
    pipe = AdapterPipeline(base, {"sketch": build_adapter(tiny_adapter_config(base, 1))},
                           controlnets={"pose": controlnet_from_unet(base.unet, base.vae_scale_factor)})
    sent: list[dict] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, limits=Limits(max_steps=4)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        with chromium_page() as (page, errors):
            page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#controlnet-pose")).not_to_be_checked(timeout=15_000)
            expect(page.locator("#adapter-sketch")).not_to_be_checked()
            page.check("#controlnet-pose")
            row = page.locator(".adapter", has=page.locator("#controlnet-pose"))
            row.locator(".weight").fill("0.5")
            row.locator(".start").fill("0.5")
            page.fill("#steps", "2")
            page.fill("#seed", "3")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("seed 3", timeout=30_000)
            assert sent[-1]["controlnets"] == {"pose": {"weight": 0.5, "window": "0.5:1"}}
            assert set(sent[-1]["conditions"]) == {"pose"} and sent[-1]["adapters"] == {}
            expect(page.locator("#history li")).to_contain_text("pose")
            assert not errors, errors
    finally:
        server.should_exit = True
        thread.join(10)
        torch.set_num_threads(threads)
