"""Compile options: one frozen dataclass shared by the CLI and the Python API."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .errors import UserError
from .ir import SCHEMES

EMIT_FORMS = ("standard", "custom", "shift-add")
FIRST_LAST = ("int8", "fp32", "quant")
INT8_WEIGHTS = ("auto", "s8", "u8", "s8-safe")
WEIGHT_ROUNDING = ("nearest", "adaptive")


def _observers() -> tuple:
    from qcompile.quant import OBSERVERS

    return tuple(OBSERVERS)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    scheme: str = "apot"
    bits: int = 4
    wbits: Optional[int] = None
    abits: Optional[int] = None
    wscheme: Optional[str] = None  # weight scheme, default: scheme
    ascheme: Optional[str] = None  # activation scheme, default: scheme
    per_channel: bool = True
    calib_method: str = "mse"
    # APoT/PoT activations that can be negative: let calibration shift the unsigned levels (quant.level_set offset)
    # where that quantizes with less error than the symmetric signed set
    asym_levels: bool = True
    fold_bn: bool = True
    equalize: bool = True
    # EqualizeInputs (per-feature scaling of raw inputs, folded into the first layers); None: as ``equalize``
    equalize_inputs: Optional[bool] = None
    bias_correction: bool = True
    # weights rounded to their nearest levels ("nearest"), or to the levels that reconstruct each layer's output on
    # the calibration data ("adaptive": the lecture's adaptive rounding, solved as GPTQ does;
    # passes/adaptive_rounding.py)
    weight_rounding: str = "nearest"
    # automatic mixed precision: per-layer weight bit-widths chosen by measured sensitivity so that the layers the
    # default rule quantizes average at most this many bits per weight (passes/mixed_precision.py); None: wbits
    avg_wbits: Optional[float] = None
    int8_outputs: bool = True  # re-quantize outputs of 8-bit layers, residual adds and pools: int8 kernels
    # a layer with uint8 input codes and int8 weights whose output goes to APoT/PoT/log2 levels (or uniform levels
    # of fewer than 8 bits) decides the level on its integer accumulator (uint8 cells / a clamped requantization,
    # BindIntegerLayers): onnxruntime runs it on int8 kernels; False: the layer runs in float and the level is the
    # exact nearest one of its float output
    int8_levels: bool = True
    keep_first_last: str = "int8"
    float_downsample: bool = False
    exclude: tuple = ()
    # per-layer overrides: a .toml/.yaml path (or, from Python, the mapping pattern -> settings), made into
    # passes.select.read_config's {"file": name, "layers": rules}, which the compiled file records (so validate
    # needs no config file)
    config: Optional[object] = None
    emit: str = "standard"
    # 8-bit weight codes beyond ±64: "s8" (int8, onnxruntime's U8S8 kernels: fastest, but saturating on x86
    # without VNNI), "s8-safe" (int8 with no kernel pair past int16, passes/int8_pairs.py: U8S8 speed, exact on
    # every CPU, ~7.5-bit weight precision), "u8" (uint8 with zero point 128: U8U8 kernels, full precision, exact
    # everywhere, slower on x86), "auto" (s8 where this machine's onnxruntime computes U8S8 exactly, else s8-safe;
    # compile() records the choice)
    int8_weights: str = "auto"
    check: Optional[bool] = None  # None: follow QCOMPILE_CHECK=1 (set by the test suite)
    leaf_modules: tuple = ()
    # axes besides the batch (0) whose size may change when the file runs (2, 3: an image's height and width):
    # the file declares them symbolic, and the compile checks it at twice the example's size there (dynamic.py)
    dynamic_axes: tuple = ()

    def __post_init__(self):
        for name in ("scheme", "wscheme", "ascheme", "emit", "calib_method"):  # 'APoT', as the paper spells it
            value = getattr(self, name)
            if isinstance(value, str) and value != value.lower() and value.lower() in SCHEMES + EMIT_FORMS + \
                    tuple(_observers()):
                object.__setattr__(self, name, value.lower())
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown --scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        for name in ("wscheme", "ascheme"):
            value = getattr(self, name)
            if value is not None and (value not in SCHEMES or value == "fp32"):
                raise UserError(f"unknown --{name} {value!r}; choose one of {', '.join(s for s in SCHEMES if s != 'fp32')}")
        import numbers

        import numpy as np

        for name in ("per_channel", "asym_levels", "fold_bn", "equalize", "bias_correction", "int8_outputs",
                     "int8_levels", "float_downsample", "equalize_inputs", "check"):  # "no" was taken as true
            value = getattr(self, name)
            if value is None and name in ("equalize_inputs", "check"):
                continue
            if isinstance(value, np.bool_):
                object.__setattr__(self, name, bool(value))
            elif not isinstance(value, bool):
                raise UserError(f"option {name} must be True or False, got {value!r} ({type(value).__name__})")
        for name in ("bits", "wbits", "abits"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):  # numpy.int64(8)
                value = int(value)
                object.__setattr__(self, name, value)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UserError(f"--{name} must be an integer bit-width from 2 to 8, got {value!r} "
                                f"({type(value).__name__})")
            if value is not None and not 2 <= value <= 8:
                from .ir import FIXED_BITS

                users = {"wbits": [self.weight_scheme], "abits": [self.act_scheme],
                         "bits": ([self.weight_scheme] if self.wbits is None else [])
                         + ([self.act_scheme] if self.abits is None else [])}[name]
                if users and all(FIXED_BITS.get(u) == value for u in users):
                    continue  # --scheme binary --bits 1: what binary levels are anyway
                raise UserError(f"--{name} {value} is outside 2..8; choose a bit-width from 2 to 8")
        from .ir import FIXED_BITS

        for side, scheme, given in (("w", self.weight_scheme, self.wbits), ("a", self.act_scheme, self.abits)):
            # (config rules may give some layers another scheme, which takes the bit-width)
            if given is not None and scheme in FIXED_BITS and given != FIXED_BITS[scheme] and self.config is None:
                flag = f"--{side}scheme" if getattr(self, f"{side}scheme") else "--scheme"
                raise UserError(f"{flag} {scheme} has {FIXED_BITS[scheme]}-bit levels whatever the bit-width; "
                                f"--{side}bits {given} cannot apply: drop it")
        if self.emit not in EMIT_FORMS:
            raise UserError(f"unknown --emit {self.emit!r}; choose one of {', '.join(EMIT_FORMS)}")
        from qcompile.quant import OBSERVERS

        if self.calib_method not in OBSERVERS:
            raise UserError(f"unknown --calib-method {self.calib_method!r}; choose one of {', '.join(OBSERVERS)}")
        if self.avg_wbits is not None:
            if isinstance(self.avg_wbits, bool) or not isinstance(self.avg_wbits, numbers.Real) \
                    or not 2 <= float(self.avg_wbits) <= 8:
                raise UserError(f"--avg-wbits must be an average bit-width from 2 to 8, got {self.avg_wbits!r}")
            object.__setattr__(self, "avg_wbits", float(self.avg_wbits))
            if self.quantized and self.weight_scheme in FIXED_BITS:
                raise UserError(f"--avg-wbits chooses bit-widths, and {self.weight_scheme} weights have "
                                f"{FIXED_BITS[self.weight_scheme]}-bit levels whatever it says: drop it, or choose "
                                "--wscheme apot, pot or uniform")
        if self.weight_rounding not in WEIGHT_ROUNDING:
            raise UserError(f"unknown --weight-rounding {self.weight_rounding!r}; choose one of "
                            f"{', '.join(WEIGHT_ROUNDING)}")
        if self.int8_weights not in INT8_WEIGHTS:
            raise UserError(f"unknown --int8-weights {self.int8_weights!r}; choose one of {', '.join(INT8_WEIGHTS)}")
        if self.keep_first_last not in FIRST_LAST:
            raise UserError(f"unknown --keep-first-last {self.keep_first_last!r}; choose one of {', '.join(FIRST_LAST)}")
        for name in ("exclude", "leaf_modules"):  # a list from Python equals the same tuple
            value = getattr(self, name)
            if isinstance(value, list) or value is None:  # None: none, as before
                object.__setattr__(self, name, tuple(value or ()))
            items = () if value is None else (value,) if isinstance(value, str) else value
            if not isinstance(items, (tuple, list, set, frozenset)) or not all(isinstance(v, str) for v in items):
                # exclude=3 stopped the compile in SelectLayers with "'int' object is not iterable"
                flag = {"exclude": "--exclude", "leaf_modules": "--leaf-module"}[name]
                raise UserError(f"option {name} takes layer names ({flag}): a str or a list of str, such as "
                                f"{name}=['fc2'], got {value!r} ({type(value).__name__})")
        object.__setattr__(self, "dynamic_axes", parse_dynamic_axes(self.dynamic_axes))
        if isinstance(self.leaf_modules, str):  # one name, as exclude="conv2" is one pattern (not its letters)
            object.__setattr__(self, "leaf_modules", (self.leaf_modules,))
        if self.config is not None:
            from qcompile.passes.select import read_config

            config = self.config
            if not isinstance(config, (dict, str, os.PathLike)):
                raise UserError(f"config= takes the path of a TOML/YAML file of layer rules or a dict "
                                f"{{pattern: settings}}, not a {type(config).__name__} (docs/passes.md)")
            if not isinstance(config, dict):
                config = read_config(config)
            elif not (set(config) <= {"file", "layers"} and isinstance(config.get("layers"), dict)):
                config = {"layers": config}  # the mapping itself, from Python: pattern -> settings
            object.__setattr__(self, "config", config)

    def file_suffix(self) -> str:
        """The default output name's suffix: ``apot4``, ``uniform8``; ``apot4_uniform8`` (weights, activations)
        where they differ; ``fp32``; then ``_pertensor`` (per-tensor weights), ``_adaptive`` (adaptive rounding),
        ``_custom`` / ``_shiftadd`` (the file's form), so that compiles which differ in these do not overwrite each
        other's file."""
        form = {"custom": "_custom", "shift-add": "_shiftadd"}.get(self.emit, "")
        if not self.quantized:
            return "fp32" + form
        from .ir import FIXED_BITS

        w = f"{self.weight_scheme}{FIXED_BITS.get(self.weight_scheme, self.weight_bits)}"
        if self.avg_wbits is not None:
            w = f"{self.weight_scheme}{self.avg_wbits:g}avg"
        a = f"{self.act_scheme}{FIXED_BITS.get(self.act_scheme, self.act_bits)}"
        suffix = w if w == a else f"{w}_{a}"
        if not self.per_channel:
            suffix += "_pertensor"
        if self.weight_rounding == "adaptive":
            suffix += "_adaptive"
        return suffix + form

    @property
    def weight_bits(self) -> int:
        return self.wbits if self.wbits is not None else self.bits

    @property
    def act_bits(self) -> int:
        return self.abits if self.abits is not None else self.bits

    @property
    def weight_scheme(self) -> str:
        return self.wscheme or self.scheme

    @property
    def act_scheme(self) -> str:
        return self.ascheme or self.scheme

    @property
    def quantized(self) -> bool:
        return self.scheme != "fp32"

    def describe(self) -> str:
        from .ir import FIXED_BITS

        if not self.quantized:
            return "fp32"
        wbits = FIXED_BITS.get(self.weight_scheme, self.weight_bits)  # ternary: 2, binary: 1, whatever --bits says
        if self.avg_wbits is not None:  # mixed precision: the average the layers' bits keep to
            wbits = f"{self.avg_wbits:g} (average)"
        abits = FIXED_BITS.get(self.act_scheme, self.act_bits)
        if self.weight_scheme == self.act_scheme:
            return f"{self.weight_scheme} W{wbits}{' ' if self.avg_wbits is not None else ''}A{abits}"
        return f"W{wbits} {self.weight_scheme} / A{abits} {self.act_scheme}"


def int8_grid_note(opts: CompileOptions, gm=None) -> str | None:
    """Why layers of the standard- or custom-form file run on float kernels, where that is their levels' doing:
    APoT/PoT/log2 levels whose integer grid is wider than int8 (weights) or uint8 (activations), as APoT at 7-8 bits
    (±904 for 8-bit weights). Such a file decides levels by lookups around float layers: an APoT W8A8 depthwise CNN
    on digits ran 6x slower than its float model (and less accurately than uniform W8A8). Reads the quantizers of
    the compiled ``gm`` (a scheme only the excluded layers would have used says nothing); None where every grid
    fits."""
    from .qmodules import FakeQuantize

    # the custom form's function bodies inline to the same nodes (the same float kernels); shift-add lowers them
    if gm is None or not opts.quantized or opts.emit == "shift-add" or not opts.int8_levels:
        return None
    import torch.nn.functional as F

    from .qmodules import QuantizedRecurrent

    # weight-only layers compute in float whatever their levels (onnxruntime's LSTM, a table lookup): not their word
    float_anyway = {id(fq) for m in gm.modules() if isinstance(m, QuantizedRecurrent) for fq in m.weight_fq.values()}
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        if node.op == "call_function" and node.target is F.embedding and len(node.args) > 1:
            src = node.args[1]
            if getattr(src, "op", None) == "call_module":
                float_anyway.add(id(gm.get_submodule(src.target)))
    wide = {}
    for m in gm.modules():
        if not isinstance(m, FakeQuantize) or m.scheme not in ("apot", "pot", "log2") or id(m) in float_anyway:
            continue
        grid = m.levelset.grid
        weight = m.role == "weight"
        if (min(grid) < -128 or max(grid) > 127) if weight else (max(grid) - min(min(grid), 0) > 255):
            what = "weights" if weight else "activations"
            wide.setdefault((m.scheme, m.bits, what), f"{m.scheme} {m.bits}-bit {what} (grid {min(grid)}..{max(grid)})")
    if not wide:
        return None
    return (f"{' and '.join(wide[k] for k in sorted(wide, key=lambda k: (k[2] != 'weights', k)))} do not fit "
            "onnxruntime's int8 kernels: the layers with them run on float kernels with level lookups, often slower "
            "than the float model; for int8 speed use uniform levels at 8 bits (APoT: weights up to 6 bits, "
            "activations up to 5)")


def resolve_int8_weights(opts: CompileOptions, keep_weights: bool = False) -> CompileOptions:
    """``opts`` with ``int8_weights="auto"`` decided for this machine: ``s8-safe`` where its onnxruntime's uint8 ×
    int8 kernels saturate (x86 without VNNI), else ``s8``. Done before the passes (``s8-safe`` adds one), so the
    file's recorded options say what it stores. ``keep_weights`` (QAT export: the trained weights are final)
    resolves to ``u8`` instead of ``s8-safe``, which would move some of them."""
    if opts.int8_weights != "auto":
        return opts
    import dataclasses

    from qcompile.runtime.session import u8s8_saturates

    if not u8s8_saturates():
        return dataclasses.replace(opts, int8_weights="s8")
    return dataclasses.replace(opts, int8_weights="u8" if keep_weights else "s8-safe")



OPTIONS_KEY = "qcompile.options"
# check: the test suite's self-check switch, not a property of the file; dynamic_axes: the file's own input shapes
# say it, and the simulation that validate rebuilds is the same without it
_NOT_RECORDED = ("check", "dynamic_axes")


def parse_dynamic_axes(value) -> tuple:
    """``dynamic_axes`` as a sorted tuple of distinct axes >= 1: from ``"2,3"`` (the command line), an int or a
    sequence of ints; ``None`` or empty: none."""
    import numbers

    if value is None:
        return ()
    items = value
    if isinstance(value, str):
        items = value.replace(",", " ").split()  # "2,3", "2, 3" or "2 3"
    elif isinstance(value, numbers.Number) and not isinstance(value, bool):
        items = [value]
    example = "such as dynamic_axes=(2, 3) (--dynamic-axes 2,3) for an image's height and width"
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise UserError(f"dynamic_axes takes input axes, {example}; got {value!r} ({type(value).__name__})")
    axes = []
    for item in items:
        try:
            if isinstance(item, bool) or (not isinstance(item, (numbers.Integral, str))):
                raise ValueError
            axis = int(item)
        except ValueError:
            raise UserError(f"dynamic_axes takes whole-number input axes, {example}; got {item!r}") from None
        if axis == 0:
            raise UserError("dynamic axis 0 is the batch, which every file takes at any size already; name the other "
                            f"axes whose size may change, {example}")
        if axis < 0:
            raise UserError(f"dynamic axis {axis} is negative; count axes from 0 (the batch), {example}")
        axes.append(axis)
    return tuple(sorted(set(axes)))


def to_metadata(opts: CompileOptions) -> str:
    """The options a file was compiled with, as the compact JSON of ``metadata_props["qcompile.options"]``: the
    qcompile version, ``scheme`` and ``bits``, and every field that differs from its default (a default is what
    that version's :class:`CompileOptions` says; the version tells which one). Recording all 20 fields cost about
    400 bytes, a tenth of the 5% size allowance of a 70k-parameter model."""
    import json

    from qcompile import __version__

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    defaults = CompileOptions()
    record = {"qcompile": __version__, "scheme": opts.scheme, "bits": opts.bits}
    for field in dataclasses.fields(CompileOptions):
        name = field.name
        if name in record or name in _NOT_RECORDED:
            continue
        value = plain(getattr(opts, name))
        if value != plain(getattr(defaults, name)):
            record[name] = value
    return json.dumps(record, separators=(",", ":"))


# (option, the default before, the version whose default differs): compact records leave defaults out
# (option, the value files from before that version were compiled with, the version whose default changed it)
_NEW_DEFAULTS = (("asym_levels", False, (0, 2)), ("int8_levels", False, (0, 3)), ("equalize_inputs", False, (0, 4)))


def _version(text: str) -> tuple:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def from_metadata(text: str) -> dict:
    """Keyword arguments of :class:`CompileOptions` from :func:`to_metadata`'s JSON (or the full records older
    files carry): unknown keys dropped, lists back to tuples."""
    import json

    record = json.loads(text)
    names = {f.name for f in dataclasses.fields(CompileOptions)} - set(_NOT_RECORDED)
    out = {k: v for k, v in record.items() if k in names}
    for name, value, since in _NEW_DEFAULTS:  # a file from before a default changed records the old default
        if name not in record and _version(record.get("qcompile", "0")) < since:
            out[name] = value
    for name in ("exclude", "leaf_modules"):
        if name in out:
            out[name] = tuple(out[name] or ())
    return out
