"""`fewshot finetune`: checkpoint round trip on both runtimes, the negative-transfer guard, bad input,
and a tiny end-to-end run of the command on a few Omniglot characters."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fewshot import create_encoder
from fewshot.backbones import load_efficientnet_lite0, parse_spec, untrained_trunk
from fewshot.checkpoint import META_FILE, WEIGHTS_FILE, build_network, load_finetuned
from fewshot.errors import FewShotError, InvalidSource, OutputConflict, UnknownEncoder
from fewshot.evaluate import guard
from fewshot.finetune import FinetuneConfig, finetune

from .conftest import SHARED_DATA

TINY = dict(image_size=48, unfreeze=2, epochs=2, views=2, val_classes=0.4, ways=6, workers=0)


def glyphs(root, classes: int = 10, per_class: int = 6, size: int = 48, seed: int = 0):
    """root/<class>/<n>.png: each class a random stroke figure, each image a jittered redrawing of it."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        points = rng.uniform(8, size - 8, size=(5, 2))
        (root / f"glyph{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("L", (size, size), 255)
            jittered = points + rng.normal(0, 1.5, size=points.shape)
            ImageDraw.Draw(image).line([tuple(p) for p in jittered], fill=0, width=3)
            image.save(root / f"glyph{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny fine-tuning, kept whatever the guard says, shared by the round-trip tests."""
    root = tmp_path_factory.mktemp("finetune")
    data = glyphs(root / "data")
    report = finetune(data, root / "out", FinetuneConfig(keep_anyway=True, **TINY), progress=False,
                      log=lambda line: None)
    return root / "out", report


def test_checkpoint_is_safetensors_with_meta(tuned):
    out, report = tuned
    from safetensors.torch import load_file

    state = load_file(out / WEIGHTS_FILE)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["kept"] and meta["base"]["spec"] == "efficientnet_lite0"
    assert meta["base"]["fingerprint"] == create_encoder("efficientnet_lite0", runtime="torch").fingerprint
    assert meta["preprocessing"]["size"] == [48, 48]
    assert report.unfrozen_units == 2 and report.train_classes == 6 and report.judge_classes == 2
    network, prep, _ = load_finetuned(out, untrained_trunk)
    for name, tensor in network.state_dict().items():
        assert np.array_equal(tensor.numpy(), state[name].numpy()), name


def test_finetuned_encoder_on_both_runtimes(tuned, tmp_path):
    out, _ = tuned
    torch_enc = create_encoder(f"finetuned:{out}", runtime="torch", cache_dir=tmp_path)
    onnx_enc = create_encoder(f"finetuned:{out}", runtime="onnx", cache_dir=tmp_path)
    base = create_encoder("efficientnet_lite0", runtime="torch", cache_dir=tmp_path)
    assert torch_enc.fingerprint == onnx_enc.fingerprint != base.fingerprint
    assert torch_enc.input_shape == (3, 48, 48)
    images = [Image.open(p) for p in sorted((out.parent / "data" / "glyph03").glob("*.png"))]
    a, b = torch_enc.embed_images(images), onnx_enc.embed_images(images)
    assert a.shape == (6, 1280) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.abs(a - b).max() < 1e-4
    # the trained network differs from the base weights, so the embeddings do too
    network, _, _ = load_finetuned(out, untrained_trunk)
    untouched = load_efficientnet_lite0(parse_spec("efficientnet_lite0").weights)
    assert not np.allclose(network.body[-1][0].weight.detach().numpy(), untouched.conv_head.weight.detach().numpy())
    assert np.allclose(network.body[0][0].weight.detach().numpy(), untouched.conv_stem.weight.detach().numpy())


def test_guard_keeps_only_a_significant_improvement(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([f"c{i}" for i in range(12)], 8)
    centres = rng.normal(size=(12, 32))
    good = centres[np.repeat(np.arange(12), 8)] + 0.3 * rng.normal(size=(96, 32))
    noise = rng.normal(size=(96, 32))
    worse = guard(good, noise, labels)
    assert not worse["kept"] and "did not help" in worse["reason"] and worse["difference"] < 0
    same = guard(good, good.copy(), labels)
    assert not same["kept"] and same["difference"] == 0  # no better is not kept either
    better = guard(noise, good, labels)
    assert better["kept"] and "helped" in better["reason"] and better["difference"] > 0
    assert "+-" in better["reason"] and better["frozen"]["ci95"] > 0


def test_a_rejected_finetuning_is_refused_by_the_loader(tuned, tmp_path):
    out, _ = tuned
    rejected = tmp_path / "rejected"
    rejected.mkdir()
    (rejected / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    meta = json.loads((out / META_FILE).read_text())
    meta.update(kept=False, report={**meta["report"], "reason": "fine-tuning did not help: frozen 50% vs 40%"})
    (rejected / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UnknownEncoder, match="not kept: fine-tuning did not help.*--keep-anyway"):
        create_encoder(f"finetuned:{rejected}", runtime="torch")


def test_bad_input(tmp_path):
    with pytest.raises(UnknownEncoder, match="fewshot finetune DATA"):
        create_encoder(f"finetuned:{tmp_path / 'nothing'}", runtime="torch")
    data = glyphs(tmp_path / "data", classes=4, per_class=3)
    with pytest.raises(InvalidSource, match="held-out"):
        finetune(data, tmp_path / "out", FinetuneConfig(**TINY), progress=False, log=lambda line: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict):
        finetune(data, tmp_path / "busy", FinetuneConfig(**TINY), progress=False, log=lambda line: None)
    data = glyphs(tmp_path / "more", classes=10, per_class=3)
    with pytest.raises(FewShotError, match="--unfreeze must be"):
        finetune(data, tmp_path / "out2", FinetuneConfig(**{**TINY, "unfreeze": 99}), progress=False,
                 log=lambda line: None)
    with pytest.raises(FewShotError, match="--ways must be"):
        finetune(data, tmp_path / "out2", FinetuneConfig(**{**TINY, "ways": 1}), progress=False,
                 log=lambda line: None)
    assert not (tmp_path / "out2" / WEIGHTS_FILE).exists()


def test_frozen_units_run_on_onnx_runtime_as_in_pytorch():
    """The cache and the head's phase run frozen units on ONNX Runtime: same numbers as PyTorch, and
    the static padding it needs is made on a copy, never on the network being trained."""
    import torch

    from fewshot.finetune.cache import frozen_inference as _frozen_inference
    from fewshot.runtimes import wrap_network

    network = build_network(untrained_trunk("efficientnet_lite0"), 1280).eval()
    units = list(network.body)
    lower, top = torch.nn.Sequential(*units[:-3]), torch.nn.Sequential(*units[-3:], network.pool)
    keys = list(network.state_dict())
    pixels = torch.randint(0, 256, (5, 3, 57, 57), dtype=torch.uint8)
    wrapped = wrap_network(lower, (0.5,) * 3, (0.5,) * 3)
    onnx_lower = _frozen_inference(wrapped, "cpu", (57, 57))
    assert type(onnx_lower).__name__ == "OnnxRuntime"
    with torch.no_grad():
        expected = wrapped(pixels).numpy()
        maps = lower(pixels.float() / 127.5 - 1)
        expected_top = top(maps).flatten(1).numpy()
    np.testing.assert_allclose(onnx_lower(pixels.numpy()), expected, atol=1e-4)
    onnx_top = _frozen_inference(top, "cpu", example=maps[:2])
    np.testing.assert_allclose(onnx_top(maps.numpy()).reshape(5, -1), expected_top, atol=1e-4)
    assert list(network.state_dict()) == keys


@pytest.mark.skipif(not (SHARED_DATA / "omniglot" / "images_background.npz").is_file(),
                    reason="needs ../shared/data/omniglot (the shared evaluation data)")
def test_command_end_to_end_on_omniglot_characters(tmp_path):
    """The command as a user runs it: finetune on 16 characters, then embed with the result."""
    def fewshot(*args):
        return subprocess.run([sys.executable, "-m", "fewshot.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600)

    assert fewshot("omniglot", SHARED_DATA / "omniglot" / "images_background.npz", tmp_path / "chars",
                   "--classes", "16").returncode == 0
    run = fewshot("finetune", tmp_path / "chars", tmp_path / "tuned", "--image-size", 64, "--unfreeze", 2,
                  "--epochs", 2, "--views", 2, "--val-classes", 0.25, "--quiet")
    assert run.returncode in (0, 1), run.stderr
    assert ("fine-tuning helped" in run.stdout) == (run.returncode == 0), run.stdout
    assert "frozen" in run.stdout and "+-" in run.stdout
    if run.returncode == 1:
        assert "NOT kept" in run.stderr
        return
    embedded = fewshot("embed", tmp_path / "chars", tmp_path / "emb", "--encoder", f"finetuned:{tmp_path / 'tuned'}",
                       "--quiet", "--cache-dir", tmp_path / "cache")
    assert embedded.returncode == 0, embedded.stderr
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    assert meta["count"] == 320 and meta["encoder"].startswith("finetuned:")


@pytest.mark.parametrize("options", [{"method": "cosine"}, {"unfreeze": 0}, {"unfreeze": "all", "image_size": 32},
                                     {"rotate_classes": True}, {"rotate_classes": True, "method": "cosine"}])
def test_other_methods_and_depths_run_and_load(tmp_path, options):
    data = glyphs(tmp_path / "data", seed=2)
    config = FinetuneConfig(**{**TINY, "epochs": 1, "keep_anyway": True, **options})
    report = finetune(data, tmp_path / "out", config, progress=False, log=lambda line: None)
    assert report.kept and report.history and report.history[0]["phase"] == "head"
    assert report.unfrozen_units == {0: 0, "all": report.total_units}.get(options.get("unfreeze"), 2)
    assert report.stopped == ("nothing to unfreeze" if options.get("unfreeze") == 0 else "epochs")
    enc = create_encoder(f"finetuned:{tmp_path / 'out'}", runtime="torch")
    assert enc.embed_images([Image.new("L", (40, 40), 255)]).shape == (1, 1280)


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_is_recalibrated_once_then_held(batchnorm):
    """--batchnorm frozen: the top units' statistics are re-estimated on the data before phase 2 and
    do not move while their weights train; in train mode they follow the batches."""
    import torch

    from fewshot.finetune.training import Trainer as _Trainer, batchnorm_modules, phase_two as _phase_two, recalibrate_batchnorm as _recalibrate_batchnorm
    from fewshot.finetune.views import view_plan

    torch.manual_seed(0)
    network = build_network(untrained_trunk("efficientnet_lite0"), 1280)
    top = torch.nn.Sequential(*list(network.body)[-2:])
    cache = torch.randn(1, 40, 192, 3, 3).half() * 3 + 1  # (views, images, channels, h, w) below the top
    labels = np.repeat(np.arange(8), 5)
    cfg = FinetuneConfig(batchnorm=batchnorm, ways=4, queries=2, epochs=1, lr=1e-2)
    trainer = _Trainer(network, top, cache, labels, np.arange(40), 8, view_plan(1, False), cfg, "cpu")
    norm = batchnorm_modules(top)[0]
    initial = norm.running_mean.clone()
    recalibrated = copy.deepcopy(top)
    _recalibrate_batchnorm(trainer, recalibrated)  # what phase 2 starts from in frozen mode
    expected = batchnorm_modules(recalibrated)[0].running_mean
    assert not torch.allclose(expected, initial)  # estimated on the data
    weight = norm.weight.detach().clone()
    for p in top.parameters():
        p.requires_grad_(True)
    network.head.requires_grad_(True)
    best = {"accuracy": 0.0, "state": None, "epoch": 0}
    _phase_two(trainer, network, top, cfg, best, [], lambda: 0.0, lambda: None, False, None, lambda line: None)
    assert not torch.equal(norm.weight, weight)  # trained either way
    assert torch.equal(norm.running_mean, expected) == (batchnorm == "frozen")
    assert not torch.equal(norm.running_mean, initial)
