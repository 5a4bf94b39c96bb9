"""Activations as 256-entry table lookups in an INT8 QDQ graph (`quantize.activation: lut`).

`lookup_activations(model, keep)` rewrites, in place, each mish / leaky ReLU that reads a
QuantizeLinear -> DequantizeLinear pair (an INT8 conv's output) into a lookup of its uint8 codes
in a [1, 256] uint8 table (`lut_table`: the activation of every input code, quantized to the
scale its consumers already use), so ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv and the
activation costs one lookup instead of a float chain; nodes named in `keep` stay as they are.
Returns the count per kind; an activation it cannot rewrite stays float and is not counted.

The activations are found by node pattern (`KINDS`), never by name: the export's sigmoid mish
(Sigmoid, Sub, Mul, Mul, Sub, Div), torch's Softplus -> Tanh -> Mul, the one `Mish` op, and
`LeakyRelu`. The input scale is the conv output's, which `quantize_static` has calibrated on the
calibration images with the section's method; a consumer that reads the activation in float (a
residual Add, a Concat left float) gets a DequantizeLinear of the looked-up codes, whose scale is
the range of the table's own values (all it can hold).

The lookup is Transpose(NHWC) -> Cast(int32) -> Reshape [1, M] -> GatherElements(table, axis 1)
-> Reshape -> Transpose(NCHW), both for ONNX Runtime's CPU kernels: its Gather copies each element
with its own memcpy (57 % of the demo baseline's time as the lookup), GatherElements a plain
loop; and it runs QLinearConv in NHWC, adding a Transpose pair around each, which it can cancel
against ours but cannot move through a Gather (2 real Transposes per activation otherwise).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["KINDS", "Activation", "find_activations", "lookup_activations", "lut_table"]


def _mish(x: np.ndarray, node=None) -> np.ndarray:
    return x * np.tanh(np.logaddexp(0.0, x))          # x * tanh(softplus(x)), no overflow


def _leaky(x: np.ndarray, node=None) -> np.ndarray:
    attrs = node.attribute if node is not None else ()
    alpha = next((a.f for a in attrs if a.name == "alpha"), 0.01)      # the ONNX default
    return np.where(x >= 0, x, alpha * x)


# a form is (tensor, op, inputs) steps from the input "x" to the output "y"; an input is a
# tensor of an earlier step or a scalar constant; Mul / Add match either input order
_SIGMOID_MISH = (("s", "Sigmoid", ("x",)), ("a", "Sub", (2.0, "s")), ("n", "Mul", ("s", "a")),
                 ("m", "Mul", ("x", "n")), ("d", "Sub", (2.0, "n")), ("y", "Div", ("m", "d")))
_SOFTPLUS_MISH = (("p", "Softplus", ("x",)), ("t", "Tanh", ("p",)), ("y", "Mul", ("x", "t")))
# kind -> (f(x, node=the form's last node) in float64, its graph forms)
KINDS: dict[str, tuple[Callable, tuple]] = {
    "mish": (_mish, (_SIGMOID_MISH, _SOFTPLUS_MISH, (("y", "Mish", ("x",)),))),
    "leaky": (_leaky, ((("y", "LeakyRelu", ("x",)),),)),
}
_COMMUTATIVE = {"Mul", "Add"}
_TO_NHWC, _TO_NCHW, _FLAT = (0, 2, 3, 1), (0, 3, 1, 2), "lut_flat_shape"


@dataclass
class Activation:
    """One matched activation: its kind, input and output tensors and its nodes."""
    kind: str
    x: str
    y: str
    nodes: list


def _key(node) -> str:
    """A node's identity: its first output (ONNX tensors have one producer)."""
    return node.output[0]


class _Index:
    """Producers, consumers and constant values of a graph's tensors."""

    def __init__(self, graph):
        self.producer = {t: n for n in graph.node for t in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self._tensors = {i.name: i for i in graph.initializer}
        self._tensors.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                              for a in n.attribute if a.name == "value"})
        self.outputs = {o.name for o in graph.output}

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node), else None."""
        from onnx import numpy_helper

        t = self._tensors.get(tensor)
        return None if t is None else numpy_helper.to_array(t)

    def is_scalar(self, tensor: str, value: float) -> bool:
        v = self.const(tensor)
        return v is not None and v.size == 1 and float(v.reshape(())) == value


def _inputs_match(node, args, bound: dict, index: _Index) -> bool:
    orders = [list(node.input)]
    if node.op_type in _COMMUTATIVE:
        orders.append(list(node.input)[::-1])
    return any(len(inputs) == len(args) and all(
        t == bound.get(a) if isinstance(a, str) else index.is_scalar(t, a)
        for t, a in zip(inputs, args)) for inputs in orders)


def _match(form, x: str, index: _Index) -> list | None:
    """The nodes of `form` read from tensor `x`, or None; its inner tensors must have no other
    readers (else the chain cannot be replaced)."""
    bound, nodes = {"x": x}, []
    for var, op, args in form:
        anchor = bound[next(a for a in args if isinstance(a, str))]
        node = next((n for n in index.consumers.get(anchor, ()) if n.op_type == op
                     and _key(n) not in map(_key, nodes) and _inputs_match(n, args, bound, index)),
                    None)
        if node is None or len(node.output) != 1:
            return None
        nodes.append(node)
        bound[var] = node.output[0]
    inside = set(map(_key, nodes))
    if any(_key(c) not in inside for n in nodes[:-1] for c in index.consumers.get(n.output[0], ())):
        return None
    return nodes


def find_activations(graph, keep: Iterable[str] = ()) -> list[Activation]:
    """Every activation of `KINDS` in `graph` none of whose nodes is named in `keep`."""
    index, keep, found, used = _Index(graph), set(keep), [], set()
    inputs = [i.name for i in graph.input] + [t for n in graph.node for t in n.output]
    for x in inputs:
        for kind, (_, forms) in KINDS.items():
            for form in forms:
                nodes = _match(form, x, index)
                if nodes and not any(n.name in keep or _key(n) in used for n in nodes):
                    used.update(map(_key, nodes))
                    found.append(Activation(kind, x, nodes[-1].output[0], nodes))
    return found


def lut_table(f: Callable[[np.ndarray], np.ndarray], s_in: float, zp_in: int, s_out: float,
              zp_out: int) -> np.ndarray:
    """The uint8 codes of f at every uint8 input code q: clip(round(f((q - zp_in) * s_in) / s_out)
    + zp_out, 0, 255), rounding half to even as QuantizeLinear does."""
    y = f((np.arange(256, dtype=np.float64) - zp_in) * float(s_in))
    return np.clip(np.rint(y / float(s_out)) + zp_out, 0, 255).astype(np.uint8)


def _qparams(node, index: _Index) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor uint8 Q / DQ node, else None."""
    scale = index.const(node.input[1])
    zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else \
        np.zeros((), np.uint8)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1 or zp.dtype != np.uint8:
        return None
    return float(scale.reshape(())), int(zp.reshape(()))


def _minmax_params(values: np.ndarray) -> tuple[float, int]:
    """uint8 (scale, zero point) of a range holding `values` and 0 (quantize_static's rule); the
    scale as the float32 the graph stores (the table must use the DQ's own scale)."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = float(np.float32((hi - lo) / 255 or 1.0))
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _lookup(codes: str, table: str, out: str, nhwc: str | None, prefix: str) -> list:
    """The nodes of out = table[codes] for a uint8 NCHW tensor `codes` (module docstring): to
    NHWC, int32, flat [1, M]; GatherElements on the [1, 256] table; back to the NHWC shape
    (the constant `nhwc`; None: read by a Shape node), NCHW."""
    from onnx import TensorProto, helper

    make = helper.make_node
    shape = [] if nhwc else [make("Shape", [f"{prefix}_nhwc"], [f"{prefix}_shape"],
                                  f"{prefix}_Shape")]
    return [make("Transpose", [codes], [f"{prefix}_nhwc"], f"{prefix}_ToNHWC", perm=_TO_NHWC),
            *shape,
            make("Cast", [f"{prefix}_nhwc"], [f"{prefix}_int"], f"{prefix}_Cast",
                 to=TensorProto.INT32),
            make("Reshape", [f"{prefix}_int", _FLAT], [f"{prefix}_index"], f"{prefix}_Flatten"),
            make("GatherElements", [table, f"{prefix}_index"], [f"{prefix}_flat"],
                 f"{prefix}_Lookup", axis=1),
            make("Reshape", [f"{prefix}_flat", nhwc or f"{prefix}_shape"], [f"{prefix}_out"],
                 f"{prefix}_Unflatten"),
            make("Transpose", [f"{prefix}_out"], [out], f"{prefix}_ToNCHW", perm=_TO_NCHW)]


def _rewrite(model, act: Activation, index: _Index, shape: tuple | None) -> bool:
    """Replace one activation by its lookup (see the module docstring); False if its
    surroundings do not allow it (left unchanged). `shape`: its NCHW input's (C, H, W) where
    shape inference fixes them (the export's fixed input size), else None."""
    from onnx import helper, numpy_helper

    dq = index.producer.get(act.x)
    q = index.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
        else None
    if q is None or q.op_type != "QuantizeLinear" or act.y in index.outputs:
        return False
    pre = _qparams(dq, index)
    if pre is None or _qparams(q, index) != pre:
        return False
    f = functools.partial(KINDS[act.kind][0], node=act.nodes[-1])
    graph, name = model.graph, act.y
    readers = index.consumers.get(name, [])
    requant = [n for n in readers if n.op_type == "QuantizeLinear"]
    floats = [n for n in readers if n.op_type != "QuantizeLinear"]
    # (scale, zero point, output tensor) of each table: one per re-quantizing reader, taking
    # over its output; read only in float: one in the range of the table's own values
    targets = [(*(_qparams(n, index) or (None, None)), n.output[0]) for n in requant]
    if any(t[0] is None for t in targets):
        return False
    if not requant:
        targets.append((*_minmax_params(f((np.arange(256, dtype=np.float64) - pre[1]) * pre[0])),
                        f"{name}_lut"))
    nhwc = f"{name}_lut_nhwc_shape" if shape else None
    tensors = [(np.array([-1, shape[1], shape[2], shape[0]], np.int64), nhwc)] if shape else []
    new = []
    for i, (s_out, zp_out, out) in enumerate(targets):
        tensors.append((lut_table(f, *pre, s_out, zp_out)[None], f"{name}_lut_table{i}"))
        new += _lookup(q.output[0], f"{name}_lut_table{i}", out, nhwc, f"{name}_lut{i}")
    if floats:                      # the float readers keep reading tensor `name`
        s_out, zp_out, out = targets[0]
        tensors += [(np.array(s_out, np.float32), f"{name}_lut_scale"),
                    (np.array(zp_out, np.uint8), f"{name}_lut_zero_point")]
        new.append(helper.make_node("DequantizeLinear", [out, f"{name}_lut_scale",
                                                         f"{name}_lut_zero_point"], [name],
                                    name=f"{name}_lut_DequantizeLinear"))
    graph.initializer.extend(numpy_helper.from_array(*t) for t in tensors)
    gone = set(map(_key, act.nodes + requant))
    if all(_key(c) in gone for c in index.consumers.get(act.x, ())):
        gone.add(_key(dq))
    kept: list = []
    for n in graph.node:            # the new nodes where the activation's last node was:
        if _key(n) == act.y:        # after their inputs, before every reader of their outputs
            kept.extend(new)
        if _key(n) not in gone:
            kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)
    return True


def _drop_dead_constants(graph) -> None:
    """Remove the Constant nodes and initializers nothing reads (the mish's 2s)."""
    read = {t for n in graph.node for t in n.input} | {t.name for t in graph.output} | \
        {t.name for t in graph.input}
    live = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in read]
    inits = [i for i in graph.initializer if i.name in read]
    del graph.node[:]
    graph.node.extend(live)
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _chw_shapes(model) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every 4-D tensor whose channels and size shape inference fixes."""
    import onnx

    info = onnx.shape_inference.infer_shapes(model).graph.value_info
    out = {}
    for v in info:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
            out[v.name] = tuple(d.dim_value for d in dims[1:])
    return out


def lookup_activations(model, keep: Iterable[str] = ()) -> dict[str, int]:
    """Rewrite `model` (an onnx ModelProto from quantize_static, QDQ, uint8 activations) in place:
    each activation of `KINDS` between INT8 tensors becomes a table lookup; returns the count
    per kind (0 where none could be)."""
    from onnx import numpy_helper

    counts = dict.fromkeys(KINDS, 0)
    shapes = _chw_shapes(model)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1, -1], np.int64), _FLAT)])
    for act in find_activations(model.graph, keep):
        index = _Index(model.graph)             # the graph as the rewrites so far left it
        act.nodes = [index.producer[_key(n)] for n in act.nodes]
        counts[act.kind] += _rewrite(model, act, index, shapes.get(act.x))
    _drop_dead_constants(model.graph)
    return counts
