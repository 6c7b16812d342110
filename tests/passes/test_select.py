"""SelectLayers: first/last rules, downsample shortcuts, overrides from code, --exclude and config files."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.errors import UserError
from qcompile.frontend import trace
from qcompile.ir import LayerConfig
from qcompile.models.digits import DigitsCNN
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.select import (Override, SelectLayers, int8_config, layer_table, load_overrides,
                                    parse_exclude)
from tests.models import MLP, DepthwiseSeparableNet, MobileNetLike, ResidualCNN, example_input

DEFAULT = LayerConfig(action="quant", wscheme="apot", wbits=4, ascheme="apot", abits=4)


def select(model_or_gm, **options):
    gm = model_or_gm if isinstance(model_or_gm, torch.fx.GraphModule) else trace(
        model_or_gm, example_input(model_or_gm))
    p = SelectLayers(**options)
    result = p(gm)
    verify(result.gm)
    return result, p, {name: cfg for name, _, cfg in layer_table(result.gm)}


def configs(gm) -> dict[str, LayerConfig]:
    return {str(n.target): n.meta["qconfig"] for n in gm.graph.nodes if "qconfig" in n.meta}


def test_default_first_last_int8():
    result, p, table = select(ResidualCNN(), default=DEFAULT)
    assert result.modified
    cfg = configs(result.gm)
    assert set(cfg) == {"conv1", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "fc"}
    assert all(isinstance(c, LayerConfig) for c in cfg.values())
    assert cfg["conv1"] == int8_config("first layer")
    assert cfg["fc"] == int8_config("last layer")
    assert cfg["layer1.conv1"] == DEFAULT and cfg["layer1.downsample.0"] == DEFAULT
    assert table["conv1"] == "W8 uniform / A8 uniform (first layer)"
    assert table["layer1.conv2"] == "W4 apot / A4 apot (default)"
    assert layer_table(result.gm)[0] == ("conv1", "Conv2d", "W8 uniform / A8 uniform (first layer)")


def test_first_last_fp32_and_quant():
    _, _, fp32 = select(MLP(), default=DEFAULT, first_last="fp32")
    assert fp32 == {"fc1": "float (first layer)", "fc2": "W4 apot / A4 apot (default)", "fc3": "float (last layer)"}
    _, _, quant = select(MLP(), default=DEFAULT, first_last="quant")
    assert set(quant.values()) == {"W4 apot / A4 apot (default)"}
    with pytest.raises(UserError):
        SelectLayers(first_last="int4")


def test_first_and_last_over_branches_and_a_single_layer():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.mid = nn.Linear(4, 4)
            self.head1, self.head2 = nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, x):
            h = self.mid(F.relu(self.a(x)) + torch.sigmoid(self.b(x)))
            return self.head1(h), self.head2(h)

    _, _, table = select(trace(TwoHeads(), torch.zeros(1, 4)), default=DEFAULT)
    assert table == {"a": "W8 uniform / A8 uniform (first layer)", "b": "W8 uniform / A8 uniform (first layer)",
                     "mid": "W4 apot / A4 apot (default)",
                     "head1": "W8 uniform / A8 uniform (last layer)", "head2": "W8 uniform / A8 uniform (last layer)"}
    _, _, single = select(trace(nn.Sequential(nn.Linear(3, 2)), torch.zeros(1, 3)), first_last="fp32")
    assert single == {"0": "float (first and last layer)"}


@pytest.mark.parametrize("fold", [False, True])
def test_float_downsample_shortcut(fold):
    model = ResidualCNN()
    gm = trace(model, example_input(model))
    if fold:
        gm = FoldBatchNorm()(gm).gm
    _, _, table = select(gm, default=DEFAULT, float_downsample=True)
    assert table["layer1.downsample.0"] == "float (1x1 downsample shortcut)"
    assert sum(v.startswith("float") for v in table.values()) == 1


def test_downsample_in_the_bundled_digits_model():
    model = DigitsCNN().eval()
    _, _, table = select(trace(model, torch.zeros(1, 1, 8, 8)), default=DEFAULT, float_downsample=True)
    assert table["down"] == "float (1x1 downsample shortcut)"
    assert table["conv3"] == "W4 apot / A4 apot (default)"


def test_projection_of_an_inverted_residual_is_not_a_downsample():
    # block1.project (1×1) → bn → add(x, ·): the other operand is the block input, not a parallel path
    _, _, table = select(MobileNetLike(), default=DEFAULT, float_downsample=True, first_last="quant")
    assert not any(v.startswith("float") for v in table.values())


def test_overrides_in_order_glob_regex_type():
    overrides = [
        Override("layer1.*", "glob", {"scheme": "uniform", "bits": 8}, source="cfg"),
        Override(r"layer1\.conv2", "regex", {"wbits": 3, "per_channel": False}, source="cfg"),
        Override("Linear", "type", {"scheme": "float"}, source="cfg"),
    ]
    result, p, table = select(ResidualCNN(), default=DEFAULT, overrides=overrides)
    cfg = configs(result.gm)
    assert cfg["layer1.conv1"] == LayerConfig("quant", "uniform", 8, "uniform", 8, True, "cfg 'layer1.*'")
    assert cfg["layer1.conv2"] == LayerConfig("quant", "uniform", 3, "uniform", 8, False, r"cfg 're:layer1\.conv2'")
    assert table["fc"] == "float (cfg 'type:Linear')"
    assert table["conv1"] == "W8 uniform / A8 uniform (first layer)"
    # a rule that matches nothing is a typo, most likely: refused, as --exclude is (it used to be only reported)
    with pytest.raises(UserError, match=r"cfg 'nothing\.\*' matched no layer; the layers are conv1, .*fix the pattern"):
        select(ResidualCNN(), default=DEFAULT, overrides=overrides + [Override("nothing.*", "glob", {"bits": 2},
                                                                               source="cfg")])


def test_quantized_scheme_override_requantizes_a_float_layer():
    overrides = [Override("fc1", "glob", {"scheme": "pot", "bits": 5}, source="cfg"),
                 Override("fc3", "glob", {"bits": 5}, source="cfg")]
    _, _, table = select(MLP(), default=DEFAULT, first_last="fp32", overrides=overrides)
    assert table["fc1"] == "W5 pot / A5 pot (cfg 'fc1')"
    assert table["fc3"] == "float (last layer; cfg 'fc3' sets no scheme)"  # bits alone do not quantize it


def test_parse_exclude():
    ovs = parse_exclude(["fc*,layer1.conv1", "re:.*downsample.*", "type:Conv2d"])
    assert [(o.pattern, o.kind) for o in ovs] == [("fc*", "glob"), ("layer1.conv1", "glob"),
                                                  (".*downsample.*", "regex"), ("Conv2d", "type")]
    assert all(o.config_changes == {"action": "float"} for o in ovs)
    _, _, table = select(ResidualCNN(), default=DEFAULT, overrides=parse_exclude(["fc"]))
    assert table["fc"] == "float (--exclude 'fc')"
    assert parse_exclude(None) == []
    # a comma inside a regex's braces or brackets is the regex's ('re:fc[23]{1' matched no layer)
    assert [o.pattern for o in parse_exclude(["re:fc[23]{1,2},conv1", "re:(a|b),c"])] == ["fc[23]{1,2}", "conv1",
                                                                                          "(a|b)", "c"]


def test_override_validation():
    with pytest.raises(UserError, match="unknown key 'bitz'"):
        Override("x", "glob", {"bitz": 4})
    with pytest.raises(UserError, match="unknown scheme 'int3'"):
        Override("x", "glob", {"scheme": "int3"})
    with pytest.raises(UserError, match="integer from 2 to 8"):
        Override("x", "glob", {"bits": 0})
    with pytest.raises(UserError, match="invalid regex"):
        Override("(", "regex", {"bits": 4})
    with pytest.raises(UserError, match="kind"):
        Override("x", "name", {"bits": 4})
    # what the command line refuses (--scheme fp32 --bits 4, --wscheme binary --wbits 4) was dropped without a word
    with pytest.raises(UserError, match="bits in overrides 'x' cannot apply to a layer kept in float"):
        Override("x", "glob", {"scheme": "fp32", "bits": 4})
    with pytest.raises(UserError, match="wscheme binary in overrides 'x' has 1-bit levels .* wbits = 4"):
        Override("x", "glob", {"wscheme": "binary", "wbits": 4})
    assert Override("x", "glob", {"wscheme": "binary", "bits": 4}).config_changes["abits"] == 4  # activations
    assert Override("x", "glob", {"scheme": "ternary", "bits": 2}).config_changes["wbits"] == 2


def test_exclude_comes_after_the_config_rules():
    """--exclude conv2 with a config rule quantizing conv2: the rule won without a word."""
    import qcompile

    model = ResidualCNN(seed=0)
    x = torch.randn(8, *ResidualCNN.INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, validate=False,
                              config={"layer1.conv1": {"scheme": "uniform", "bits": 8}}, exclude="layer1.conv1")
    node = next(n for n in result.model.graph.nodes if n.meta.get("layer") == "layer1.conv1"
                or n.target == "layer1.conv1")
    assert node.meta["qconfig"].action == "float", node.meta["qconfig"]


TOML = '''
"layer1.*" = { scheme = "uniform", bits = 8 }
"re:layer1\\\\.conv2" = { wbits = 3 }
"type:Linear" = "float"
'''

YAML = '''
layers:
  layer1.*: {scheme: uniform, bits: 8}
  re:layer1\\.conv2: {wbits: 3}
  type:Linear: float
'''


@pytest.mark.parametrize("suffix,text", [(".toml", TOML), (".yaml", YAML)])
def test_load_overrides(tmp_path, suffix, text):
    path = tmp_path / f"layers{suffix}"
    path.write_text(text)
    ovs = load_overrides(path)
    assert [(o.pattern, o.kind) for o in ovs] == [("layer1.*", "glob"), (r"layer1\.conv2", "regex"),
                                                  ("Linear", "type")]
    _, _, table = select(ResidualCNN(), default=DEFAULT, overrides=ovs)
    assert table["layer1.conv1"] == f"W8 uniform / A8 uniform (layers{suffix} 'layer1.*')"
    assert table["layer1.conv2"] == f"W3 uniform / A8 uniform (layers{suffix} 're:layer1\\.conv2')"
    assert table["fc"] == f"float (layers{suffix} 'type:Linear')"


def test_load_overrides_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_overrides(tmp_path / "missing.toml")
    bad_ext = tmp_path / "layers.json"
    bad_ext.write_text("{}")
    with pytest.raises(UserError, match=r"\.toml, \.yaml or \.yml"):
        load_overrides(bad_ext)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("layer4.* = 3")
    with pytest.raises(UserError, match="cannot parse"):
        load_overrides(bad_toml)
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("fc: 8\n")
    with pytest.raises(UserError, match="must map to a table"):
        load_overrides(bad_value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_overrides(empty) == []
    bad_yaml = tmp_path / "flow.yaml"
    bad_yaml.write_text("fc: {bits: 8}\nconv*: [bits: 4, scheme: apot\n")
    with pytest.raises(UserError, match=r"cannot parse config file .* line 3, column 1: .*fix the syntax there"):
        load_overrides(bad_yaml)
    (tmp_path / "configs").mkdir()
    with pytest.raises(UserError, match="is a directory; give the .toml or .yaml file inside it"):
        load_overrides(tmp_path / "configs")
    # a key given twice: TOML refuses it, YAML kept the last one without a word
    twice = tmp_path / "twice.yaml"
    twice.write_text("fc2: {bits: 4}\nfc2: {bits: 3}\n")
    with pytest.raises(UserError, match=r"line 2, column 1: duplicate key 'fc2' \(give each layer one rule\)"):
        load_overrides(twice)


@pytest.mark.parametrize("rule", ['{ scheme = "fp32", action = "quant" }', '{ scheme = "apot", action = "float" }',
                                  '{ wscheme = "float", action = "quant" }'])
def test_a_rule_whose_action_contradicts_its_scheme_is_refused(rule, tmp_path):
    """The later key won silently: fp32 + quant compiled the layer at the default APoT W4A4."""
    path = tmp_path / "rules.toml"
    path.write_text(f'"fc2" = {rule}\n')
    with pytest.raises(UserError, match=r"action = '(quant|float)' in rules.toml 'fc2' contradicts its scheme"):
        load_overrides(path)


def test_an_exclude_that_matches_no_layer_is_an_error_naming_the_layers():
    """A typo in --exclude used to compile the layer quantized with only a report line; a config file's pattern
    (often shared between models) still only reports."""
    with pytest.raises(UserError, match=r"--exclude 'layer9\*' matched no layer; the layers are conv1, "):
        select(ResidualCNN(), default=DEFAULT, overrides=parse_exclude(["layer9*"]))
    with pytest.raises(UserError, match="--exclude needs a layer name or glob"):
        parse_exclude([" , "])


def test_unchanged_and_idempotent():
    model = DepthwiseSeparableNet()
    gm = trace(model, example_input(model))
    first = SelectLayers(default=DEFAULT)
    assert first(gm).modified is True
    code = gm.code
    before = configs(gm)
    again = SelectLayers(default=DEFAULT)
    assert again(gm).modified is False
    assert configs(gm) == before and gm.code == code
    assert SelectLayers(default=DEFAULT, first_last="fp32")(gm).modified is True


def test_graph_without_layers_is_unchanged():
    gm = trace(nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1)), torch.zeros(1, 2, 4, 4))
    result, p, table = select(gm)
    assert result.modified is False and table == {}


def test_functional_layers_are_annotated():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.zeros(4, 3, 3, 3))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = F.conv2d(x, self.w1, padding=1)
            return self.head(x.mean((2, 3)))

    _, _, table = select(trace(Functional(), torch.zeros(1, 3, 5, 5)), default=DEFAULT, first_last="fp32")
    rows = layer_table(trace(Functional()))
    assert rows == []  # nothing annotated on a fresh trace
    assert table == {"w1": "float (first layer)", "head": "float (last layer)"}


def test_layer_table_of_a_compiled_model_lists_the_int8_layers_too():
    """layer_table took only Conv/Linear modules and functions: on a compiled model it left out every layer bound to
    an int8 kernel (the digits CNN: 2 of 6 rows). It gives the rows of the CLI's layer table now."""
    import qcompile
    from qcompile.passes import layer_table as exported
    from qcompile.summary import layer_lines

    model = ResidualCNN()
    x = example_input(model, batch=8)
    result = qcompile.compile(model, x, calib=x, scheme="apot", bits=4, output=None, validate=False)
    rows = exported(result.model)
    assert [r[0] for r in rows] == ["conv1", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "fc"]
    assert rows[0][1] == "Conv2d" and "int8 kernel" in rows[0][2] and rows[-1][1] == "Linear"
    assert [line.split()[0] for line in layer_lines(result.model)[1:]] == [r[0] for r in rows]


def test_a_rule_without_a_scheme_leaves_a_float_layer_float_and_says_why():
    """A rule that only sets bits on a layer kept float by first/last fp32 was credited with making it float."""
    _, _, table = select(MLP(), default=DEFAULT, first_last="fp32",
                         overrides=[Override("fc3", "glob", {"wbits": 4, "abits": 8}, source="layers.toml")])
    assert table["fc3"] == "float (last layer; layers.toml 'fc3' sets no scheme)"
    _, _, table = select(MLP(), default=DEFAULT, first_last="fp32",
                         overrides=[Override("fc3", "glob", {"scheme": "uniform", "bits": 8}, source="layers.toml")])
    assert table["fc3"] == "W8 uniform / A8 uniform (layers.toml 'fc3')"


def test_in_a_checked_pipeline_with_fold():
    model = ResidualCNN()
    gm = trace(model, example_input(model))
    result = Pipeline([FoldBatchNorm(), SelectLayers(default=DEFAULT, float_downsample=True)], check=True)(gm)
    assert result.modified
    assert dict((n, d) for n, _, d in layer_table(result.gm))["layer1.downsample.0"].startswith("float")


@torch.fx.wrap
def _attention_with(x, weight, bias):
    return torch.softmax(F.linear(x, weight, bias), -1)


class WeightToWrappedFunction(torch.nn.Module):
    """Swin's pattern: a Linear module whose weight is passed to an fx-wrapped function (computed in float)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(_attention_with(x, self.qkv.weight, self.qkv.bias))


def test_a_layer_whose_weight_goes_to_another_function_is_listed_as_float():
    import qcompile
    from qcompile.summary import layer_lines

    x = torch.randn(16, 8)
    result = qcompile.compile(WeightToWrappedFunction().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    lines = {line.split()[0]: line for line in layer_lines(result.model)[1:]}
    assert "float" in lines["qkv"] and "read by _attention_with" in lines["qkv"], lines
    assert "float" not in lines["fc"], lines


def test_per_tensor_weights_apply_to_the_8_bit_first_and_last_layers_too():
    """per_channel=False (--per-tensor) left the first and last layers per channel, and the layer table read the
    same either way."""
    import qcompile
    from qcompile.passes import layer_table

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.randn(32, 1, 8, 8)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, per_channel=False)
    assert result.report.passed
    assert all(m.axis is None for n, m in result.model.named_modules() if n.endswith("weight_fq"))
    rows = layer_table(result.model)
    assert rows and all("per-tensor" in decision for _, _, decision in rows), rows


def test_misnamed_rules_table_and_a_config_rules_bad_levels_name_the_file(tmp_path):
    """[layer] for [layers] was refused as "unknown key 'conv2' in k.toml 'layer'", which never said what was
    wrong; levels a config rule chose that do not exist advised the --ascheme/--abits flags the user never gave."""
    import qcompile

    bad = tmp_path / "k.toml"
    bad.write_text('[layer]\n"conv2" = {scheme = "pot", bits = 3}\n')
    with pytest.raises(UserError, match=r"k.toml: 'layer' holds rules for other patterns .*under a \[layers\] table"):
        load_overrides(str(bad))
    with pytest.raises(UserError, match="config 'file' must be a string"):
        load_overrides({"layers": {"conv2": {"bits": 4}}, "file": 5})
    rule = tmp_path / "pot6.toml"
    rule.write_text('"layer1.conv2" = {scheme = "pot", abits = 6}\n')
    model = ResidualCNN()
    x = example_input(model, batch=8)
    with pytest.raises(UserError, match=r"choose another activation scheme/bits in pot6.toml 'layer1.conv2'"):
        qcompile.compile(model, x[:1], calib=x, config=str(rule), validate=False)


def test_config_bits_take_numpy_integers_as_the_top_level_options_do():
    """bits=np.int64(4) was accepted by compile() but refused in a config dict ("must be an integer")."""
    import numpy as np

    rule = Override("fc", config_changes={"wbits": np.int64(8), "bits": np.int32(6)})
    assert rule.config_changes["wbits"] == 8 and type(rule.config_changes["wbits"]) is int
    assert LayerConfig().wbits == 4 and rule.apply(LayerConfig()).abits == 6


def test_a_model_whose_every_layer_is_first_or_last_says_none_got_the_bits_asked():
    """A 2-layer MLP at W4A8: both layers are first/last, kept at 8 bits, and the file was all 8-bit while the CLI's
    first line said "(uniform W4A8)", without a word."""
    import warnings

    import qcompile
    from qcompile.errors import QuantizationWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 8)

    def notes(**options):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = qcompile.compile(model, x[:1], calib=x, validate=False, **options)
        said = [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)
                and "its first and last layers are kept" in str(w.message)]
        assert bool(said) == ("first_last_note" in result.summary)
        return said

    said = notes(scheme="uniform", bits=8, wbits=4)
    assert len(said) == 1 and said[0].startswith("no layer of this model is uniform W4A8: its first and last layers "
                                                 "are kept at 8-bit uniform (--keep-first-last int8)"), said
    assert notes(scheme="apot", bits=4)
    assert "kept float (--keep-first-last fp32)" in notes(scheme="apot", bits=4, keep_first_last="fp32")[0]
    assert notes(scheme="apot", bits=4, exclude=["0"])  # one excluded, the other 8-bit: none as asked either
    assert not notes(scheme="uniform", bits=8)  # 8-bit asked: what it got
    assert not notes(scheme="apot", bits=4, keep_first_last="quant")
    # a config rule gives the layers levels of their own: those were asked for (the note said "no other layer the
    # rules leave as asked" and suggested --keep-first-last quant to a user whose rules chose every layer)
    assert not notes(scheme="apot", bits=4, config={"2": {"scheme": "apot", "wbits": 3, "abits": 5}})
    assert notes(scheme="apot", bits=4, config={"2": {"action": "float"}})  # kept float by rule: none as asked
    deeper = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompile.compile(deeper, x[:1], calib=x, validate=False, scheme="apot", bits=4)
    assert not any("first and last layers are kept" in str(w.message) for w in caught)  # the middle one is APoT-4


def test_layers_on_a_parameter_list_are_named_by_item_in_the_table_and_in_rules():
    """F.linear(x, self.W[i]) over an nn.ParameterList: every layer was named "W" (the table showed three rows
    "W", and --exclude W.1 matched nothing, so one of them could not be kept float). A root parameter and a
    module's own parameter keep their names."""
    import qcompile
    from qcompile.summary import layer_rows

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16) * 0.2)

        def forward(self, x):
            return F.relu(F.linear(x, self.w))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.ParameterList([nn.Parameter(torch.randn(16, 8) * 0.3), nn.Parameter(torch.randn(16, 16) * 0.2),
                                       nn.Parameter(torch.randn(4, 16) * 0.2)])
            self.blk = Blk()
            self.v = nn.Parameter(torch.randn(16, 16) * 0.2)

        def forward(self, x):
            h = F.relu(F.linear(x, self.W[0]))
            h = F.relu(F.linear(h, self.v))
            h = F.relu(F.linear(h, self.W[1]))
            return F.linear(self.blk(h), self.W[2])

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    result = qcompile.compile(Net().eval(), x[:1], calib=x, scheme="apot", bits=4, validate=False,
                              exclude=["W.1"])
    rows = {name: decision for name, _, decision in layer_rows(result.model)}
    assert list(rows) == ["W.0", "v", "W.1", "blk", "W.2"], rows
    assert rows["W.1"] == "float (--exclude 'W.1')" and rows["v"].startswith("W4 apot")
    with pytest.raises(UserError, match="the layers are W.0, v, W.1, blk, W.2"):
        qcompile.compile(Net().eval(), x[:1], calib=x, scheme="apot", bits=4, validate=False, exclude=["W"])


def test_a_functional_layer_on_a_layer_modules_weight_is_named_after_that_module():
    """F.conv2d(x, self.c.weight, ...) and F.linear(h, self.fc.weight, ...) on nn.Conv2d / nn.Linear modules the
    forward never calls: torch.fx copies ``c`` and ``fc`` as plain Modules, and the layers were named "c.weight" and
    "fc.weight" (--exclude fc was refused) where weight_layer_name's rule says "c" and "fc"."""
    import qcompile
    from qcompile.summary import layer_rows

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 64, 10), nn.Linear(10, 4)

        def forward(self, x):
            y = F.relu(F.conv2d(x, self.c.weight, self.c.bias, padding=1))
            return self.head(F.relu(F.linear(y.flatten(1), self.fc.weight, self.fc.bias)))

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    result = qcompile.compile(Net().eval(), x[:1], calib=x, scheme="uniform", bits=8, exclude=["fc"])
    rows = {name: decision for name, _, decision in layer_rows(result.model)}
    assert list(rows) == ["c", "fc", "head"], rows
    assert rows["fc"] == "float (--exclude 'fc')" and result.report.passed


def test_the_type_column_of_the_layer_table_is_what_type_rules_match():
    """A custom MyLinear calling F.linear on its own weight showed type MyLinear in the layer table, but type:MyLinear
    matched nothing (SelectLayers saw torch.fx's plain Module copy); the layers on a ParameterDict were all named
    "D". Every row's name and type now select that row."""
    import qcompile
    from qcompile.summary import layer_rows

    class MyLinear(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(o, i) * 0.3)
            self.bias = nn.Parameter(torch.zeros(o))

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.my, self.b = nn.Linear(8, 16), MyLinear(16, 16), nn.Linear(16, 3)
            self.D = nn.ParameterDict({"p": nn.Parameter(torch.randn(16, 16) * 0.2),
                                       "q": nn.Parameter(torch.randn(16, 16) * 0.2)})

        def forward(self, x):
            h = torch.relu(self.my(torch.relu(self.a(x))))
            h = torch.relu(F.linear(h, self.D["p"]))
            h = torch.relu(F.linear(h, self.D["q"]))
            return self.b(h)

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    result = qcompile.compile(Net().eval(), x[:1], calib=x, scheme="apot", bits=4, validate=False)
    rows = [(name, kind) for name, kind, _ in layer_rows(result.model)]
    assert rows == [("a", "Linear"), ("my", "MyLinear"), ("D.p", "linear"), ("D.q", "linear"), ("b", "Linear")], rows
    for name, kind in rows[1:-1]:
        for rule in (name, f"type:{kind}"):
            picked = qcompile.compile(Net().eval(), x[:1], calib=x, scheme="apot", bits=4, validate=False,
                                      config={"layers": {rule: "fp32"}})
            floats = {n for n, _, d in layer_rows(picked.model) if d.startswith("float")}
            assert name in floats, (rule, floats)


def test_a_functional_transposed_convolution_on_a_parameter_has_a_float_row():
    """F.conv_transpose2d(x, self.wt) (a tied decoder) stayed float with no row in the layer table and no warning; a
    module's weight read so was said to be "opaque to torch.fx", which traced it."""
    import torch.nn.functional as F

    import qcompile
    from qcompile.summary import layer_rows

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.wt = nn.Parameter(torch.randn(8, 4, 2, 2) * 0.2)
            self.o = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.o(torch.relu(F.conv_transpose2d(torch.relu(self.a(x)), self.wt, stride=2)))

    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    rows = {name: decision for name, _, decision in layer_rows(result.model)}
    assert rows["wt"].startswith("float: the weight of a functional transposed convolution"), rows
    assert not any("opaque" in d for d in rows.values()), rows


def test_layer_table_of_a_model_instead_of_a_graph_module_says_how_to_get_one():
    """layer_table(model) raised "'DigitsCNN' object has no attribute 'graph'"."""
    from qcompile.models import digits
    from qcompile.passes.select import layer_table

    with pytest.raises(TypeError, match=r"layer_table takes a torch.fx.GraphModule, got DigitsCNN: trace the model"):
        layer_table(digits.pretrained())


def test_an_exclude_over_a_config_rule_is_reported():
    """--config giving conv2 uniform 8-bit and --exclude conv2: the exclude won and the rule was dropped without a
    word."""
    import qcompile
    from qcompile.models import digits

    x = digits.calibration_inputs(8)
    result = qcompile.compile(digits.pretrained(), calib=x, config={"conv2": {"wscheme": "uniform", "wbits": 8}},
                              exclude=["conv2"], validate=False, progress=False)
    lines = [line for t in result.timings if t.name == "SelectLayers" for line in t.report]
    assert "--exclude keeps conv2 float over the --config rule that quantizes it (--exclude wins)" in lines, lines
    alone = qcompile.compile(digits.pretrained(), calib=x, exclude=["conv2"], validate=False, progress=False)
    assert not any("over the --config" in line for t in alone.timings for line in t.report)
