"""The Llama family: Llama 2/3.x, TinyLlama, SmolLM2, Mistral and Qwen2/2.5.

RMSNorm, rotary position embeddings applied inside each layer from every row's own positions
(left padding and in-flight rows at different positions need nothing else), grouped-query
attention whose cache holds only the key/value heads, a SwiGLU MLP, explicit residual adds.
The members differ only in config details read here: Qwen2's q/k/v biases (any bias the
checkpoint has is exported), RMSNorm epsilon, an explicit ``head_dim``, tied or untied heads,
RoPE scaling (``linear``, ``llama3``), and Mistral's sliding window (refused when shorter than
the export's length, since the layers attend over every cached position).

Layer weights ([in, out]): ``ln_attn.weight``, ``ln_ffn.weight`` (RMSNorm scales); ``qkv.weight``
[E, (H + 2 Hkv) D] with the 1/sqrt(D) query scaling (and RoPE's attention scaling, on queries and
keys) folded in, ``qkv.bias`` when present; ``out_proj.weight`` [H D, E] (+ bias);
``gate_up.weight`` [E, 2F] (gate, then up); ``down.weight`` [F, E]; ``rope.inv_freq`` [D/2], the
inverse frequencies transformers computes for this config (scaling included).
"""

from __future__ import annotations

import numpy as np

from .base import Family, config_token, refuse, to_numpy, torch_linear

# RoPE variants whose frequencies do not depend on the sequence length: the layer graphs hold them.
ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(config) -> dict:
    """RoPE parameters from either config layout: transformers 5 ``rope_parameters``, older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if getattr(config, "rope_theta", None) is not None:
        params.setdefault("rope_theta", config.rope_theta)
    return params


def sliding_window(config) -> int | None:
    """The attention window a layer of this config uses, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:  # Qwen2: only "sliding_attention" layers use the window
        return window if "sliding_attention" in types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    rope = True
    LAYER_WEIGHTS = ("ln_attn.weight", "qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias",
                     "ln_ffn.weight", "gate_up.weight", "gate_up.bias", "down.weight", "down.bias", "rope.inv_freq")
    HEAD_WEIGHTS = ("lm_head.weight", "final_layer_norm.weight")
    REQUIRED_WEIGHTS = ("qkv.weight", "gate_up.weight")
    MLP_MATRICES = 3  # SwiGLU: gate, up, down
    FP32_PREFIXES = ("ln_", "final_layer_norm", "rope.")

    # -- checkpoint ----------------------------------------------------------------------------
    def spec(self, config, source: str):
        from ..manifest import ModelSpec

        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise refuse(source, f"activation {act!r} is not supported (the Llama family uses silu)")
        rope = rope_settings(config)
        if rope["rope_type"] not in ROPE_TYPES:
            raise refuse(source, f"RoPE type {rope['rope_type']!r} is not supported ({', '.join(ROPE_TYPES)}): its "
                                 "frequencies change with the sequence length")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise refuse(source, f"{heads} attention heads are not a multiple of {kv_heads} key/value heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if head_dim % 2:
            raise refuse(source, f"head_dim {head_dim} is odd; RoPE rotates pairs of dimensions")
        window = sliding_window(config)
        return ModelSpec(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
            head_dim=head_dim, ffn_dim=config.intermediate_size, vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings, word_embed_proj_dim=config.hidden_size,
            layer_norm="pre", activation="silu", bos_token_id=config_token(config, "bos_token_id"),
            eos_token_id=config_token(config, "eos_token_id"), pad_token_id=config_token(config, "pad_token_id"),
            model_type=config.model_type, num_kv_heads=kv_heads, norm_eps=float(config.rms_norm_eps),
            rope={k: v for k, v in rope.items() if isinstance(v, (int, float, str))},
            sliding_window=window)

    def hf_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def hf_layers(self, model):
        return model.model.layers

    def layer_weights(self, model, index, spec):
        layer = self.hf_layers(model)[index]
        attn, mlp = layer.self_attn, layer.mlp
        rotary = model.model.rotary_emb
        # Queries carry 1/sqrt(D); RoPE's attention scaling multiplies cos and sin of both queries
        # and keys, and a rotation is linear, so it folds into their projections as well (the
        # cached keys are then exactly the keys transformers caches).
        rope_scale = np.float32(getattr(rotary, "attention_scaling", 1.0))
        q_scale = np.float32(spec.head_dim ** -0.5) * rope_scale
        q_w, k_w, v_w = (to_numpy(p.weight).T for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        w = {"qkv.weight": np.concatenate([q_w * q_scale, k_w * rope_scale, v_w], axis=1)}
        biases = [to_numpy(p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        if any(b is not None for b in biases):
            q_b, k_b, v_b = (np.zeros(p.out_features, np.float32) if b is None else b
                             for b, p in zip(biases, (attn.q_proj, attn.k_proj, attn.v_proj)))
            w["qkv.bias"] = np.concatenate([q_b * q_scale, k_b * rope_scale, v_b])
        w["out_proj.weight"], w["out_proj.bias"] = to_numpy(attn.o_proj.weight).T, to_numpy(attn.o_proj.bias)
        w["gate_up.weight"] = np.concatenate([to_numpy(mlp.gate_proj.weight).T, to_numpy(mlp.up_proj.weight).T], axis=1)
        if mlp.gate_proj.bias is not None:
            w["gate_up.bias"] = np.concatenate([to_numpy(mlp.gate_proj.bias), to_numpy(mlp.up_proj.bias)])
        w["down.weight"], w["down.bias"] = to_numpy(mlp.down_proj.weight).T, to_numpy(mlp.down_proj.bias)
        w["ln_attn.weight"] = to_numpy(layer.input_layernorm.weight)
        w["ln_ffn.weight"] = to_numpy(layer.post_attention_layernorm.weight)
        w["rope.inv_freq"] = to_numpy(rotary.inv_freq)
        return w

    def embed_weights(self, model, spec):
        return {"embed_tokens.weight": to_numpy(model.model.embed_tokens.weight)}

    def head_weights(self, model, spec):
        return {"lm_head.weight": to_numpy(model.lm_head.weight),
                "final_layer_norm.weight": to_numpy(model.model.norm.weight)}

    # -- graphs --------------------------------------------------------------------------------
    def embed_graph(self, b, spec, W):
        return b.op("Gather", [W("embed_tokens.weight"), "input_ids"])

    def layer_input(self, b, spec, W, x, positions):
        H, Hkv, D = spec.num_heads, spec.kv_heads, spec.head_dim
        h = b.rms_norm(x, W("ln_attn.weight"), spec.norm_eps)
        qkv = b.gemm(h, W("qkv.weight"), W("qkv.bias"))
        qk, v = b.op("Split", [qkv, b.const([(H + Hkv) * D, Hkv * D])], 2, axis=1)
        # Queries and keys rotate together, by transformers' rotate-half: x*cos + rotate_half(x)*sin
        # with cos/sin of [inv_freq, inv_freq] x position in float32 as transformers computes them,
        # and rotate_half(x) = cat(-x2, x1) as one MatMul by a signed permutation (exact: one
        # nonzero product per output). A decode step runs every layer's graph, so few small
        # operators matter more here than a few flops.
        inv_freq = W("rope.inv_freq")
        freqs = b.op("Concat", [inv_freq, inv_freq], axis=0)                                          # [D]
        angles = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [positions], to=1), b.const([1, 2])]), freqs])  # [N,1,D]
        cos = b.cast(b.op("Cos", [angles]), "float32", b.dtype)
        sin = b.cast(b.op("Sin", [angles]), "float32", b.dtype)
        half = np.zeros((D, D), np.float32)
        half[np.arange(D // 2) + D // 2, np.arange(D // 2)] = -1.0   # output i < D/2 takes -x[i + D/2]
        half[np.arange(D // 2), np.arange(D // 2) + D // 2] = 1.0    # output i >= D/2 takes x[i - D/2]
        heads = b.op("Reshape", [qk, b.const([-1, H + Hkv, D])])
        turned = b.op("MatMul", [heads, b.weight("rope.rotate_half", half)])
        rotated = b.op("Add", [b.op("Mul", [heads, cos]), b.op("Mul", [turned, sin])])
        q, k = b.op("Split", [b.op("Reshape", [rotated, b.const([-1, (H + Hkv) * D])]),
                              b.const([H * D, Hkv * D])], 2, axis=1)
        return [q, k, v]

    def layer_output(self, b, spec, W, x, context):
        x = b.op("Add", [x, b.gemm(context, W("out_proj.weight"), W("out_proj.bias"))])
        h = b.rms_norm(x, W("ln_ffn.weight"), spec.norm_eps)
        gate, up = b.op("Split", [b.gemm(h, W("gate_up.weight"), W("gate_up.bias")),
                                  b.const([spec.ffn_dim, spec.ffn_dim])], 2, axis=1)
        h = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        return b.op("Add", [x, b.gemm(h, W("down.weight"), W("down.bias"))])

    def head_input(self, b, spec, W, x):
        return b.rms_norm(x, W("final_layer_norm.weight"), spec.norm_eps)

    # -- torch ---------------------------------------------------------------------------------
    def torch_embed(self, w, ids, positions):
        import torch.nn.functional as F

        return F.embedding(ids, w["embed_tokens.weight"])

    def torch_layer_input(self, w, spec, x, positions, dtype):
        import torch

        H, Hkv, D = spec.num_heads, spec.kv_heads, spec.head_dim
        h = _torch_rms_norm(x, w["ln_attn.weight"], spec.norm_eps, dtype)
        q, k, v = torch_linear(h, w, "qkv").split([H * D, Hkv * D, Hkv * D], dim=-1)
        angles = positions.float()[..., None] * w["rope.inv_freq"]              # [..., D/2]
        cos, sin = torch.cos(angles)[..., None, :].to(dtype), torch.sin(angles)[..., None, :].to(dtype)
        return _torch_rotate(q, cos, sin, H, D), _torch_rotate(k, cos, sin, Hkv, D), v

    def torch_layer_output(self, w, spec, x, context, dtype):
        import torch

        x = x + torch_linear(context, w, "out_proj")
        h = _torch_rms_norm(x, w["ln_ffn.weight"], spec.norm_eps, dtype)
        gate, up = torch_linear(h, w, "gate_up").split(spec.ffn_dim, dim=-1)
        return x + torch_linear(torch.nn.functional.silu(gate) * up, w, "down")

    def torch_head_input(self, w, spec, x, dtype):
        return _torch_rms_norm(x, w["final_layer_norm.weight"], spec.norm_eps, dtype)

    # -- transformers ---------------------------------------------------------------------------
    def hf_embed(self, model, ids, positions):
        return model.model.embed_tokens(ids)

    def hf_layer(self, model, index, hidden, mask, positions):
        embeddings = model.model.rotary_emb(hidden, positions)
        out = self.hf_layers(model)[index](hidden, attention_mask=mask, position_ids=positions,
                                           position_embeddings=embeddings)
        return out[0] if isinstance(out, tuple) else out

    def hf_keys_values(self, model, index, hidden, positions):
        import sys

        layer = self.hf_layers(model)[index]
        attn = layer.self_attn
        apply_rope = sys.modules[type(layer).__module__].apply_rotary_pos_emb  # the family's own
        B, S = hidden.shape[:2]
        h = layer.input_layernorm(hidden)
        shape = (B, S, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape)
        cos, sin = model.model.rotary_emb(hidden, positions)
        _, k = apply_rope(q, k, cos, sin)
        return k.transpose(1, 2), v

    def hf_head(self, model, hidden):
        return model.lm_head(model.model.norm(hidden))


def _torch_rotate(x, cos, sin, heads: int, D: int):
    import torch

    shape = x.shape
    x = x.reshape(*shape[:-1], heads, D)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).reshape(shape)


def _torch_rms_norm(x, weight, eps: float, dtype):
    import torch

    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight).to(dtype)
