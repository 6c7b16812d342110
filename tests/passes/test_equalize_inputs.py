"""EqualizeInputs: per-feature scaling of a model input folded into the layers that read it."""
from __future__ import annotations

import torch
import torch.nn as nn

import qcompile
from qcompile.frontend import trace
from qcompile.passes.base import Pipeline
from qcompile.passes.equalize_inputs import EqualizeInputs


def raw_features(n: int = 256, seed: int = 0):
    """Tabular inputs on the scales of raw measurements (as wine's 0.1 .. 1680): positive, offset, 1e-1 .. 1e3."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 3, 12)
    return (1.5 + torch.rand(n, 12, generator=gen)) * scales, scales


def raw_mlp(scales: torch.Tensor) -> nn.Module:
    """An MLP whose first layer weighs each feature by about 1/its scale, as training on raw features makes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.div_(scales)
        model[0].bias.sub_(model[0].weight @ (2.0 * scales))  # centre the first layer's outputs
    return model.eval()


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_raw_features_are_scaled_and_centred_into_the_first_layer_exactly():
    x, scales = raw_features()
    model = raw_mlp(scales)
    p = EqualizeInputs(x)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    assert any("12 features scaled" in line and "centred" in line for line in p.report), p.report
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert not EqualizeInputs(x)(gm).modified  # the scaled input reads a Mul now, not a layer: left alone


def test_raw_tabular_inputs_keep_their_small_features_at_w8a8():
    """Per-tensor 8-bit input codes over features 1e-1 .. 1e3: the small features fell into one or two codes. A
    trained MLP on raw wine went from 94 % to 59 % at W8A8 (2 dB); with the pass 93 % (30 dB)."""
    x, scales = raw_features()
    model = raw_mlp(scales)
    with torch.no_grad():
        ref = model(x)
    results = {}
    for equalize in (False, True):
        r = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, equalize=equalize)
        assert r.report.passed, r.report.summary()
        with torch.no_grad():
            results[equalize] = sqnr(ref, r.model(x))
    assert results[True] > 30 and results[True] > results[False] + 15, results


def test_inputs_whose_features_share_a_range_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)).eval()
    x = torch.randn(64, 3, 8, 8)
    assert not EqualizeInputs(x)(trace(model, (x[:1],))).modified
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    z = torch.randn(128, 12)  # standardized features
    assert not EqualizeInputs(z)(trace(mlp, (z[:1],))).modified


def test_conv_input_channels_are_scaled_without_a_shift():
    """A conv's zero padding must stay zero: channels are scaled, not centred."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5))
    ranges = torch.tensor([0.01, 1.0, 300.0])
    with torch.no_grad():
        model[0].weight.div_(ranges.reshape(1, 3, 1, 1))
    model.eval()
    x = torch.randn(64, 3, 8, 8) * ranges.reshape(1, 3, 1, 1)
    p = EqualizeInputs(x)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    assert p.report and "centred" not in p.report[0], p.report
    assert not any(n.target is torch.sub for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    r = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert r.report.passed and r.report.extra["sqnr_vs_float_db"] > 30, r.report.summary()


def test_an_input_read_by_other_ops_too_or_without_data_is_left_alone():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x):
            return self.fc(x) + x

    x, scales = raw_features()
    assert not EqualizeInputs(x)(trace(Skip().eval(), (x[:1],))).modified
    assert not EqualizeInputs(None)(trace(raw_mlp(scales), (x[:1],))).modified


class Through(nn.Module):
    """x.float() and x.view(x.size(0), -1) before the first Linear, which hand the values on unchanged."""

    def __init__(self, scales):
        super().__init__()
        self.mlp = raw_mlp(scales)

    def forward(self, x):
        return self.mlp(x.float().view(x.size(0), -1))


def test_the_pass_looks_through_ops_that_hand_the_input_on_and_keeps_constant_and_ignored_columns_out():
    """x.view(x.size(0), -1) before the Linear switched the pass off (wine 94 -> 67 %); a constant column (a 'year'
    2023) or a column with zero weights was neither scaled nor centred and set the input quantizer's range alone."""
    x, scales = raw_features()
    model = Through(scales).eval()
    p = EqualizeInputs(x)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    assert p.report, "the pass did not look through .float() / .view()"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)

    extra = torch.cat([x, torch.full((len(x), 1), 2023.0), 1e5 * torch.rand(len(x), 1)], 1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(14, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        mlp[0].weight.copy_(torch.cat([raw_mlp(scales)[0].weight, torch.zeros(32, 2)], 1))
        mlp[0].weight[:, 12] = 0.01  # the constant column: read, but never varies
    mlp.eval()
    with torch.no_grad():
        ref = mlp(extra)
    r = qcompile.compile(mlp, extra[:1], calib=extra, scheme="uniform", bits=8)
    assert r.report.passed
    with torch.no_grad():
        assert sqnr(ref, r.model(extra)) > 30


def test_a_first_layer_kept_float_gets_no_input_scaling():
    x, scales = raw_features()
    model = raw_mlp(scales)
    for kwargs in ({"keep_first_last": "fp32"}, {"exclude": ("0",)}):
        r = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, **kwargs)
        assert not [line for t in r.timings if t.name == "EqualizeInputs" for line in t.report], kwargs


def test_qat_prepare_scales_raw_input_features_too():
    """qat.prepare sets equalize=False, which switched EqualizeInputs off: raw wine started QAT at 63 % (94 %
    float) and ended at 87 %."""
    from qcompile import qat

    x, scales = raw_features()
    model = raw_mlp(scales)
    gm = qat.prepare(model, x[:1], scheme="uniform", bits=8, method="ste", calib=x)
    assert any(n.op == "get_attr" and str(n.target).endswith("_equalize_scale") for n in gm.graph.nodes)
    gm.eval()
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > 30


def test_a_constant_column_beside_standardized_features_is_moved_to_zero():
    """Standardized features and a constant 'year' column (2023): the features' ranges are close, so nothing is
    scaled, but the constant alone set the input quantizer's range."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(256, 12), torch.full((256, 1), 2023.0)], 1)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    p = EqualizeInputs(x)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    assert p.report and "a=0, centred" in p.report[0], p.report
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-3)


def test_a_model_taking_star_args_compiles():
    """``forward(self, *xs)``: the placeholder's metadata is a list, and the pass stopped on it."""
    class VarArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, *xs):
            return self.fc(torch.relu(self.a(xs[0])))

    x = torch.randn(32, 6)
    assert qcompile.compile(VarArgs().eval(), calib=x, scheme="uniform", bits=8).report.passed


def test_a_file_from_before_the_pass_validates_as_it_was_compiled(tmp_path):
    """A 0.3 file records no equalize_inputs (the pass did not exist): validate rebuilds its simulation without the
    pass, or a raw-feature model's file would fail against a simulation that has it."""
    import json

    import numpy as np
    import onnx

    from qcompile.cli import main

    x, scales = raw_features()
    model = raw_mlp(scales)
    torch.save(model, tmp_path / "m.pt")
    np.save(tmp_path / "calib.npy", x.numpy())
    path = tmp_path / "old.onnx"
    qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, equalize_inputs=False, output=str(path))
    onnx_model = onnx.load(str(path))
    for version in ("0.3.0", "0.4.0"):
        for prop in onnx_model.metadata_props:
            if prop.key == "qcompile.options":
                record = json.loads(prop.value)
                record.pop("equalize_inputs", None)
                record["qcompile"] = version
                prop.value = json.dumps(record, separators=(",", ":"))
        onnx.save(onnx_model, str(tmp_path / f"as_{version}.onnx"))
        rc = main(["validate", str(tmp_path / f"as_{version}.onnx"), "--against", str(tmp_path / "m.pt"),
                   "--trust-pickle", "--data", str(tmp_path / "calib.npy")])
        assert rc == (0 if version == "0.3.0" else 1), version


def test_a_feature_far_from_zero_is_centred_even_where_ranges_are_close():
    """Pixels in [0, 1] beside a pressure of 1013 ± 0.2 hPa: the spans are close (no range spread), but the
    per-tensor input range spanned the offset and every pixel fell into code 0 or 1 (a trained digits MLP: 81 %
    float, 10 % at W8A8, validation PASS)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(256, 8, generator=gen), 1013 + 0.2 * torch.randn(256, 1, generator=gen)], 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].bias.sub_(model[0].weight[:, 8] * 1013)  # as training makes it: the offset cancelled
        ref = model(x)
    p = EqualizeInputs(x)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    assert any("centred" in line for line in p.report), p.report
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-3)
    results = {}
    for equalize in (False, True):
        r = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, equalize=equalize, progress=False)
        assert r.report.passed, r.report.summary()
        with torch.no_grad():
            results[equalize] = sqnr(ref, r.model(x))
    assert results[True] > 35 and results[True] > results[False] + 15, results


def test_a_feature_with_one_value_in_calibration_does_not_set_the_weight_rows_range():
    """Raw features spanning 1e6 in units, some 0 in every calibration sample (a pixel never lit): their weight
    columns kept the raw scale (1/unit, 100x the others after scaling) and set each row's weight range, 7-18 dB
    lost at W8A8. They are brought within the others' largest column."""
    x, scales = raw_features()
    model = raw_mlp(scales)
    calib = x.clone()
    calib[:, 0] = 0.0  # the smallest-unit feature (largest weight column) never seen
    p = EqualizeInputs(calib)
    gm = Pipeline([p], check=True)(trace(model, (x[:1],))).gm
    w = gm.get_submodule("0").weight.detach().abs().amax(0)
    assert float(w[0]) <= float(w[1:].max()) * (1 + 1e-6), w
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-3)  # the same function off the data too


def test_a_standardisation_folded_into_the_first_layer_is_undone_in_the_file():
    """An MLP trained on standardised digits pixels, its scaler (mean, std) folded into the first Linear: the inputs
    share one range (0..16), but rarely lit pixels have a small std and weight columns 1/std large, which set every
    row's weight range (16 dB held-out at W8A8). The weight-column spread triggers the pass (24 dB)."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    mu, sd = x[:1200].mean(0), x[:1200].std(0)
    sd = torch.where(sd < 1e-3, torch.ones_like(sd), sd)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(10):
        for i in range(0, 1200, 32):
            opt.zero_grad()
            F.cross_entropy(model((x[i:i + 32] - mu) / sd), y[i:i + 32]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        w = model[0].weight / sd
        model[0].bias -= (w * mu).sum(1)
        model[0].weight.copy_(w)
        ref = model(x[1200:])
    results = {}
    for equalize in (False, True):
        r = qcompile.compile(model, x[:1], calib=x[:64], scheme="uniform", bits=8, equalize_inputs=equalize,
                             progress=False)
        assert r.report.passed
        with torch.no_grad():
            results[equalize] = sqnr(ref, r.model(x[1200:]))  # held-out images
    assert results[True] > results[False] + 4, results


def test_tiny_weight_columns_do_not_trigger_the_pass():
    """Columns far below the typical one (L1 leftovers, inputs a feature selection all but dropped) carry little:
    scaling their inputs up cost held-out headroom (-8 dB on digits MLPs). Only columns far above it count."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(128, 12, generator=gen) * 16  # one range
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight[:, :3] *= 1e-3
    p = EqualizeInputs(x)
    assert not Pipeline([p])(trace(model, (x[:1],))).modified, p.report
    with torch.no_grad():
        model[0].weight[:, :3] *= 1e6  # now three columns far above the rest: a folded scaler's rarely lit inputs
    p = EqualizeInputs(x)
    Pipeline([p])(trace(model, (x[:1],)))
    assert any("features scaled" in line for line in p.report), p.report


def test_raw_features_are_equalized_before_apot_input_levels_too():
    """The pass ran only where the first layer read uniform input levels: with every layer on APoT levels
    (keep_first_last="quant") raw features went into the low-bit first layer as they were. A trained MLP on raw
    wine at APoT W4A4 kept 50 % (81 % with the pass), at APoT W3/A8 41 % (70 %); float 96 %. (PoT stays out:
    mixed there.)"""
    x, scales = raw_features()
    model = raw_mlp(scales)
    with torch.no_grad():
        ref = model(x)
    for options in (dict(scheme="apot", bits=4), dict(scheme="apot", bits=4, wbits=3, abits=8)):
        results = {}
        for equalize in (False, True):
            r = qcompile.compile(model, x[:1], calib=x, keep_first_last="quant", equalize_inputs=equalize,
                                 **options)
            assert r.report.passed, r.report.summary()
            with torch.no_grad():
                results[equalize] = sqnr(ref, r.model(x))
        assert results[True] > results[False] + 3, (options, results)
