"""A classification run as a Hugging Face-style folder: timm and transformers load it offline, with the run's
class names and preprocessing, and give the run's own predictions."""
import json

import pytest
import timm
import torch
from PIL import Image

from hatnet.errors import HatNetError
from hatnet.export.hf_folder import save_hf_folder
from hatnet.tasks.classification import ClassificationTask
from test_faults_cli import TRAIN, colours, hatnet  # noqa: F401  (fixture)
from test_engine import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope='module')
def run(colours, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp('runs') / 'colours'
    code, _, err = hatnet(*TRAIN, '--data', colours, '--out', run_dir)
    assert code == 0, err
    return run_dir


@pytest.fixture(scope='module')
def folder(run, tmp_path_factory):
    return save_hf_folder(run, tmp_path_factory.mktemp('hf') / 'colours-hat_net_tiny')


def test_the_folder_holds_the_runs_model_names_and_card(folder, run):
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'hat_net_tiny' and config['label_names'] == ['blue', 'green', 'red']
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]  # the run's image size, not ImageNet's 224
    assert 'top1' not in config['pretrained_cfg']  # the ImageNet weights' facts are not this model's
    card = (folder / 'README.md').read_text()
    assert 'import hatnet' in card and '`red`' in card and 'val_top1' in card


def test_timm_loads_the_folder_and_gives_the_runs_logits(folder, run):
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    predictor = ClassificationTask.load(run, 'cpu')
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(images), predictor.model(images), atol=1e-5)
    assert model.pretrained_cfg['label_names'] == ['blue', 'green', 'red']


def test_transformers_loads_the_folder_offline_with_class_names(folder, run, colours, monkeypatch):  # noqa: F811
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    transformers = pytest.importorskip('transformers')
    model = transformers.AutoModelForImageClassification.from_pretrained(str(folder))
    assert model.config.id2label == {0: 'blue', 1: 'green', 2: 'red'}
    classify = transformers.pipeline('image-classification', model=str(folder), device='cpu')
    image = sorted((colours / 'val' / 'red').glob('*.png'))[0]
    ours = ClassificationTask.load(run, 'cpu').predict(image, top_k=3)[0]
    theirs = classify(Image.open(image).convert('RGB'), top_k=3)
    assert [t['label'] for t in theirs] == ours.labels  # same preprocessing, same ranking
    assert [t['score'] for t in theirs] == pytest.approx(ours.scores, abs=2e-3)


def test_an_existing_folder_is_kept_unless_asked(folder, run):
    before = (folder / 'model.safetensors').stat().st_mtime_ns
    with pytest.raises(HatNetError, match='exists already'):
        save_hf_folder(run, folder)
    assert (folder / 'model.safetensors').stat().st_mtime_ns == before
    save_hf_folder(run, folder, overwrite=True)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging folder left behind


def test_the_export_command_writes_the_folder_and_refuses_what_it_cannot(run, tmp_path):
    code, out, err = hatnet('export', run, '--hf', tmp_path / 'hf')
    assert code == 0, err
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['label_names'] == ['blue', 'green', 'red']
    for args, message in [(('export', run, '--hf', tmp_path / 'hf'), 'exists already'),
                          (('export', 'hat_net_tiny', '--hf', tmp_path / 'x'), 'give its run directory'),
                          (('export', run, '--hf', tmp_path / 'y', '--onnx', tmp_path / 'y.onnx'), 'give one output')]:
        code, _, err = hatnet(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
