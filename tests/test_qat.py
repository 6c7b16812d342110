"""qcompile.qat: the gradients of the trainable quantizers against their formulas (closed forms and finite
differences), SDQ's running sigma, eq. 11 re-scaling, two-phase freezing, weight-normalisation folding, and the
export of a QAT-trained model to ONNX, validated in onnxruntime."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import qat, quant
from qcompile.errors import QuantizationWarning, UserError
from qcompile.models.digits import load_split, pretrained
from qcompile.qat.modules import BiasQuantize, LearnableFakeQuantize, SDQFakeQuantize, channel_stats
from qcompile.qmodules import FakeQuantize
from qcompile.runtime.session import run, session

GRAD_RTOL = 1e-4  # autograd (float32) against the float64 closed form / finite differences


def nearest_level(u: np.ndarray, levelset) -> np.ndarray:
    """Pi(u): the nearest normalised level, written independently of qcompile.quant (no ties in the data)."""
    values = np.asarray(levelset.values)
    return values[np.abs(u[..., None] - values).argmin(-1)]


def rcf_local(u: np.ndarray, levelset) -> np.ndarray:
    """d(alpha * Pi(x / alpha)) / d alpha of the RCF: sign(u) where clipped, Pi(u) - u inside (APoT slides)."""
    lo = -1.0 if levelset.signed else 0.0
    clipped = np.clip(u, lo, 1.0)
    inside = (u > lo) & (u < 1.0)
    return np.where(inside, nearest_level(clipped, levelset) - u, np.where(u >= 1.0, 1.0, -1.0 if lo < 0 else 0.0))


@pytest.fixture(scope="module")
def digits():
    return load_split()


# -- RCF (APoT) ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,signed", [("apot", True), ("apot", False), ("pot", True), ("uniform", False)])
def test_rcf_alpha_gradient_closed_form(scheme, signed):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=gen) * 1.5
    g = torch.randn(4000, generator=gen)
    fq = LearnableFakeQuantize(scheme, 4, signed, role="weight" if signed else "activation",
                               init_alpha=torch.tensor(2.0), grad="rcf")
    (fq(x) * g).sum().backward()
    ls = fq.levelset
    want = float((g.double().numpy() * rcf_local(x.double().numpy() / 2.0, ls)).sum())
    assert fq.learned_alpha.grad.item() == pytest.approx(want, rel=GRAD_RTOL)
    # PACT / STE gradient of the same quantizer: only the clipped values count (the lecture's dQ/dalpha)
    pact = LearnableFakeQuantize(scheme, 4, signed, role=fq.role, init_alpha=torch.tensor(2.0), grad="ste")
    (pact(x) * g).sum().backward()
    u = x.double().numpy() / 2.0
    clipped = np.where(u >= 1.0, 1.0, np.where(signed & (u <= -1.0), -1.0, 0.0))
    assert pact.learned_alpha.grad.item() == pytest.approx(float((g.double().numpy() * clipped).sum()), rel=GRAD_RTOL)


def _surrogate(w: torch.Tensor, alpha: torch.Tensor, fq: LearnableFakeQuantize, w0, a0) -> torch.Tensor:
    """The STE surrogate at (w0, a0) of ``sigma * alpha * Pi((w - mu) / (sigma * alpha))``, smooth in (w, alpha):
    inside the clip range Pi(u) -> Pi(u0) + (u - u0), outside -> sign(u0). Its exact derivative is what RCF with
    STE and weight normalisation claim to compute."""
    mu0, s0 = channel_stats(w0, fq.axis)
    u0 = ((w0 - mu0) / (s0 * a0)).double()
    p0 = torch.from_numpy(nearest_level(u0.clamp(-1, 1).numpy(), fq.levelset))
    mu, sigma = channel_stats(w, fq.axis)
    u = (w - mu) / (sigma * alpha)
    inside = u0.abs() < 1
    return sigma * alpha * torch.where(inside, p0 + (u - u0), torch.sign(u0))


def test_rcf_with_weight_norm_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 3, 3, 3, generator=gen) * 0.2 + 0.03
    g = torch.randn(w.shape, generator=gen)
    alpha0 = torch.tensor(1.7)
    fq = LearnableFakeQuantize("apot", 4, True, axis=0, role="weight", init_alpha=alpha0, grad="rcf",
                               weight_norm=True)
    wp = w.clone().requires_grad_(True)
    (fq(wp) * g).sum().backward()

    w64, a64, g64 = w.double(), alpha0.double(), g.double()

    def loss(wv, av):
        return float((_surrogate(wv, av, fq, w64, a64) * g64).sum())

    eps = 1e-6
    fd_alpha = (loss(w64, a64 + eps) - loss(w64, a64 - eps)) / (2 * eps)
    assert fq.learned_alpha.grad.item() == pytest.approx(fd_alpha, rel=GRAD_RTOL)
    # closed form: sum over channels of sigma_c * RCF(u), u = (w - mu_c) / (sigma_c alpha)
    mu, sigma = channel_stats(w64, 0)
    u = ((w64 - mu) / (sigma * a64)).numpy()
    closed = float((g64.numpy() * sigma.numpy() * rcf_local(u, fq.levelset)).sum())
    assert fq.learned_alpha.grad.item() == pytest.approx(closed, rel=GRAD_RTOL)
    # weights: the gradient flows through the normalisation (mean and std), slides "BACKWARD i."
    flat = w64.reshape(-1)
    for i in (0, 17, 40, 101, 150):
        step = torch.zeros_like(flat)
        step[i] = eps
        fd = (loss((flat + step).reshape(w.shape), a64) - loss((flat - step).reshape(w.shape), a64)) / (2 * eps)
        assert wp.grad.reshape(-1)[i].item() == pytest.approx(fd, rel=1e-3, abs=1e-5)


# -- SDQ --------------------------------------------------------------------------------------------------------
def test_sdq_activation_gradient_eq6_eq8():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=gen) * 2
    g = torch.randn(5000, generator=gen)
    sigma, alpha, s = torch.tensor(1.3), torch.tensor(2.0), 0.1
    fq = SDQFakeQuantize("uniform", 3, False, init_alpha=alpha, sigma=sigma, grad_scale=s).eval()
    xp = x.clone().requires_grad_(True)
    y = fq(xp)
    (y * g).sum().backward()
    clip = float(alpha * sigma)
    above = x >= clip
    # eq. 8 (without the lambda*alpha term, which the optimizer's weight decay adds): s * sigma * sum g, x >= a*s
    assert fq.learned_alpha.grad.item() == pytest.approx(s * float(sigma) * float(g[above].sum()), rel=GRAD_RTOL)
    # eq. 7: the input gradient passes for 0 < x < alpha * sigma only
    inside = (x > 0) & (x < clip)
    assert torch.equal(xp.grad, torch.where(inside, g, torch.zeros_like(g)))
    # finite differences where eq. 6 is exact: a clipped output is alpha * sigma
    eps = 1e-3
    hi = SDQFakeQuantize("uniform", 3, False, init_alpha=alpha + eps, sigma=sigma).eval()(x)
    lo = SDQFakeQuantize("uniform", 3, False, init_alpha=alpha - eps, sigma=sigma).eval()(x)
    fd = ((hi - lo) / (2 * eps))[above]
    assert torch.allclose(fd, torch.full_like(fd, float(sigma)), rtol=1e-3)
    # the lambda * alpha term: weight decay on the alpha group (param_groups) adds it once per step
    lam, lr = 0.5, 0.01
    opt = torch.optim.SGD([{"params": [fq.learned_alpha], "weight_decay": lam}], lr=lr)
    before, grad = fq.learned_alpha.item(), fq.learned_alpha.grad.item()
    opt.step()
    assert fq.learned_alpha.item() == pytest.approx(before - lr * (grad + lam * before), rel=1e-6)


def test_sdq_log2_weight_gradient_and_levels():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 16, generator=gen) * torch.linspace(0.1, 1.0, 8)[:, None]
    g = torch.randn(w.shape, generator=gen)
    _, sigma = channel_stats(w, 0, centred=False)  # about 0, as the module measures weights
    sigma = sigma.reshape(-1)
    fq = SDQFakeQuantize("log2", 3, True, axis=0, role="weight", init_alpha=torch.tensor(2.5),
                         sigma=sigma, grad_scale=0.01)
    wp = w.clone().requires_grad_(True)
    y = fq(wp)
    (y * g).sum().backward()
    clip = 2.5 * sigma[:, None]
    outside = w.abs() >= clip
    want = 0.01 * float((sigma[:, None] * torch.sign(w) * g)[outside].sum())
    assert fq.learned_alpha.grad.item() == pytest.approx(want, rel=GRAD_RTOL)
    # eq. 9-10 levels: {0, +-2^k} * alpha * sigma / L_p2 with L_p2 = 4 at 3 bits
    levels = torch.unique(torch.round(y.detach() / (clip / 4) * 1e4) / 1e4)
    assert set(levels.tolist()) <= {-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0}


def test_weight_clips_centred_at_0_scale_by_the_spread_about_0():
    """SDQ's weights and scale-only weight normalisation clip at alpha * sigma about 0, but sigma was the spread
    about the mean: a depthwise blur filter (mostly its mean) was clipped at a fraction of its weights (4-bit SDQ
    weights of such a layer: 9.5 dB, 21.0 dB with the spread about 0)."""
    gen = torch.Generator().manual_seed(0)
    w = 0.3 + 0.02 * torch.randn(6, 1, 3, 3, generator=gen)  # blur-like depthwise filters: mean >> spread
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(SDQFakeQuantize.batch_sigma(w, "weight", 0), rms)
    fq = LearnableFakeQuantize("uniform", 4, True, axis=0, role="weight", init_alpha=torch.tensor(2.5),
                               weight_norm=True, center=False)
    x_in, alpha = fq.effective(w)
    assert torch.equal(x_in, w)
    torch.testing.assert_close(alpha, 2.5 * rms)
    # centred normalisation keeps the spread about the mean (the APoT authors' weight normalisation)
    fq_c = LearnableFakeQuantize("uniform", 4, True, axis=0, role="weight", init_alpha=torch.tensor(2.5),
                                 weight_norm=True, center=True)
    torch.testing.assert_close(fq_c.effective(w)[1], 2.5 * w.std(dim=(1, 2, 3)))


def test_sdq_running_sigma_of_mirrored_positive_part():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 2.0])
    sigma_t = float(np.sqrt((1 + 4 + 4) / 3))  # sqrt(E[x^2 | x > 0])
    assert SDQFakeQuantize.batch_sigma(x, "activation", None).item() == pytest.approx(sigma_t)
    fq = SDQFakeQuantize("uniform", 4, False, init_alpha=torch.tensor(3.0), sigma=torch.tensor(1.0))
    fq.train()
    with torch.enable_grad():
        fq(x)
    assert fq.sigma.item() == pytest.approx(0.999 * 1.0 + 0.001 * sigma_t, rel=1e-6)  # eq. 3, momentum 0.001
    fq.eval()
    fq(x)
    assert fq.sigma.item() == pytest.approx(0.999 * 1.0 + 0.001 * sigma_t, rel=1e-6)  # eval: no update


# -- eq. 11 re-scaling --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["uniform", "log2"])
def test_rescaling_keeps_the_quantization_intervals(scheme):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2000, generator=gen)
    high, low = quant.level_set(scheme, 3, True), quant.level_set(scheme, 2, True)
    alpha3 = torch.tensor(2.2)
    alpha2 = qat.rescale_alpha(alpha3, high, low)
    assert float(alpha2) == pytest.approx(float(alpha3) * low.denom / high.denom)
    # the step alpha / L is kept, so every 2-bit level is a 3-bit level and the pruning area is unchanged
    assert float(quant.unit_from_alpha(alpha2, low)) == pytest.approx(float(quant.unit_from_alpha(alpha3, high)))
    lv3 = set(np.round(high.values * float(alpha3), 6))
    assert set(np.round(low.values * float(alpha2), 6)) <= lv3
    pruned = lambda a, ls: int((quant.quantize(w, a, ls) == 0).sum())  # noqa: E731
    assert pruned(alpha2, low) == pruned(alpha3, high)
    assert pruned(alpha3, low) > pruned(alpha3, high)  # without re-scaling the pruning area grows (SDQ Fig. 3)


def test_change_bits_rescales_a_prepared_model(digits):
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=3, method="sdq", calib=x_tr[:64])
    before = {n: (m.bits, m.learned_alpha.detach().clone(), m.levelset)
              for n, m in gm.named_modules() if isinstance(m, LearnableFakeQuantize)}
    changed = qat.change_bits(gm, wbits=2, abits=2)
    assert changed == sum(1 for b, _, _ in before.values() if b == 3)
    for name, mod in gm.named_modules():
        if not isinstance(mod, LearnableFakeQuantize):
            continue
        bits, alpha, ls = before[name]
        if bits == 8:
            assert mod.bits == 8 and torch.equal(mod.learned_alpha, alpha)  # fixed first/last/output quantizers
        else:
            assert mod.bits == 2
            assert torch.allclose(mod.learned_alpha, alpha * mod.levelset.denom / ls.denom)
    cfg = qat.config_of(gm)
    assert (cfg.wbits, cfg.abits) == (2, 2)
    # the layer table follows (it kept "W3 uniform / A3 uniform" beside 2-bit quantizers); first/last stay 8-bit
    from qcompile.passes import layer_table

    rows = {name: what for name, _, what in layer_table(gm)}
    assert rows["conv2"].startswith("W2 uniform / A2 uniform") and rows["conv1"].startswith("W8 uniform / A8"), rows


# -- two-phase training -----------------------------------------------------------------------------------------
def _train(gm, x, y, opt, steps):
    gm.train()
    for i in range(steps):
        sl = slice(32 * i, 32 * (i + 1))
        loss = F.cross_entropy(gm(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_phase_two_freezes_alpha_and_sigma(digits):
    x_tr, y_tr, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="log2", bits=3, method="sdq", calib=x_tr[:64], momentum=0.1)
    opt = torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.05, wd_alpha=1e-3), lr=1e-3, weight_decay=1e-4)
    quantizers = [m for m in qat.learnable_quantizers(gm) if m.learnable]
    start = [(m.learned_alpha.detach().clone(), m.sigma.clone()) for m in quantizers]
    _train(gm, x_tr, y_tr, opt, 3)
    assert any(not torch.equal(m.learned_alpha, a) for m, (a, _) in zip(quantizers, start))  # phase one learns
    assert any(not torch.equal(m.sigma, s) for m, (_, s) in zip(quantizers, start) if m.role != "weight")
    assert qat.freeze_quantizers(gm) == len(qat.learnable_quantizers(gm))
    frozen = [(m.learned_alpha.detach().clone(), m.sigma.clone()) for m in quantizers]
    weights = gm.conv2.weight.detach().clone()
    _train(gm, x_tr[96:], y_tr[96:], opt, 3)  # the same optimizer: its momentum and weight decay must not leak
    for m, (a, s) in zip(quantizers, frozen):
        assert torch.equal(m.learned_alpha, a) and torch.equal(m.sigma, s)
    assert not torch.equal(gm.conv2.weight, weights)  # the weights still train
    assert all(not g["params"] for g in qat.param_groups(gm)[1:])


# -- prepare / param groups -------------------------------------------------------------------------------------
def test_prepare_quantizers_and_param_groups(digits):
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, method="apot", calib=x_tr[:64])
    assert gm.training and qat.config_of(gm).weight_norm and qat.config_of(gm).grad == "rcf"
    fqs = dict((n, m) for n, m in gm.named_modules() if isinstance(m, FakeQuantize))
    assert fqs and all(isinstance(m, LearnableFakeQuantize) for m in fqs.values())
    for m in fqs.values():  # 4-bit quantizers learn alpha; 8-bit first/last/output ones keep the PTQ value
        assert m.learned_alpha.requires_grad == (m.bits == 4)
        assert m.weight_norm == (m.role == "weight" and m.bits == 4)
    assert fqs["conv1.weight_fq"].bits == 8 and fqs["conv2.weight_fq"].bits == 4
    weights, alphas = qat.param_groups(gm, lr_alpha=0.01, wd_alpha=1e-4, weight_decay=0.0)
    assert alphas["lr"] == 0.01 and alphas["weight_decay"] == 1e-4 and weights["weight_decay"] == 0.0
    ids = [id(p) for p in weights["params"]] + [id(p) for p in alphas["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in gm.parameters() if p.requires_grad}
    ablation = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, weight_norm=False, rcf=False,
                           calib=x_tr[:64])
    assert {m.grad for m in qat.learnable_quantizers(ablation) if m.learnable} == {"ste"}
    assert not any(m.weight_norm for m in qat.learnable_quantizers(ablation))
    with pytest.raises(UserError, match="unknown QAT method"):
        qat.prepare(pretrained(), x_te[:1], method="lsq")
    with pytest.raises(UserError, match="bias correction"):
        qat.prepare(pretrained(), x_te[:1], bias_correction=True)


def test_convert_folds_weight_norm_exactly(digits, tmp_path):
    x_tr, y_tr, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, calib=x_tr[:64])
    _train(gm, x_tr, y_tr, torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.01), lr=1e-3), 2)
    gm.eval()
    with torch.no_grad():
        trained = gm(x_te[:100])
        trained_w = {name: gm.get_submodule(name).weight_fq(gm.get_submodule(name).weight)
                     for name in ("conv2", "conv3", "down", "fc1")}
    w = gm.conv2.weight.detach().clone()
    mu, sigma = channel_stats(w, 0)
    alpha = gm.conv2.weight_fq.learned_alpha.detach()
    conv = qat.convert(gm)
    with torch.no_grad():
        for name, want in trained_w.items():  # the quantized weights are the trained ones, bit for bit
            assert torch.equal(conv.get_submodule(name).weight_fq(conv.get_submodule(name).weight), want)
        # and so is the model: biases were trained on the accumulator grid and the int8 layers' integer
        # re-quantization computes the same codes
        assert torch.equal(conv(x_te[:100]), trained)
    assert type(conv.conv2.weight_fq) is FakeQuantize and conv.conv2.weight_fq.calibrated
    # a pickled converted model does not load back (torch.fx re-traces its integer layers): the CLI says so and what
    # to save instead (it said "make the module that defines the model importable")
    from qcompile.frontend import load_model

    path = str(tmp_path / "converted.pt")
    with pytest.raises(UserError, match=r"bound to qcompile's integer kernels.*for QAT the qat.prepare'd model"):
        torch.save(conv, path)  # refused where it is saved, since 0.9.13
    del type(conv).__reduce__  # as earlier versions pickled it: refused where it is loaded
    torch.save(conv, path)
    with pytest.raises(UserError, match=r"does not survive torch.save/torch.load .* save the qat.prepare'd model"):
        load_model(path, trust_pickle=True)
    assert torch.equal(conv.conv2.weight, w - mu)  # the normalisation's mean folded into the stored weight
    assert torch.equal(conv.conv2.weight_fq.alpha, sigma.reshape(-1) * alpha)  # and its scale into alpha
    # the same graph without the training-time bias quantizers (int8 first/last layers bound to integers)
    # (plus the units the int8 layers read their codes with)
    # (and the residual add on 8-bit codes bound to onnxruntime's QLinearAdd arithmetic)
    got = [n.name for n in conv.graph.nodes if not str(n.target).startswith("int8_units.")]
    want = [n.name for n in gm.graph.nodes if "bias_fq" not in n.name]
    assert len(got) == len(want) and all(g == w or (g.startswith("int8_add") and w.startswith("add"))
                                         for g, w in zip(got, want)), (got, want)
    assert not any(isinstance(m, BiasQuantize) for m in conv.modules())
    assert isinstance(gm.conv2.weight_fq, LearnableFakeQuantize)  # the trained model is left as it was
    assert not any(isinstance(m, LearnableFakeQuantize) for m in conv.modules())


# -- export -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,method", [("apot", "apot"), ("log2", "sdq")])
def test_qat_model_exports_and_matches_in_onnxruntime(digits, tmp_path, scheme, method):
    x_tr, y_tr, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme=scheme, bits=3, method=method, calib=x_tr[:64])
    _train(gm, x_tr, y_tr, torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.01), lr=1e-3), 4)
    gm.eval()
    with torch.no_grad():
        trained = gm(x_te[:200]).numpy()
    path = str(tmp_path / "qat.onnx")
    result = qat.export(gm, x_te[:1], output=path, validation_inputs=x_te[:200])
    assert result.report.passed, result.report.summary()
    assert result.report.top1 >= 0.99
    got = run(session(path), [x_te[:200].numpy()])[0]
    with torch.no_grad():
        sim = result.model(x_te[:200]).numpy()
    # the converted simulation is the trained module bit for bit; onnxruntime agrees with it
    assert np.array_equal(sim, trained)
    assert np.mean(got.argmax(1) == trained.argmax(1)) >= 0.99
    err = np.linalg.norm(got - trained) / np.linalg.norm(trained)
    assert err < 1e-2, err


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")  # BiasCorrection on α params
@pytest.mark.parametrize("bits, method", [(4, "pact"), (8, "ste")])
def test_compile_takes_the_trainable_and_the_converted_model(digits, bits, method):
    """At W8A8, compile() of the converted model ran ShareInt8Params again: an input quantizer that a layer bound
    to an int8 kernel reads took its source's parameters, the simulation kept the old unit and the file FAILed
    (16.8% of one quantizer's codes), where qat.export of the same model passed."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=bits, method=method, calib=x_tr[:128])
    direct = qcompile.compile(gm, x_te[:1], scheme="uniform", bits=bits, calib=x_tr[:128],
                              validation_inputs=x_te[:100])
    assert direct.report.passed, direct.report.summary()  # compile() converts a prepared model itself
    conv = qat.convert(gm)
    alphas = {n: m.alpha.clone() for n, m in conv.named_modules() if isinstance(m, FakeQuantize)}
    result = qcompile.compile(conv, x_te[:1], scheme="uniform", bits=bits, calib=x_tr[:128],
                              validation_inputs=x_te[:100])
    assert result.report.passed, result.report.summary()
    for name, mod in result.model.named_modules():  # no recalibration: the learned values are exported
        if name in alphas:
            assert torch.equal(mod.alpha, alphas[name])


def test_whole_model_checkpoints_and_user_mistakes(digits, tmp_path):
    """torch.save of the prepared model dropped gm.meta: qat.export of the reloaded model stopped on "the bias of
    conv2d ... is not on its accumulator grid". prepare() of a prepared model kept its quantizers and recorded the
    new options; export() of a float module was an AttributeError, of a traced float model a float file with PASS."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=3, method="apot", calib=x_tr[:64])
    want = qat.export(gm, x_te[:1], validation_inputs=x_te[:50])
    torch.save(gm, tmp_path / "prepared.pt")
    reloaded = torch.load(tmp_path / "prepared.pt", weights_only=False)
    got = qat.export(reloaded, x_te[:1], validation_inputs=x_te[:50])
    assert got.report.passed
    assert got.onnx_model.SerializeToString() == want.onnx_model.SerializeToString()
    # and its layer table: the node meta it lost named the layers conv2d_1 ... with the default widths
    from qcompile.passes import layer_table

    assert layer_table(got.model) == layer_table(want.model)
    assert [name for name, _, _ in layer_table(got.model)] == ["conv1", "conv2", "conv3", "down", "fc1", "fc2"]
    with pytest.raises(UserError, match="already holds qcompile quantizers"):
        qat.prepare(gm, x_te[:1], scheme="uniform", bits=2, method="pact", calib=x_tr[:64])
    with pytest.raises(UserError, match=r"prepare\(\) got an unknown option 'symmetric_levels'; use asym_levels"):
        qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=3, calib=x_tr[:64], symmetric_levels=True)
    with pytest.raises(UserError, match="qcompile.qat.export takes the GraphModule"):
        qat.export(pretrained(), x_te[:1])
    with pytest.raises(UserError, match="no trainable quantizers"):
        qat.export(torch.fx.symbolic_trace(pretrained()), x_te[:1])
    # a half copy and wrappers (EMA's AveragedModel, DataParallel) export as compile() takes them
    for other in (copy.deepcopy(gm).half(), torch.optim.swa_utils.AveragedModel(gm), torch.nn.DataParallel(gm)):
        assert qat.export(other, x_te[:1], validation_inputs=x_te[:50]).report.passed
    # change_bits checks both widths before changing anything; compile then takes the new widths
    with pytest.raises(UserError, match="abits must be an integer from 2 to 8"):
        qat.change_bits(gm, wbits=2, abits=9)
    assert config_bits(gm) == (3, 3) and {fq.bits for fq in gm.modules() if isinstance(fq, LearnableFakeQuantize)
                                          and fq.role == "weight" and fq.scheme == "apot"} == {3}
    qat.change_bits(gm, wbits=2, abits=2)
    assert qcompile.compile(gm, x_te[:1], scheme="apot", bits=2, validate=False).options.weight_bits == 2
    # bits= that is neither prepare's (3) nor the layers' (2) was taken without a word for a W2A2 file
    with pytest.raises(UserError, match=r"fix what its layers compute \(layers at W2A2\); drop bits here"):
        qcompile.compile(gm, x_te[:1], bits=5, validate=False)


def config_bits(gm):
    cfg = qat.prepare.__globals__["config_of"](gm)
    return cfg.wbits, cfg.abits


def test_depthwise_filters_are_normalised_by_scale_only():
    """Removing a depthwise filter's mean (mostly its mean: ~9 weights) wrecked APoT QAT of a depthwise-separable
    CNN (25 % after 8 epochs); those layers keep it, the others are centred as in the paper."""
    from tests.models import DepthwiseSeparableNet, example_input

    model = DepthwiseSeparableNet().eval()
    x = example_input(model, batch=16)
    gm = qat.prepare(model, x[:1], scheme="apot", bits=4, method="apot", calib=x, keep_first_last="quant")
    modules = dict(gm.named_modules())
    seen = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LearnableFakeQuantize) \
                and modules[node.target].role == "weight":
            weight = getattr(gm.get_submodule(node.args[0].target.rpartition(".")[0]), "weight")
            depthwise = weight.dim() >= 3 and weight.shape[1] == 1
            seen.setdefault(depthwise, set()).add(modules[node.target].center)
    assert seen == {True: {False}, False: {True}}, seen


def test_switches_that_a_method_does_not_apply_are_refused(digits):
    """method='ste' with weight_norm=True or rcf=True was accepted, not applied (no alpha is trained), and recorded
    in the file's QAT metadata as applied."""
    x_tr, _, x_te, _ = digits
    for kw in ({"weight_norm": True}, {"rcf": True}):
        with pytest.raises(UserError, match="method 'ste' keeps the calibrated clipping values"):
            qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, method="ste", calib=x_tr[:16], **kw)
        with pytest.raises(UserError, match="method 'sdq' has its own clipping"):
            qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, method="sdq", calib=x_tr[:16], **kw)
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, method="ste", calib=x_tr[:16], weight_norm=False)
    assert "weight-norm" not in qat.config_of(gm).describe()


def test_prepare_and_export_arguments_of_the_wrong_type_are_one_line(digits, tmp_path):
    """rcf="no" was taken as true (RCF stayed on), grad_scale="x" raised a bare ValueError from float(),
    grad_scale=-1 reversed SDQ's alpha gradient, and export(output=pathlib.Path(...)) an AttributeError."""
    import pathlib

    x_tr, _, x_te, _ = digits
    for kw, needle in (({"rcf": "no"}, "rcf must be True or False"),
                       ({"shared_alpha": "no"}, "shared_alpha must be True or False"),
                       ({"grad_scale": "x"}, "grad_scale must be a number"),
                       ({"momentum": float("nan")}, "momentum must be a number"),
                       ({"method": "sdq", "grad_scale": -1}, "grad_scale must be positive")):
        with pytest.raises(UserError, match=needle):
            qat.prepare(pretrained(), x_te[:1], calib=x_tr[:16], **kw)
    import numpy as np

    qat.prepare(pretrained(), x_te[:1], calib=x_tr[:16], rcf=np.bool_(True), shared_alpha=np.True_,
                grad_scale=torch.tensor(0.5), momentum=np.float32(0.9))  # numpy booleans, scalars, 0-d tensors
    gm = qat.prepare(pretrained(), x_te[:1], calib=x_tr[:16])
    path = tmp_path / "m.onnx"
    assert qat.export(gm, x_te[:1], output=path, validate=False).onnx_path == str(path) and path.is_file()
    with pytest.raises(UserError, match="output= is of type int"):
        qat.export(gm, x_te[:1], output=123)


def test_compile_of_a_trained_model_takes_the_options_it_was_trained_with(digits):
    """compile() re-decided layers from its own options: a layer prepare excluded was quantized and calibrated
    anew (the file no longer computed the trained model), and the file recorded the scheme and bit-width given to
    compile, not the trained ones. It takes prepare's options now, refuses others, and says what was trained."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=3, method="apot", calib=x_tr[:64],
                     exclude=("fc1",))
    conv = qat.convert(gm)
    with torch.no_grad():
        want = conv(x_te[:100])
    result = qcompile.compile(conv, x_te[:1], calib=x_tr[:64], validation_inputs=x_te[:100])  # default scheme/bits
    assert result.report.passed, result.report.summary()
    with torch.no_grad():
        assert (result.model(x_te[:100]) - want).abs().max() < 1e-4
    assert not any(n.startswith("fc1") and isinstance(m, FakeQuantize) for n, m in result.model.named_modules())
    meta = {p.key: p.value for p in result.onnx_model.metadata_props}
    recorded = json.loads(meta["qcompile.options"])
    assert (recorded["scheme"], recorded["bits"], recorded["exclude"]) == ("apot", 3, ["fc1"])
    assert meta["qcompile.qat"].startswith("apot: W3 apot / A3 apot")
    with pytest.raises(UserError, match=r"trained with qcompile.qat.prepare.*\(scheme='apot', bits=3\)"):
        qcompile.compile(conv, x_te[:1], scheme="pot", bits=2, calib=x_tr[:64])
    with pytest.raises(UserError, match=r"\(exclude=\('fc1',\)\)"):
        qcompile.compile(conv, x_te[:1], scheme="apot", bits=3, exclude=(), calib=x_tr[:64])
    same = qcompile.compile(conv, x_te[:1], scheme="apot", bits=3, exclude=["fc1"], calib=x_tr[:64])  # a list
    assert same.options.exclude == ("fc1",)
    with pytest.raises(UserError, match=r"\(bits=3\); drop bits"):  # compile()'s own defaults, asked for
        qcompile.compile(conv, x_te[:1], scheme="apot", bits=4, calib=x_tr[:64])


def test_compile_of_a_trained_model_with_a_config_rule_on_a_middle_layer(digits):
    """With prepare's options taken over, a rule naming a layer that conversion bound to integer kernels was refused
    as matching no layer ("the layers are fc3"): a model already decided keeps its rules."""
    x_tr, _, x_te, _ = digits

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

        def forward(self, x):
            x = torch.flatten(x, 1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    gm = qat.prepare(MLP().eval(), x_te[:1], scheme="apot", bits=4, method="apot", calib=x_tr[:64],
                     config={"fc2": {"scheme": "uniform", "bits": 3}})
    conv = qat.convert(gm)
    with torch.no_grad():
        want = conv(x_te[:100])
    result = qcompile.compile(conv, x_te[:1], validation_inputs=x_te[:100])
    assert result.report.passed, result.report.summary()
    with torch.no_grad():
        assert (result.model(x_te[:100]) - want).abs().max() < 1e-4
    with pytest.raises(UserError, match="matched no layer"):  # a fresh model still refuses a typo
        qcompile.compile(MLP().eval(), x_te[:1], calib=x_tr[:64], config={"fc9": {"bits": 3}})


def test_compile_of_a_converted_apot_model_keeps_the_trained_level_decisions(digits):
    """QAT decides APoT levels in float (as ``qat.export`` writes them); ``compile`` deciding them on int8
    accumulator cells bound layers the conversion left float, and its file no longer computed the trained model
    (a digits CNN at APoT-3: max |diff| 0.78, 98.75 -> 98.00 %). Nothing is recalibrated or re-decided now."""
    x_tr, y_tr, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=3, method="apot", calib=x_tr[:64])
    _train(gm, x_tr, y_tr, torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.01), lr=1e-3), 1)
    gm.eval()
    conv = qat.convert(gm)
    with torch.no_grad():
        trained = conv(x_te[:200])
    result = qcompile.compile(conv, x_te[:1], scheme="apot", bits=3, validation_inputs=x_te[:200])
    assert result.report.passed, result.report.summary()
    assert result.options.int8_levels is False
    with torch.no_grad():
        err = float((result.model(x_te[:200]) - trained).abs().max())
    assert err < 1e-4, err


class _OtherLayers(torch.nn.Module):
    """A reflect-padded conv, a transposed conv and a 3-D conv: layers whose bias QuantizeBias rounds."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(13)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.v = torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.head = torch.nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        y = F.relu(self.up(F.relu(self.b(F.relu(self.a(x))))))
        y = F.relu(self.v(y.unsqueeze(2))).squeeze(2)
        return self.head(y)


def test_padded_transposed_and_3d_layers_train_their_bias_on_the_accumulator_grid():
    """Their bias is trained through BiasQuantize (as for plain convs), so convert, which rounds every bias to the
    S_x·S_w grid, still computes the trained model's outputs."""
    model = _OtherLayers().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    gm = qat.prepare(model, x[:1], scheme="apot", bits=4, method="apot", calib=x, keep_first_last="quant")
    for name in ("b", "up", "v"):
        assert isinstance(getattr(gm.get_submodule(name), "bias_fq", None), BiasQuantize), name
    opt = torch.optim.SGD(qat.param_groups(gm, lr_alpha=1e-3), lr=1e-2)
    for _ in range(3):
        loss = gm(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    with torch.no_grad():
        trained = gm(x)
        converted = qat.convert(gm)(x)
    assert torch.equal(trained.float(), converted.float())


def test_asymmetric_apot_activations_survive_training_and_export(tmp_path):
    """Calibration's asymmetric APoT levels (SiLU/Hardswish inputs) are the levels QAT trains and exports."""
    from tests.test_emit import _SiLUNet

    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(128, 1, 8, 8, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    gm = qat.prepare(_SiLUNet().eval(), x[:1], scheme="apot", bits=4, calib=x[:64])
    offsets = {n: m.level_offset for n, m in gm.named_modules() if isinstance(m, FakeQuantize) and m.level_offset}
    assert len(offsets) >= 2 and all(isinstance(gm.get_submodule(n), LearnableFakeQuantize) for n in offsets)
    _train(gm, x, y, torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.01), lr=1e-3), 2)
    gm.eval()
    result = qat.export(gm, x[:1], output=str(tmp_path / "q.onnx"), validation_inputs=x)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    assert {n: m.level_offset for n, m in result.model.named_modules()
            if isinstance(m, FakeQuantize) and m.level_offset} == offsets


def test_change_bits_keeps_the_negative_reach_of_asymmetric_levels():
    from tests.test_emit import _SiLUNet

    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    gm = qat.prepare(_SiLUNet().eval(), x[:1], scheme="apot", bits=4, calib=x)
    before = {n: m.levelset for n, m in gm.named_modules() if isinstance(m, FakeQuantize) and m.level_offset}
    qat.change_bits(gm, wbits=3, abits=3)
    for name, old in before.items():
        new = gm.get_submodule(name).levelset
        assert new.bits == 3 and new.offset in quant.asymmetric_offsets("apot", 3)
        # the 3-bit offset whose reach below 0 (offset / denom) is nearest the 4-bit one
        reach = [abs(o / (10 - o) - old.offset / old.denom) for o in quant.asymmetric_offsets("apot", 3)]
        assert abs(new.offset / new.denom - old.offset / old.denom) == pytest.approx(min(reach))


def test_compiled_trained_model_keeps_its_layer_table_and_validate_refuses_its_file(digits, tmp_path, capsys):
    """compile() of a trained model re-decided the layers for the table: conv1, bound to an int8 kernel, is no
    longer a Conv node, so conv2 was labelled "W8 uniform (first layer)" while its trained APoT-3 quantizers stayed.
    And `qcompile validate` rebuilt a QAT file's simulation by calibrating --against afresh: a false FAIL (19.5 dB,
    39 % of codes); it now says why it cannot, in one line."""
    from qcompile.cli import main
    from qcompile.summary import layer_rows

    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=3, calib=x_tr[:64])
    before = {name: decision for name, _, decision in layer_rows(gm)}
    path = str(tmp_path / "q.onnx")
    result = qcompile.compile(gm, x_te[:1], output=path, validation_inputs=x_te[:64])
    assert result.report.passed
    after = {name: decision.split("; int8 kernel")[0] for name, _, decision in layer_rows(result.model)}
    assert after["conv2"] == before["conv2"] == "W3 apot / A3 apot (default)", after
    assert after == {k: v.split("; int8 kernel")[0] for k, v in before.items()}
    torch.save(pretrained().state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", x_tr[:64].numpy())
    rc = main(["validate", path, "--against", str(tmp_path / "w.pt"), "--arch", "qcompile.models.digits:digits_cnn",
               "--data", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "was exported from a QAT-trained model" in err and err.count("\n") == 1, err


def test_prepare_and_export_a_model_with_two_inputs(tmp_path):
    """Token ids and a mask: prepare read calib=(ids, mask) as a list of one-input batches ("calibration batch 1 has
    samples of shape (12,) (torch.float32) but batch 0 has ... int64"), and calib=None stopped in a pass."""
    import torch.nn as nn

    import qcompile.qat as qat

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(20, 8)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, ids, mask):
            h = (self.e(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return self.fc2(torch.relu(self.fc1(h)))

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (32, 12), generator=gen)
    mask = (torch.arange(12)[None] < torch.randint(6, 13, (32, 1), generator=gen)).float()
    model = Pool().eval()
    for calib in ((ids, mask), [(ids[:16], mask[:16]), (ids[16:], mask[16:])], None):
        trainable = qat.prepare(model, (ids[:1], mask[:1]), scheme="apot", bits=4, calib=calib)
        assert trainable(ids, mask).shape == (32, 3)
    result = qat.export(trainable, (ids[:1], mask[:1]), output=str(tmp_path / "q.onnx"),
                        validation_inputs=(ids, mask))
    assert result.report.passed, result.report.summary()


def test_the_record_gives_ternary_weights_their_two_bits(digits):
    """prepare(bits=4, wscheme="ternary") recorded "W4 ternary" (in gm.meta and the file's qcompile.qat key)."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, wscheme="ternary", method="ste",
                     calib=x_tr[:64])
    assert qat.config_of(gm).describe().startswith("ste: W2 ternary / A4 apot")


@pytest.mark.parametrize("wscheme", ["ternary", "binary"])
def test_ternary_and_binary_weights_learn_as_recorded_whatever_bits_says(digits, wscheme):
    """prepare(wscheme="ternary", bits=4, method="apot") compared the quantizers' 2 bits with 4: the run's own
    weight quantizers learned no alpha and had no weight normalisation, while the record said "weight-norm"."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], wscheme=wscheme, ascheme="uniform", bits=4, method="apot",
                     calib=x_tr[:64])
    own = [m for m in qat.learnable_quantizers(gm) if m.role == "weight" and m.scheme == wscheme]
    assert own and all(m.learned_alpha.requires_grad and m.weight_norm for m in own)
    assert "weight-norm" in qat.config_of(gm).describe()
    with pytest.raises(UserError, match=f"change_bits: {wscheme} weights have a fixed width"):
        qat.change_bits(gm, wbits=3)


def test_trained_models_compile_only_with_weights_they_were_trained_with_and_no_float_comparison(digits, tmp_path):
    """compile(QAT model, int8_weights="s8-safe") wrote full-range int8 weights under the s8-safe name (the pass
    that moves them is not run on trained weights): FAIL on x86 without VNNI, 96 -> 68 % in onnxruntime. And the
    "vs the float model" figures compared the converted model with itself (79 dB, 100 % at 10 % accuracy)."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, method="pact", calib=x_tr[:64])
    with pytest.raises(UserError, match="int8_weights='s8-safe' moves 8-bit weights onto pair-safe codes"):
        qcompile.compile(gm, x_te[:1], validation_inputs=x_te[:50], int8_weights="s8-safe",
                         output=str(tmp_path / "no.onnx"))
    assert not (tmp_path / "no.onnx").exists()
    result = qcompile.compile(gm, x_te[:1], validation_inputs=x_te[:50])
    assert result.report.passed
    assert "sqnr_vs_float_db" not in result.report.extra and "top1_vs_float" not in result.report.extra
    safe = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, method="pact", calib=x_tr[:64],
                       int8_weights="s8-safe")
    # the pair-safe pass runs at conversion, after training, and moves trained 8-bit weights: the validation
    # compares the file with the converted model, so the warning is the only word of it
    from qcompile import QuantizationWarning

    with pytest.warns(QuantizationWarning, match=r"int8_weights='s8-safe' made the trained 8-bit layer\(s\) conv1, fc2 pair-safe"):
        result = qcompile.compile(safe, x_te[:1], validation_inputs=x_te[:50], int8_weights="s8-safe")
    assert result.report.passed


def test_export_checks_validation_inputs_before_writing_and_warns_on_low_agreement(digits, tmp_path):
    """qat.export with validation inputs of the wrong shape raised onnxruntime's INVALID_ARGUMENT and left the file
    written; a trained model that agrees with the float one on 11 % of inputs exported without a word."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, method="pact", calib=x_tr[:64])
    path = tmp_path / "q.onnx"
    with pytest.raises(UserError, match=r"validation data has samples of shape \(1, 4, 4\)"):
        qat.export(gm, x_te[:1], str(path), validation_inputs=torch.zeros(8, 1, 4, 4))
    assert not path.exists()
    with torch.no_grad():  # a wrecked trained model: its first layer's weights zeroed
        for name, p in gm.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.zero_()
                break
    with pytest.warns(QuantizationWarning, match="predicts as the float model on only"):
        qat.export(gm, x_te[:1], str(path), validation_inputs=x_te[:100], float_model=pretrained())
    assert path.exists()


def test_change_bits_refused_for_asymmetric_levels_changes_nothing():
    """The uniform_asym refusal came after the weight quantizers had moved to the new width: the model then held
    3-bit weights with a config (and a file record) of W4, and its accuracy fell to chance."""
    from tests.test_emit import _SiLUNet

    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    gm = qat.prepare(_SiLUNet().eval(), x[:1], scheme="uniform", bits=4, method="sdq", calib=x)
    before = {n: (m.bits, m.alpha.clone()) for n, m in gm.named_modules() if isinstance(m, LearnableFakeQuantize)}
    assert any(m.scheme == "uniform_asym" for m in gm.modules() if isinstance(m, LearnableFakeQuantize))
    with pytest.raises(UserError, match="not uniform_asym; change_bits\\(..., rescale=False\\)"):
        qat.change_bits(gm, wbits=3, abits=3)
    after = {n: (m.bits, m.alpha.clone()) for n, m in gm.named_modules() if isinstance(m, LearnableFakeQuantize)}
    assert {n: b for n, (b, _) in after.items()} == {n: b for n, (b, _) in before.items()}
    assert all(torch.equal(after[n][1], before[n][1]) for n in before)
    assert config_bits(gm) == (4, 4)


def test_the_cli_compiles_a_pickled_trained_model_without_repeating_its_options(digits, tmp_path, capsys):
    """The command line passed its defaults (equalize, bias correction) as if asked, and compile refused the trained
    model: "drop equalize, bias_correction here", options the user never gave."""
    from qcompile.cli import main

    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, method="pact", calib=x_tr[:64])
    torch.save(gm, tmp_path / "qat.pt")
    np.save(tmp_path / "x.npy", x_tr[:64].numpy())
    rc = main([str(tmp_path / "qat.pt"), "--trust-pickle", "--calib", str(tmp_path / "x.npy"),
               "-o", str(tmp_path / "q.onnx")])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip().endswith("PASS"), out + err
    # the first line says what the model was trained at (it said the defaults, "apot W4A4")
    assert out.splitlines()[0].endswith("(uniform W4A4, QAT-trained)"), out
    assert "no layer of this model" not in err  # its bound layers are no layer nodes: no note about them
    # an option given that differs from the trained one is still refused, naming it
    rc = main([str(tmp_path / "qat.pt"), "--trust-pickle", "--calib", str(tmp_path / "x.npy"), "--keep-first-last",
               "fp32", "--no-bias-correction", "-o", str(tmp_path / "q2.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "keep_first_last" in err and "bias_correction" not in err and "equalize" not in err, err


def test_mistakes_that_trained_or_exported_nothing_are_refused(digits, tmp_path):
    """param_groups / freeze_quantizers of the float model (the mistake docs/qat.md warns about) returned groups
    without one quantizer, and training then changed nothing of the prepared model; prepare with every layer
    excluded returned a model with nothing to train, which export then said was not prepare's; export with an
    example of the wrong shape raised torch's "mat1 and mat2 shapes cannot be multiplied". Each is one line now,
    and nothing is written."""
    x_tr, _, x_te, _ = digits
    model = pretrained()
    gm = qat.prepare(model, x_te[:1], scheme="apot", bits=3, calib=x_tr[:64])
    for fn in (qat.param_groups, qat.freeze_quantizers):
        for wrong in (model, qat.convert(gm)):
            with pytest.raises(UserError, match=f"{fn.__name__} takes the model that qcompile.qat.prepare returned"):
                fn(wrong)
    assert len(qat.param_groups(gm)[1]["params"]) > 0 and qat.freeze_quantizers(copy.deepcopy(gm)) > 0
    for how in ({"exclude": "*"}, {"config": {"*": "fp32"}}):
        with pytest.raises(UserError, match="prepare quantized no layer"):
            qat.prepare(model, x_te[:1], calib=x_tr[:64], **how)
    out = tmp_path / "bad.onnx"
    with pytest.raises(UserError, match=r"does not run on the example inputs of shape \[\(1, 1, 16, 16\) float32\]"):
        qat.export(gm, torch.zeros(1, 1, 16, 16), output=str(out))
    assert not out.exists()


def test_prepare_checks_its_calibration_data_as_compile_does(digits):
    """Calibration data of another shape, without samples or of integers reached the passes: a PassError around
    torch's "mat1 and mat2 shapes cannot be multiplied" or a StopIteration, where compile says what is wrong."""
    x_tr, _, x_te, _ = digits
    for calib, needle in ((torch.rand(16, 1, 16, 16), "samples of shape (1, 16, 16)"),
                          (x_tr[:16, 0], "samples of shape (8, 8)"),
                          (x_tr[:0], "holds no samples"),
                          (x_tr[:16].long(), "holds integers")):
        with pytest.raises(UserError, match=re.escape(needle)):
            qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, calib=calib)


def test_export_runs_the_float_model_as_compile_does_in_eval_mode(digits):
    """``export(..., float_model=model)`` right after a training loop, the model in train mode: the float run took
    batch statistics (and moved the model's running ones), and a BatchNorm1d on one sample raised "Expected more
    than 1 value per channel when training"."""
    x_tr, y_tr, x_te, _ = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
    with torch.no_grad():
        model.train()(x_tr[:256])  # running statistics of real data
    gm = qat.prepare(model, x_te[:1], scheme="uniform", bits=4, calib=x_tr[:64])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = qat.export(gm, x_te[:1], float_model=model, validation_inputs=x_te[:1])
    assert result.report.passed, result.report.summary()
    assert model.training  # left as the user had it, and its statistics too
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = qat.export(gm, x_te[:1], float_model=model, validation_inputs=x_te[:64])
    with torch.no_grad():
        expected = float((model.eval()(x_te[:64]).argmax(1) == torch.from_numpy(
            run(session(result.onnx_model.SerializeToString()), [x_te[:64].numpy()])[0]).argmax(1)).float().mean())
    assert result.report.extra["top1_vs_float"] == pytest.approx(expected)


def test_an_optimizer_of_the_float_model_trains_nothing_and_export_says_so(digits, tmp_path):
    """``AdamW(model.parameters())`` built before ``prepare`` steps the float model's tensors; the prepared one
    stayed at its PTQ start, and export wrote it under a PASS with no word (digits W2A2: 71.8 % where training
    gives 98 %)."""
    import warnings

    x_tr, y_tr, x_te, _ = digits
    model = pretrained()
    wrong = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gm = qat.prepare(model, x_te[:1], scheme="apot", bits=3, calib=x_tr[:64])
    _train(gm, x_tr, y_tr, wrong, 2)
    with pytest.warns(QuantizationWarning, match="changed since qcompile.qat.prepare: it was not trained"):
        qat.export(gm, x_te[:1], output=str(tmp_path / "untrained.onnx"), validation_inputs=x_te[:64])
    _train(gm, x_tr, y_tr, torch.optim.AdamW(qat.param_groups(gm), lr=1e-3), 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*it was not trained")
        qat.export(gm, x_te[:1], output=str(tmp_path / "trained.onnx"), validation_inputs=x_te[:64])


def test_a_state_dict_carries_the_asymmetric_level_offsets():
    """The offset calibration chose for asymmetric APoT levels was a plain attribute: a trained state dict loaded
    into a model prepared on other calibration rows matched every key and computed another function."""
    from tests.test_emit import _SiLUNet

    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(128, 1, 8, 8, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    gm = qat.prepare(_SiLUNet().eval(), x[:1], scheme="apot", bits=4, calib=x[:64])
    offsets = {n: m.level_offset for n, m in gm.named_modules() if isinstance(m, FakeQuantize) and m.level_offset}
    assert offsets
    _train(gm, x, y, torch.optim.AdamW(qat.param_groups(gm, lr_alpha=0.01), lr=1e-3), 2)
    fresh = qat.prepare(_SiLUNet().eval(), x[:1], scheme="apot", bits=4, calib=x[:64])
    for n in offsets:  # as another calibration set might choose
        fresh.get_submodule(n).level_offset = 0
    fresh.load_state_dict(gm.state_dict())
    assert {n: fresh.get_submodule(n).level_offset for n in offsets} == offsets
    gm.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), fresh(x))
    # a state dict saved before the offsets were in it still loads (strict), keeping the offsets as they are
    old = {k: v for k, v in gm.state_dict().items() if not k.endswith("level_offset_buffer")}
    fresh.load_state_dict(old)
    assert {n: fresh.get_submodule(n).level_offset for n in offsets} == offsets


def test_a_state_dict_loads_only_into_the_levels_it_was_trained_with():
    """An APoT 4-bit QAT state dict loaded into a model prepared at uniform 4 or APoT 3 bits matched every key
    and took clipping values learned for other levels; now loading stops naming both. After change_bits the
    saved bits are the new ones; a state dict from before the levels were saved still loads."""
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = qat.prepare(pretrained(), x[:1], scheme="apot", bits=4, method="apot", calib=x)
    state = gm.state_dict()
    for scheme, bits, needle in [("uniform", 4, "saved with apot 4-bit signed levels and this one has uniform 4-bit "
                                  "signed: prepare the model with the scheme and bits it was trained with"),
                                 ("apot", 3, "saved with apot 4-bit signed levels and this one has apot 3-bit")]:
        other = qat.prepare(pretrained(), x[:1], scheme=scheme, bits=bits, method="apot", calib=x)
        with pytest.raises(RuntimeError, match=needle):
            other.load_state_dict(state)
    same = qat.prepare(pretrained(), x[:1], scheme="apot", bits=4, method="apot", calib=x)
    same.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), gm.eval()(x))
    qat.change_bits(gm, wbits=3, abits=3)
    three = qat.prepare(pretrained(), x[:1], scheme="apot", bits=4, method="apot", calib=x)
    with pytest.raises(RuntimeError, match="saved with apot 3-bit signed levels and this one has apot 4-bit"):
        three.load_state_dict(gm.state_dict())
    qat.change_bits(three, wbits=3, abits=3)
    three.load_state_dict(gm.state_dict())
    old = {k: v for k, v in state.items() if not k.endswith("level_config_buffer")}
    same.load_state_dict(old)  # strict: the missing entries are not missing keys


def test_export_checks_its_thresholds_as_compile_does(tmp_path):
    """qat.export(thresholds={"min_sqnr": "30"}) stopped validation with a TypeError ("'<' not supported between
    instances of 'float' and 'str'"), an unknown name with one from validate_quantized's signature."""
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = qat.prepare(pretrained(), x[:1], scheme="uniform", bits=8, method="ste", calib=x)
    for thresholds, needle in [({"min_sqnr": "30"}, "threshold min_sqnr='30' is a str; give a number"),
                               ({"min_snr": 30}, "unknown validation threshold(s) 'min_snr'"),
                               ({"min_top1": 99}, "threshold min_top1=99 is not a fraction")]:
        with pytest.raises(UserError) as err:
            qat.export(gm, x[:1], output=str(tmp_path / "q.onnx"), thresholds=thresholds)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="validation_inputs= holds the inputs validation runs on, and "
                       "validate=False skips it"):
        qat.export(gm, x[:1], output=str(tmp_path / "q.onnx"), validate=False, validation_inputs=x)
    assert not (tmp_path / "q.onnx").exists()
    assert qat.export(gm, x[:1], thresholds={"min_sqnr": 10}).report.passed


class _ScalarFeature(torch.nn.Module):
    """A series of scalars projected to features in the middle of the model (``nn.Linear(1, d)``: one weight per
    output channel) and a depthwise 1x1 conv (one weight per channel too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.emb = torch.nn.Linear(4, 8), torch.nn.Linear(1, 16)
        self.dw, self.fc = torch.nn.Conv1d(16, 16, 1, groups=16), torch.nn.Linear(16, 3)

    def forward(self, x):  # (N, T, 1)
        h = F.relu(self.emb(self.a(x.expand(-1, -1, 4)).mean(-1, keepdim=True))).transpose(1, 2)
        return self.fc(F.relu(self.dw(h)).mean(-1))


@pytest.mark.parametrize("method,scheme", [("apot", "apot"), ("pact", "uniform"), ("sdq", "log2")])
def test_layers_with_one_weight_per_channel_prepare_train_and_export(method, scheme):
    # the unbiased std of one value is NaN (0 / 0): prepare stopped with "mse observer got NaN or inf values"; and
    # weight normalisation centred each single weight to 0 (the layer computed its bias only)
    model = _ScalarFeature().eval()
    x = torch.randn(64, 10, 1, generator=torch.Generator().manual_seed(1))
    gm = qat.prepare(model, x[:1], scheme=scheme, bits=4, method=method, calib=x[:32])
    with torch.no_grad():
        want, got = model(x), gm.eval()(x)
    assert float(10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum())) > 25
    gm.train()
    opt = torch.optim.Adam(qat.param_groups(gm, lr_alpha=1e-2), lr=1e-3)
    for _ in range(3):
        loss = F.cross_entropy(gm(x[:32]), torch.arange(32) % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert qat.export(gm, x[:1], validation_inputs=x[32:]).report.passed


def test_channel_stats_of_one_value_per_channel_is_the_tensors_spread():
    w = torch.tensor([[0.5], [-2.0], [1.0]])
    mu, sigma = channel_stats(w, 0)
    assert torch.equal(mu, w) and torch.isfinite(sigma).all()
    assert torch.allclose(sigma, w.std().expand(3, 1))


def test_param_groups_checks_its_rates(digits):
    """lr_alpha='fast' or -5 was handed to the optimizer, which failed at its first step inside torch.optim."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, calib=x_tr[:64])
    for kwargs in (dict(lr_alpha="fast"), dict(lr_alpha=-5), dict(wd_alpha="x"), dict(weight_decay=float("nan"))):
        with pytest.raises(UserError, match="param_groups: .* must be a number >= 0"):
            qat.param_groups(gm, **kwargs)
    assert len(qat.param_groups(gm, lr_alpha=0.01, wd_alpha=1e-4)) == 2
    # export's other options: a TypeError from Python before
    with pytest.raises(UserError, match=r"qat.export takes .* not 'int8_weights'; .* qcompile.compile\(model, "
                       r"example_inputs, int8_weights=...\)"):
        qat.export(gm, x_te[:1], int8_weights="u8")


def test_a_prepared_model_inside_another_module_is_refused_with_the_qat_way(digits):
    """nn.Sequential(prepared, Softmax) was refused as "already quantized" with PTQ advice (compile the float
    model); the QAT way is to export the prepared model itself, or wrap the float model before prepare."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="apot", bits=4, calib=x_tr[:32])
    with pytest.raises(UserError, match=r"holds quantizers of a qcompile.qat.prepare'd model .* put any head or "
                                        "wrapper around the float model before qat.prepare"):
        qcompile.compile(torch.nn.Sequential(gm, torch.nn.Softmax(1)), x_te[:1], calib=x_tr[:32], validate=False)


def test_export_without_validation_inputs_checks_more_than_the_example(digits):
    """qat.export without validation_inputs validated on its one example input; now also 15 N(0, 1) samples of
    its shape, as compile does without data (no loss warning on them: noise has no classes)."""
    x_tr, _, x_te, _ = digits
    gm = qat.prepare(pretrained(), x_te[:1], scheme="uniform", bits=4, method="pact", calib=x_tr[:32])
    result = qat.export(gm, x_te[:1])
    assert result.report.passed and "validation on 16 inputs" in result.report.summary(), result.report.summary()
