"""``hatnet serve``: the JSON API on a real socket, checked against the CLI's output for the same checkpoints.

The server runs in a background thread on a free port of 127.0.0.1 with the one-step classification,
segmentation and detection runs of test_api.py; requests go through urllib as any client's would.
"""
import base64
import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from pycocotools import mask as mask_utils

import hatnet
from hatnet.cli import main
from hatnet.data.images import read_image
from hatnet.serve import MAX_PIXELS, MAX_UPLOAD_BYTES, Run, create_app, listen, load_runs
from hatnet.tasks.attention import attention_probabilities
import test_api
from test_api import _cli_json
from test_engine import one_thread  # noqa: F401  (autouse fixture: one intra-op thread for small models)

# test_api's one-step runs, as fixtures of this module too
classification_run, segmentation_run, detection_run = (
    test_api.classification_run, test_api.segmentation_run, test_api.detection_run)


@contextlib.contextmanager
def running(runs):
    """The app serving ``runs`` from a background thread on a free port; yields its URL, stops at the end."""
    sock = listen('127.0.0.1', 0)
    server = uvicorn.Server(uvicorn.Config(create_app(runs), log_level='warning'))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, 'the server did not start'
        time.sleep(0.02)
    try:
        yield f'http://127.0.0.1:{sock.getsockname()[1]}'
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def request(url, fields=None, files=None):
    """(status, JSON body) of a GET (no fields or files) or a multipart POST; files: name -> (file name, bytes)."""
    data, headers = None, {}
    if fields is not None or files is not None:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (fields or {}).items()]
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode() + content + b'\r\n'
                  for k, (name, content) in (files or {}).items()]
        data = b''.join(parts) + f'--{boundary}--\r\n'.encode()
        headers['Content-Type'] = f'multipart/form-data; boundary={boundary}'
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def image_file(path):
    return {'image': (path.name, path.read_bytes())}


def decode_data_url(url):
    prefix = 'data:image/png;base64,'
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


@pytest.fixture(scope='module')
def server(classification_run, segmentation_run, detection_run):
    runs = load_runs([classification_run[0], segmentation_run[0]], device='cpu')
    # the one-step detector scores below the run's threshold (0.05): served with none, as the command can load it
    detector = hatnet.load(detection_run[0], device='cpu', score_thresh=0., detections_per_img=5)
    runs['det'] = Run('det', str(detection_run[0]), detector)
    with running(runs) as url:
        yield url, runs


def test_runs_are_listed_with_task_model_classes_and_attention_blocks(server, classification_run):
    url, runs = server
    assert list(runs) == ['cls', 'seg', 'det']  # the run folders' names
    status, body = request(f'{url}/api/runs')
    assert status == 200
    listed = {run['name']: run for run in body['runs']}
    assert {name: (r['task'], r['model']) for name, r in listed.items()} == {
        'cls': ('classification', 'hat_net_tiny'), 'seg': ('segmentation', 'resnet10t'),
        'det': ('detection', 'hat_net_tiny')}
    for name, run in runs.items():
        assert listed[name]['classes'] == run.predictor.class_names
    assert listed['cls']['attention_blocks'][:3] == ['0.0', '0.1', '1.0'] and len(listed['cls']['attention_blocks']) == 13
    assert listed['det']['attention_blocks'] == listed['cls']['attention_blocks']  # the detector's HAT-Net backbone
    assert listed['seg']['attention_blocks'] == []                               # a ResNet: no H-MHSA
    assert listed['seg']['palette'] == [list(c) for c in runs['seg'].predictor.palette]
    assert listed['det']['arch'] == 'maskrcnn' and listed['det']['score_thresh'] == 0
    assert body['limits'] == dict(max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS,
                                  formats=['JPEG', 'PNG', 'WebP'])


def test_classification_is_what_hatnet_predict_json_prints(server, classification_run):
    url, _ = server
    run, folder = classification_run
    path = sorted((folder / 'val' / 'red').glob('*.png'))[0]
    status, body = request(f'{url}/api/predict', {'run': 'cls'}, image_file(path))
    assert status == 200, body
    cli = _cli_json('predict', path, '--checkpoint', run, '--json', '--device', 'cpu')[0]
    assert body['image'] == path.name and cli['image'] == str(path)
    assert [p['name'] for p in body['predictions']] == [p['name'] for p in cli['predictions']]
    assert [p['index'] for p in body['predictions']] == [p['index'] for p in cli['predictions']]
    assert [p['probability'] for p in body['predictions']] == pytest.approx(
        [p['probability'] for p in cli['predictions']], abs=1e-6)
    assert body['run'] == 'cls' and body['task'] == 'classification' and body['latency_ms'] > 0


def test_segmentation_is_what_hatnet_seg_predict_json_prints_with_the_mask(server, segmentation_run, tmp_path):
    url, runs = server
    run, shapes = segmentation_run
    path = sorted((shapes / 'images' / 'val').iterdir())[0]
    status, body = request(f'{url}/api/predict', {'run': 'seg'}, image_file(path))
    assert status == 200, body
    cli = _cli_json('seg', 'predict', path, '--checkpoint', run, '--out', tmp_path, '--json', '--device', 'cpu')[0]
    assert body['size'] == cli['size'] and body['classes'] == pytest.approx(cli['classes'])
    mask = decode_data_url(body['mask'])
    cli_mask = Image.open(cli['mask'])
    assert mask.mode == cli_mask.mode == 'P' and mask.getpalette() == cli_mask.getpalette()
    assert np.array_equal(np.asarray(mask), np.asarray(cli_mask))  # the class of every pixel
    counts = np.bincount(np.asarray(mask).ravel(), minlength=len(runs['seg'].predictor.class_names))
    palette = runs['seg'].predictor.palette
    assert [(e['index'], e['name'], e['colour']) for e in body['legend']] == [
        (i, runs['seg'].predictor.class_names[i], list(palette[i])) for i in np.argsort(-counts, kind='stable')
        if counts[i]]
    assert sum(e['share'] for e in body['legend']) == pytest.approx(1)


def test_detection_is_what_hatnet_det_predict_writes_with_colours_and_masks(server, detection_run, tmp_path):
    url, runs = server
    run, shapes = detection_run
    path = sorted((shapes / 'val2017').glob('*.png'))[0]
    status, body = request(f'{url}/api/predict', {'run': 'det'}, image_file(path))
    assert status == 200, body
    with pytest.raises(SystemExit) as exit_info:  # with the served detector's settings
        main([str(a) for a in ('det', 'predict', path, '--checkpoint', run, '--out', tmp_path, '--score-thresh', 0,
                               '--max-detections', 5, '--device', 'cpu')])
    assert not exit_info.value.code
    cli = json.loads((tmp_path / 'predictions.json').read_text())[0]['detections']
    assert len(body['detections']) == len(cli) > 0
    width, height = Image.open(path).size
    for served, written in zip(body['detections'], cli):
        assert {k: served[k] for k in ('category_id', 'label', 'segmentation')} == \
               {k: written[k] for k in ('category_id', 'label', 'segmentation')}
        assert served['bbox'] == pytest.approx(written['bbox'], abs=1e-4)
        assert served['score'] == pytest.approx(written['score'], abs=1e-6)
        # the mask the page draws: the RLE's pixels, in the detection's colour
        rle = mask_utils.decode(dict(written['segmentation'], counts=written['segmentation']['counts'].encode()))
        drawn = np.zeros((height, width), bool)
        if 'mask' in served:
            rgba = np.asarray(decode_data_url(served['mask']['png']))
            x, y = served['mask']['x'], served['mask']['y']
            drawn[y:y + rgba.shape[0], x:x + rgba.shape[1]] = rgba[..., 3] == 255
            assert (rgba[rgba[..., 3] == 255][:, :3] == served['colour']).all()
        assert np.array_equal(drawn, rle.astype(bool))


@pytest.mark.parametrize('run_name', ['cls', 'det'])
def test_attention_is_what_hatnet_attention_computes(server, classification_run, run_name):
    url, runs = server
    _, folder = classification_run
    path = sorted((folder / 'val' / 'green').glob('*.png'))[0]
    status, body = request(f'{url}/api/attention', {'run': run_name, 'block': '1.0', 'x': 9, 'y': 20},
                           image_file(path))
    assert status == 200, body
    assert body['block'] == '1.0' and body['stride'] == 8 and body['latency_ms'] > 0
    local, global_ = np.array(body['local']), np.array(body['global'])
    assert local.sum() == pytest.approx(1, abs=1e-4) and global_.sum() == pytest.approx(1, abs=1e-4)
    width, height = body['input_size']
    assert decode_data_url(body['input']).size == (width, height)
    assert body['query'] == [20 // 8, 9 // 8] and body['map_size'] == [-(-height // 8), -(-width // 8)]
    if run_name == 'cls':  # the classifier's input is that of `hatnet attention`: compare with its numbers
        predictor = runs['cls'].predictor
        expected = attention_probabilities(predictor.model, predictor.transform(read_image(path)), 1, 0, (9, 20))
        assert body['cell'] == list(expected['cell']) and body['pool'] == expected['pool']
        np.testing.assert_allclose(local, expected['local'].mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(global_, expected['global'].mean(0).numpy(), atol=1e-6)
    # no query: the centre, as `hatnet attention` asks by default
    status, centre = request(f'{url}/api/attention', {'run': run_name, 'block': '1.0'}, image_file(path))
    assert status == 200 and centre['query'] == [int((height - 1) / 2) // 8, int((width - 1) / 2) // 8]


def _png(width, height, colour=(90, 160, 40)):
    buffer = io.BytesIO()
    Image.new('RGB', (width, height), colour).save(buffer, format='PNG')
    return buffer.getvalue()


def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, classification_run):
    url, _ = server
    _, folder = classification_run
    good = image_file(sorted((folder / 'val' / 'blue').glob('*.png'))[0])
    gif = io.BytesIO()
    Image.new('RGB', (8, 8)).save(gif, format='GIF')
    cases = [
        ({'run': 'cls'}, {'image': ('notes.txt', b'not an image at all')}, 415, 'notes.txt is not an image'),
        ({'run': 'cls'}, {'image': ('cut.png', _png(64, 48)[:60])}, 400, 'cut.png is a truncated or corrupt PNG'),
        ({'run': 'cls'}, {'image': ('anim.gif', gif.getvalue())}, 415, 'anim.gif is a GIF image'),
        ({'run': 'cls'}, {'image': ('empty.png', b'')}, 400, 'empty.png is empty'),
        ({'run': 'cls'}, {'image': ('wide.png', _png(4097, 4097))}, 413, 'more than the limit of 16.8 megapixels'),
        ({'run': 'cls'}, {'image': ('huge.png', bytes(MAX_UPLOAD_BYTES + 1))}, 413, 'huge.png is larger than the limit'),
        # refused from its Content-Length, before the body is read
        ({'run': 'cls'}, {'image': ('huger.png', bytes(MAX_UPLOAD_BYTES + 2 ** 20))}, 413, 'larger than the limit of 20 MB'),
        ({'run': 'nope'}, good, 400, "unknown run 'nope': the runs are cls, seg, det"),
        ({}, good, 400, 'no run: send the field "run"'),
        ({'run': 'cls'}, {}, 400, 'no image'),
    ]
    for fields, files, status, message in cases:
        got, body = request(f'{url}/api/predict', fields, files)
        assert (got, message) == (status, message) and message in body['error'], body
    attention_cases = [
        ({'run': 'seg', 'block': '0.0'}, 'seg is a resnet10t, not a HAT-Net'),
        ({'run': 'cls', 'block': '7.1'}, "cls has no block '7.1'"),
        ({'run': 'cls', 'x': 'left', 'y': '3'}, 'x and y must be numbers'),
        ({'run': 'cls', 'x': 40, 'y': 3}, 'the query (40, 3) is outside the 32x32 model input'),
    ]
    for fields, message in attention_cases:
        got, body = request(f'{url}/api/attention', fields, good)
        assert got == 400 and message in body['error'], body
    not_multipart = urllib.request.Request(f'{url}/api/predict', b'{}', {'Content-Type': 'application/json'})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(not_multipart, timeout=30)
    assert error.value.code == 400 and 'multipart/form-data' in json.load(error.value)['error']

    # still serving, and requests at the same time get the same answers (predictions run one at a time)
    answers = [None] * 4

    def ask(i):
        answers[i] = request(f'{url}/api/predict', {'run': 'cls'}, good)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(status == 200 for status, _ in answers)
    assert all(body['predictions'] == answers[0][1]['predictions'] for _, body in answers)


def test_the_command_loads_the_runs_and_listens(classification_run, monkeypatch, capsys, tmp_path):
    run, _ = classification_run
    served = {}
    monkeypatch.setattr(hatnet.serve, 'serve', lambda runs, sock: served.update(runs=runs, port=sock.getsockname()[1]))
    with contextlib.closing(listen('127.0.0.1', 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(SystemExit) as exit_info:
        main(['serve', '--checkpoint', str(run), '--checkpoint', str(run), '--port', str(port), '--device', 'cpu'])
    assert not exit_info.value.code
    assert list(served['runs']) == ['cls', 'cls-2'] and served['port'] == port
    assert served['runs']['cls'].predictor.device == torch.device('cpu')
    assert f'open http://127.0.0.1:{port}/' in capsys.readouterr().out

    # bad input is one line and exit status 2: a missing checkpoint, no run at all, a port in use
    monkeypatch.chdir(tmp_path)
    with contextlib.closing(listen('127.0.0.1', 0)) as taken:
        taken.listen()
        used = taken.getsockname()[1]
        for args, message in [(['--checkpoint', 'no-such-run'], 'no-such-run'), ([], 'give --checkpoint RUN'),
                              (['--checkpoint', str(run), '--port', str(used)], f'cannot listen on 127.0.0.1:{used}')]:
            with pytest.raises(SystemExit) as exit_info:
                main(['serve', *args])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
