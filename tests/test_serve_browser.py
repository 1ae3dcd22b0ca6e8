"""The page of ``hatnet serve`` in headless Chromium (Debian's ``chromium``, driven by playwright).

Each test uploads an image through the page's file input, waits for the answer and checks what the page
drew: the top classes and the attention panels of a classifier, the mask overlay of a segmenter at full
opacity, the boxes of a detector and its score slider, the message for a file that is not an image. The
screenshots are compared with what the predictors give for the same image.

``python tests/test_serve_browser.py RUN IMAGE OUT.png [BLOCK]`` takes the screenshot of the docs
(docs/serve.png) the same way.
"""
import io
import os
import sys
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hatnet
from hatnet.serve import Run, load_runs
from hatnet.tasks.detection import DetectionConfig, DetectionPredictor, build_detector
import test_api
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)
from test_serve import running

# test_api's one-step runs, as fixtures of this module too
classification_run, segmentation_run = test_api.classification_run, test_api.segmentation_run

CHROMIUM = Path(shutil.which('chromium') or '/usr/bin/chromium')  # Debian's package
# as root without a sandbox; no background connections (this machine reaches no outside host)
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-sync',
                 '--disable-background-networking', '--disable-component-update']
DONE = "s => s.classList.contains('error') || s.textContent.includes('round trip')"


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def open_page(browser, url):
    """The page at ``url``, once it has listed the runs; page errors are collected in ``page.errors``."""
    page = browser.new_page(viewport=dict(width=1100, height=1000))
    page.set_default_timeout(60_000)
    page.errors = []
    page.on('pageerror', lambda error: page.errors.append(error))
    page.goto(url)
    page.wait_for_selector('#run option', state='attached')
    return page


def show(page, image, run=None, attention=False):
    """Upload ``image`` to ``run`` (default: the one selected) and wait for the answer (and the attention's)."""
    if run is not None:
        page.select_option('#run', run)
    page.eval_on_selector('#status', "s => { s.textContent = ''; s.className = ''; }")
    page.eval_on_selector('#att-status', "s => { s.textContent = ''; }")
    page.set_input_files('#file', str(image))
    page.wait_for_function(f'({DONE})(document.querySelector("#status"))')
    if attention:
        page.wait_for_function(f'({DONE})(document.querySelector("#att-status"))')


def set_slider(page, selector, value):
    page.eval_on_selector(selector, "(s, v) => { s.value = v; s.dispatchEvent(new Event('input')); }", str(value))


def shot(locator) -> np.ndarray:
    """An element's screenshot as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert('RGB')).astype(int)


def near(pixels: np.ndarray, colour, tolerance=12) -> np.ndarray:
    return (np.abs(pixels - np.array(colour)) <= tolerance).all(-1)


@pytest.fixture(scope='module')
def browser():
    if not CHROMIUM.exists():
        if os.environ.get('CI'):
            pytest.fail(f'{CHROMIUM} is missing: .ci/run installs Debian\'s chromium for this test')
        pytest.skip(f'headless Chromium is not installed ({CHROMIUM}): apt-get install chromium')
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope='module')
def detector():
    """A Mask R-CNN on HAT-Net-Tiny with its first weights (no training needed to draw what it finds)."""
    config = DetectionConfig(arch='maskrcnn', min_size=64, max_size=96, score_thresh=0., detections_per_img=4)
    return DetectionPredictor(build_detector(config, 4), ['rectangle', 'triangle', 'disc'], 'cpu',
                              category_ids=[3, 7, 9], config=config)


@pytest.fixture(scope='module')
def url(classification_run, segmentation_run, detector):
    runs = load_runs([classification_run[0], segmentation_run[0]], device='cpu')
    runs['det'] = Run('det', 'first weights', detector)
    with running(runs) as address:
        yield address


def test_a_classification_shows_the_top_classes_and_the_attention_of_a_clicked_point(
        browser, url, classification_run, tmp_path):
    run, folder = classification_run
    path = sorted((folder / 'val' / 'red').glob('*.png'))[0]
    expected = hatnet.load(run, device='cpu').predict(path)[0]
    page = open_page(browser, url)
    show(page, path, 'cls', attention=True)
    assert 'classification of 0.png in' in page.inner_text('#status')
    assert page.locator('#top5 li .name').all_inner_texts() == expected.labels
    assert page.inner_text('#top5 li .score') == f'{100 * expected.scores[0]:.1f} %'
    picture = shot(page.locator('#view'))
    assert near(picture, (220, 40, 40)).mean() > 0.1  # the red square of the image is drawn
    # the attention of the centre: the query's token (3, 3) of stage 0's 8x8 map, marked in cyan, its cell in yellow
    assert 'query token (3, 3) of the 8×8 token map' in page.inner_text('#att-status')
    local = shot(page.locator('#att-local'))
    assert near(local, (0, 255, 255), 40).sum() > 20 and near(local, (255, 255, 0), 40).sum() > 100
    # stage 0 pools the whole 8x8 map into one token: its heat, the top of the scale, tints every pixel
    tinted = 0.4 * picture.min() + 0.6 * np.array([252, 255, 164]) - 12
    assert (shot(page.locator('#att-global')) >= tinted).all(-1).mean() > 0.95
    assert 'global step: to 1×1 pooled tokens' in page.inner_text('#cap-global')
    # a click at pixel (2, 28) of the 32 x 32 model input asks from token (7, 0): 4 pixels a token in stage 0
    page.eval_on_selector('#att-status', "s => { s.textContent = ''; }")
    box = page.locator('#att-global').bounding_box()
    page.click('#att-global', position=dict(x=2.5 / 32 * (box['width'] - 2), y=28.5 / 32 * (box['height'] - 2)))
    page.wait_for_function(f'({DONE})(document.querySelector("#att-status"))')
    assert 'query token (7, 0)' in page.inner_text('#att-status')
    page.select_option('#block', '1.0')  # the same point in stage 1: 8 pixels a token
    page.wait_for_function("document.querySelector('#att-status').textContent.includes('block 1.0: query token (3, 0)"
                           " of the 4×4')")
    page.screenshot(path=tmp_path / 'classification.png', full_page=True)
    screenshot = np.asarray(Image.open(tmp_path / 'classification.png').convert('RGB'))
    assert screenshot.std() > 20 and len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 100  # not blank
    assert page.errors == []


def test_a_segmentation_overlays_the_mask_in_the_class_colours(browser, url, segmentation_run):
    run, shapes = segmentation_run
    path = sorted((shapes / 'images' / 'val').iterdir())[1]
    segmentation = hatnet.load(run, device='cpu').predict(path)[0]
    page = open_page(browser, url)
    show(page, path, 'seg')
    assert page.locator('#legend li .name').all_inner_texts() == list(segmentation.shares(top=4))
    set_slider(page, '#opacity', 1)  # the mask alone: its colours must be the palette's, pixel for pixel
    drawn = shot(page.locator('#view'))
    height, width = drawn.shape[:2]
    mask = np.asarray(segmentation.colorized().convert('RGB').resize((width, height), Image.NEAREST)).astype(int)
    assert near(drawn, mask, 2).mean() > 0.95
    set_slider(page, '#opacity', 0)  # the image alone
    assert near(shot(page.locator('#view')), mask, 2).mean() < 0.5
    assert page.inner_text('#opacity-value') == '0.00' and page.errors == []


def test_a_detection_draws_the_boxes_above_the_score_threshold(browser, url, detector, segmentation_run):
    _, shapes = segmentation_run
    path = sorted((shapes / 'images' / 'val').iterdir())[0]
    detections = detector.predict(path)[0]
    page = open_page(browser, url)
    show(page, path, 'det', attention=True)
    set_slider(page, '#threshold', 0)
    assert page.locator('#detections tr .name').all_inner_texts() == detections.labels
    swatches = page.locator('#detections .swatch').evaluate_all('s => s.map(e => getComputedStyle(e).backgroundColor)')
    colours = {tuple(int(v) for v in colour[4:-1].split(',')) for colour in swatches}  # 'rgb(r, g, b)'

    def coloured_pixels():  # of the boxes' lines, captions and masks
        drawn = shot(page.locator('#view'))
        return sum(near(drawn, colour, 3).sum() for colour in colours)
    with_boxes = coloured_pixels()
    set_slider(page, '#threshold', 1)
    assert page.locator('#detections tr').count() == 0
    assert with_boxes > coloured_pixels() + 100
    assert 'query token' in page.inner_text('#att-status')  # the detector's HAT-Net backbone
    assert page.errors == []


def test_a_file_that_is_not_an_image_gets_a_message_and_the_next_one_works(browser, url, classification_run, tmp_path):
    _, folder = classification_run
    (tmp_path / 'notes.png').write_text('a shopping list')
    page = open_page(browser, url)
    show(page, tmp_path / 'notes.png', 'cls')
    assert page.locator('#status.error').inner_text() == 'notes.png is not an image: send a JPEG, PNG or WebP file'
    assert page.locator('#result').is_hidden() and page.locator('#attention').is_hidden()
    show(page, sorted((folder / 'val' / 'blue').glob('*.png'))[0])
    assert page.locator('#status.error').count() == 0 and page.locator('#top5 li').count() == 3


if __name__ == '__main__':  # the screenshot of the docs: RUN IMAGE OUT.png [BLOCK]
    from playwright.sync_api import sync_playwright
    checkpoint, image, out, *block = sys.argv[1:]
    with running(load_runs([checkpoint])) as address, sync_playwright() as playwright:
        chromium = launch(playwright)
        page = open_page(chromium, address)
        show(page, image, attention=True)
        if block:
            page.select_option('#block', block[0])
            page.wait_for_function(f"document.querySelector('#att-status').textContent"
                                   f".includes('block {block[0]}: query token')")
        page.screenshot(path=out, full_page=True)
        chromium.close()
