"""Running an encoder's network: PyTorch (CPU, or CUDA in fp16) or ONNX Runtime on the CPU.

Both take a (n, 3, H, W) uint8 batch and return (n, dim) float32 features; pixel normalisation
lives inside the network (``PixelNormalize``), so the ONNX graph and the torch module agree by
construction and nothing outside them repeats mean and std.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import TorchMissing
from .files import replaced_atomically

if TYPE_CHECKING:  # torch is imported lazily: a warm ONNX start needs none of it
    import torch


TORCH_PACKAGES = ("torch", "torchvision", "timm", "open_clip")
TORCH_INSTALL = "pip install torch torchvision timm"


def torch_available() -> bool:
    """Whether PyTorch is installed (a serving-only install runs exported encoders without it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def require_torch(what: str, timm: bool = False) -> None:
    """Raise ``TorchMissing`` naming ``what`` (e.g. "exporting efficientnet_lite0") unless torch (and timm,
    where ``timm``) can be imported."""
    import importlib.util

    missing = [name for name in ("torch", "timm")[:1 + timm] if importlib.util.find_spec(name) is None]
    if missing:
        raise TorchMissing(torch_missing_message(what, missing[0]))


def torch_missing_message(what: str, package: str = "torch") -> str:
    return (f"{what} needs {package}, which this serving-only install leaves out (it runs encoders already "
            f"exported to ONNX): {TORCH_INSTALL}")


def owned_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class Runtime(Protocol):
    name: str
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) uint8 -> (n, dim) float32 features (not yet unit length)."""


def wrap_network(trunk: "torch.nn.Module", mean, std) -> "torch.nn.Module":
    """uint8 pixels -> normalised float -> headless trunk -> (n, dim) features."""
    import torch

    class PixelNormalize(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * std_t))
            self.register_buffer("shift", mean_t / std_t)
            self.trunk = trunk

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.to(self.scale.dtype) * self.scale - self.shift
            return self.trunk(x).flatten(1)

    return PixelNormalize().eval()


def make_padding_static(model: "torch.nn.Module", size: tuple[int, int] | None, example=None) -> "torch.nn.Module":
    """Replace timm's dynamic TF-"same" convolutions by fixed pads for one input size.

    Dynamic padding computes pad widths from the tensor shape at every call, which the ONNX
    exporter turns into a chain of Shape/Gather/Pad nodes; a fixed input size makes them constants.
    ``example`` replaces the uint8 pixels of ``size`` for models that take other tensors.
    """
    import torch

    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:
        return model
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module, args) -> None:
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return model
    with torch.no_grad():
        model(torch.zeros(1, 3, *size, dtype=torch.uint8) if example is None else example)
    for hook in hooks:
        hook.remove()
    for name, (height, width) in seen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _static_same_conv(parent.get_submodule(child), height, width))
    return model


def _static_same_conv(conv, height: int, width: int):
    import torch

    def total(size: int, k: int, s: int, d: int) -> int:
        return max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)

    pad_h = total(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
    pad_w = total(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
    plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                            0, conv.dilation, conv.groups, conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    if pad_h % 2 == 0 and pad_w % 2 == 0:
        plain.padding = (pad_h // 2, pad_w // 2)
        return plain
    pad = torch.nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return torch.nn.Sequential(pad, plain)


class TorchRuntime:
    """PyTorch eager; fp16 on CUDA (normalisation and output stay float32)."""

    def __init__(self, network: "torch.nn.Module", device: str) -> None:
        import torch

        self.name = "torch"
        self.device = device
        self.network = network.to(device).eval()
        if device.startswith("cuda"):
            self.network.half()
            torch.backends.cudnn.benchmark = True

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
            return self.network(pixels).float().cpu().numpy()


def export_onnx(network: "torch.nn.Module", size: tuple[int, int] | None, path: Path, example=None) -> None:
    """Export ``network`` (uint8 pixels in, features out) with a dynamic batch axis, atomically.
    ``example`` replaces the (2, 3, *size) uint8 example input for networks that take other tensors."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, *size, dtype=torch.uint8) if example is None else example
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with replaced_atomically(path) as tmp:
            _export(network, example, tmp)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export(network, example, tmp: Path) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's constant-folding chatter
        torch.onnx.export(network.cpu().eval(), (example,), str(tmp), input_names=["pixels"],
                          output_names=["features"], dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                          opset_version=17, dynamo=False)


def quantize_onnx(fp32: Path, path: Path, calibration: np.ndarray, batch_size: int = 16) -> None:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations) of an exported
    model, with activation ranges measured on ``calibration`` ((n, 3, H, W) uint8 inputs)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)])

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": np.ascontiguousarray(batch, dtype=np.uint8)}

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        with replaced_atomically(path) as tmp:
            quantize_static(prepared, tmp, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


class OnnxRuntime:
    """ONNX Runtime on the CPU: one intra-op thread per owned core, no busy-spinning.

    Spinning thread pools burn a core waiting for work; with a neighbour holding a core that made
    2-thread inference 15x slower here, so spinning is off.
    """

    def __init__(self, path: Path, threads: int | None = None, name: str = "onnx") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or owned_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.name = name
        self.device = "cpu"
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_dtype = np.float32 if self.session.get_inputs()[0].type == "tensor(float)" else np.uint8

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(batch, dtype=self.input_dtype)})[0]
