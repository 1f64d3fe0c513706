"""The GPU path (skipped without CUDA; run on a GPU machine): data, buffers and model stay on the
device, bf16 / compile / channels-last runs learn, and the GPU agrees with the CPU."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_replay_run_keeps_data_buffer_and_model_on_the_gpu(run_debug):
    summary, run_dir = run_debug("device=cuda", "strategy=derpp")
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["peak_gpu_mem_mb"] > 0
    saved = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert all(v.device.type == "cuda" for v in saved["buffer"]["data"].values())
    assert all(v.device.type == "cuda" for v in saved["model"].values())


def test_bf16_compile_channels_last_learn(run_debug):
    # cumulative training of a small CNN: 0.97 on the CPU in fp32
    summary, _ = run_debug(
        "device=cuda",
        "model=cnn",
        "~model.hidden_sizes",
        "model.channels=[16,32]",
        "precision=bf16",
        "compile=true",
        "channels_last=true",
        "strategy=cumulative",
    )
    assert summary["status"] == "completed" and summary["final_avg_acc"] > 0.8


@pytest.mark.parametrize("strategy", ["naive", "replay", "lwf", "ewc", "gem"])
def test_gpu_and_cpu_reach_the_same_accuracy(run_debug, strategy):
    gpu, _ = run_debug("device=cuda", f"strategy={strategy}")
    cpu, _ = run_debug("device=cpu", f"strategy={strategy}")
    assert abs(gpu["final_avg_acc"] - cpu["final_avg_acc"]) < 0.05, (gpu, cpu)


def test_unlearning_request_on_the_gpu(run_debug):
    summary, _ = run_debug(
        "device=cuda", "strategy=amnesiac_replay", "unlearning.requests={2: [1]}"
    )
    block = summary["unlearning"]
    assert block["events"][0]["buffer_samples_removed"] > 0 and "forgotten" in block["reference"]


@pytest.mark.parametrize("strategy", ["replay", "derpp", "xder"])
def test_deterministic_gpu_run_repeats_bit_for_bit(run_debug, strategy):
    overrides = ("device=cuda", "deterministic=true", f"strategy={strategy}")
    (a, dir_a), (b, dir_b) = run_debug(*overrides), run_debug(*overrides)
    assert a["status"] == b["status"] == "completed"
    ma = torch.load(dir_a / "checkpoint" / "state.pt", weights_only=True)["model"]
    mb = torch.load(dir_b / "checkpoint" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
