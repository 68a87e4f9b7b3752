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
def model_folder(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("app") / "model")


@pytest.fixture(scope="module")
def app(model_folder):
    return SegmentationApp(*load_model(str(model_folder)))


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


def write_upload(path, kind):
    """Files Gradio's own conversion reads otherwise than the project: a 16-bit PNG (saturated by convert("RGB")), a
    float TIFF in [0, 255] (clipped by PIL), an int32 TIFF out of 0-255 (refused by `predict`), a file that is no image."""
    rng = np.random.default_rng(0)
    scene = np.asarray(Image.open(example_image()).convert("L"), dtype=np.float64)
    if kind == "png16":
        Image.fromarray((scene * 257).astype(np.uint16)).save(path)
    elif kind == "float_tiff":
        Image.fromarray((scene + rng.uniform(0, 0.4, scene.shape)).astype(np.float32), mode="F").save(path)
    elif kind == "int32_tiff":
        Image.fromarray((scene * 300).astype(np.int32), mode="I").save(path)
    else:
        path.write_bytes(b"not an image at all")
    return path


def predict_files(model_folder, image, output):
    from eovseg.predict import main as predict_main

    names, is_thing = parse_class_list(CLASS_TEXT)
    stuff = [n for n, thing in zip(names, is_thing) if not thing]
    return predict_main([str(image), "--output_dir", str(output), "--model", str(model_folder), "--classes", *names,
                         "--stuff", *stuff])


@pytest.mark.parametrize("kind, suffix", [("png16", ".png"), ("float_tiff", ".tif")])
def test_an_upload_gives_the_segments_predict_writes_for_the_file(kind, suffix, app, model_folder, tmp_path):
    image = write_upload(tmp_path / f"upload{suffix}", kind)
    _, _, json_path, png_path = app.segment(str(image), CLASS_TEXT)
    assert predict_files(model_folder, image, tmp_path / "out") == 0
    coco = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert json.loads(open(json_path).read())["segments_info"] == coco["annotations"][0]["segments_info"]
    assert np.array_equal(np.asarray(Image.open(png_path)),
                          np.asarray(Image.open(tmp_path / "out" / "panoptic" / coco["annotations"][0]["file_name"])))


def test_the_page_hands_the_uploaded_file_itself_to_the_decoder(app, tmp_path):
    # Before the fix the page's gr.Image(type="pil") converted the upload with PIL: a 16-bit PNG came saturated, an
    # int32 TIFF that predict refuses was accepted.
    pytest.importorskip("gradio")
    from gradio.data_classes import FileData

    from eovseg.app import build_demo

    demo = build_demo(app)
    upload = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "input-image")
    for kind, suffix in (("png16", ".png"), ("int32_tiff", ".tif")):
        path = write_upload(tmp_path / f"{kind}{suffix}", kind)
        assert upload.preprocess(FileData(path=str(path), orig_name=path.name)) == str(path)


@pytest.mark.parametrize("kind, suffix, message", [
    ("int32_tiff", ".tif", "has dtype int32 with values in [19800, 61200]; integer images other than uint16"),
    ("garbage", ".png", "as an image (UnidentifiedImageError: cannot identify image file"),
])
def test_the_page_shows_the_projects_message_for_a_file_predict_refuses(kind, suffix, message, app, model_folder,
                                                                         tmp_path, capsys):
    gr = pytest.importorskip("gradio")
    from eovseg.app import page_errors

    image = write_upload(tmp_path / f"upload{suffix}", kind)
    with pytest.raises(gr.Error) as error:
        page_errors(app.segment)(str(image), CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)
    shown = error.value.message
    assert message in shown and f"the uploaded file 'upload{suffix}'" in shown and "\n" not in shown
    assert predict_files(model_folder, image, tmp_path / "out") == 1
    assert message in capsys.readouterr().err  # predict refuses the same file for the same reason
    with pytest.raises(gr.Error, match="Upload an image"):
        page_errors(app.segment)(None, CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)


def test_bad_port_is_refused_when_the_arguments_are_parsed(capsys):
    from eovseg.app import main as app_main

    for port, message in (("99999", "must be a port number 1-65535, got '99999'"),
                          ("0", "must be a port number 1-65535, got '0'"), ("http", "expected an integer, got 'http'")):
        assert app_main(["--port", port]) == 2
        assert f"argument --port: {message}" in capsys.readouterr().err


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
            page.locator("#input-preview img").wait_for(timeout=30000)
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
