"""The PyTorch reference backend: the same math as the graphs, on the weights the export holds.

It reads the initializers of the exported ONNX files (so it needs no checkpoint) and runs them
with plain torch ops, writing keys and values into a preallocated sequence-major cache in place.
It is the reference that the onnxruntime backend is compared with under skip schedules.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from .base import Engine, KVCache

try:
    import onnx
    import torch
    from onnx import numpy_helper
except ImportError as exc:  # pragma: no cover - depends on the install
    raise BackendError(f"the torch backend needs torch and onnx ({exc}); "
                       "pip install 'skipdeploy[export]'") from None

MASK_VALUE = -1e9
_TORCH = {"float32": torch.float32, "float16": torch.float16}


def _weights(path) -> dict[str, "torch.Tensor"]:
    model = onnx.load(str(path))
    return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in model.graph.initializer
            if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and init.dims}


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, manifest: Manifest, device: str = "cpu") -> None:
        super().__init__(manifest)
        self.device = torch.device(device)
        self.dtype = _TORCH[manifest.dtype]
        to = dict(device=self.device)
        self.embed_w = {k: v.to(**to) for k, v in _weights(manifest.path("embed")).items()}
        self.layer_w = [{k: v.to(**to) for k, v in _weights(manifest.layer_path(i)).items()}
                        for i in range(self.spec.num_layers)]
        self.head_w = {k: v.to(**to) for k, v in _weights(manifest.path("head")).items()}

    def allocate(self, capacities: list[int], batch: int) -> KVCache:
        H, D = self.spec.num_heads, self.spec.head_dim
        shape = [(cap, batch, H, D) for cap in capacities]
        keys = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shape]
        values = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shape]
        return KVCache(keys, values, capacities, batch)

    @torch.no_grad()
    def embed(self, input_ids: np.ndarray, position_ids: np.ndarray) -> "torch.Tensor":
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(position_ids, dtype=torch.long, device=self.device)
        w = self.embed_w
        x = w["embed_tokens.weight"][ids]
        if "project_in.weight" in w:
            x = x @ w["project_in.weight"]
        return x + w["embed_positions.weight"][pos + 2]

    def _layer_norm(self, x, weight, bias):
        y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight, bias, 1e-5)
        return y.to(self.dtype)

    def _linear(self, x, w, name):
        y = x @ w[f"{name}.weight"]
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    @torch.no_grad()
    def layer(self, index: int, hidden, cache: KVCache, past: int, attention_bias: np.ndarray):
        B, T, E = hidden.shape
        H, D = self.spec.num_heads, self.spec.head_dim
        if past + T > cache.capacities[index]:
            raise BackendError(f"layer {index}: writing positions {past}..{past + T - 1} would overflow "
                               f"its cache of {cache.capacities[index]} positions")
        w = self.layer_w[index]
        pre = self.spec.layer_norm == "pre"
        x = hidden
        h = self._layer_norm(x, w["ln_attn.weight"], w["ln_attn.bias"]) if pre else x
        q, k, v = self._linear(h, w, "qkv").split(E, dim=-1)
        keys, values = cache.keys[index], cache.values[index]
        keys[past:past + T] = k.view(B, T, H, D).transpose(0, 1)
        values[past:past + T] = v.view(B, T, H, D).transpose(0, 1)
        K = keys[:past + T].permute(1, 2, 3, 0)                         # [B,H,D,S]
        V = values[:past + T].permute(1, 2, 0, 3)                       # [B,H,S,D]
        q = q.view(B, T, H, D).transpose(1, 2)                          # [B,H,T,D]
        scores = (q @ K).float()
        key_pos = torch.arange(past + T, device=self.device)
        query_pos = torch.arange(past, past + T, device=self.device)
        causal = torch.where(key_pos[None, :] <= query_pos[:, None], 0.0, MASK_VALUE)
        bias = torch.as_tensor(attention_bias, dtype=torch.float32, device=self.device)
        probs = torch.softmax(scores + causal + bias[:, None, None, :], dim=-1).to(self.dtype)
        context = (probs @ V).transpose(1, 2).reshape(B, T, E)
        x = x + self._linear(context, w, "out_proj")
        if not pre:
            x = self._layer_norm(x, w["ln_attn.weight"], w["ln_attn.bias"])
        h = self._layer_norm(x, w["ln_ffn.weight"], w["ln_ffn.bias"]) if pre else x
        h = self._linear(h, w, "fc1")
        h = torch.relu(h) if self.spec.activation == "relu" else torch.nn.functional.gelu(h)
        x = x + self._linear(h, w, "fc2")
        if not pre:
            x = self._layer_norm(x, w["ln_ffn.weight"], w["ln_ffn.bias"])
        return x

    @torch.no_grad()
    def head(self, hidden) -> np.ndarray:
        w = self.head_w
        x = hidden[:, -1, :]
        if "final_layer_norm.weight" in w:
            x = self._layer_norm(x, w["final_layer_norm.weight"], w["final_layer_norm.bias"])
        if "project_out.weight" in w:
            x = x @ w["project_out.weight"]
        return (x @ w["lm_head.weight"].T).float().cpu().numpy()

    def available_memory(self) -> int | None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)
        return super().available_memory()
