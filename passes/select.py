"""SelectLayers: decide which layers are quantized and how, and record it on the nodes.

Every Conv1d/2d/3d, ConvTranspose1d/2d and Linear (``call_module``, and ``F.conv1d/2d/3d``/``F.linear``
``call_function``) node, and every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` and embedding table (whose weights alone are
quantized: see ``InsertQuantizers``), gets ``node.meta["qconfig"] = LayerConfig(...)``. An embedding table counts
as a first layer of its own and is left out when the first layers are found (the projections that read it stay
first). Later passes read only this metadata.
The rules, in order, later ones winning:

1. ``default``: the requested scheme, for every layer;
2. first and last layers (``first_last``): ``"int8"`` = 8-bit uniform weights and activations (default; the
   lecture: first/last layers are "more sensitive ... quantizing these layers to 8-bit does not reduce
   accuracy", and the APoT code keeps first/last weights at 8 bits), ``"fp32"`` = kept in float,
   ``"quant"`` = like the rest. *First* = the layers reached from a graph input without passing another layer;
   *last* = the layers from which the graph output is reached without passing another layer;
3. ``float_downsample=True``: 1×1 downsample shortcuts are kept in float (N2UQ appendix, Table A). A shortcut is
   a 1×1 conv whose output goes (possibly through a BatchNorm) into an add whose other operand is computed from
   the same block input along another path;
4. ``overrides``: :class:`Override` objects matched against the module's qualified name (glob or regex) or its
   class name (``type``), in order.

Before: ``conv1 -> ... -> fc`` without metadata.   After: the same graph, each layer node carrying a LayerConfig,
e.g. ``conv1: W8 uniform / A8 uniform (first layer)``. ``modified`` is whether any node's LayerConfig changed.

Configuration file (``load_overrides``), TOML or YAML, maps pattern to changes (optionally under a ``layers``
table); ``re:`` marks a regex (whole name must match), ``type:`` a module class name, anything else is a glob::

    "layer4.*" = { scheme = "uniform", bits = 8 }
    "re:.*downsample.*" = "float"
    "type:Linear" = { wbits = 8 }

Change keys: ``scheme`` (weights and activations; ``float``/``fp32`` means keep the layer in float), ``wscheme``,
``ascheme``, ``bits`` (both), ``wbits``, ``abits``, ``per_channel``, ``action`` (``quant``/``float``). Setting a
quantized scheme on a layer that an earlier rule put in float quantizes it again.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import numbers
import operator
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile.errors import UserError
from qcompile.ir import QUANT_SCHEMES, LayerConfig

from .base import Pass, PassResult, _reads_metadata, stock_layer

LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
LAYER_FUNCTIONS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.linear: "linear"}
FIRST_LAST_MODES = ("int8", "fp32", "quant")
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FLOAT_WORDS = ("float", "fp32")
_CHANGE_KEYS = ("scheme", "wscheme", "ascheme", "bits", "wbits", "abits", "per_channel", "action")
_KINDS = ("glob", "regex", "type")


_FIRST_LAST_REASONS = ("first layer", "last layer", "first and last layer")


def int8_config(reason: str) -> LayerConfig:
    """8-bit uniform weights and activations: the default for the first and last layers."""
    return LayerConfig(action="quant", wscheme="uniform", wbits=8, ascheme="uniform", abits=8, reason=reason)


@dataclasses.dataclass(frozen=True)
class Override:
    """A per-layer rule: layers whose name (``glob``/``regex``) or class name (``type``) match get ``config_changes``.

    ``source`` names where the rule came from (a file, ``--exclude``) and goes into the layer's ``reason``.
    """

    pattern: str
    kind: str = "glob"
    config_changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UserError(f"override kind {self.kind!r} for {self.pattern!r} must be one of {', '.join(_KINDS)}")
        if not self.pattern:
            raise UserError("an override pattern is empty; give a module name glob, re:REGEX or type:CLASS")
        if self.kind == "regex":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise UserError(f"invalid regex {self.pattern!r} in {self.where}: {exc}") from None
        object.__setattr__(self, "config_changes", _validate_changes(dict(self.config_changes), self))

    @property
    def where(self) -> str:
        return self.source or "overrides"

    @property
    def label(self) -> str:
        prefix = {"glob": "", "regex": "re:", "type": "type:"}[self.kind]
        return f"{prefix}{self.pattern}"

    def matches(self, name: str, type_name: str) -> bool:
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.pattern)
        if self.kind == "regex":
            return re.fullmatch(self.pattern, name) is not None
        wanted = self.pattern.rsplit(".", 1)[-1]  # accept "Conv2d", "nn.Conv2d", "torch.nn.Conv2d"
        return type_name == wanted

    def apply(self, cfg: LayerConfig) -> LayerConfig:
        ch = self.config_changes
        upd: dict[str, Any] = {}
        for key in ("wscheme", "ascheme", "wbits", "abits", "per_channel", "action"):
            if key in ch:
                upd[key] = ch[key]
        new = dataclasses.replace(cfg, **upd)
        rule = f"{self.where} '{self.label}'"
        if new.action == "float" and "action" not in ch and cfg.action == "float":
            # a rule that sets only bits/schemes of a layer kept float for another reason: that reason stands
            return dataclasses.replace(new, reason=f"{cfg.reason}; {rule} sets no scheme")
        if cfg.reason == "default" and not any(k in ch for k in ("wscheme", "wbits", "action")):
            # a rule on the activations or the weights' granularity only: the weight bits are still the default's,
            # which --avg-wbits chooses (a rule {abits = 8} took the layer out of the average, 3.33 bits for 2)
            return dataclasses.replace(new, reason=f"default; {rule}")
        return dataclasses.replace(new, reason=rule)


def _validate_changes(raw: dict, ov: "Override") -> dict:
    """Normalise user keys to LayerConfig fields; raise UserError naming the rule on a bad key or value."""
    where = f"{ov.where} '{ov.label}'"
    unknown = [k for k in raw if k not in _CHANGE_KEYS]
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(_CHANGE_KEYS)}")
    out: dict[str, Any] = {}

    def scheme_value(key: str) -> str | None:
        value = raw[key]
        if not isinstance(value, str):
            raise UserError(f"{key} in {where} must be a string, got {value!r}")
        value = value.lower()
        if value in _FLOAT_WORDS:
            return None
        if value not in QUANT_SCHEMES:
            raise UserError(f"unknown scheme {value!r} in {where}; use one of {', '.join(QUANT_SCHEMES)} or float")
        return value

    quantized_scheme = False
    for key, fields in (("scheme", ("wscheme", "ascheme")), ("wscheme", ("wscheme",)), ("ascheme", ("ascheme",))):
        if key in raw:
            value = scheme_value(key)
            if value is None:
                out["action"] = "float"
            else:
                quantized_scheme = True
                for f in fields:
                    out[f] = value
    for key, fields in (("bits", ("wbits", "abits")), ("wbits", ("wbits",)), ("abits", ("abits",))):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 2 <= value <= 8:
                raise UserError(f"{key} in {where} must be an integer from 2 to 8, got {value!r}")
            for f in fields:
                out[f] = int(value)  # numpy integers too, as the top-level bits= takes them
    if "per_channel" in raw:
        if not isinstance(raw["per_channel"], bool):
            raise UserError(f"per_channel in {where} must be true or false, got {raw['per_channel']!r}")
        out["per_channel"] = raw["per_channel"]
    if "action" in raw:
        action = raw["action"]
        if action not in ("quant", "float"):
            raise UserError(f"action in {where} must be 'quant' or 'float', got {action!r}")
        said = "float" if out.get("action") == "float" else "quant" if quantized_scheme else None
        if said is not None and said != action:  # the later key silently won
            scheme = next(raw[k] for k in ("scheme", "wscheme", "ascheme") if k in raw)
            raise UserError(f"action = {action!r} in {where} contradicts its scheme {scheme!r}; keep one of the two")
        out["action"] = action
    elif quantized_scheme and "action" not in out:
        out["action"] = "quant"  # naming a quantized scheme asks for the layer to be quantized
    # what the command line refuses, refused here too (the setting was dropped without a word)
    given_bits = [k for k in ("bits", "wbits", "abits") if k in raw]
    if out.get("action") == "float" and given_bits:
        raise UserError(f"{given_bits[0]} in {where} cannot apply to a layer kept in float; drop it")
    from qcompile.ir import FIXED_BITS

    fixed = {f: FIXED_BITS[out[f]] for f in ("wscheme", "ascheme") if out.get(f) in FIXED_BITS}
    for key, fields in (("wbits", ("wscheme",)), ("abits", ("ascheme",)), ("bits", ("wscheme", "ascheme"))):
        if key in raw and all(f in fixed and raw[key] != fixed[f] for f in fields):
            raise UserError(f"{fields[0]} {out[fields[0]]} in {where} has {fixed[fields[0]]}-bit levels whatever "
                            f"the bit-width; {key} = {raw[key]} cannot apply: drop it")
    return out


def parse_pattern(key: str) -> tuple[str, str]:
    """``re:X`` -> (X, "regex"), ``type:X`` -> (X, "type"), anything else -> (key, "glob")."""
    if key.startswith("re:"):
        return key[3:], "regex"
    if key.startswith("type:"):
        return key[5:], "type"
    return key, "glob"


def _split_commas(text: str) -> list[str]:
    """``a,b`` -> ``[a, b]``, but not at a comma inside brackets or braces: ``re:fc[23]{1,2}`` is one pattern (it
    was cut into ``re:fc[23]{1``, which matched no layer)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_exclude(globs: Iterable[str] | str | None) -> list[Override]:
    """``--exclude`` values (repeatable, or comma-separated) -> overrides that keep matching layers in float."""
    if globs is None:
        return []
    if isinstance(globs, str):
        globs = [globs]
    out = []
    for item in globs:
        parts = [p.strip() for p in _split_commas(str(item))]
        if not any(parts):
            raise UserError("--exclude needs a layer name or glob, e.g. --exclude 'layer4.*' (got an empty value)")
        for part in parts:
            if part:
                pattern, kind = parse_pattern(part)
                out.append(Override(pattern, kind, {"action": "float"}, source="--exclude"))
    return out


def _unique_keys_loader(yaml):
    """yaml's SafeLoader refusing a key given twice in one mapping (safe_load keeps the last one without a word;
    TOML refuses it: "Cannot overwrite a value")."""

    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (give each layer one "
                                                        "rule)", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeys


def read_config(path: str | os.PathLike) -> dict:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file mapping pattern -> changes: ``{"file": its base
    name, "layers": the mapping}``. ``CompileOptions`` keeps this (not the path), so the compiled file records the
    rules themselves and ``qcompile validate`` rebuilds the same model wherever the file has gone since."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"config file {path!r} is a directory; give the .toml or .yaml file inside it")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; give the path of a .toml or .yaml file of per-layer "
                        "settings")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path, "r", encoding="utf-8") as fh:
                data = yaml.load(fh, Loader=_unique_keys_loader(yaml))
        else:
            raise UserError(f"config file {path!r} must end in .toml, .yaml or .yml")
    except UserError:
        raise
    except PermissionError:  # not a syntax error: "fix the syntax there" was the wrong fix
        raise UserError(f"config file {path!r} cannot be read (permission denied); check its permissions (chmod +r) "
                        "or run as a user who can read it") from None
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)  # yaml: where the parser stopped (tomllib says it in its message)
        if mark is not None:
            first = f"line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', None) or first}"
        raise UserError(f"cannot parse config file {path!r}: {first}; fix the syntax there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must map layer patterns to settings, e.g. 'layer4.*: {{bits: 8}}'")
    if isinstance(data.get("layers"), dict):
        data = data["layers"]
    return {"file": os.path.basename(path), "layers": data}


def load_overrides(config: str | os.PathLike | dict) -> list[Override]:
    """The overrides of a config file (a path), of :func:`read_config`'s record of one, or of a mapping
    ``{pattern: settings}`` as ``compile(config=...)`` takes it, in their order."""
    if not isinstance(config, dict):
        config = read_config(config)
    elif not (set(config) <= {"file", "layers"} and isinstance(config.get("layers"), dict)):
        # the rules themselves, from Python (they were read as an empty record: no rule, no word)
        config = {"layers": config["layers"] if isinstance(config.get("layers"), dict) else config}
    if not isinstance(config.get("file") or "", str):  # it names the rules in the layer table
        raise UserError(f"config 'file' must be a string (the name of the rules' source), got {config['file']!r}")
    source = str(config.get("file") or "config")
    out = []
    for key, changes in (config.get("layers") or {}).items():
        pattern, kind = parse_pattern(str(key))
        if isinstance(changes, str):
            changes = {"scheme": changes}
        if not isinstance(changes, dict):
            raise UserError(f"{source}: pattern {key!r} must map to a table of settings or a scheme name, got {changes!r}")
        if changes and all(isinstance(v, dict) for v in changes.values()) and \
                not any(k in _CHANGE_KEYS for k in changes):
            # [layer] / [Layers] / [overrides] for [layers]: a table of rules read as one pattern's settings
            first = next(iter(changes))
            raise UserError(f"{source}: {key!r} holds rules for other patterns ({first!r} = {{...}}), not settings; "
                            "put per-layer rules under a [layers] table (layers: in YAML) or at the top level")
        out.append(Override(pattern, kind, changes, source=source))
    return out


def _stack_paths(node: torch.fx.Node | None) -> set[str]:
    """The modules torch.fx traced through to reach ``node`` (its ``nn_module_stack``)."""
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    return {path for path, _ in stack.values()}


_FOLDED = re.compile(r"(.+?)_folded\d*")  # passes.fold_constants names a folded weight <owner>.<largest source>_folded[i]


def weight_layer_name(gm: torch.fx.GraphModule, target: str, node: torch.fx.Node | None = None) -> str:
    """The layer name of a functional layer ``node`` reading the parameter ``target`` (``F.linear(x,
    self.fc.weight)``): the module that owns it (``fc``), or the parameter itself where no layer module owns it: a
    parameter of the root module (``w``), one of an ``nn.ParameterList``/``ParameterDict`` (``W.0``, ``D.q``: they
    were all named ``W`` and ``D``, and ``--exclude W.1`` matched nothing). torch.fx copies such a container as a
    plain Module, as it does a module whose forward it traced through: a plain-Module owner that the layer was not
    reached through (its module stack) holds parameters, not a layer."""
    owner_path, _, attr = target.rpartition(".")
    source = _FOLDED.fullmatch(attr)
    if source:  # FoldConstants' result (``x @ self.W``: W.T as ``W_folded``): named as the parameter it comes from
        attr = source.group(1)
        target = f"{owner_path}.{attr}" if owner_path else attr
    if not owner_path or attr.isdigit():  # a ParameterList's items are numbered
        return target
    try:
        owner = gm.get_submodule(owner_path)
    except AttributeError:
        return owner_path
    if isinstance(owner, (nn.ParameterList, nn.ParameterDict)):
        return target
    if owner_path in gm.meta.get("layer_owners", {}):
        return owner_path  # a layer module of the model whose parameter only is read (torch.fx copied it plainly)
    if type(owner) is nn.Module and node is not None and owner_path not in _stack_paths(node):
        from qcompile.qmodules import FakeQuantize

        if not any(not isinstance(child, FakeQuantize) for child in owner.children()):  # (the quantizers of its
            return target  # other parameters, InsertQuantizers' children, are no modules of the model)
    return owner_path


def _stack_type(node: torch.fx.Node) -> str | None:
    """The class name of the innermost module torch.fx traced through to reach ``node``, as the layer table shows."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    cls = next(reversed(stack.values()))[1]
    return getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1]


def _layer_name_and_type(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, str]:
    if node.op == "call_module":
        rnn = recurrent_module(gm, node)
        return str(node.target), type(rnn if rnn is not None else gm.get_submodule(node.target)).__name__
    # a functional layer: the module it came from (meta["layer"], set when a pass rewrites a module call), else the
    # owner of its weight attribute, else the node name
    name = node.meta.get("layer")
    if not isinstance(name, str):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = node.name
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            name = weight_layer_name(gm, str(weight.target), node)
    # an F.embedding table is of type Embedding, as an nn.Embedding is ('type:Embedding' reaches both)
    fn = "Embedding" if node.target is F.embedding else \
        LAYER_FUNCTIONS.get(node.target, getattr(node.target, "__name__", str(node.target)))
    if node.target is F.embedding:
        return name, fn
    try:
        owner = gm.get_submodule(name)
    except AttributeError:  # a parameter of the root module or of a container: the function names it, or the
        return name, _stack_type(node) or fn  # module whose forward called it, as the layer table does
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return name, fn  # a table used as a layer's weight (a tied output head): 'type:linear', not the table's type
    if type(owner) is nn.Module:  # torch.fx's copy of a module it traced through (MyLinear's F.linear): its class
        return name, _stack_type(node) or fn
    return name, type(owner).__name__


def weight_only_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A layer whose weights alone are quantized (its input stays float or is made of ids): recurrent layers and
    embedding tables."""
    return recurrent_module(gm, node) is not None or embedding_node(gm, node)


def recurrent_module(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """The ``nn.LSTM``/``nn.GRU``/``nn.RNN`` that the call_module ``node`` runs (itself, or inside the
    ``QuantizedRecurrent`` that InsertQuantizers put in its place), or None."""
    if node.op != "call_module":
        return None
    from qcompile.qmodules import QuantizedRecurrent, stock_recurrent

    mod = gm.get_submodule(node.target)
    if isinstance(mod, QuantizedRecurrent):
        return mod.layer
    return mod if stock_recurrent(mod) else None


def embedding_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """An ``nn.Embedding`` table lookup whose table can be quantized (weight-only, per row): the module itself (no
    ``max_norm``, which renormalizes rows in forward) or ``F.embedding`` on a parameter (as InsertQuantizers leaves
    it, the table read through its quantizer)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return type(mod) is nn.Embedding and mod.max_norm is None
    if node.op != "call_function" or node.target is not F.embedding or len(node.args) < 2:
        return False
    if (node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")) is not None:
        return False
    weight = node.args[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "call_module" and weight.args:
        weight = weight.args[0]  # read through its quantizer
    return isinstance(weight, torch.fx.Node) and weight.op == "get_attr"


def layer_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The Conv/Linear nodes that get a LayerConfig, and the recurrent layers (``nn.LSTM``/``nn.GRU``/``nn.RNN``)
    and embedding tables, quantized weight-only, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYER_MODULES) \
                and stock_layer(gm.get_submodule(node.target)):
            out.append(node)
        elif recurrent_module(gm, node) is not None or embedding_node(gm, node):
            out.append(node)
        elif node.op == "call_function" and node.target in LAYER_FUNCTIONS:
            out.append(node)
    return out


def _first_layers(gm: torch.fx.GraphModule, layers: set) -> list[torch.fx.Node]:
    """Layers with no layer among their ancestors: the ones that read the model's inputs directly. (Not "reachable
    from an input without crossing a layer": a transformer's residual stream reaches every block that way.)"""
    behind: dict[torch.fx.Node, bool] = {}  # node -> some layer among its ancestors
    for node in gm.graph.nodes:
        behind[node] = any(behind[a] or a in layers for a in node.all_input_nodes)
    return [n for n in gm.graph.nodes if n in layers and not behind[n]]


def _last_layers(gm: torch.fx.GraphModule, layers: set) -> list[torch.fx.Node]:
    """Layers with no layer among their descendants (the classifier; every head of a multi-output model)."""
    ahead: dict[torch.fx.Node, bool] = {}  # node -> some layer among its descendants
    for node in reversed(gm.graph.nodes):
        ahead[node] = any(ahead[u] or u in layers for u in node.users)
    return [n for n in gm.graph.nodes if n in layers and not ahead[n]]


def _ancestors(node: torch.fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_bn(gm, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _BATCHNORMS)
    return node.op == "call_function" and node.target is F.batch_norm


def _is_downsample_shortcut(gm: torch.fx.GraphModule, node: torch.fx.Node, layers: set) -> bool:
    """A 1×1 conv whose output goes (maybe via a BN) into an add whose other operand comes from the same block
    input along another path."""
    if node.op != "call_module":
        return False
    conv = gm.get_submodule(node.target)
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or any(k != 1 for k in conv.kernel_size):
        return False
    out = node
    if len(out.users) == 1 and _is_bn(gm, next(iter(out.users))):
        out = next(iter(out.users))
    if len(out.users) != 1:
        return False
    add = next(iter(out.users))
    if not _is_add(add):
        return False
    others = [a for a in add.all_input_nodes if a is not out]
    if len(others) != 1:
        return False
    other = others[0]
    other_ancestors = _ancestors(other)
    if node in other_ancestors:
        return False  # the other operand is computed from this conv: not a parallel path
    # Walk back from the conv's input to the nearest layer or graph input: the shortcut's source (the block
    # input, possibly pooled, as in ResNet-D). The other operand must be computed from it through a layer.
    src = node.args[0] if node.args else None
    while isinstance(src, torch.fx.Node):
        if src in other_ancestors:
            return any(a in layers for a in other_ancestors - _ancestors(src) - {src}) or other in layers
        if src in layers or src.op == "placeholder" or not src.all_input_nodes:
            return False
        src = src.all_input_nodes[0]
    return False


class SelectLayers(Pass):
    """Annotate every Conv/Linear node with its LayerConfig (see the module docstring).

    Args:
        default: the configuration of every layer no other rule decides.
        first_last: ``"int8"`` (8-bit uniform), ``"fp32"`` (float) or ``"quant"`` (like the rest).
        float_downsample: keep 1×1 downsample shortcuts in float.
        overrides: per-layer rules, applied in order after the others (later ones win).
    """

    def __init__(self, default: LayerConfig = LayerConfig(), first_last: str = "int8", float_downsample: bool = False,
                 overrides: Sequence[Override] = ()) -> None:
        super().__init__()
        if not isinstance(default, LayerConfig):
            hint = " (qcompile.quantize_pipeline.default_layer_config(options) gives the one compile uses)" \
                if type(default).__name__ == "CompileOptions" else ""
            raise UserError(f"SelectLayers: default must be a LayerConfig (qcompile.ir.LayerConfig(wscheme='apot', "
                            f"wbits=4, ...)), got {type(default).__name__}{hint}")
        if first_last not in FIRST_LAST_MODES:
            raise UserError(f"--keep-first-last {first_last!r} must be one of {', '.join(FIRST_LAST_MODES)}")
        self.default = default
        self.first_last = first_last
        self.only_first_last = False  # set by call(): see there
        self._configured: set = set()  # set by decide()
        self.float_downsample = float_downsample
        if isinstance(overrides, (dict, str, os.PathLike)):  # the rules as compile(config=...) takes them
            overrides = load_overrides(overrides)
        if isinstance(overrides, Override):
            overrides = (overrides,)
        try:
            overrides = tuple(overrides)
        except TypeError:  # overrides=42: "'int' object is not iterable"
            overrides = (overrides,)
        wrong = [o for o in overrides if not isinstance(o, Override)]
        if wrong:  # AttributeError: 'str' object has no attribute 'matches', from the first layer decided
            raise TypeError(f"overrides must be Override rules (load_overrides(config)) or a config given as "
                            f"compile(config=...) takes it, got {type(wrong[0]).__name__} {wrong[0]!r}")
        self.overrides = overrides

    def decide(self, gm: torch.fx.GraphModule) -> dict[torch.fx.Node, LayerConfig]:
        """The LayerConfig of every layer node, without touching the graph."""
        nodes = layer_nodes(gm)
        # an embedding table is the model's first layer wherever it is (it reads token ids); it does not take that
        # role from the layers after it (a transformer's first projections, kept 8-bit before tables were quantized)
        tables = {n for n in nodes if embedding_node(gm, n)}
        layers = set(nodes) - tables
        decision = {n: self.default for n in nodes}
        if self.first_last != "quant":
            first = set(_first_layers(gm, layers)) | tables
            last = set(_last_layers(gm, layers))
            for n in nodes:
                if n in first or n in last:
                    reason = "first and last layer" if n in first and n in last else (
                        "first layer" if n in first else "last layer")
                    # 8-bit, with the weights per channel or per tensor as asked (--per-tensor kept them per channel)
                    int8 = dataclasses.replace(int8_config(reason), per_channel=self.default.per_channel)
                    decision[n] = int8 if self.first_last == "int8" else dataclasses.replace(
                        self.default, action="float", reason=reason)
        if self.float_downsample:
            for n in nodes:
                if _is_downsample_shortcut(gm, n, layers):
                    decision[n] = dataclasses.replace(decision[n], action="float", reason="1x1 downsample shortcut")
        matched = {id(ov): 0 for ov in self.overrides}
        self._configured = set()  # layers a config rule quantizes as it says (not --exclude): the user's own levels
        ruled: dict = {}  # layer -> the config rule that set it (an --exclude after it overrides it: said below)
        overridden: list[str] = []
        for ov in self.overrides:
            for n in nodes:
                name, type_name = _layer_name_and_type(gm, n)
                if ov.matches(name, type_name):
                    decision[n] = ov.apply(decision[n])
                    matched[id(ov)] += 1
                    if ov.source != "--exclude" and decision[n].action == "quant":
                        self._configured.add(n)
                        ruled[n] = ov
                    else:
                        self._configured.discard(n)
                        if ov.source == "--exclude" and n in ruled:
                            ruled.pop(n)
                            overridden.append(name)
        if overridden:  # --config said how to quantize them, and --exclude kept them float, without a word
            self.report.append(f"--exclude keeps {', '.join(dict.fromkeys(overridden))} float over the --config "
                               "rule that quantizes it (--exclude wins)")
        names = [_layer_name_and_type(gm, n)[0] for n in nodes]
        names = list(dict.fromkeys(names))  # a module called twice is one name
        from qcompile.qmodules import FakeQuantize

        # a model quantized already (QAT-trained, converted): its rules were checked when they decided its layers,
        # and the layers they named may be bound to integer kernels now, no longer Conv/Linear nodes
        decided = any(isinstance(m, FakeQuantize) for m in gm.modules())
        for ov in self.overrides:
            if not matched[id(ov)] and not decided:  # a typo, most likely: ignoring it would quantize as if absent
                shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
                fix = "" if ov.source == "--exclude" else "; fix the pattern or remove it"
                raise UserError(f"{ov.where} '{ov.label}' matched no layer; the layers are {shown or 'none'}{fix}")
        return decision

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            # torch.fx.symbolic_trace records no shapes; the quantization passes read them (which Linear runs as a
            # 2-D Gemm, which outputs are logits) and built another, less accurate model without a word
            raise UserError("the graph carries no tensor shapes (torch.fx.symbolic_trace records none), which the "
                            "quantization passes need: trace with qcompile.trace(model, example_inputs), or run "
                            "torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs) first")
        decision = self.decide(gm)
        from qcompile.qmodules import FakeQuantize

        quantized = any(isinstance(m, FakeQuantize) for m in gm.modules())
        # no layer gets the bits and scheme asked, the first and last ones among them (a 2-layer MLP at --wbits 4
        # gave an all-8-bit file, and said "(uniform W4A8)"; with --keep-first-last fp32 an all-float one): compile
        # says so. Not for a quantized (QAT-trained) graph, whose bound layers are no layer nodes any more.
        def levels(cfg) -> tuple:
            return (cfg.action, cfg.wscheme, cfg.wbits, cfg.ascheme, cfg.abits)

        # (not where a config rule gives layers levels of their own: those are the levels asked for them)
        self.only_first_last = not quantized and self.first_last != "quant" and self.default.action == "quant" \
            and bool(decision) and all(levels(cfg) != levels(self.default) for cfg in decision.values()) \
            and any(cfg.reason in _FIRST_LAST_REASONS for cfg in decision.values()) and not self._configured
        if quantized:
            # quantizers are in the graph already (a QAT-trained model, converted): a layer keeps the decision that
            # put them there. Deciding anew labelled conv2 "W8 uniform (first layer)" (conv1, bound to an int8
            # kernel, is no longer a Conv node) while its trained APoT quantizers stayed.
            kept = {n: n.meta.get("qconfig", cfg) for n, cfg in decision.items()}
            differ = [n for n in decision if kept[n] != decision[n]]
            if differ:  # a new configuration given to a quantized graph was ignored without a word
                names = ", ".join(dict.fromkeys(_layer_name_and_type(gm, n)[0] for n in differ[:8]))
                self.report.append(f"quantizers are in the graph already: {len(differ)} layer(s) ({names}) keep the "
                                   f"decision that placed them, not this configuration (run the pipeline again from "
                                   f"the traced model to change it)")
            decision = kept
        changed = 0
        for node, cfg in decision.items():
            if node.meta.get("qconfig") != cfg:
                node.meta["qconfig"] = cfg
                changed += 1
        counts: dict[str, int] = {}
        for node, cfg in decision.items():
            key = cfg.describe(weights_only=weight_only_layer(gm, node))
            counts[key] = counts.get(key, 0) + 1
        for key, count in counts.items():
            self.report.append(f"{count} layer(s): {key}")
        for name, type_name, inside in opaque_layers(gm):
            self.report.append(f"{name} ({type_name}) is opaque to torch.fx: its {inside} stay float")
        if changed:
            self.report.append(f"set the configuration of {changed} of {len(decision)} layer(s)")
        return PassResult(gm, bool(changed))


def opaque_layers(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    """(name, type, what) for every module the graph calls as a whole (a torch.fx leaf that is not itself a layer:
    ``nn.LSTM``, an ``nn.MultiheadAttention`` with a mask, a --leaf-module) that holds weights the quantizer cannot
    reach, e.g. ``"6 Conv/Linear layer(s) and 2 attention in_proj weight(s)"``: these stay float, and the summary
    says so."""
    rows = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        mod = gm.get_submodule(node.target)
        if (isinstance(mod, LAYER_MODULES) and stock_layer(mod)) or type(mod).__module__.startswith("qcompile.") \
                or recurrent_module(gm, node) is not None:  # a layer of the table (recurrent: weight-only)
            continue
        layers = sum(isinstance(m, LAYER_MODULES) for m in mod.modules())
        recurrent = sum(m.num_layers for m in mod.modules() if isinstance(m, nn.RNNBase))  # stacked layers count
        recurrent += sum(isinstance(m, nn.RNNCellBase) for m in mod.modules())  # GRUCell/LSTMCell unrolled by hand
        packed = sum(isinstance(m, nn.MultiheadAttention) for m in mod.modules())
        parts = []
        if isinstance(mod, LAYER_MODULES):  # a kept-whole subclass: quantizing it as the plain layer would be wrong
            parts.append(f"a {type(mod).__mro__[1].__name__} with its own forward")
        elif layers:
            parts.append(f"{layers} Conv/Linear layer(s)")
        if recurrent:
            parts.append(f"{recurrent} recurrent layer(s)")
        if packed:
            parts.append(f"{packed} attention in_proj weight(s)")
        if parts:
            rows.append((str(node.target), type(mod).__name__, " and ".join(parts)))
    # a layer module's weight handed to another function (torchvision's fx.wrap'ed ``shifted_window_attention(x,
    # qkv.weight, proj.weight, ...)`` in Swin): the function computes with it in float
    from qcompile import qmodules

    layer_fns = set(LAYER_FUNCTIONS) | {getattr(qmodules, n) for n in dir(qmodules) if n.startswith("int8_")}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        path, _, attr = str(node.target).rpartition(".")
        if attr != "weight" or not path or path in seen:
            continue
        try:
            weight = getattr(gm.get_submodule(path), attr)
        except AttributeError:
            continue
        readers = sorted({getattr(u.target, "__name__", str(u.target)) for u in node.users
                          if u.op == "call_function" and u.target not in layer_fns and u.target is not F.embedding
                          and not _reads_metadata(u)})  # w.device, w.shape: nothing computed with the values
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and readers:
            seen.add(path)
            rows.append((path, "weight", f"read by {', '.join(readers)}"))
    # a transposed convolution written as F.conv_transpose*d on a parameter (a tied decoder): qcompile quantizes
    # nn.ConvTranspose layers, not this call, which stayed float with no row and no word
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _CONV_TRANSPOSE_FUNCTIONS and len(node.args) > 1 and \
                isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr":
            target = str(node.args[1].target)
            path = target.rpartition(".")[0]
            if target not in seen and path not in seen:
                seen.add(target)
                rows.append((target, node.target.__name__, "the weight of a functional transposed convolution, "
                             "which is not quantized (an nn.ConvTranspose layer is)"))
    return rows


_CONV_TRANSPOSE_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def layer_table(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    """(name, type, decision) for every layer node carrying a LayerConfig, in graph order, then the opaque modules
    whose layers stay float (:func:`opaque_layers`): the rows of the compile summary's layer table, on the graph
    of any stage (after ``SelectLayers``, or a compiled model whose layers run on int8 kernels)."""
    from qcompile.summary import layer_rows

    if not isinstance(gm, torch.fx.GraphModule):  # "'DigitsCNN' object has no attribute 'graph'"
        raise TypeError(f"layer_table takes a torch.fx.GraphModule, got {type(gm).__name__}: trace the model first, "
                        "gm = qcompile.trace(model, example_inputs), or give a compiled model (result.model)")
    return layer_rows(gm)


__all__ = ["SelectLayers", "Override", "load_overrides", "parse_exclude", "parse_pattern", "layer_table",
           "opaque_layers", "layer_nodes", "recurrent_module", "embedding_node", "weight_only_layer", "int8_config", "FIRST_LAST_MODES"]
