"""celo2.torch_cuda.Celo2CUDA (the GPU engine from PyTorch). Without a CUDA device (or in a
build without the GPU engine) the constructor must refuse with a clear error, which is
tested everywhere; the numeric tests need a device and skip otherwise (CELO2_REQUIRE_GPU=1
makes a missing device a failure): the GPU optimizer's parameters after several steps
equal the CPU optimizer's (celo2.torch.Celo2) within 1e-4 of the change (max|err|/RMS,
spec §8), bfloat16 models train, and checkpoints move between the two."""
import os

import pytest
import torch

import celo2
from celo2 import _celo2
from celo2.torch import Celo2
from celo2.torch_cuda import Celo2CUDA
from tinylm import TinyLM

HAVE_GPU = _celo2.gpu_engine_supported() and torch.cuda.is_available()
if not HAVE_GPU and os.environ.get("CELO2_REQUIRE_GPU") == "1":
    raise RuntimeError("CELO2_REQUIRE_GPU=1 but the GPU engine or a CUDA device is missing")
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs the GPU engine and a CUDA device")


def loss_of(model, t, device):
    g = torch.Generator().manual_seed(t)
    x = torch.randint(0, 17, (4, 6), generator=g)
    y = (3 * x + 1) % 17
    out = model(x.to(device)).float()
    return torch.nn.functional.cross_entropy(out.reshape(-1, 17), y.to(device).reshape(-1))


@pytest.mark.skipif(HAVE_GPU, reason="the refusal without a GPU")
def test_refuses_clearly_without_a_gpu():
    model = TinyLM()
    with pytest.raises(RuntimeError, match="CUDA|GPU engine"):
        Celo2CUDA(model.named_parameters(), lr=1e-2)


@needs_gpu
def test_matches_the_cpu_optimizer():
    torch.manual_seed(0)
    cpu_model = TinyLM()
    gpu_model = TinyLM().cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    init = {k: v.clone() for k, v in cpu_model.state_dict().items()}
    opts = dict(lr=1e-2, weight_decay=0.01, communicator="local")
    cpu_opt = Celo2(cpu_model.named_parameters(), **opts)
    gpu_opt = Celo2CUDA(gpu_model.named_parameters(), lr=1e-2, weight_decay=0.01)
    for t in range(4):
        for model, opt, dev in ((cpu_model, cpu_opt, "cpu"), (gpu_model, gpu_opt, "cuda")):
            opt.zero_grad()
            loss_of(model, t, dev).backward()
            opt.step()
    for k, v in cpu_model.state_dict().items():
        got = gpu_model.state_dict()[k].cpu()
        dc, dg = v - init[k], got - init[k]
        err = (dg - dc).abs().max() / dc.pow(2).mean().sqrt().clamp_min(1e-30)
        assert err <= 1e-4, (k, float(err))


@needs_gpu
def test_bfloat16_model_trains_and_checkpoints_move_to_the_cpu(tmp_path):
    torch.manual_seed(1)
    model = TinyLM().cuda().to(torch.bfloat16)
    opt = Celo2CUDA(model.named_parameters(), lr=1e-2)
    losses = []
    for t in range(30):
        opt.zero_grad()
        loss = loss_of(model, t % 4, "cuda")
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    opt.save(tmp_path / "gpu.state")
    cpu = Celo2(TinyLM().named_parameters(), lr=1e-2, communicator="local")
    cpu.load(tmp_path / "gpu.state")
    assert cpu.status()["step"] == 30
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.last_report["step"] == 30
