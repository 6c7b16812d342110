"""RemoveIdentity and EliminateDeadCode: numeric equivalence, what they remove, what they must keep, and a second
run that reports ``modified=False``."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile.frontend import trace
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.cleanup import EliminateDeadCode, RemoveIdentity
from tests.models import MLP, ResidualCNN, example_input

ATOL = 0.0  # removing identities and dead code changes no arithmetic: outputs must be bit-identical

IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


class WithIdentities(nn.Module):
    """Identity, Dropout, Dropout2d, AlphaDropout modules and functional dropout with training=False."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.skip = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.3)
        self.alpha = nn.AlphaDropout(0.2)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.last = nn.Identity()

    def forward(self, x):
        y = self.drop2d(torch.relu(self.conv(self.skip(x))))
        y = F.dropout(y, 0.5, False)
        y = F.dropout(y, p=0.1, training=self.training)
        y = self.alpha(self.drop(torch.flatten(y, 1)))
        return self.last(self.fc(y))


class WithDeadCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.unused_branch = nn.Linear(6, 3)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x, unused_input):
        dead = torch.sigmoid(self.unused_branch(x)) * 2.0  # noqa: F841 - traced, then nobody reads it
        return self.fc2(torch.relu(self.fc1(x)))


def seeded(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().eval()


def module_nodes(gm, types) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types)]


def dropout_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.dropout]


# --- RemoveIdentity -----------------------------------------------------------------------------------------


def test_remove_identity_removes_identity_and_eval_dropout():
    model = seeded(WithIdentities)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    assert len(module_nodes(gm, IDENTITY_TYPES)) == 5 and len(dropout_calls(gm)) == 2
    p = RemoveIdentity()
    result = p(gm)
    assert result.modified is True
    assert module_nodes(result.gm, IDENTITY_TYPES) == [] and dropout_calls(result.gm) == []
    assert p.report == ["removed 7 identity/dropout node(s)"]
    for name in ("skip", "drop", "drop2d", "alpha", "last"):
        assert not hasattr(result.gm, name), name  # their submodules are gone too
    verify(result.gm)
    result.gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x), model(x), rtol=0, atol=ATOL)


def test_remove_identity_second_run_reports_no_change():
    gm = trace(seeded(WithIdentities), torch.zeros(1, 3, 6, 6))
    RemoveIdentity()(gm)
    again = RemoveIdentity()(gm)
    assert again.modified is False


def test_training_mode_dropout_is_kept():
    model = seeded(WithIdentities).train()
    gm = torch.fx.symbolic_trace(model)  # trace() would switch to eval; this graph is traced in training mode
    result = RemoveIdentity()(gm)
    assert result.modified is True  # F.dropout(x, 0.5, False) is still the identity
    kept = {n.target for n in module_nodes(result.gm, IDENTITY_TYPES)}
    assert {"alpha", "drop", "drop2d"} <= kept
    assert len(dropout_calls(result.gm)) == 1  # F.dropout(training=self.training) traced as training=True


def test_functional_dropout_with_default_training_is_kept():
    class DefaultDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5) + 1.0  # training defaults to True: it is not the identity

    gm = torch.fx.symbolic_trace(DefaultDropout())
    code_before = gm.code
    result = RemoveIdentity()(gm)
    assert result.modified is False and result.gm.code == code_before


def test_remove_identity_leaves_a_model_without_identities_unchanged():
    model = ResidualCNN(seed=2)
    gm = trace(model, example_input(model))
    code_before = gm.code
    result = RemoveIdentity()(gm)
    assert result.modified is False and result.gm.code == code_before


def test_identity_feeding_the_output_directly():
    gm = trace(nn.Sequential(nn.Linear(3, 3), nn.Identity()).eval(), torch.zeros(1, 3))
    result = RemoveIdentity()(gm)
    output = next(n for n in result.gm.graph.nodes if n.op == "output")
    assert output.args[0].target == "0"


# --- EliminateDeadCode --------------------------------------------------------------------------------------


def test_eliminate_dead_code_removes_unused_nodes_and_their_submodules():
    model = seeded(WithDeadCode)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    gm = torch.fx.symbolic_trace(model)
    assert "unused_branch" in {n.target for n in gm.graph.nodes}
    p = EliminateDeadCode()
    result = p(gm)
    assert result.modified is True
    targets = {n.target for n in result.gm.graph.nodes}
    assert "unused_branch" not in targets and torch.sigmoid not in targets
    assert not hasattr(result.gm, "unused_branch")
    assert p.report == ["removed 3 dead node(s)", "dropped 1 unused submodule(s)"]
    result.gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x, None), model(x, None), rtol=0, atol=ATOL)


def test_eliminate_dead_code_keeps_unused_inputs():
    gm = torch.fx.symbolic_trace(seeded(WithDeadCode))
    EliminateDeadCode()(gm)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "unused_input"]  # the signature is not the pass's to change


def test_eliminate_dead_code_drops_a_submodule_no_node_calls():
    gm = trace(MLP(), example_input(MLP))
    gm.add_submodule("spare", nn.Linear(2, 2))
    p = EliminateDeadCode()
    result = p(gm)
    assert result.modified is True and not hasattr(result.gm, "spare")
    assert p.report == ["dropped 1 unused submodule(s)"]


def test_eliminate_dead_code_keeps_side_effects():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x.clone()
            torch.ops.aten.add_.Tensor(y, 1.0)  # result unused, but the in-place op has an effect on y
            return y * 2.0

    gm = torch.fx.symbolic_trace(InPlace())
    x = torch.arange(4.0)
    expected = gm(x)
    result = EliminateDeadCode()(gm)
    assert result.modified is False
    result.gm.recompile()
    torch.testing.assert_close(result.gm(x), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("factory", [ResidualCNN, MLP])
def test_eliminate_dead_code_leaves_live_graphs_unchanged(factory):
    model = factory(seed=1)
    gm = trace(model, example_input(model))
    code_before = gm.code
    result = EliminateDeadCode()(gm)
    assert result.modified is False and result.gm.code == code_before


# --- both, as the fp32 pipeline runs them ---------------------------------------------------------------------


def test_cleanup_pipeline_reaches_a_fixed_point():
    model = seeded(WithIdentities)
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    gm = trace(model, x)
    pipe = Pipeline([RemoveIdentity(), EliminateDeadCode()], steps=3, check=True)
    result = pipe(gm)
    assert result.modified is True
    assert [(t.name, t.modified) for t in pipe.timings] == [
        ("RemoveIdentity", True), ("EliminateDeadCode", False),
        ("RemoveIdentity", False), ("EliminateDeadCode", False),
    ]
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x), model(x), rtol=0, atol=ATOL)


# --- DecomposeRMSNorm ---------------------------------------------------------------------------------------
class RMSNormNet(nn.Module):
    """RMSNorm as a module (affine, eps None), as a module without weight (eps given), and as F.rms_norm."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm1 = nn.RMSNorm(32)
        self.norm2 = nn.RMSNorm([4, 8], eps=1e-3, elementwise_affine=False)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 32))
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        h = self.norm1(self.fc1(x))
        h = self.norm2(h.view(-1, 4, 8)).flatten(1)
        h = F.rms_norm(h, (32,), self.gain, 1e-5)
        return self.fc2(torch.relu(h))


def test_decompose_rms_norm_keeps_the_function_and_makes_it_exportable():
    from qcompile.export import export_onnx
    from qcompile.passes.cleanup import DecomposeRMSNorm

    torch.manual_seed(0)
    model = RMSNormNet().eval()
    with torch.no_grad():
        model.norm1.weight.uniform_(0.5, 2.0)
    x = torch.randn(6, 16)
    gm = trace(model, (x,))
    with pytest.raises(Exception, match="rms_norm"):  # what the pass is for
        export_onnx(gm, (x,))
    result = Pipeline([DecomposeRMSNorm()], check=True)(gm)
    assert result.modified
    out = result.gm
    assert not any(n.op == "call_module" and isinstance(out.get_submodule(n.target), nn.RMSNorm)
                   for n in out.graph.nodes)
    assert not any(n.op == "call_function" and n.target is F.rms_norm for n in out.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)
    assert not DecomposeRMSNorm()(out).modified

    import onnxruntime as ort
    onnx_model = export_onnx(out, (x,))
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_a_model_with_rms_norm_compiles_quantized_and_validates(tmp_path):
    import qcompile

    torch.manual_seed(1)
    model = RMSNormNet().eval()
    calib = torch.randn(32, 16)
    result = qcompile.compile(model, calib[:1], calib=calib, output=str(tmp_path / "m.onnx"), scheme="apot", bits=4)
    assert result.report.passed, result.report.failures
    from qcompile.qmodules import FakeQuantize

    weights = [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "weight"]
    assert len(weights) == 2  # both Linear layers, around the decomposed norms
    assert result.report.extra["sqnr_vs_float_db"] > 10
    assert (tmp_path / "m.onnx").exists()


# --- DecomposeAdaptivePool ----------------------------------------------------------------------------------
class UnequalBins(nn.Module):
    """VGG's head on a small image: a 7x7 adaptive average pool of a 5x5 map (bins overlap), a 3x2 adaptive max
    pool of a 5x5 map, a 1-D adaptive pool of 10 -> 4, and one that divides (left as a pool)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.avg = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(4 * 49 + 4 * 6 + 4 * 4 + 4, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))                              # (N, 4, 5, 5)
        a = self.avg(h).flatten(1)
        m = F.adaptive_max_pool2d(h, (3, 2)).flatten(1)
        s = F.adaptive_avg_pool1d(h.flatten(2)[..., :10], 4).flatten(1)
        g = F.adaptive_avg_pool2d(h, 1).flatten(1)                # divides: stays a pool
        return self.fc(torch.cat([a, m, s, g], 1))


def test_adaptive_pools_with_unequal_bins_are_decomposed_exactly_and_export(tmp_path):
    import onnxruntime as ort

    import qcompile
    from qcompile.export import export_onnx
    from qcompile.passes.cleanup import DecomposeAdaptivePool

    torch.manual_seed(0)
    model = UnequalBins().eval()
    x = torch.randn(3, 3, 10, 10)
    gm = trace(model, (x,))
    with pytest.raises(Exception, match="not factor of input size"):
        export_onnx(gm, (x,))
    out = Pipeline([DecomposeAdaptivePool()], check=True)(gm).gm
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-6)
    pools = [n for n in out.graph.nodes if n.op == "call_function" and n.target is F.adaptive_avg_pool2d]
    assert len(pools) == 1 and pools[0].args[1] == 1
    assert not any(n.op == "call_module" and isinstance(out.get_submodule(n.target), nn.AdaptiveAvgPool2d)
                   for n in out.graph.nodes)
    assert not DecomposeAdaptivePool()(out).modified
    sess = ort.InferenceSession(export_onnx(out, (x,)).SerializeToString(), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), model(x).detach(),
                               rtol=1e-5, atol=1e-5)
    result = qcompile.compile(model, x[:1], calib=torch.randn(16, 3, 10, 10), output=str(tmp_path / "m.onnx"),
                              scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()


# --- DecomposeCubicDownscale --------------------------------------------------------------------------------
class CubicResizes(nn.Module):
    """Bicubic resizes between convolutions: ``kwargs`` for ``F.interpolate``, or an ``nn.Upsample`` module."""

    def __init__(self, kwargs: dict, module: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.kwargs = kwargs
        self.up = nn.Upsample(mode="bicubic", **kwargs) if module else None

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.up(h) if self.up is not None else F.interpolate(h, mode="bicubic", **self.kwargs)
        return torch.relu(self.c2(h)).mean((2, 3))


CUBIC_CASES = {
    "half": ({"scale_factor": 0.5}, False),
    "module": ({"scale_factor": 0.5}, True),
    "size, align_corners": ({"size": (5, 7), "align_corners": True}, False),
    "antialias": ({"size": (6, 6), "antialias": True}, False),
    "down h, up w": ({"size": (7, 20)}, False),
    "recompute": ({"scale_factor": (0.6, 0.7), "recompute_scale_factor": True}, False),
}


@pytest.mark.parametrize("case", list(CUBIC_CASES))
def test_bicubic_downscales_become_two_constant_matmuls(case):
    from qcompile.passes.cleanup import DecomposeCubicDownscale

    kwargs, module = CUBIC_CASES[case]
    torch.manual_seed(0)
    model = CubicResizes(kwargs, module).eval()
    x = torch.randn(3, 3, 12, 16)
    gm = trace(model, (x,))
    result = Pipeline([DecomposeCubicDownscale()], check=True)(gm)
    assert result.modified
    out = result.gm
    assert not any(n.target is F.interpolate or (n.op == "call_module" and isinstance(out.get_submodule(n.target),
                   nn.Upsample)) for n in out.graph.nodes)
    assert sum(n.target is torch.matmul for n in out.graph.nodes) == 2
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)
    assert not DecomposeCubicDownscale()(out).modified


def test_bicubic_enlargements_stay_resizes():
    from qcompile.passes.cleanup import DecomposeCubicDownscale

    gm = trace(CubicResizes({"scale_factor": 2.0}).eval(), (torch.randn(1, 3, 8, 8),))
    assert not DecomposeCubicDownscale()(gm).modified


def test_a_bicubic_downscale_between_int8_layers_runs_in_onnxruntime(tmp_path):
    """onnxruntime's optimized session ran the int8 file's Resize in NHWC and refused it at load ("'Cubic' mode
    only supports ... other scales >= 1"): validation raised onnxruntime's own error."""
    import onnx
    import onnxruntime as ort

    import qcompile

    torch.manual_seed(0)
    model = CubicResizes({"scale_factor": 0.5}).eval()
    calib = torch.randn(32, 3, 16, 16)
    path = tmp_path / "m.onnx"
    result = qcompile.compile(model, calib[:1], calib=calib, output=str(path), scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()
    assert result.report.extra["sqnr_vs_float_db"] > 30
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops and "Resize" not in ops


# --- DecomposeAvgPoolDivisor --------------------------------------------------------------------------------
class DivisorPools(nn.Module):
    def __init__(self, ceil_mode: bool = False, dims: int = 2):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.AvgPool2d) if dims == 2 else (nn.Conv3d, nn.AvgPool3d)
        self.dims = dims
        self.c1, self.c2 = conv(1, 8, 3, padding=1), conv(8, 4, 3, padding=1)
        self.pool = pool(2, divisor_override=3, ceil_mode=ceil_mode)

    def forward(self, x):
        h = self.pool(F.relu(self.c1(x)))
        fn = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return self.c2(fn(h, 3, stride=1, padding=1, divisor_override=5))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_average_pools_with_divisor_override_compute_their_divisor_in_the_file(dims, scheme):
    """torch.onnx writes ``divisor_override`` pools as plain AveragePool: the fp32 file was 12 dB from the model
    and validation failed."""
    import qcompile
    from qcompile.passes.cleanup import DecomposeAvgPoolDivisor

    torch.manual_seed(0)
    model = DivisorPools(dims=dims).eval()
    x = torch.randn(32, 1, *([16, 16] if dims == 2 else [8, 8, 8]))
    out = Pipeline([DecomposeAvgPoolDivisor()], check=True)(trace(model, (x[:1],))).gm
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)
    assert not DecomposeAvgPoolDivisor()(out).modified
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8, output=None)
    assert result.report.passed, result.report.summary()
    if scheme != "fp32":
        assert result.report.extra["sqnr_vs_float_db"] > 30, result.report.extra


def test_a_divisor_override_pool_in_ceil_mode_compiles_where_windows_are_whole_and_else_stops_in_one_line():
    import qcompile
    from qcompile.errors import UserError

    model = DivisorPools(ceil_mode=True).eval()
    result = qcompile.compile(model, torch.randn(1, 1, 16, 16), scheme="fp32", output=None)  # 16 = 8 windows of 2
    assert result.report.passed
    with pytest.raises(UserError, match="divisor_override with ceil_mode=True"):
        qcompile.compile(model, torch.randn(1, 1, 15, 15), scheme="fp32", output=None)


class _CachedKeys(nn.Module):
    """Keys appended to a cache that starts as ``torch.tensor([])`` (transformers 5's ``DynamicCache``: GPT-2
    without an attention mask)."""

    def __init__(self):
        super().__init__()
        self.k, self.q, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.cache = torch.tensor([])

    def forward(self, x):
        keys = torch.cat([self.cache, self.k(x)], dim=-2)
        att = torch.softmax(self.q(x) @ keys.transpose(-1, -2), dim=-1)
        return self.out(att @ keys)


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_an_empty_cache_concatenated_to_keys_is_dropped(scheme):
    """torch skips a 1-D empty tensor in ``cat`` beside tensors of higher rank; torch.onnx refused it with an
    AssertionError ("All tensors must have the same rank"), raised as a traceback through compile."""
    import qcompile

    x = torch.randn(32, 5, 8, generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(_CachedKeys().eval(), x[:1], calib=x, scheme=scheme, bits=8, output=None)
    assert result.report.passed, result.report.summary()
    removal = next(t for t in result.timings if t.name == "RemoveIdentity")
    assert "dropped empty tensors from 1 concatenation(s)" in " ".join(removal.report)  # cat([empty, k]) is k


class _GroupedQueryAttention(nn.Module):
    """Four query heads over one or two key/value heads through ``enable_gqa`` (transformers 5's Llama/Mistral/Qwen2
    without a mask)."""

    def __init__(self, kv_heads: int):
        super().__init__()
        self.kv = kv_heads
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 4 * kv_heads), nn.Linear(16, 4 * kv_heads)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, 4).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 16))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_grouped_query_attention_exports_as_repeated_heads(kv_heads, scheme):
    """torch.onnx has no conversion of ``enable_gqa=True`` ("not implemented if enable_gqa is True"), and the
    message sent users to rewrite transformers' attention."""
    import qcompile
    from qcompile.passes.cleanup import DecomposeGroupedQueryAttention
    from qcompile.frontend import trace

    model = _GroupedQueryAttention(kv_heads).eval()
    x = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(0))
    gm = trace(model, (x[:1],))
    assert DecomposeGroupedQueryAttention()(gm).modified
    assert not any(n.kwargs.get("enable_gqa") for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8, output=None)
    assert result.report.passed, result.report.summary()


# --- MatmulAsLinear -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["@", "torch.matmul", "torch.mm", "method"])
def test_a_matmul_with_a_parameter_is_quantized_as_the_linear_layer_it_is(form):
    """``x @ self.W`` stayed float with no row in the layer table while the compile said W8A8."""
    import qcompile

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 32) * 0.2)
            self.fc = nn.Linear(32, 5)

        def forward(self, x):
            h = {"@": lambda: x @ self.W, "torch.matmul": lambda: torch.matmul(x, self.W),
                 "torch.mm": lambda: torch.mm(x, self.W), "method": lambda: x.matmul(self.W)}[form]()
            return self.fc(torch.relu(h))

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(64, 16)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 30, result.report.summary()
    from qcompile.qmodules import FakeQuantize

    weights = [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "weight"]
    assert len(weights) == 2


class _HFConv1D(nn.Module):
    """HuggingFace's ``Conv1D`` (transformers.pytorch_utils; GPT-2's c_attn, c_fc, c_proj): a linear layer with its
    weight stored (in, out), computed as ``addmm``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


@pytest.mark.parametrize("scheme", ["uniform", "apot"])
def test_hf_conv1d_layers_are_quantized_as_linear_layers(scheme):
    """GPT-2's layers (HF Conv1D, ``torch.addmm``) stayed float with a warning; ``addmm(b, x, W)`` is now the
    ``F.linear(x, W.t(), b)`` it computes. An addmm whose alpha/beta are not 1 or whose bias broadcasts another way
    is no layer."""
    import qcompile
    from qcompile.qmodules import FakeQuantize

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_mid, self.c_proj = _HFConv1D(32, 16), _HFConv1D(32, 32), _HFConv1D(5, 32)
            self.bias2d = nn.Parameter(torch.randn(1, 5) * 0.1)

        def forward(self, x):
            h = self.c_proj(torch.relu(self.c_mid(torch.relu(self.c_fc(x)))))
            scaled = torch.addmm(self.c_proj.bias, h.reshape(-1, 5), self.c_mid.weight[:5, :5], alpha=0.5)
            return h + scaled.view(h.shape) + torch.addmm(self.bias2d, x[:, 0, :5], self.c_mid.weight[:5, :5])[:, None]

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(64, 7, 16)
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8 if scheme == "uniform" else 4)
    assert result.report.passed, result.report.summary()
    weights = [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "weight"]
    assert len(weights) == 3
    assert sum(n.target is torch.addmm for n in result.model.graph.nodes) == 2
    if scheme == "uniform":
        assert result.report.extra["sqnr_vs_float_db"] > 30, result.report.extra


def test_matmul_layers_are_named_as_their_parameter_or_module():
    """``x @ self.W`` and a GPT-2 ``Conv1D`` ``c_attn`` were named ``W_folded`` and ``c_attn.weight_folded`` (the
    folded transpose's attribute), so ``--exclude W`` / ``--exclude c_attn`` matched no layer, while the README says a
    functional layer is named as its parameter, or its module."""
    import qcompile
    from qcompile.summary import layer_lines

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.W = nn.Parameter(torch.randn(16, 16) * 0.2)
            self.V, self.bv = nn.Parameter(torch.randn(16, 16) * 0.2), nn.Parameter(torch.zeros(16))
            self.c_attn = _HFConv1D(16, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.relu(h @ self.W)
            h = torch.relu(torch.addmm(self.bv, h, self.V))
            return self.fc(torch.relu(self.c_attn(h)))

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="apot", bits=4, exclude=["W", "c_attn"])
    assert result.report.passed
    rows = {line.split()[0]: line for line in layer_lines(result.model)[1:]}
    assert list(rows) == ["a", "W", "V", "c_attn", "fc"], rows
    assert "--exclude 'W'" in rows["W"] and "--exclude 'c_attn'" in rows["c_attn"] and "W4 apot" in rows["V"]


def test_a_decomposed_bicubic_resize_stays_a_float_resize_not_a_layer():
    """MatmulAsLinear took the resize's second product for a layer: quantized at the model's 4 bits (2 dB lost)."""
    import qcompile

    model = CubicResizes({"size": (10, 10)}).eval()
    calib = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(model, calib[:1], calib=calib, scheme="apot", bits=4)
    assert result.report.passed
    assert sum(n.target is torch.matmul for n in result.model.graph.nodes) == 2
    assert not any(n.target is F.linear for n in result.model.graph.nodes)


# --- MeanAsGlobalPool ---------------------------------------------------------------------------------------


class MeanHeads(nn.Module):
    """The spatial means a classifier head is written with, and means that are no global pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        a = y.mean((2, 3))                            # (N, C)
        b = torch.mean(y, dim=(-1, -2), keepdim=True)  # (N, C, 1, 1)
        c = y.mean(dim=1)                              # a channel mean: kept
        d = y.mean(3)                                  # one spatial axis: kept
        return a + b.flatten(1), c, d


def test_mean_as_global_pool_rewrites_spatial_means_only():
    from qcompile.passes.cleanup import MeanAsGlobalPool

    model = seeded(MeanHeads)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    result = MeanAsGlobalPool()(gm)
    assert result.modified is True
    pools = [n for n in result.gm.graph.nodes if n.target is F.adaptive_avg_pool2d]
    means = [n for n in result.gm.graph.nodes if n.target in ("mean", torch.mean)]
    assert len(pools) == 2 and len(means) == 2
    verify(result.gm)
    result.gm.recompile()
    with torch.no_grad():
        for got, want in zip(result.gm(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # another summation order
    assert MeanAsGlobalPool()(result.gm).modified is False


def test_reads_of_rank_and_dtype_are_constants_so_batchnorm_folds():
    """timm's BatchNormAct2d starts with ``_assert(x.ndim == 4)``: the read of the conv output's rank was a second
    user of it, and FoldBatchNorm left the BatchNorm (float, between int8 layers) in most timm CNNs."""
    import torch.nn.functional as F

    import qcompile
    from qcompile.passes.cleanup import ConstantMetadataReads

    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            torch._assert(x.ndim == 4, "expected 4D input")
            torch._assert(x.dim() == 4, "4D")
            torch._assert(x.is_floating_point(), "float")
            torch._assert(x.dtype == torch.float32, "float32")
            return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                       self.eps))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BNAct(8), nn.Conv2d(8, 4, 1)).eval()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 6, 6)
    gm = trace(model, (x[:1],))
    result = ConstantMetadataReads()(gm)
    assert result.modified and not [n for n in gm.graph.nodes if n.target is getattr]
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    compiled = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert compiled.report.passed
    assert not [n for n in compiled.onnx_model.graph.node if n.op_type == "BatchNormalization"]


def test_a_linear_written_as_a_product_with_the_transposed_weight_is_a_layer():
    """Falcon's ``FalconLinear`` (an ``nn.Linear`` whose forward is ``input @ self.weight.T + self.bias``) was traced
    into, and its product stayed float with no row in the layer table: 8 of Falcon's 9 layers float, validation
    PASS. ``x @ W.T`` (and ``W.t()``, ``W.transpose(0, 1)``) is ``F.linear(x, W)``, the add of a bias of its out
    features the layer's bias."""
    import qcompile
    from qcompile.passes.cleanup import MatmulAsLinear
    from qcompile.summary import layer_rows

    class ProductLinear(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class TLinear(nn.Linear):
        def forward(self, x):
            return self.bias + torch.matmul(x, self.weight.transpose(0, 1))

    torch.manual_seed(0)
    model = nn.Sequential(ProductLinear(8, 16), nn.ReLU(), TLinear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 5, 8)
    gm = trace(model, (x[:1],))
    result = MatmulAsLinear()(gm)
    assert result.modified
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert len(linears) == 2 and all(len(n.args) == 3 for n in linears)  # the biases taken in
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    compiled = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert compiled.report.passed
    assert len(layer_rows(compiled.model)) == 3


def test_a_rank_the_model_computes_with_stays_a_read():
    """``softmax(h, dim=h.ndim - 1)`` after ``h.squeeze()``: at the example's batch of 1 the rank is 1, and as a
    constant the file took the softmax over the batch while validation (the same graph) passed. Only ranks that
    ``torch._assert`` checks are folded."""
    from qcompile.passes.cleanup import ConstantMetadataReads

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = self.fc(x).unsqueeze(-1).squeeze()
            torch._assert(h.ndim >= 1, "a tensor")
            return F.softmax(h, dim=h.ndim - 1)

    x = torch.randn(6, 8)
    gm = trace(M().eval(), (x[:1],))
    ConstantMetadataReads()(gm)
    gm.recompile()
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)
    assert [n for n in gm.graph.nodes if n.target is getattr]  # the read the softmax uses stays


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_circular_padding_moves_out_of_the_layer_so_it_runs_on_int8_kernels(dims, tmp_path):
    """torch.onnx writes a circular-padded convolution's wrap-around as slices and a concatenation inside the layer,
    behind its input quantizer: onnxruntime ran it as a float Conv (a helper's image model: 1.8x slower than
    quantize_static's file). As F.pad before the layer, the quantizer reads the padded tensor: QLinearConv."""
    import qcompile
    from qcompile.runtime.session import session
    from qcompile.summary import layer_lines

    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, padding=1, padding_mode="circular"),
                          nn.ReLU(), conv(8, 2, 1)).eval()
    x = torch.randn((32, 2) + (6,) * dims, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "c.onnx"
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=str(out))
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    rows = {line.split()[0]: line for line in layer_lines(result.model)[1:]}
    assert "int8 kernel" in rows["2"], rows
    assert model[2].padding_mode == "circular"  # the caller's model is untouched
    optimized = tmp_path / "opt.onnx"
    session(str(out), optimized_model_path=str(optimized))
    import onnx

    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert ops.count("QLinearConv") == 3, ops


def test_a_circular_padded_conv_called_twice_is_padded_at_both_calls():
    """The module is changed once, after every call of it got its pad (the first call's rewrite had switched the
    module to zero padding, and the second call lost its padding: CheckFloatOutputs stopped the compile)."""
    import qcompile

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
            self.o = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = torch.relu(self.c(torch.relu(self.a(x))))
            return self.o(torch.relu(self.c(h)))

    torch.manual_seed(0)
    x = torch.randn(32, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(Twice().eval(), x[:1], calib=x, scheme="uniform", bits=8, output=None)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 35, result.report.summary()


@pytest.mark.parametrize("equation", ["bi,oi->bo", "bi,io->bo", "btd,od->bto", "b t d , d o -> b t o"])
def test_a_linear_written_as_einsum_is_quantized(equation):
    """``torch.einsum("bi,oi->bo", x, self.W)`` stayed float with no row in the layer table, and the compile warned
    that the model had no other layer to quantize."""
    import qcompile
    from qcompile.qmodules import FakeQuantize
    from qcompile.summary import layer_rows

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 32)
            out_first = equation.replace(" ", "").split(",")[1].startswith("o")
            self.W = nn.Parameter(torch.randn(24, 32) * 0.2 if out_first else torch.randn(32, 24) * 0.2)
            self.o = nn.Linear(24, 5)

        def forward(self, x):
            return self.o(torch.relu(torch.einsum(equation, torch.relu(self.a(x)), self.W)))

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(64, 5, 16) if "t" in equation else torch.randn(64, 16)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 30, result.report.summary()
    assert [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "weight"].__len__() == 3
    assert "W" in [row[0] for row in layer_rows(result.model)]


def test_an_einsum_that_is_no_linear_layer_is_left_alone():
    from qcompile.frontend import trace
    from qcompile.passes.cleanup import MatmulAsLinear

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):  # a contraction over the first axis, and a trace: no Linear
            return torch.einsum("bi,bo->io", x, x @ self.W) + torch.einsum("ii->i", self.W)

    gm = trace(M().eval(), (torch.randn(4, 8),))
    MatmulAsLinear()(gm)
    assert sum(n.target is torch.einsum for n in gm.graph.nodes) == 2


def test_addmm_with_a_transposed_weight_and_a_bias_is_a_linear_layer():
    """``torch.addmm(self.bias, x, self.W.t())`` (W stored (out, in)) stayed float, and the layer before it was
    called the last layer."""
    import qcompile
    from qcompile.summary import layer_rows

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 32)
            self.W = nn.Parameter(torch.randn(10, 32) * 0.2)
            self.bias = nn.Parameter(torch.randn(10) * 0.1)

        def forward(self, x):
            return torch.addmm(self.bias, torch.relu(self.a(x)), self.W.t())

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(64, 16)
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4)
    assert result.report.passed, result.report.summary()
    rows = {row[0]: row[2] for row in layer_rows(result.model)}
    assert "last layer" in rows["W"] and "last layer" not in rows["a"], rows


@pytest.mark.parametrize("pad", ["reflect", "replicate"])
@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d(2), nn.AdaptiveAvgPool1d(4),
                                  nn.AdaptiveMaxPool1d(4)])
def test_adaptive_pools_with_equal_bins_behind_a_copying_pad_export(pad, pool):
    """A reflect/replicate-padded conv before an adaptive pool with equal bins stopped the compile: torch.onnx could
    not read the pool's input size behind the pad ("input size not accessible"), and the hint asked for
    --input-shape, which the trace had. The pool is written as the plain pool it is."""
    import qcompile

    dims = 2 if isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) else 1
    conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(3, 8, 3, padding=1, padding_mode=pad)
    model = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.Linear(8 * 4, 5)).eval()
    x = torch.randn(32, 3, 8, 8) if dims == 2 else torch.randn(32, 3, 16)
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8)
        assert result.report.passed, result.report.summary()


@pytest.mark.parametrize("form", ["linear", "conv"])
def test_functional_layers_called_with_keyword_weights_are_quantized(form):
    """timm's EVA attention calls F.linear(x, weight=self.qkv.weight, bias=qkv_bias): QuantizeOutputs stopped with an
    internal IndexError. Such calls are written positionally first."""
    import torch.nn.functional as F

    import qcompile
    from qcompile.summary import layer_rows

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48, bias=False) if form == "linear" else nn.Conv2d(3, 8, 3, bias=False)
            self.q_bias = nn.Parameter(torch.randn(16 if form == "linear" else 8) * 0.1)
            self.proj = nn.Linear(48, 10) if form == "linear" else nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if form == "linear":
                b = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.q_bias))
                return self.proj(torch.relu(F.linear(x, weight=self.qkv.weight, bias=b)))
            return self.proj(torch.relu(F.conv2d(x, weight=self.qkv.weight, bias=self.q_bias, padding=1)))

    torch.manual_seed(0)
    x = torch.randn(16, 8, 16) if form == "linear" else torch.randn(16, 3, 8, 8)
    result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()
    rows = {name: decision for name, _, decision in layer_rows(result.model)}
    assert [d for name, d in rows.items() if name.startswith("qkv")][0].startswith("W8"), rows


def test_layers_torch_onnx_refuses_are_written_as_operations_it_exports(tmp_path):
    """nn.ChannelShuffle, nn.Threshold(0.1, 0) and nn.Bilinear stopped the compile in torch.onnx ("not supported",
    "non-zero threshold"); DecomposeUnexportable writes them exactly, and the files validate in fp32 and at W8A8."""
    import qcompile
    from qcompile.passes import DecomposeUnexportable

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 12, 3, padding=1)
            self.shuffle = nn.ChannelShuffle(3)
            self.t = nn.Threshold(0.1, -0.5)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.a = nn.Linear(12, 8)
            self.b = nn.Bilinear(8, 12, 4)

        def forward(self, x):
            y = self.t(self.shuffle(torch.relu(self.c(x))))
            f = torch.flatten(self.pool(y), 1)
            return self.b(torch.relu(self.a(f)), torch.nn.functional.threshold(f, 0.2, 1.0))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 3, 8, 8)
    gm = qcompile.trace(model, x[:1])
    decompose = DecomposeUnexportable()
    result = decompose(gm)
    assert result.modified and decompose.report[0].startswith("decomposed 4 layer(s) torch.onnx cannot export")
    called = {type(result.gm.get_submodule(n.target)).__name__ for n in result.gm.graph.nodes if n.op == "call_module"}
    assert not called & {"ChannelShuffle", "Threshold", "Bilinear"}
    assert not any(n.target is torch.nn.functional.threshold for n in result.gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(result.gm(x), model(x))
    for scheme in ("fp32", "uniform"):
        out = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8, output=str(tmp_path / f"{scheme}.onnx"))
        assert out.report.passed, out.report.summary()
