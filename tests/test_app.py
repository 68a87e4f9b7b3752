"""The web demo: its work without a browser (text cache, outputs), and the page driven in headless Chromium."""

import html
import io
import json
import os
import re
import shutil
import socket

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from eovseg.app import (DISPLAY_SIDE, SegmentationApp, example_image, format_class_list, page_preview, page_run,
                        parse_class_list, vocabulary_text)
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
    factor = max(1, DISPLAY_SIDE // min(image.size))
    assert overlay.size == (image.width * factor, image.height * factor) and data["height"] == image.height
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
    ("int32_tiff", ".tif", "has dtype int32 with values in [{low}, {high}]; integer images other than uint16"),
    ("garbage", ".png", "as an image (UnidentifiedImageError: cannot identify image file"),
])
def test_the_page_shows_the_projects_message_for_a_file_predict_refuses(kind, suffix, message, app, model_folder,
                                                                         tmp_path, capsys):
    run = page_run(app)
    image = write_upload(tmp_path / f"upload{suffix}", kind)
    if "{low}" in message:  # the range of the file just written, read back independently of the project's reader
        values = np.asarray(Image.open(image))
        message = message.format(low=int(values.min()), high=int(values.max()))
    good = run(example_image(), CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)
    assert good[0] is not None and "eovseg-legend-item" in good[1] and good[2] and good[3]
    assert re.search(r"\d+ segments? found\.", good[4]) and "error" not in good[4]
    # The failed run clears the earlier picture, legend and files, and says why in the project's one line.
    picture, legend, json_path, png_path, shown = run(str(image), CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)
    assert (picture, legend, json_path, png_path) == (None, "", None, None)
    shown = html.unescape(shown)
    assert shown.startswith('<div class="eovseg-error">eovseg app: error: ') and shown.count("error:") == 1
    assert message in shown and f"the uploaded file 'upload{suffix}'" in shown and "\n" not in shown
    assert predict_files(model_folder, image, tmp_path / "out") == 1
    assert message in capsys.readouterr().err  # predict refuses the same file for the same reason
    assert "eovseg app: error: Upload an image" in run(None, CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)[4]
    # Choosing a file clears the result of the earlier one; an unreadable one says why at once.
    preview, *cleared, note = page_preview(str(image))
    assert preview is None and cleared == [None, "", None, None] and message in html.unescape(note)
    preview, *cleared, note = page_preview(example_image())
    assert DISPLAY_SIDE / 2 < min(preview.size) <= max(DISPLAY_SIDE, min(Image.open(example_image()).size))
    assert cleared == [None, "", None, None] and note == ""


def test_a_bug_in_a_run_still_clears_the_result_and_says_it_failed(app, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("shape mismatch\nsecond line")

    monkeypatch.setattr(app, "segment", broken)
    *cleared, shown = page_run(app)(example_image(), CLASS_TEXT, "panoptic", 0.0, 0.8, 0.5)
    assert cleared == [None, "", None, None]
    assert html.unescape(shown) == '<div class="eovseg-error">eovseg app: internal error: RuntimeError: shape ' \
        'mismatch</div>'
    assert "Traceback" in capsys.readouterr().err  # for whoever runs the server


class Steps(list):
    """A progress recorder that is falsy while empty, as Gradio's Progress is."""

    def __call__(self, fraction, desc=None):
        self.append((fraction, desc))


def test_the_page_reports_progress_of_the_text_pass_and_the_image(app):
    steps = Steps()
    page_run(app)(example_image(), CLASS_TEXT + "\nlamp", "panoptic", 0.0, 0.8, 0.5, steps)
    fractions = [fraction for fraction, _ in steps]
    assert fractions == sorted(fractions) and fractions[0] == 0.0
    assert any("Text pass: 4 class names" in desc for _, desc in steps)
    assert any(desc.startswith("Segmenting the ") for _, desc in steps)
    # The text pass runs between its step and the image's step.
    calls = []
    before = app.model.num_text_encoder_calls
    page_run(app)(example_image(), CLASS_TEXT + "\nsofa", "panoptic", 0.0, 0.8, 0.5,
                  lambda fraction, desc=None: calls.append((desc, app.model.num_text_encoder_calls - before)))
    text_step = next(i for i, (desc, _) in enumerate(calls) if desc.startswith("Text pass"))
    image_step = next(i for i, (desc, _) in enumerate(calls) if desc.startswith("Segmenting"))
    assert calls[text_step][1] == 0 and calls[image_step][1] == 1


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


def _serve(app):
    from eovseg.app import build_demo, launch

    port = _free_port()
    demo = build_demo(app)
    launch(demo, "127.0.0.1", port, block=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(app):
    """The page on the tiny test model, served on a free local port."""
    demo, url = _serve(app)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def served_demo_model():
    """The page as `eovseg app` serves it: on the bundled demo model, which segments the example's shapes."""
    demo, url = _serve(SegmentationApp(*load_model(None)))
    yield url
    demo.close()


def _open_page(url, tmp_path, request):
    """A headless Chromium page on a served app (Debian's chromium: no browser download); on leaving, the test
    checks that nothing was asked of another machine, and copies its screenshots to $EOVSEG_SCREENSHOT_DIR."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium package: apt-get install chromium"
    (tmp_path / "shots").mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        requested = []
        page.on("request", lambda req: requested.append(req.url))
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#run").wait_for(timeout=30000)
        yield page
        browser.close()
    assert [u for u in requested if not u.startswith((url, "data:", "blob:"))] == []  # nothing off this machine
    if os.environ.get("EOVSEG_SCREENSHOT_DIR"):
        os.makedirs(os.environ["EOVSEG_SCREENSHOT_DIR"], exist_ok=True)
        for shot in (tmp_path / "shots").glob("*.png"):
            shutil.copy(shot, os.path.join(os.environ["EOVSEG_SCREENSHOT_DIR"], f"{request.node.name}-{shot.name}"))


@pytest.fixture
def page(served, tmp_path, request):
    yield from _open_page(served, tmp_path, request)


@pytest.fixture
def demo_page(served_demo_model, tmp_path, request):
    yield from _open_page(served_demo_model, tmp_path, request)


def upload(page, path):
    """Choose a file in the upload box (emptied first), and wait for the page to read it."""
    clear = page.locator('#input-image button[aria-label="Clear"]')
    if clear.count():
        clear.click()
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    page.locator("#input-preview img, #message .eovseg-error").first.wait_for(timeout=30000)


def run_and_wait(page, timeout=120000):
    """Press Segment and wait until the run has answered (Gradio's status over the message is gone)."""
    page.locator("#run").click()
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('#message [data-testid=status-tracker]:not(.hide)')",
                           timeout=timeout)
    page.locator("#message .eovseg-note, #message .eovseg-error").first.wait_for(timeout=timeout)


def image_sizes(page, selector):
    """`(natural width, natural height, displayed width)` of an image on the page, and the width of its box."""
    return page.evaluate("""s => { const img = document.querySelector(s + ' img');
        return [img.naturalWidth, img.naturalHeight, img.getBoundingClientRect().width,
                document.querySelector(s).getBoundingClientRect().width]; }""", selector)


def legend_swatches(page):
    """`{name: (r, g, b)}` of the legend on the page."""
    items = page.evaluate("""() => [...document.querySelectorAll('#legend .eovseg-legend-item')].map(item =>
        [item.textContent.trim(), getComputedStyle(item.querySelector('span')).backgroundColor])""")
    return {text.rsplit(" ", 1)[0].strip(): tuple(int(v) for v in color[4:-1].split(",")) for text, color in items}


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_headless_chromium_shows_the_example_at_full_size(demo_page, tmp_path):
    page = demo_page
    page.locator("button.gallery-item").first.click()  # the example
    page.locator("#input-preview img").wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelector('#input-preview img').naturalWidth > 0", timeout=30000)
    run_and_wait(page)
    page.locator("#legend .eovseg-legend-item").first.wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelector('#result img').naturalWidth > 0", timeout=30000)
    page.screenshot(path=str(tmp_path / "shots" / "example.png"), full_page=True)
    width, height = Image.open(example_image()).size
    factor = max(1, DISPLAY_SIDE // min(width, height))
    for selector in ("#input-preview", "#result"):
        natural_width, natural_height, shown, box = image_sizes(page, selector)
        # drawn at a whole multiple of the example's size, shown across most of its column: not a thumbnail
        assert (natural_width, natural_height) == (width * factor, height * factor)
        assert shown >= min(0.75 * box, natural_width), (selector, shown, box)
    vocabulary = parse_class_list(page.locator("#classes textarea").input_value())[0]
    assert set(legend_swatches(page)) <= {name.split(",")[0].strip() for name in vocabulary}
    assert page.locator("#segments-json a, #panoptic-png a").count() == 2
    assert re.search(r"^\d+ segments? found\.$", page.locator("#message").inner_text().strip())


@pytest.mark.browser
@pytest.mark.slow
def test_a_failed_run_or_unreadable_upload_shows_the_message_and_clears_the_result(page, tmp_path):
    upload(page, example_image())
    page.locator("#classes textarea").fill(CLASS_TEXT)
    run_and_wait(page)
    page.locator("#result img").wait_for(timeout=30000)
    page.screenshot(path=str(tmp_path / "shots" / "1-result.png"), full_page=True)
    # A run that fails (a class list with a duplicate) clears the earlier picture, legend and files.
    page.locator("#classes textarea").fill("cup\ncup")
    run_and_wait(page)
    page.screenshot(path=str(tmp_path / "shots" / "2-failed-run.png"), full_page=True)
    assert page.locator("#message .eovseg-error").inner_text().startswith("eovseg app: error: ")
    assert "duplicate class name" in page.locator("#message").inner_text()
    assert page.locator("#result img").count() == 0 and page.locator("#legend .eovseg-legend-item").count() == 0
    assert page.locator("#segments-json a, #panoptic-png a").count() == 0
    # A good run again, then an unreadable upload: the message at once, the result gone, and Segment says it again.
    page.locator("#classes textarea").fill(CLASS_TEXT)
    run_and_wait(page)
    page.locator("#legend .eovseg-legend-item").first.wait_for(timeout=30000)
    upload(page, write_upload(tmp_path / "broken.png", "garbage"))
    page.locator("#message .eovseg-error").wait_for(timeout=30000)
    page.screenshot(path=str(tmp_path / "shots" / "3-unreadable-upload.png"), full_page=True)
    shown = page.locator("#message").inner_text()
    assert shown.startswith("eovseg app: error: cannot read the uploaded file 'broken.png' as an image") and \
        "\n" not in shown.strip()
    assert page.locator("#result img").count() == 0 and page.locator("#legend .eovseg-legend-item").count() == 0
    assert page.locator("#input-preview img").count() == 0 and page.get_by_text("Error", exact=True).count() == 0
    run_and_wait(page)
    assert page.locator("#message").inner_text() == shown and page.locator("#result img").count() == 0


def fetch_image(page, selector):
    """The picture an `<img>` of the page shows, as the browser received it."""
    source = page.evaluate(f"() => document.querySelector('{selector} img').src")
    return Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB")


def fetch_file(page, selector):
    return page.request.get(page.locator(f"{selector} a").first.get_attribute("href")).body()


@pytest.mark.browser
@pytest.mark.slow
def test_labels_on_a_large_photo_are_readable_and_progress_is_shown(demo_page, tmp_path):
    from eovseg.app import parse_class_list
    from eovseg.visualization import draw_segments

    page = demo_page
    photo = Image.open(example_image()).convert("RGB").resize((3000, 2000), Image.Resampling.BILINEAR)
    photo.save(tmp_path / "photo.png")
    upload(page, tmp_path / "photo.png")
    page.locator("#run").click()
    # Gradio's progress names the step (not a bare timer): the image's step is long enough to be seen.
    page.get_by_text("Segmenting the 3000x2000 image").first.wait_for(timeout=60000)
    page.screenshot(path=str(tmp_path / "shots" / "1-progress.png"), full_page=True)
    page.locator("#message .eovseg-note").wait_for(timeout=120000)
    page.wait_for_function("() => document.querySelector('#result img').naturalWidth > 0", timeout=30000)
    page.screenshot(path=str(tmp_path / "shots" / "2-large.png"), full_page=True)
    natural_width, natural_height, shown, _ = image_sizes(page, "#result")
    assert (natural_width, natural_height) == (3000, 2000)
    # The labels: what the page's picture holds beyond the same segments drawn without labels (from the page's own
    # panoptic PNG and segments JSON). Each label is at least 64 photo pixels high: 11 CSS pixels on the page.
    ids = np.asarray(Image.open(io.BytesIO(fetch_file(page, "#panoptic-png"))), dtype=np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    infos = [{"id": s["id"], "label_id": s["category_id"]}
             for s in json.loads(fetch_file(page, "#segments-json"))["segments_info"]]
    names = parse_class_list(page.locator("#classes textarea").input_value())[0]
    plain = np.asarray(draw_segments(photo, ids, infos, names, labels=False), dtype=np.int64)
    labels = np.abs(np.asarray(fetch_image(page, "#result"), dtype=np.int64) - plain).max(-1) > 40
    found, count = ndimage.label(ndimage.binary_closing(labels, iterations=8))
    heights = [s[0].stop - s[0].start for s in ndimage.find_objects(found)]
    assert count >= 2 and min(heights) >= 64 and min(heights) * shown / natural_width >= 11, (heights, shown)


@pytest.mark.browser
@pytest.mark.slow
def test_a_builtin_vocabulary_is_shown_in_its_data_sets_colours(page, tmp_path):
    import eovseg.vocabularies

    upload(page, example_image())
    page.locator("#vocabulary input").click()
    page.get_by_role("option", name="coco_panoptic", exact=True).click()
    page.wait_for_function("() => document.querySelector('#classes textarea').value.startsWith('person,')",
                           timeout=30000)
    run_and_wait(page)
    page.locator("#legend .eovseg-legend-item").first.wait_for(timeout=30000)
    page.screenshot(path=str(tmp_path / "shots" / "coco.png"), full_page=True)
    folder = os.path.dirname(eovseg.vocabularies.__file__)
    with open(os.path.join(folder, "coco_panoptic.json")) as file:
        coco = {c["name"].split(",")[0]: tuple(c["color"]) for c in json.load(file)["classes"]}
    swatches = legend_swatches(page)
    assert swatches and all(coco[name] == color for name, color in swatches.items()), swatches
    # The picture too: inside each segment (its labels and outlines aside) the tint is half the data set's colour.
    ids = np.asarray(Image.open(io.BytesIO(fetch_file(page, "#panoptic-png"))), dtype=np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    picture = np.asarray(fetch_image(page, "#result"), dtype=np.float64)
    factor = picture.shape[0] // ids.shape[0]
    ids = np.repeat(np.repeat(ids, factor, axis=0), factor, axis=1)
    scene = np.repeat(np.repeat(np.asarray(Image.open(example_image()).convert("RGB"), dtype=np.float64), factor,
                                axis=0), factor, axis=1)
    names = [c["name"].split(",")[0] for c in json.load(open(os.path.join(folder, "coco_panoptic.json")))["classes"]]
    for segment in json.loads(fetch_file(page, "#segments-json"))["segments_info"]:
        inside = ndimage.binary_erosion(ids == segment["id"], iterations=2)
        color = np.median(2 * picture[inside] - scene[inside], axis=0)
        assert np.abs(color - coco[names[segment["category_id"]]]).max() <= 2, (segment, color)


def test_the_pages_files_are_removed_at_exit(tmp_path):
    """The page's downloads live in a temporary folder removed when the process exits, so runs and test runs leave
    no eovseg-app-* folders behind."""
    import subprocess
    import sys

    code = ("import sys; from eovseg.app import SegmentationApp; app = SegmentationApp(None, None); "
            "(app.output_root / 'segments.json').write_text('{}'); print(app.output_root)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    folder = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert folder.strip().startswith(str(tmp_path))
    assert not list(tmp_path.glob("eovseg-app-*"))
