"""The web demo: its work without a browser (text cache, outputs), and the page driven in headless Chromium."""

import json
import os
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

from eovseg.app import SegmentationApp, example_image, format_class_list, parse_class_list, vocabulary_text
from eovseg.predict import load_model
from test_predict import make_tiny_model_folder

CLASS_TEXT = "cup, mug\ntable\nwall (stuff)"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("app") / "model")
    return SegmentationApp(*load_model(str(folder)))


def test_class_list_parsing_round_trips():
    names, is_thing = parse_class_list("  cup, mug \n\ntable\nwall (stuff)\nfloor (STUFF)")
    assert names == ["cup, mug", "table", "wall", "floor"] and is_thing == [True, True, False, False]
    assert parse_class_list(format_class_list(names, is_thing)) == (names, is_thing)


def test_vocabulary_picker_fills_the_class_list():
    from eovseg.vocabularies import get_vocabulary

    coco = get_vocabulary("coco_panoptic")
    assert parse_class_list(vocabulary_text("coco_panoptic")) == (coco.class_names, coco.is_thing)


def test_second_call_with_the_same_classes_runs_no_text_pass(app):
    image = Image.open(example_image())
    before = app.model.num_text_encoder_calls
    first = app.segment(image, CLASS_TEXT)
    assert app.model.num_text_encoder_calls == before + 1
    second = app.segment(image, CLASS_TEXT, threshold=0.0)
    assert app.model.num_text_encoder_calls == before + 1
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    app.segment(image, CLASS_TEXT + "\nchair")
    assert app.model.num_text_encoder_calls == before + 2


def test_outputs_segments_json_png_and_legend(app):
    image = Image.open(example_image()).convert("RGB")
    overlay, legend, json_path, png_path = app.segment(image, CLASS_TEXT)
    data = json.loads(open(json_path).read())
    assert overlay.size == image.size and data["height"] == image.height
    assert [c["name"] for c in data["categories"]] == ["cup, mug", "table", "wall"]
    png = np.asarray(Image.open(png_path), dtype=np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    assert data["segments_info"] and {s["id"] for s in data["segments_info"]} == set(np.unique(ids)) - {0}
    names = {["cup", "table", "wall"][s["category_id"]] for s in data["segments_info"]}
    assert all(f"> {name} &times;" in legend for name in names)
    for subtask in ("semantic", "instance"):
        overlay, legend, json_path, _ = app.segment(image, CLASS_TEXT, subtask=subtask)
        assert json.loads(open(json_path).read())["subtask"] == subtask


def test_bad_input_is_one_clear_error(app):
    with pytest.raises(ValueError, match="Upload an image"):
        app.segment(None, CLASS_TEXT)
    with pytest.raises(ValueError, match="duplicate class name"):
        app.segment(Image.open(example_image()), "cup\ncup")


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_headless_chromium(app, tmp_path):
    from playwright.sync_api import sync_playwright

    from eovseg.app import build_demo, launch

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium package: apt-get install chromium"
    port = _free_port()
    demo = build_demo(app)
    launch(demo, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#input-image input[type=file]").set_input_files(example_image())
            page.locator("#input-image img").wait_for(timeout=30000)
            page.locator("#classes textarea").fill(CLASS_TEXT)
            page.locator("#run").click()
            result = page.locator("#result img")
            result.wait_for(timeout=60000)
            page.locator("#legend .eovseg-legend-item").first.wait_for(timeout=30000)
            page.wait_for_function("() => document.querySelector('#result img').naturalWidth > 0", timeout=30000)
            legend = page.locator("#legend").inner_text()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            size = page.evaluate("() => [document.querySelector('#result img').naturalWidth,"
                                 " document.querySelector('#result img').naturalHeight]")
            downloads = page.locator("#segments-json a, #panoptic-png a").count()
            browser.close()
    finally:
        demo.close()
    assert tuple(size) == Image.open(example_image()).size
    assert any(name in legend for name in ("cup", "table", "wall")), legend
    assert downloads == 2
    local = f"http://127.0.0.1:{port}/"
    assert [url for url in requested if not url.startswith((local, "data:", "blob:"))] == []  # nothing off this machine
    if os.environ.get("EOVSEG_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "app.png", os.environ["EOVSEG_SCREENSHOT_DIR"])
