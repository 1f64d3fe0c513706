"""``model=timm``: any timm model as a backbone, its input fitted on the device, weights from a
file, a clrun run or the hub (offline: one line), a frozen backbone that stays bit-identical."""

import json

import pytest
import torch

timm = pytest.importorskip("timm")

from clrun.benchmarks import synthetic  # noqa: E402
from clrun.config import build_model  # noqa: E402
from clrun.errors import ConfigError  # noqa: E402
from clrun.models import timm_model  # noqa: E402
from clrun.models.timm import WeightsUnavailable  # noqa: E402

# a two-block ViT-Tiny on 16×16 images, 4×4 patches: seconds per run on a CPU
TINY = (
    "model=timm",
    "model.name=vit_tiny_patch16_224",
    "model.img_size=16",
    "model.patch_size=4",
    "+model.create_args.depth=2",
)


def tiny(**kw):
    args = {"img_size": 16, "patch_size": 4, "create_args": {"depth": 2}, **kw}
    return timm_model((1, 8, 8), 10, name="vit_tiny_patch16_224", **args)


def test_the_model_reports_its_input_and_the_benchmark_fits_it():
    model = tiny()
    spec = model.input_spec
    assert spec.channels == 3 and spec.size == (16, 16) and len(spec.mean) == 3
    b = synthetic()  # 1×8×8 uint8 images
    b.fit_input(spec)
    ex = b.test_stream[0]
    x = b.prepare(ex.x[:5], ex.e[:5])
    assert x.shape == (5, 3, 16, 16)
    # by hand: [0, 1] pixels, grey to 3 channels, bilinear resize, the weights' mean and std
    raw = ex.x[:5].float() / 255
    want = torch.nn.functional.interpolate(
        raw.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False
    )
    want = (want - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    torch.testing.assert_close(x, want)
    assert model(x).shape == (5, 10) and model.backbone(x).shape == (5, 192)


def test_flat_inputs_are_refused_in_one_line():
    from conftest import make_cfg

    b = synthetic()
    b.input_shape = (64,)
    with pytest.raises(ConfigError, match="takes images"):
        build_model(make_cfg(*TINY), b, torch.device("cpu"))


def test_weights_from_a_file_load_exactly_and_mismatches_are_listed(tmp_path):
    from safetensors.torch import save_file

    source = tiny().backbone.net
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)
    save_file(state, tmp_path / "vit.safetensors")
    torch.save({"model": state}, tmp_path / "vit.pth")  # a wrapped checkpoint, as published
    for f in ("vit.safetensors", "vit.pth"):
        loaded = tiny(weights=str(tmp_path / f)).backbone.net
        for k, v in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (f, k)
    del state["cls_token"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"1 missing \(cls_token\); 1 unexpected \(extra.weight"):
        tiny(weights=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsUnavailable, match="no such file or run directory"):
        tiny(weights=str(tmp_path / "nothing.pth"))


def test_another_image_size_resamples_the_position_embedding(tmp_path):
    source = timm_model(
        (1, 8, 8),
        10,
        name="vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        create_args={"depth": 2},
    )
    torch.save(source.backbone.net.state_dict(), tmp_path / "vit32.pth")
    loaded = tiny(weights=str(tmp_path / "vit32.pth")).backbone.net  # 16×16: 16 patches, not 64
    assert loaded.pos_embed.shape == (1, 17, 192)
    assert torch.equal(
        loaded.blocks[1].mlp.fc1.weight, source.backbone.net.blocks[1].mlp.fc1.weight
    )


def test_hub_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set it here too
    with pytest.raises(WeightsUnavailable, match=r"huggingface.co/timm/vit_tiny_patch16_224"):
        tiny(weights="hub")


def test_unknown_name_and_missing_timm(monkeypatch):
    with pytest.raises(ConfigError, match="did you mean vit_tiny_patch16_224"):
        timm_model((1, 8, 8), 10, name="vit_tiny_patch16_22")
    import importlib

    real = importlib.import_module

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_timm)
    with pytest.raises(ConfigError, match=r"needs timm .*clrun\[pretrained\]"):
        tiny()


def test_pretrain_in_one_run_continue_from_its_directory_frozen(run_debug):
    """``strategy=joint`` pretrains; a second run loads that backbone (``model.weights=<run
    dir>``), freezes it (bit-identical after training) and trains only its head."""
    first, first_dir = run_debug(*TINY, "strategy=joint", "strategy.epochs=1")
    assert first["status"] == "completed"
    saved = torch.load(first_dir / "checkpoint" / "state.pt", weights_only=True)["model"]
    second, second_dir = run_debug(
        *TINY, f"model.weights={first_dir}", "model.freeze=backbone", "strategy.epochs=1"
    )
    after = torch.load(second_dir / "checkpoint" / "state.pt", weights_only=True)["model"]
    backbone = [k for k in after if k.startswith("backbone.net.")]
    assert backbone and all(torch.equal(after[k], saved[k]) for k in backbone)
    head = "head.units.linear.weight"  # the incremental head: trained in the second run
    assert not torch.equal(after[head], saved[head])
    summary = json.loads((second_dir / "summary.json").read_text())
    assert summary["model"] == "timm" and summary["status"] == "completed"


def test_a_run_of_another_model_cannot_give_timm_weights(run_debug):
    _, mlp_dir = run_debug("strategy.epochs=1")
    with pytest.raises(ConfigError, match="is not a timm model"):
        tiny(weights=str(mlp_dir))
