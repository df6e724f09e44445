"""What both torch engines share: the export's weights as tensors on a device, and the family's
layer math on them (the static ``torch_engine`` and the in-flight ``torch_inflight``).

Weights come from the export's ONNX initializers through ``families.weights`` (so no checkpoint is
needed); the math is the family's ``torch_*`` functions, the same as the graphs.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..families import for_model_type
from ..families.weights import read_graph_weights, read_layer_weights
from ..manifest import Manifest
from .base import Engine

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the install
    raise BackendError(f"the torch backend needs torch ({exc}); pip install 'skipdeploy[export]'") from None

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class TorchGraphs(Engine):
    """The embedding, the layers' projections and the head in torch, on ``device``. ``dtype``
    (None: float16 on CUDA, the export's on the CPU) is what the weights and activations use."""

    name = "torch"

    def __init__(self, manifest: Manifest, device: str = "cpu", dtype: str | None = None) -> None:
        super().__init__(manifest)
        if manifest.quantization:  # int8 and int4 graphs hold no float weights to read
            raise BackendError(f"{manifest.directory} has {manifest.quantization.get('weights')} weights; "
                               "the torch backend runs float exports: use the onnxruntime backend, or the "
                               "float32 export it was quantized from")
        self.device = torch_device(device)
        if dtype is None:
            dtype = "float16" if self.device.type == "cuda" else manifest.dtype
        if dtype not in DTYPES:
            raise BackendError(f"the torch backend runs float32 or float16 (got dtype {dtype!r})")
        self.dtype = DTYPES[dtype]
        self.family = for_model_type(self.spec.model_type)
        self.embed_w = self._tensors(read_graph_weights(manifest.path("embed"), self.spec, "embed"))
        self.layer_w = [self._tensors(read_layer_weights(manifest.layer_path(i), self.spec, "the torch backend"))
                        for i in range(self.spec.num_layers)]
        self.head_w = self._tensors(read_graph_weights(manifest.path("head"), self.spec, "head"))

    def _tensors(self, weights: dict[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
        # Norm parameters and RoPE frequencies stay float32 (the graphs compute them in float32 too).
        return {k: torch.from_numpy(np.array(v)).to(device=self.device, dtype=torch.float32
                                                    if k.startswith(self.family.FP32_PREFIXES) else self.dtype)
                for k, v in weights.items()}

    # -- the family's math ---------------------------------------------------------------------
    def _embed(self, ids, pos):
        return self.family.torch_embed(self.embed_w, ids, pos)

    def _layer_input(self, index: int, hidden, positions):
        return self.family.torch_layer_input(self.layer_w[index], self.spec, hidden, positions, self.dtype)

    def _layer_output(self, index: int, x, context):
        return self.family.torch_layer_output(self.layer_w[index], self.spec, x, context, self.dtype)

    def _head(self, hidden):
        w = self.head_w
        x = self.family.torch_head_input(w, self.spec, hidden[:, -1, :], self.dtype)
        return (x @ w["lm_head.weight"].T).float()

    def _heads(self, t, heads: int):
        """[..., heads*D] -> [..., heads, D]."""
        return t.reshape(*t.shape[:-1], heads, self.spec.head_dim)

    # -- the shared calls ------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray):
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(position_ids, dtype=torch.long, device=self.device)
        return self._embed(ids, pos)

    @torch.no_grad()
    def head(self, hidden) -> np.ndarray:
        return self._head(hidden).cpu().numpy()

    def to_numpy(self, hidden) -> np.ndarray:
        if isinstance(hidden, torch.Tensor):
            return hidden.float().cpu().numpy()
        return np.asarray(hidden, np.float32)

    def from_numpy(self, array: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.array(array, np.float32)).to(device=self.device, dtype=self.dtype)

    @property
    def cache_itemsize(self) -> int:
        return self.dtype.itemsize

    def available_memory(self) -> int | None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(free) + int(cached) + self._held_bytes()  # held buffers are reused, not added to
        return super().available_memory()

    def _held_bytes(self) -> int:
        """Device bytes this engine holds for reuse (released caches)."""
        return 0


def torch_device(device: str) -> "torch.device":
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendError(f"unknown torch device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BackendError(f"the torch backend on {device} needs an NVIDIA GPU and a CUDA build of torch "
                               f"(this is torch {torch.__version__}, {build}, and sees no GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise BackendError(f"the torch backend runs on 'cpu' or 'cuda' (got {device!r})")
    return dev
