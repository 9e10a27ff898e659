"""A reader for dlib's serialised DNNs (``dlib::serialize`` of a ``loss_metric`` ResNet such as
``dlib_face_recognition_resnet_model_v1.dat``), written from dlib's format, never executing it.

The stream, as dlib writes it: integers as a control byte (low nibble: byte count, bit 7: sign) and
that many little-endian bytes; strings as such an integer length and the bytes; bools as '0'/'1';
floats as an integer mantissa and exponent (mantissa * 2**exponent); tensors as version 2, four
integer dimensions and raw little-endian float32 data. A network serialises its outermost layer
first, but each layer writes its sub-network *before* its own parameters, so after a run of version
numbers the layers' parameters follow in forward order: the input layer, then one record per layer
(``con_``, ``affine_``, ``bn_con2``, ``relu_``, ``max_pool_``, ``avg_pool_``, ``add_prev_``, ``fc_``),
each followed by the layer's training state (three bools and three tensors), which we skip. A batch
norm is read as the affine of its running statistics, as dlib does when it loads one for inference.
``fewshot.face_cnn`` reads the detector (``loss_mmod``) with the same pieces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FewShotError


class DlibFormatError(FewShotError, ValueError):
    """A file that is not a dlib network of the kind we read."""


@dataclass
class Layer:
    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    params: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    loss: str
    input_mean: tuple[float, float, float]  # subtracted from 0..255 RGB, then divided by 256
    input_size: int
    layers: list[Layer]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"dlib file ends early at byte {self.pos:,}; is it truncated?")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def peek_int(self) -> int:
        saved = self.pos
        try:
            return self.int()
        finally:
            self.pos = saved

    def int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#x} at byte {self.pos - 1:,}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return special[exponent] if exponent in special else math.ldexp(mantissa, exponent)

    def string(self) -> str:
        return self._take(self.int()).decode("latin-1")

    def byte(self) -> int:
        """One raw byte (dlib writes a ``uint8_t`` so)."""
        return self._take(1)[0]

    def bool(self) -> bool:
        ch = self._take(1)
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {ch!r} at byte {self.pos - 1:,}")
        return ch == b"1"

    def tensor(self) -> np.ndarray:
        if (version := self.int()) != 2:
            raise DlibFormatError(f"tensor version {version} at byte {self.pos:,}; dlib writes 2")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), "<f4").reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, ...]:
        if (version := self.int()) != 1:
            raise DlibFormatError(f"alias tensor version {version} at byte {self.pos:,}; dlib writes 1")
        return tuple(self.int() for _ in range(4))


def _split(params: np.ndarray, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """dlib keeps a layer's weights in one flat tensor, cut by alias tensors in order."""
    flat, out, at = params.reshape(-1), [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[at:at + n].reshape(shape))
        at += n
    if at != flat.size:
        raise DlibFormatError(f"parameter tensor of {flat.size} values, its parts take {at}")
    return out


def _details(r: _Reader) -> Layer:
    tag = r.string()
    if tag in ("con_4", "con_5", "con_6"):
        params = r.tensor()
        filters, nr, nc = r.int(), r.int(), r.int()
        stride, padding = (r.int(), r.int()), (r.int(), r.int())
        weight_shape, bias_shape = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        use_bias = r.bool() if tag in ("con_5", "con_6") else True
        if tag == "con_6":
            r.bool()  # use_relu: a fused relu dlib adds at inference; never set in saved networks
        weight, bias = _split(params, weight_shape, bias_shape)
        return Layer("con", {"weight": weight, "bias": bias.reshape(-1) if use_bias else None,
                             "kernel": (nr, nc), "stride": stride, "padding": padding, "filters": filters})
    if tag in ("affine_", "affine_2"):
        params = r.tensor()
        gamma_shape, beta_shape = r.alias(), r.alias()
        mode = r.int()
        if tag == "affine_2":
            r.bool()
        gamma, beta = _split(params, gamma_shape, beta_shape)
        if mode != 0:
            raise DlibFormatError(f"affine layer in fully-connected mode at byte {r.pos:,}; fewshot reads the "
                                  "per-channel (convolutional) mode only")
        return Layer("affine", {"gamma": gamma.reshape(-1), "beta": beta.reshape(-1)})
    if tag == "bn_con2":  # batch norm saved as trained: at inference an affine of its running statistics
        params = r.tensor()
        gamma_shape, beta_shape = r.alias(), r.alias()
        for _ in range(2):  # the last batch's means and inverse deviations: training state
            r.tensor()
        running_mean, running_var = r.tensor().reshape(-1), r.tensor().reshape(-1)
        r.int(), r.int()  # updates so far, running-statistics window
        for _ in range(4):
            r.float()
        eps = r.float()
        gamma, beta = _split(params, gamma_shape, beta_shape)
        scale = gamma.reshape(-1) / np.sqrt(running_var + eps)
        return Layer("affine", {"gamma": scale.astype(np.float32),
                                "beta": (beta.reshape(-1) - scale * running_mean).astype(np.float32)})
    if tag in ("relu_", "relu_2"):
        if tag == "relu_2":
            r.bool()
        return Layer("relu")
    if tag in ("max_pool_2", "avg_pool_2"):
        nr, nc, stride, padding = r.int(), r.int(), (r.int(), r.int()), (r.int(), r.int())
        return Layer(tag[:-2], {"kernel": (nr, nc), "stride": stride, "padding": padding})
    if tag == "add_prev_":
        return Layer("add_prev")
    if tag in ("fc_2", "fc_3"):
        outputs, inputs, params = r.int(), r.int(), r.tensor()
        weight_shape, bias_shape = r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        use_bias = r.bool() if tag == "fc_3" else True
        parts = _split(params, weight_shape, bias_shape) if bias_mode == 0 else _split(params, weight_shape)
        weight = parts[0].reshape(inputs, outputs)
        bias = parts[1].reshape(-1) if bias_mode == 0 and use_bias else None
        return Layer("fc", {"weight": weight, "bias": bias})
    raise DlibFormatError(f"dlib layer {tag!r} is not one fewshot reads (at byte {r.pos:,})")


def read_layers(r: _Reader, versions: list[int], path: Path) -> list[Layer]:
    """The layers after the input layer, in forward order, to the end of the file."""
    layers = []
    for _ in range(sum(v >= 2 for v in versions)):  # add_layers (version 2 or 3) carry parameters
        layers.append(_details(r))
        for _ in range(3):
            r.bool()
        for _ in range(3):  # x_grad, cached output, gradient: training state
            r.tensor()
        if versions[-1] == 3 and len(layers) == 1:
            r.int()  # sample expansion factor of the input's layer (dlib >= 19.22)
    if r.pos != len(r.data):
        raise DlibFormatError(f"{path}: {len(r.data) - r.pos:,} bytes left after the last layer")
    return layers


def read_versions(r: _Reader) -> list[int]:
    """The run of add_layer version numbers, one per nested layer; a string length (>= 5) ends it."""
    versions = []
    while r.peek_int() in (1, 2, 3):
        versions.append(r.int())
    return versions


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a serialised dlib metric network into its input and its layers in forward order."""
    path = Path(path)
    r = _Reader(path.read_bytes())
    if r.int() != 1:
        raise DlibFormatError(f"{path} does not start like a dlib network (add_loss_layer version 1)")
    loss = r.string()
    if loss == "loss_metric_2":
        r.float(), r.float()  # margin and distance threshold: training settings
    elif loss != "loss_metric_":
        raise DlibFormatError(f"{path} holds a {loss!r} network; fewshot reads metric networks (loss_metric)")
    versions = read_versions(r)
    if r.string() != "input_rgb_image_sized":
        raise DlibFormatError(f"{path}: expected an input_rgb_image_sized input layer")
    mean = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    layers = read_layers(r, versions, path)
    if size[0] != size[1]:
        raise DlibFormatError(f"{path}: input of {size[0]}x{size[1]} px; fewshot reads square inputs")
    return DlibNet(loss, mean, size[0], layers)


# ---------------------------------------------------------------------------------- PyTorch
def to_torch(net: DlibNet):
    """The network as a PyTorch module: (n, 3, S, S) RGB already scaled as dlib's input layer does,
    (x - input_mean) / 256, -> (n, 128) descriptors (not normalised: dlib compares them by Euclidean
    distance). Each affine layer is folded into the convolution before it."""
    import torch
    from torch import nn

    class Block(nn.Module):
        """conv-affine-relu-conv-affine, plus the input (average-pooled when the block downsamples);
        dlib adds tensors of different sizes over their common part (zero padding), and so do we."""

        def __init__(self, first: nn.Conv2d, second: nn.Conv2d, pool: nn.Module | None) -> None:
            super().__init__()
            self.first, self.second, self.pool = first, second, pool

        def forward(self, x):
            main = self.second(torch.relu(self.first(x)))
            skip = self.pool(x) if self.pool is not None else x
            return torch.relu(_add_padded(main, skip))

    class Network(nn.Module):
        def __init__(self, stem: nn.Sequential, blocks: list, head: nn.Linear) -> None:
            super().__init__()
            self.stem, self.blocks, self.head = stem, nn.Sequential(*blocks), head

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    def conv(layer: Layer, affine: Layer) -> nn.Conv2d:
        p = layer.params
        out = nn.Conv2d(p["weight"].shape[1], p["filters"], p["kernel"], p["stride"], p["padding"])
        gamma, beta = affine.params["gamma"], affine.params["beta"]
        bias = p["bias"] if p["bias"] is not None else np.zeros(p["filters"], np.float32)
        out.weight.data = torch.from_numpy(p["weight"] * gamma[:, None, None, None])
        out.bias.data = torch.from_numpy(bias * gamma + beta)
        return out

    layers, kinds = net.layers, [layer.kind for layer in net.layers]
    if kinds[:4] != ["con", "affine", "relu", "max_pool"] or kinds[-2:] != ["avg_pool", "fc"]:
        raise DlibFormatError(f"an unexpected layer sequence: {' '.join(kinds[:6])} ... {' '.join(kinds[-3:])}")
    pool = layers[3].params
    stem = nn.Sequential(conv(layers[0], layers[1]), nn.ReLU(), nn.MaxPool2d(pool["kernel"], pool["stride"],
                                                                             pool["padding"]))
    blocks, i = [], 4
    while i < len(layers) - 2:
        down = kinds[i + 5:i + 6] == ["avg_pool"]
        expected = ["con", "affine", "relu", "con", "affine"] + (["avg_pool"] if down else []) + ["add_prev", "relu"]
        if kinds[i:i + len(expected)] != expected:
            raise DlibFormatError(f"layers {i}..: {' '.join(kinds[i:i + 8])} is not a residual block fewshot reads")
        skip = None
        if down:
            p = layers[i + 5].params
            skip = nn.AvgPool2d(p["kernel"], p["stride"], p["padding"])
        blocks.append(Block(conv(layers[i], layers[i + 1]), conv(layers[i + 3], layers[i + 4]), skip))
        i += len(expected)
    fc = layers[-1].params
    head = nn.Linear(*fc["weight"].shape, bias=fc["bias"] is not None)
    head.weight.data = torch.from_numpy(np.ascontiguousarray(fc["weight"].T))
    if fc["bias"] is not None:
        head.bias.data = torch.from_numpy(fc["bias"])
    return Network(stem, blocks, head).eval()


def _add_padded(a, b):
    """a + b over the union of their shapes, each zero outside itself (dlib's add_prev)."""
    import torch.nn.functional as F

    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[d], b.shape[d]) for d in (1, 2, 3))

    def grow(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)
