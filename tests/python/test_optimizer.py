"""celo2.torch.Celo2 on one process: the torch.optim contract (step, zero_grad, closures,
LR schedulers), state_dict round trips that resume exactly and are interchangeable with the
engine's checkpoint files, parameters that need a float32 master copy, and clear Python
exceptions for bad arguments."""
import os

import numpy as np
import pytest
import torch

import celo2
from celo2.torch import Celo2
from dist_worker import TORCH_LOAD_KW
from tinylm import TinyLM


def batch(t):
    g = torch.Generator().manual_seed(t)
    x = torch.randint(0, 17, (4, 6), generator=g)
    return x, (3 * x + 1) % 17  # learnable: a fixed permutation of the tokens


def loss_of(model, t):
    x, y = batch(t)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 17), y.reshape(-1))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM()
    kw.setdefault("schedule", "cosine:lr=1e-2,warmup=3,total=20,final=0.1")
    kw.setdefault("communicator", "local")
    return model, Celo2(model.named_parameters(), **kw)


def train(model, opt, first, last):
    losses = []
    for t in range(first, last):
        opt.zero_grad()
        loss = loss_of(model, t)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return losses


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trains_and_labels():
    model, opt = make()
    losses = train(model, opt, 0, 20)
    assert losses[-1] < losses[0] - 0.3, losses
    st = opt.status()
    assert st["step"] == 20 and st["world_size"] == 1 and st["backend"] == "local"
    # Seed default: embeddings and 1-D tensors to AdamW, matrices to Celo2.
    assert st["elements_by_label"]["adamw"] == 17 * 8 + 16 + 16 + 16
    assert "embed.weight" in opt.routing_table()
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.last_report["lr"])


def test_grads_are_views_of_the_engine_buffer():
    model, opt = make()
    loss_of(model, 0).backward()
    w = model.fc.weight
    assert w.grad.data_ptr() == opt.grad_buffer[opt._engine.offset_of(opt.names.index("fc.weight"))
                                                 :].data_ptr()
    opt.zero_grad()
    assert float(opt.grad_buffer.abs().sum()) == 0.0


def test_set_to_none_and_replaced_grads_are_copied():
    torch.manual_seed(0)
    a, oa = make()
    b, ob = make()
    for t in range(5):
        oa.zero_grad()
        loss_of(a, t).backward()
        oa.step()
        ob.zero_grad(set_to_none=True)
        loss_of(b, t).backward()  # fresh .grad tensors, not the buffer's views
        ob.step()
    for n, p in params(a).items():
        assert torch.equal(p, params(b)[n]), n


def test_closure_and_lr_scheduler():
    model, opt = make(schedule=None, lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    for t in range(3):
        loss = opt.step(lambda: (opt.zero_grad(), loss_of(model, t))[1].__class__ and _closure(model, opt, t))
        assert torch.is_tensor(loss)
        assert opt.last_report["lr"] == pytest.approx(5e-3 * 0.5 ** t)
        sched.step()


def _closure(model, opt, t):
    opt.zero_grad()
    loss = loss_of(model, t)
    loss.backward()
    return loss


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    model, opt = make()
    train(model, opt, 0, 7)
    sd = opt.state_dict()
    saved = params(model)
    torch.save({"opt": sd}, tmp_path / "ck.pt")
    train(model, opt, 7, 15)
    want = params(model)

    model2, opt2 = make(seed=123)  # different init: everything must come from the checkpoint
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.copy_(saved[n])
    opt2.load_state_dict(torch.load(tmp_path / "ck.pt", **TORCH_LOAD_KW)["opt"])
    assert opt2.status()["step"] == 7
    train(model2, opt2, 7, 15)
    for n, p in params(model2).items():
        assert torch.equal(p, want[n]), n


def test_state_dict_is_the_engine_checkpoint(tmp_path):
    model, opt = make()
    train(model, opt, 0, 4)
    path = tmp_path / "optimizer.state"
    opt.save(path)
    sd = opt.state_dict()
    assert sd["celo2_state_file"] == path.read_bytes()
    st = celo2.read_state_file(sd["celo2_state_file"])
    assert st["step"] == 4
    assert st["tensors"]["fc.weight"]["label"] == "celo2"
    assert st["tensors"]["fc.weight"]["m"].shape == (3, 16, 8)
    assert st["tensors"]["embed.weight"]["label"] == "adamw"
    # And an engine file loads through load_state_dict (and load()).
    model2, opt2 = make()
    opt2.load_state_dict({"celo2_state_file": path.read_bytes()})
    assert opt2.status()["step"] == 4
    model3, opt3 = make()
    opt3.load(path)
    assert opt3.status()["step"] == 4


def test_master_copies_for_other_dtypes():
    torch.manual_seed(0)
    a, oa = make()
    torch.manual_seed(0)
    b = TinyLM()
    b.load_state_dict(a.state_dict())
    b = b.to(torch.float64)
    ob = Celo2(b.named_parameters(), schedule="cosine:lr=1e-2,warmup=3,total=20,final=0.1",
               communicator="local")
    for t in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            loss_of(m, t).backward() if m is a else _float64_loss(m, t).backward()
            o.step()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pb.dtype == torch.float64
        assert torch.allclose(pa.double(), pb, atol=1e-5), n


def _float64_loss(model, t):
    x, y = batch(t)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 17), y.reshape(-1))


def test_frozen_parameters_are_not_registered():
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.weight.requires_grad_(False)
    opt = Celo2(model.named_parameters(), communicator="local")
    assert "embed.weight" not in opt.names
    before = model.embed.weight.clone()
    train(model, opt, 0, 2)
    assert torch.equal(before, model.embed.weight)


def test_control_plane_starts_on_loopback(tmp_path):
    if not celo2.control_supported():
        pytest.skip("built without the gRPC control plane")
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    token.chmod(0o600)
    model, opt = make(control="127.0.0.1:0", control_token_file=str(token))
    train(model, opt, 0, 2)
    addr = opt.control_address
    assert addr.startswith("127.0.0.1:") and int(addr.rsplit(":", 1)[1]) > 0
    assert opt.status()["control_address"] == addr


# ------------------------------------------------------------------ bad arguments
def _model():
    torch.manual_seed(0)
    return TinyLM()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-1.0), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(betas=(0.9, 1.5)), ValueError, "betas"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(variant="celo3"), ValueError, "variant"),
    (dict(grads="mean"), ValueError, "grads must be"),
    (dict(nan_policy="ignore"), ValueError, "nan_policy"),
    (dict(schedule="cosine:lr=1e-3,warmup=-5"), ValueError, "schedule"),
    (dict(schedule="sawtooth:lr=1"), ValueError, "schedule"),
    (dict(rules="re:([ => adamw"), ValueError, "rules"),
    (dict(rules="* => sgd"), ValueError, "rules"),
    (dict(theta="/nonexistent/theta.state"), FileNotFoundError, "theta"),
    (dict(theta=b"not msgpack"), celo2.FormatError, r"theta \(11 bytes\): MessagePack"),
    (dict(config={"ns_iterz": 3}), celo2.FormatError, "ns_iterz"),
    (dict(communicator="nccl2"), ValueError, "communicator"),
    (dict(schedule=3), TypeError, "schedule"),
])
def test_bad_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Celo2(_model().named_parameters(), **kwargs)


def test_bad_params_raise():
    m = _model()
    with pytest.raises(ValueError, match="empty"):
        Celo2([], communicator="local")
    with pytest.raises(ValueError, match="appears twice"):
        Celo2([("a", m.fc.weight), ("a", m.fc.bias)], communicator="local")
    with pytest.raises(ValueError, match="appears twice"):
        Celo2([("a", m.fc.weight), ("b", m.fc.weight)], communicator="local")
    with pytest.raises(TypeError, match="tensor"):
        Celo2([("a", 3)], communicator="local")
    with pytest.raises(ValueError, match="own betas"):
        Celo2([{"params": [m.fc.weight]}, {"params": [m.fc.bias], "betas": (0.8, 0.9)}], communicator="local")
    with pytest.raises(ValueError, match="weight_decay .* must be a finite number"):
        Celo2([{"params": [m.fc.bias], "weight_decay": -1.0}], communicator="local")


def test_bad_use_raises(tmp_path):
    model, opt = make()
    train(model, opt, 0, 1)
    with pytest.raises(RuntimeError, match="registers its tensors once"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="not a Celo2 state_dict"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    with pytest.raises(celo2.FormatError):
        opt.load_state_dict({"celo2_state_file": b"\x00garbage"})
    other, other_opt = make()
    other_opt2 = Celo2([("x", torch.nn.Parameter(torch.zeros(4, 4)))], communicator="local")
    with pytest.raises(celo2.FormatError, match="tensors"):
        other_opt2.load_state_dict(opt.state_dict())
    # Rank 0 reads and shares its verdict with every rank: a FormatError naming the file.
    with pytest.raises(celo2.FormatError, match="missing.state"):
        opt.load(tmp_path / "missing.state")
    model.fc.weight.data = model.fc.weight.data.clone()  # reallocated behind the optimizer's back
    with pytest.raises(RuntimeError, match="reallocated"):
        opt.step()


def test_nan_policy_error_raises_nonfinite():
    model, opt = make(nan_policy="error")
    loss_of(model, 0).backward()
    model.fc.weight.grad[0, 0] = float("nan")
    with pytest.raises(celo2.NonFiniteGradientError):
        opt.step()


def test_nan_policy_skip_counts():
    model, opt = make()
    loss_of(model, 0).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    before = params(model)
    opt.step()
    assert opt.last_report["skipped"] and opt.status()["skipped"] == 1
    for n, p in params(model).items():
        assert torch.equal(p, before[n])


def test_published_celo_v1_weights_are_refused(shared_dir):
    path = os.path.join(shared_dir, "weights", "celo-v1", "theta.state")
    if not os.path.exists(path):
        pytest.skip("no celo-v1 weights in shared/")
    with pytest.raises(celo2.FormatError):
        Celo2(_model().named_parameters(), theta=path, communicator="local")


def test_published_celo2_weights_load(shared_dir):
    path = os.path.join(shared_dir, "weights", "celo2", "theta.state")
    if not os.path.exists(path):
        pytest.skip("no published Celo2 weights in shared/")
    model, opt = make(theta=path)
    assert opt.status()["theta_sha256"] == celo2.theta_sha256(path)
    losses = train(model, opt, 0, 10)
    assert np.isfinite(losses).all()


def test_celo2ctl_attaches_to_a_python_trainer(tmp_path):
    """The README's `celo2ctl status` against a PyTorch trainer's control plane."""
    import subprocess

    ctl = os.environ.get("CELO2_CTL")
    if not celo2.control_supported() or not ctl or not os.path.exists(ctl):
        pytest.skip("needs the control plane and celo2ctl (CELO2_CTL)")
    token = tmp_path / "token"
    token.write_text("another-test-token-0123456789\n")
    token.chmod(0o600)
    model, opt = make(control="127.0.0.1:0", control_token_file=str(token))
    train(model, opt, 0, 3)
    r = subprocess.run([ctl, "--addr", opt.control_address, "--token-file", str(token), "--json", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3" in r.stdout and "schedule" in r.stdout.lower(), r.stdout
    bad = tmp_path / "bad"
    bad.write_text("wrong-token-wrong-token-wrong\n")
    bad.chmod(0o600)
    r = subprocess.run([ctl, "--addr", opt.control_address, "--token-file", str(bad), "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_global_clipping_equals_torch_clip_grad_norm():
    """max_grad_norm inside the step == torch.nn.utils.clip_grad_norm_ before an unclipped
    step (one rank; tests/mpi covers W ranks); opt.grad_norm is what clip_grad_norm_
    returns. Tolerance: 1e-5 of the parameter change (torch takes the norm in float32, the
    engine in double)."""
    ma, a = make(seed=3, max_grad_norm=0.05)
    mb, b = make(seed=3)
    start = params(ma)
    for t in range(5):
        for m, o in ((ma, a), (mb, b)):
            o.zero_grad()
            loss_of(m, t).backward()
        want = torch.nn.utils.clip_grad_norm_(list(mb.parameters()), 0.05)
        a.step()
        b.step()
        assert a.grad_norm == pytest.approx(float(want), rel=1e-5)
        assert a.last_report["clip_scale"] < 1.0
    for (n, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        da, db = pa.detach() - start[n], pb.detach() - start[n]
        err = float((da - db).abs().max() / db.pow(2).mean().sqrt().clamp_min(1e-30))
        assert err <= 1e-5, (n, err)
    a.set_max_grad_norm(0.0)  # off from the next step
    a.zero_grad()
    loss_of(ma, 9).backward()
    a.step()
    assert a.last_report["clip_scale"] == 1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        make(max_grad_norm=-1.0)


def test_parameters_without_gradients_stay_unchanged():
    """As torch.optim: a parameter whose .grad is None in a step (unused in the forward
    pass, zero_grad(set_to_none=True)) is not updated, and its state does not advance."""
    torch.manual_seed(4)
    model = TinyLM()
    extra = torch.nn.Parameter(torch.ones(8, 8))  # a matrix the forward pass never uses
    opt2 = Celo2(list(model.named_parameters()) + [("unused.weight", extra)],
                 schedule="constant:lr=1e-2", communicator="local")
    for t in range(3):
        opt2.zero_grad(set_to_none=True)
        loss_of(model, t).backward()
        opt2.step()
        assert opt2.last_report["no_grad_tensors"] == 1
    assert torch.equal(extra.detach(), torch.ones(8, 8))


def test_unreadable_or_unwritable_files_are_os_errors(tmp_path):
    """Issue 14 D6: a missing file, a directory or a missing folder is an I/O error
    (celo2.FileError: an OSError, and a FormatError as before), not a format error."""
    model, opt = make()
    with pytest.raises(OSError, match="missing.state"):
        opt.load(tmp_path / "missing.state")
    with pytest.raises(celo2.FileError):
        opt.load(tmp_path)  # a directory
    with pytest.raises(OSError, match="no-such-dir"):
        opt.save(tmp_path / "no-such-dir" / "x.state")
    with pytest.raises(celo2.FormatError) as bad:  # a corrupt file stays a format error
        (tmp_path / "bad.state").write_bytes(b"\x00garbage")
        opt.load(tmp_path / "bad.state")
    assert not isinstance(bad.value, OSError)


def _nanogpt_groups(model, wd, nodecay_lr=None):
    """nanoGPT's configure_optimizers: decay on >= 2-D tensors, none on biases and norms."""
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    nodecay = [(n, p) for n, p in named if p.dim() < 2]
    g2 = {"params": nodecay, "weight_decay": 0.0}
    if nodecay_lr is not None:
        g2["lr"] = nodecay_lr
    return [{"params": decay, "weight_decay": wd}, g2]


def test_param_groups_as_torch():
    # Each group's tensors move exactly as under an optimizer whose recipe is that group's
    # lr and decay for every tensor (the update of one tensor does not depend on the others').
    sched = "cosine:lr=1e-2,warmup=3,total=20,final=0.1"
    torch.manual_seed(0)
    a = TinyLM()
    b, c = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    oa = Celo2(_nanogpt_groups(a, 0.1, nodecay_lr=5e-3), lr=1e-2, schedule=sched, communicator="local")
    ob = Celo2(b.named_parameters(), lr=1e-2, schedule=sched, weight_decay=0.1, communicator="local")
    oc = Celo2(c.named_parameters(), lr=1e-2, schedule="cosine:lr=5e-3,warmup=3,total=20,final=0.1",
               weight_decay=0.0, communicator="local")
    assert len(oa.param_groups) == 2 and oa.param_groups[1]["weight_decay"] == 0.0
    for t in range(6):
        oa.zero_grad()
        loss_of(a, t).backward()
        for m in (b, c):  # the same gradients for all three
            for (_, pa), (_, pm) in zip(a.named_parameters(), m.named_parameters()):
                pm.grad = pa.grad.clone()
        for o in (oa, ob, oc):
            o.step()
        assert oa.param_groups[1]["lr"] == pytest.approx(oc.last_report["lr"])
        assert oa.param_groups[0]["lr"] == pytest.approx(ob.last_report["lr"])
    pb, pc = params(b), params(c)
    for n, p in a.named_parameters():
        want = pb[n] if p.dim() >= 2 else pc[n]
        assert torch.equal(p.detach(), want), n
    # The recipe's decay (set_weight_decay, the control plane) does not override a group's own.
    oa.set_weight_decay(0.5)
    assert oa.param_groups[1]["weight_decay"] == 0.0 and oa.param_groups[0]["weight_decay"] == 0.1
    # A trainer's write into param_groups takes effect at the next step (here: lr 0 freezes).
    before = params(a)
    oa.param_groups[1]["lr"] = 0.0
    oa.zero_grad()
    loss_of(a, 9).backward()
    oa.step()
    for n, p in a.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p.detach(), before[n]), n
        else:
            assert not torch.equal(p.detach(), before[n]), n
    # Groups survive a state_dict round trip.
    sd = oa.state_dict()
    a2 = TinyLM()
    oa2 = Celo2(_nanogpt_groups(a2, 0.1, nodecay_lr=5e-3), lr=1e-2, schedule=sched, communicator="local")
    oa2.load_state_dict(sd)
    assert oa2.param_groups[1]["lr"] == 0.0 and oa2._scales == oa._scales
    with pytest.raises(RuntimeError, match="registers its tensors once"):
        oa.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def _bf16_model(seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(torch.bfloat16)


def _bf16_train(model, opt, first, last):
    for t in range(first, last):
        opt.zero_grad()
        x, y = batch(t)
        loss = torch.nn.functional.cross_entropy(model(x).float().reshape(-1, 17), y.reshape(-1))
        loss.backward()
        opt.step()


def test_bf16_masters_follow_the_float32_run():
    # bf16 parameters are updated in place through the engine's float32 masters: given the
    # same gradients, the masters move as float32 parameters do, and the bf16 values are
    # round(master).
    h = _bf16_model()
    f = TinyLM()
    f.load_state_dict({k: v.float() for k, v in h.state_dict().items()})
    oh = Celo2(h.named_parameters(), schedule="constant:lr=1e-2", communicator="local")
    of = Celo2(f.named_parameters(), schedule="constant:lr=1e-2", communicator="local")
    ptr = h.fc.weight.data_ptr()
    for t in range(4):
        _bf16_train(h, oh, t, t + 1)
        for (n, ph), (_, pf) in zip(h.named_parameters(), f.named_parameters()):
            pf.grad = ph.grad.float()  # the same gradients
        of.step()
        assert oh.last_report["masters_reseeded"] == 0
    assert h.fc.weight.data_ptr() == ptr  # in place: no copy of the model
    for (n, ph), (_, pf) in zip(h.named_parameters(), f.named_parameters()):
        assert ph.dtype == torch.bfloat16
        same = (ph.detach() == pf.detach().to(torch.bfloat16)).float().mean().item()
        assert same > 0.98, (n, same)
    st = celo2.read_state_file(oh.state_dict()["celo2_state_file"])
    assert np.allclose(st["tensors"]["fc.weight"]["master"], f.fc.weight.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_bf16_resume_keeps_the_loaded_weights(tmp_path):
    # The usual resume of a bf16 model: model.load_state_dict, then opt.load_state_dict (or
    # the other order). The masters come from the checkpoint, exactly: the resumed run
    # continues bit for bit as the original does.
    h = _bf16_model()
    oh = Celo2(h.named_parameters(), schedule="cosine:lr=1e-2,warmup=2,total=20,final=0.1",
               communicator="local")
    _bf16_train(h, oh, 0, 5)
    torch.save({"model": h.state_dict(), "opt": oh.state_dict()}, tmp_path / "ck.pt")
    _bf16_train(h, oh, 5, 8)
    want = params(h)
    for order in ("model_first", "opt_first"):
        ck = torch.load(tmp_path / "ck.pt", **TORCH_LOAD_KW)
        r = _bf16_model(seed=99)  # other weights: everything must come from the checkpoint
        orr = Celo2(r.named_parameters(), schedule="cosine:lr=1e-2,warmup=2,total=20,final=0.1",
                    communicator="local")
        if order == "model_first":
            r.load_state_dict(ck["model"])
            orr.load_state_dict(ck["opt"])
        else:
            orr.load_state_dict(ck["opt"])
            r.load_state_dict(ck["model"])
        _bf16_train(r, orr, 5, 8)
        for n, p in params(r).items():
            assert torch.equal(p, want[n]), (order, n)


def test_bf16_writes_between_steps_reseed_the_masters():
    # Weights loaded into a running bf16 model (model.load_state_dict, an EMA swap) are what
    # the next step updates, not the stale masters.
    h = _bf16_model()
    oh = Celo2(h.named_parameters(), schedule="constant:lr=1e-3", communicator="local")
    _bf16_train(h, oh, 0, 3)
    other = _bf16_model(seed=7).state_dict()
    h.load_state_dict(other)
    _bf16_train(h, oh, 3, 4)
    assert oh.last_report["masters_reseeded"] > 0.9 * sum(p.numel() for p in h.parameters())
    for n, p in h.named_parameters():
        # One step of lr 1e-3 (AdamW branch: 20x) from the loaded weights, not from the old ones.
        assert (p.detach().float() - other[n].float()).abs().max().item() < 0.05, n
