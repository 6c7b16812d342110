"""AdaptiveRounding (``weight_rounding="adaptive"``): weights on levels of their own quantizer that reconstruct the
layer's output on its inputs better than nearest rounding, in every layer kind the pass reads (Linear on rows and on
tokens, Conv2d with groups, Conv1d with "same" padding); the compiled file still computes its simulation, and on the
held-out digits the output is closer to the float model's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.passes.adaptive_rounding import adaptive_round
from qcompile.qmodules import FakeQuantize
from qcompile.runtime.session import session


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / 8 + torch.eye(d))


@pytest.mark.parametrize("scheme,bits,axis", [("apot", 4, 0), ("uniform", 3, 0), ("pot", 4, None), ("uniform", 8, 0),
                                              ("ternary", 2, 0)])
def test_adaptive_round_halves_the_output_error_on_the_quantizers_levels(scheme, bits, axis):
    x = correlated_inputs(512, 64, seed=0)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    fq = FakeQuantize(scheme, bits, True, axis=axis, role="weight")
    fq.set_params(w.abs().amax(1) if axis == 0 else w.abs().max(), torch.zeros((), dtype=torch.int32))
    nearest = fq.simulate(w)
    chosen = adaptive_round(w[None], (x.T @ x)[None], fq)[0]
    assert torch.equal(fq.simulate(chosen), chosen)  # on levels: the quantizer gives them back, the codes are its own
    err = lambda q: float(((w - q) @ x.T).pow(2).sum())  # noqa: E731
    assert err(chosen) < 0.75 * err(nearest), (err(chosen), err(nearest))  # measured 0.51-0.56


def test_groups_are_solved_as_if_each_were_alone():
    """Depthwise and grouped convolutions: one batched solve gives what each group's own solve gives."""
    fq = FakeQuantize("apot", 4, True, axis=0, role="weight")
    w = torch.randn(3, 4, 18, generator=torch.Generator().manual_seed(2)) * 0.1
    fq.set_params(w.reshape(12, 18).abs().amax(1), torch.zeros((), dtype=torch.int32))
    h = torch.stack([correlated_inputs(200, 18, seed=s).T @ correlated_inputs(200, 18, seed=s) for s in range(3)])
    together = adaptive_round(w, h, fq)
    for g in range(3):
        alone = FakeQuantize("apot", 4, True, axis=0, role="weight")
        alone.set_params(fq.alpha[4 * g:4 * g + 4], torch.zeros((), dtype=torch.int32))
        torch.testing.assert_close(together[g], adaptive_round(w[g:g + 1], h[g:g + 1], alone)[0], rtol=0, atol=1e-6)


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))


def test_digits_apot4_weights_reconstruct_the_float_model_better_on_held_out_images(tmp_path):
    """APoT-4 weights with 8-bit activations, where the weights' rounding is most of the error: measured 27.4 dB
    (nearest) and 31.1 dB (adaptive) against the float model on the 500 held-out digits; the file equals its
    simulation either way."""
    from qcompile.models import digits

    x_train, _, x_test, y_test = digits.load_split()
    model = digits.pretrained()
    with torch.no_grad():
        ref = model(x_test).numpy()
    sqnr = {}
    for rounding in ("nearest", "adaptive"):
        path = str(tmp_path / f"{rounding}.onnx")
        result = qcompile.compile(model, calib=x_train[:32], validation_inputs=x_test[:64], output=path,
                                  wscheme="apot", wbits=4, ascheme="uniform", abits=8, weight_rounding=rounding)
        assert result.report.passed, result.report.summary()
        out = session(path).run(None, {"input": x_test.numpy()})[0]
        sqnr[rounding] = _sqnr(ref, out)
        assert float(np.mean(out.argmax(1) == y_test.numpy())) >= 0.985
    assert sqnr["adaptive"] > sqnr["nearest"] + 2.0, sqnr
    report = next(t.report for t in result.timings if t.name == "AdaptiveRounding")
    assert any(line.startswith("conv2: ") and "% of weights on another level than the nearest" in line
               for line in report), report


class Mixed(nn.Module):
    """A depthwise conv, a Conv1d with "same" padding and a Linear on tokens: every input form the pass reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.seq = nn.Conv1d(8, 12, 5, padding="same")
        self.tok = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.stem(x))))  # (B, 8, 6, 6)
        h = torch.relu(self.seq(h.flatten(2)))              # (B, 12, 36)
        h = torch.relu(self.tok(h.transpose(1, 2)))         # (B, 36, 12)
        return self.head(h.mean(1))


def test_every_layer_kind_is_rounded_adaptively_and_the_file_validates(tmp_path):
    torch.manual_seed(0)
    model = Mixed().eval()
    # smooth images: neighbouring pixels correlate, as in real ones (on white noise H is diagonal, and the nearest
    # level is already the best one)
    x = torch.nn.functional.interpolate(torch.randn(48, 2, 3, 3), size=6, mode="bilinear")
    result = qcompile.compile(model, calib=x, output=str(tmp_path / "m.onnx"), scheme="uniform", bits=4,
                              keep_first_last="quant", weight_rounding="adaptive")
    assert result.report.passed, result.report.summary()
    report = next(t.report for t in result.timings if t.name == "AdaptiveRounding")
    moved = {line.split(":")[0] for line in report if "% of weights on another level" in line
             and not line.split(": ")[1].startswith("0.0%")}
    assert moved == {"stem", "dw", "seq", "tok", "head"}, report
    for m in result.model.modules():  # the weights the file holds are on their quantizer's levels
        if isinstance(m, FakeQuantize) and m.role == "weight":
            owner = result.model.get_submodule(next(n for n, mod in result.model.named_modules() if mod is m)
                                               .rpartition(".")[0])
            torch.testing.assert_close(m.simulate(owner.weight), owner.weight, rtol=0, atol=0)


def test_the_choice_is_recorded_in_the_file_and_refused_without_data():
    from qcompile.models import digits

    x_train, _, _, _ = digits.load_split()
    model = digits.pretrained()
    options = lambda r: json.loads(next(p.value for p in r.onnx_model.metadata_props  # noqa: E731
                                        if p.key == "qcompile.options"))
    adaptive = qcompile.compile(model, calib=x_train[:16], weight_rounding="adaptive", validate=False)
    assert options(adaptive)["weight_rounding"] == "adaptive"  # qcompile validate rebuilds the same simulation
    assert "weight_rounding" not in options(qcompile.compile(model, calib=x_train[:16], validate=False))
    with pytest.raises(qcompile.UserError, match="pass calibration inputs"):
        qcompile.compile(model, x_train[:1], weight_rounding="adaptive", validate=False)
    with pytest.raises(qcompile.UserError, match="unknown --weight-rounding 'gptq'"):
        qcompile.compile(model, calib=x_train[:16], weight_rounding="gptq", validate=False)
    from qcompile import qat

    with pytest.raises(qcompile.UserError, match="adaptive weight rounding is a PTQ step"):
        qat.prepare(model, x_train[:16], scheme="apot", bits=4, weight_rounding="adaptive")


@pytest.mark.parametrize("fn,shape,kernel,args", [
    (torch.nn.functional.conv1d, (2, 6, 11), (5,), ((1,), "same", (1,), 2)),
    (torch.nn.functional.conv2d, (2, 6, 9, 8), (3, 3), ((2, 1), (1, 0), (1, 2), 3)),
    (torch.nn.functional.conv3d, (2, 4, 5, 6, 7), (3, 3, 3), ((1, 2, 2), (0, 1, 1), 1, 2)),
])
def test_the_input_rows_times_the_weights_are_the_convolution(fn, shape, kernel, args):
    """The patches H is summed over are the convolution's own: ``W · rows`` gives its output, every group."""
    import types

    from qcompile.passes.adaptive_rounding import _input_rows

    stride, padding, dilation, groups = args
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(6, shape[1] // groups, *kernel, generator=gen)
    node = types.SimpleNamespace(target=fn, args=(None, None, None, stride, padding, dilation, groups), kwargs={})
    rows = _input_rows(node, x, groups, w.shape)
    y = fn(x, w, None, stride, padding, dilation, groups)
    out = torch.einsum("grd,god->gro", rows, w.reshape(groups, 6 // groups, -1))
    ref = y.movedim(1, -1).reshape(-1, groups, 6 // groups).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn,shape,kernel,args", [
    (torch.nn.functional.conv_transpose1d, (2, 4, 7), (4,), (2, 1, 1, 1, 1)),
    (torch.nn.functional.conv_transpose2d, (2, 4, 5, 6), (3, 3), ((2, 3), (1, 0), (1, 2), 2, (1, 2))),
    (torch.nn.functional.conv_transpose2d, (2, 4, 5, 5), (3, 3), (1, 3, 0, 4, 1)),  # depthwise; padding past k-1
    (torch.nn.functional.conv_transpose3d, (2, 4, 3, 4, 3), (2, 3, 3), ((2, 1, 2), (0, 1, 1), (1, 0, 1), 1, 1)),
])
def test_a_transposed_convolution_is_solved_as_the_convolution_it_equals(fn, shape, kernel, args):
    """Rows of the stride-dilated, padded input times the swapped, flipped weight give the layer's output; the weight
    maps back exactly."""
    import types

    from qcompile.passes.adaptive_rounding import _as_convolution, _from_convolution, _input_rows

    stride, padding, out_pad, groups, dilation = args
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    per = 1 if groups == shape[1] else 3
    w = torch.randn(shape[1], per, *kernel, generator=gen)
    node = types.SimpleNamespace(target=fn, args=(None, None, None, stride, padding, out_pad, groups, dilation),
                                 kwargs={})
    w_eq = _as_convolution(w, groups)
    assert torch.equal(_from_convolution(w_eq, groups), w)
    rows = _input_rows(node, x, groups, w_eq.shape)
    y = fn(x, w, None, stride, padding, out_pad, groups, dilation)
    out = torch.einsum("grd,god->gro", rows, w_eq.reshape(groups, w_eq.shape[0] // groups, -1))
    ref = y.movedim(1, -1).reshape(-1, groups, w_eq.shape[0] // groups).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)       # per output channel: axis 1
        self.dw = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)       # depthwise: axis 0
        self.grouped = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2)  # one scale per position of a group
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        return self.out(torch.relu(self.grouped(torch.relu(self.dw(torch.relu(self.up(h)))))))


def test_transposed_convolutions_are_rounded_for_their_outputs(tmp_path):
    """ConvTranspose layers were left at nearest rounding without a word; now each is solved on the convolution it
    equals (per output channel, depthwise, and grouped, whose one scale serves the same position of every group):
    the layer's output error on its quantized input falls, and the file validates."""
    torch.manual_seed(0)
    model = Decoder().eval()
    x = torch.nn.functional.interpolate(torch.randn(48, 1, 4, 4), size=8, mode="bilinear")  # smooth images
    # equalize=False: the compiled layers keep the model's float weights, the reference below
    options = dict(calib=x, scheme="uniform", bits=3, keep_first_last="quant", equalize=False)
    adaptive = qcompile.compile(model, output=str(tmp_path / "a.onnx"), weight_rounding="adaptive", **options)
    assert adaptive.report.passed, adaptive.report.summary()
    report = next(t.report for t in adaptive.timings if t.name == "AdaptiveRounding")
    moved = {line.split(":")[0] for line in report if "% of weights on another level" in line
             and not line.split(": ")[1].startswith("0.0%")}
    assert moved == {"enc", "up", "dw", "grouped", "out"}, report
    for name in ("up", "dw", "grouped"):  # the layer's own objective, on what it reads in the simulation
        seen = {}
        layer = next(n for n in adaptive.model.graph.nodes if n.meta.get("layer") == name and n.op == "call_function")
        handle = torch.fx.Interpreter(adaptive.model)
        orig = handle.run_node

        def run_node(n, orig=orig):
            out = orig(n)
            if n is layer:
                seen["x"] = handle.env[n.args[0]]
            return out
        handle.run_node = run_node
        with torch.no_grad():
            handle.run(x)
        xq, module = seen["x"], model.get_submodule(name)
        args = (module.stride, module.padding, module.output_padding, module.groups, module.dilation)
        wfq = adaptive.model.get_submodule(f"{name}.weight_fq")
        with torch.no_grad():
            ref = torch.nn.functional.conv_transpose2d(xq, module.weight, None, *args)
            errs = [float((torch.nn.functional.conv_transpose2d(xq, w, None, *args) - ref).pow(2).sum())
                    for w in (wfq.simulate(module.weight), adaptive.model.get_submodule(name).weight)]
        assert errs[1] < 0.8 * errs[0], (name, errs)
        rounded = adaptive.model.get_submodule(name).weight  # on the layer's own levels, its quantizer unchanged
        torch.testing.assert_close(wfq.simulate(rounded), rounded, rtol=0, atol=0)
    assert adaptive.model.get_submodule("grouped.weight_fq").alpha.numel() == 4  # out / groups scales, as before


def test_on_a_compiled_model_it_says_it_did_nothing():
    """On a compiled model (layers bound to integer kernels) it found no layer and reported nothing at all."""
    import copy

    import qcompile
    from qcompile.models import digits
    from qcompile.passes import AdaptiveRounding

    x = digits.calibration_inputs(16)
    gm = copy.deepcopy(qcompile.compile(digits.pretrained(), x[:1], calib=x, validate=False).model)
    p = AdaptiveRounding(x)
    assert not p(gm).modified
    assert p.report == ["no layer with fake-quantized weights to round (after BindIntegerLayers, or on a compiled "
                        "model): nothing done; run AdaptiveRounding right after Calibrate"]
