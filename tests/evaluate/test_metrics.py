"""Quality-metric plumbing (dt_lora.evaluate.metrics) on toy inputs, with nothing downloaded.

The Inception and CLIP networks are randomly initialised stand-ins saved as a user would provide
them, so the numbers are not meaningful FIDs, only the behaviour is: a set is at distance ~0 from
itself and far from noise, IS >= 1, CLIP score in [0, 100], and every missing or unsafe weight file
is named in a MissingWeights error.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dt_lora import toy
from dt_lora.evaluate.metrics import CaptionsError, MissingWeights, quality_metrics, read_captions
from dt_lora.toy import world


@pytest.fixture(scope="module")
def toy_set():
    images, scenes = world.sample(8, 0)
    return images, [world.prompt_for(s.shape, s.colour, "a photo of a {colour} {shape}") for s in scenes]


# ---------------------------------------------------------------- captions


def test_read_captions_text_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red circle\n\n  a photo of a blue star  \nune étoile verte\n", encoding="utf-8")
    assert read_captions(path) == ["a red circle", "a photo of a blue star", "une étoile verte"]


def test_read_captions_coco_json(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({
        "info": {}, "images": [{"id": 1}, {"id": 2}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A man riding a horse. "},
                        {"image_id": 1, "id": 11, "caption": "A horse and its rider.\n"},
                        {"image_id": 2, "id": 12, "caption": "Two cats on a sofa."}],
    }))
    assert read_captions(path) == ["A man riding a horse.", "A horse and its rider.", "Two cats on a sofa."]


@pytest.mark.parametrize("name, content, complaint", [
    ("broken.json", '{"annotations": [{"caption": "a cat"}', "not valid JSON"),
    ("captions.json", '{"images": []}', "no 'annotations' list"),
    ("captions.json", '{"annotations": [{"caption": "a cat"}, {"image_id": 3}]}', "annotations[1] has no 'caption'"),
    ("captions.json", '[{"caption": "a cat"}]', "no 'annotations' list"),
    ("captions.txt", "\n   \n", "holds no captions"),
    ("captions.txt", b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_read_captions_rejects_malformed_files(tmp_path, name, content, complaint):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CaptionsError, match="captions file") as error:
        read_captions(path)
    assert complaint in str(error.value) and str(path) in str(error.value)


def test_read_captions_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file .*nope.txt does not exist"):
        read_captions(tmp_path / "nope.txt")


# ---------------------------------------------------------------- FID / IS


def test_fid_of_a_set_with_itself_is_zero_and_is_is_at_least_one(inception_weights, toy_set):
    images, _ = toy_set
    result = quality_metrics(images, metrics=("fid", "is"), reference_images=images.copy(),
                             inception_weights=inception_weights, is_splits=2, batch_size=5)
    assert set(result) == {"fid", "is", "is_std"}
    assert abs(result["fid"]) < 1e-2
    assert math.isfinite(result["is"]) and result["is"] >= 1.0
    assert math.isfinite(result["is_std"]) and result["is_std"] >= 0.0

    # The extractor loaded from safetensors is the one torch-fidelity builds from its own checkpoint.
    from torch_fidelity import calculate_metrics

    checkpoint = inception_weights.parent / "trusted-test-copy.pth"  # written by this test, not a user file
    torch.save(load_file(inception_weights), checkpoint)
    dataset = _ListDataset([torch.from_numpy(image).permute(2, 0, 1) for image in images])
    reference = calculate_metrics(input1=dataset, isc=True, isc_splits=2, cuda=False, cache=False,
                                  verbose=False, save_cpu_ram=True, feature_extractor_weights_path=str(checkpoint))
    assert result["is"] == pytest.approx(reference["inception_score_mean"], rel=1e-5)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_fid_against_a_folder_of_noise_is_large(inception_weights, toy_set, tmp_path):
    from PIL import Image

    images, _ = toy_set
    rng = np.random.default_rng(1)
    for i in range(6):  # another size and aspect: centre-cropped and resized to 32×32 on the way in
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"noise{i}.png")
    (tmp_path / "notes.txt").write_text("not an image: ignored")
    result = quality_metrics(images, metrics=("fid",), reference_images=tmp_path, inception_weights=inception_weights)
    assert set(result) == {"fid"}
    assert result["fid"] > 1.0


# ---------------------------------------------------------------- CLIP score


def test_clip_score(clip_folder, toy_set):
    images, captions = toy_set
    captions = captions[:-1] + ["a very long caption " * 10]  # past the 16-token limit: truncated, not an error
    result = quality_metrics(images, captions, metrics=("clip",), clip_model=clip_folder)
    assert set(result) == {"clip"}
    assert math.isfinite(result["clip"]) and 0.0 <= result["clip"] <= 100.0
    # Batching does not change the score.
    again = quality_metrics(images, captions, metrics=("clip",), clip_model=clip_folder, batch_size=3)
    assert again["clip"] == pytest.approx(result["clip"], rel=1e-4, abs=1e-4)


def test_clip_score_needs_one_caption_per_image(clip_folder, toy_set):
    images, captions = toy_set
    with pytest.raises(ValueError, match="one caption per image: 8 images, 7 captions"):
        quality_metrics(images, captions[:7], metrics=("clip",), clip_model=clip_folder)


# ---------------------------------------------------------------- missing weights


class _Tripwire:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _inception_error(images, weights):
    with pytest.raises(MissingWeights) as error:
        quality_metrics(images, metrics=("is",), inception_weights=weights, is_splits=2)
    return str(error.value)


def test_missing_inception_weights_are_named(tmp_path, toy_set):
    images, _ = toy_set
    message = _inception_error(images, None)
    assert "Inception (FID/IS) needs weights" in message and "--inception-weights" in message

    message = _inception_error(images, tmp_path / "absent.safetensors")
    assert "absent.safetensors do not exist" in message and "--inception-weights" in message

    assert "are a folder, not a .safetensors file" in _inception_error(images, tmp_path)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file at all")
    assert "garbage.safetensors are not a safetensors file" in _inception_error(images, garbage)

    wrong = tmp_path / "wrong.safetensors"  # a safetensors file of some other model
    save_file({"layer.weight": torch.zeros(2, 2)}, wrong)
    message = _inception_error(images, wrong)
    assert "wrong.safetensors are not the FID Inception's state dict" in message and "Missing key" in message


def test_a_pickle_is_refused_without_being_unpickled(tmp_path, toy_set):
    images, _ = toy_set
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _Tripwire(marker)}, pickled)
    legacy = tmp_path / "legacy.safetensors"  # a bare pickle, whatever its name says
    torch.save({"payload": _Tripwire(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (pickled, legacy):
        message = _inception_error(images, path)
        assert f"{path} are a PyTorch pickle" in message and "never unpickles" in message
    assert not marker.exists()


def test_missing_clip_model_is_named(tmp_path, clip_folder, toy_set):
    images, captions = toy_set

    def error(folder):
        with pytest.raises(MissingWeights) as raised:
            quality_metrics(images, captions, metrics=("clip",), clip_model=folder)
        return str(raised.value)

    assert "CLIP score needs a local CLIP model: pass --clip PATH" in error(None)
    assert "absent does not exist" in error(tmp_path / "absent")

    pickled = tmp_path / "pickled"
    shutil.copytree(clip_folder, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle")
    assert "no .safetensors weights (only pytorch_model.bin, a pickle dt-lora will not load)" in error(pickled)

    text_only = tmp_path / "text_encoder"
    shutil.copytree(toy.MODEL_DIR / "text_encoder", text_only)
    assert "holds a 'clip_text_model' model, not a full CLIP model" in error(text_only)

    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_folder / name, no_processor)
    assert f"CLIP model folder {no_processor} could not be loaded" in error(no_processor)


def test_every_missing_weight_is_reported_before_any_work(tmp_path, toy_set):
    images, captions = toy_set
    with pytest.raises(MissingWeights) as error:
        quality_metrics(images, captions, reference_images=images, is_splits=2)
    message = str(error.value)
    assert "--inception-weights" in message and "--clip" in message
    assert isinstance(error.value, FileNotFoundError)


def test_bad_arguments(toy_set, inception_weights):
    images, _ = toy_set
    with pytest.raises(ValueError, match="unknown metrics \\['kid'\\]"):
        quality_metrics(images, metrics=("fid", "kid"))
    with pytest.raises(ValueError, match="FID needs reference images"):
        quality_metrics(images, metrics=("fid",), inception_weights=inception_weights)
    with pytest.raises(ValueError, match="IS with 10 splits needs at least 10 images, got 8"):
        quality_metrics(images, metrics=("is",), inception_weights=inception_weights)
    with pytest.raises(ValueError, match="images must be a uint8 NHWC RGB array, got float32"):
        quality_metrics(images.astype(np.float32), metrics=("is",), inception_weights=inception_weights, is_splits=2)
    with pytest.raises(FileNotFoundError, match="reference image folder .* does not exist"):
        quality_metrics(images, metrics=("fid",), reference_images="/no/such/folder",
                        inception_weights=inception_weights)
