"""Fixtures several test files share."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.lora import STACKED


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores, for torch here and for the processes the
    tests start (CLI runs, `accelerate launch`). The toy models' operations are small: more threads than
    cores make every one of them wait on the others (three times slower on 2 cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_pipeline():
    from dt_lora import toy

    return toy.load()


@pytest.fixture(scope="session")
def toy_shields(tmp_path_factory) -> dict[str, Path]:
    """concept → a copy of the shipped shield adapters/toy-<concept>.safetensors. Training the four would take
    minutes; `python -m worlds.toy.shields` trained them with their recipes, and test_shipped_shields checks
    that they still are what those recipes train."""
    from dt_lora.recipes import adapter_path

    folder = tmp_path_factory.mktemp("shields")
    return {concept: Path(shutil.copy(adapter_path(f"toy-{concept}"), folder)) for concept in STACKED}


# ---- stand-ins for the weights of real-model metrics (random, nothing downloaded)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FID Inception, randomly initialised (its constructor would download weights)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})  # no download
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # He init keeps activations O(1) through the ~100 layers
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel (32×32 images) with the toy model's CLIP tokenizer, as save_pretrained writes it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {"vocab_size": 624, "bos_token_id": 622, "eos_token_id": 623, "pad_token_id": 623,  # the toy tokenizer's
            "max_position_embeddings": 16}
    config = CLIPConfig(
        text_config={**text, **tower},
        vision_config={"image_size": 32, "patch_size": 8, **tower},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    from dt_lora import toy

    tokenizer = CLIPTokenizer.from_pretrained(toy.MODEL_DIR / "tokenizer", local_files_only=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
