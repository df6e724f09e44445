"""OPT (the SkipDecode paper's family): LayerNorm (pre-LN, or post-LN as in OPT-350m), learned
positions with an offset of 2, multi-head attention with biases, a ReLU (or GELU) MLP, and
``project_in``/``project_out`` where the word embedding is narrower than the hidden size."""

from __future__ import annotations

import numpy as np

from .base import Family, config_token, refuse, to_numpy, torch_linear

LN_EPS = 1e-5
ACTIVATIONS = ("relu", "gelu")


def layer_norm_params(weight: np.ndarray | None, bias: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """LayerNorm without elementwise affine is LayerNorm with scale 1 and bias 0."""
    return (np.ones(size, np.float32) if weight is None else weight,
            np.zeros(size, np.float32) if bias is None else bias)


class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    LAYER_WEIGHTS = ("ln_attn.weight", "ln_attn.bias", "qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias",
                     "ln_ffn.weight", "ln_ffn.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    EMBED_WEIGHTS = ("embed_tokens.weight", "embed_positions.weight", "project_in.weight")
    HEAD_WEIGHTS = ("lm_head.weight", "project_out.weight", "final_layer_norm.weight", "final_layer_norm.bias")
    REQUIRED_WEIGHTS = ("qkv.weight", "fc1.weight")

    # -- checkpoint ----------------------------------------------------------------------------
    def spec(self, config, source: str):
        from ..manifest import ModelSpec

        if config.activation_function not in ACTIVATIONS:
            raise refuse(source, f"activation {config.activation_function!r} is not supported "
                                 f"({', '.join(ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise refuse(source, f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                                 f"{config.num_attention_heads}")
        return ModelSpec(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, head_dim=config.hidden_size // config.num_attention_heads,
            ffn_dim=config.ffn_dim, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
            word_embed_proj_dim=config.word_embed_proj_dim,
            layer_norm="pre" if config.do_layer_norm_before else "post",
            activation=config.activation_function, bos_token_id=config_token(config, "bos_token_id"),
            eos_token_id=config_token(config, "eos_token_id"), pad_token_id=config_token(config, "pad_token_id"),
            model_type="opt", norm_eps=LN_EPS)

    def hf_class(self):
        from transformers import OPTForCausalLM

        return OPTForCausalLM

    def hf_layers(self, model):
        return model.model.decoder.layers

    def layer_weights(self, model, index, spec):
        layer = self.hf_layers(model)[index]
        attn = layer.self_attn
        scaling = np.float32(spec.head_dim ** -0.5)
        q_w, k_w, v_w = (to_numpy(p.weight).T for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        w = {"qkv.weight": np.concatenate([q_w * scaling, k_w, v_w], axis=1)}
        biases = [to_numpy(p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        w["qkv.bias"] = None if biases[0] is None else np.concatenate([biases[0] * scaling, biases[1], biases[2]])
        for key, module in (("out_proj", attn.out_proj), ("fc1", layer.fc1), ("fc2", layer.fc2)):
            w[f"{key}.weight"] = to_numpy(module.weight).T
            w[f"{key}.bias"] = to_numpy(module.bias)
        for key, module in (("ln_attn", layer.self_attn_layer_norm), ("ln_ffn", layer.final_layer_norm)):
            w[f"{key}.weight"], w[f"{key}.bias"] = layer_norm_params(to_numpy(module.weight), to_numpy(module.bias),
                                                                     spec.hidden_size)
        return w

    def embed_weights(self, model, spec):
        decoder = model.model.decoder
        return {"embed_tokens.weight": to_numpy(decoder.embed_tokens.weight),
                "embed_positions.weight": to_numpy(decoder.embed_positions.weight),
                "project_in.weight": None if decoder.project_in is None else to_numpy(decoder.project_in.weight).T}

    def head_weights(self, model, spec):
        decoder = model.model.decoder
        ln = decoder.final_layer_norm
        w = {"lm_head.weight": to_numpy(model.lm_head.weight),
             "project_out.weight": None if decoder.project_out is None else to_numpy(decoder.project_out.weight).T}
        if ln is not None:
            w["final_layer_norm.weight"], w["final_layer_norm.bias"] = layer_norm_params(
                to_numpy(ln.weight), to_numpy(ln.bias), ln.normalized_shape[0])
        return w

    # -- graphs --------------------------------------------------------------------------------
    def embed_graph(self, b, spec, W):
        tokens = b.op("Gather", [W("embed_tokens.weight"), "input_ids"])
        if W("project_in.weight") is not None:
            tokens = b.op("MatMul", [tokens, W("project_in.weight")])
        positions = b.op("Gather", [W("embed_positions.weight"), b.op("Add", ["position_ids", b.const(2)])])
        return b.op("Add", [tokens, positions])

    def layer_input(self, b, spec, W, x, positions):
        E = spec.hidden_size
        h = b.layer_norm(x, W("ln_attn.weight"), W("ln_attn.bias"), LN_EPS) if spec.layer_norm == "pre" else x
        qkv = b.gemm(h, W("qkv.weight"), W("qkv.bias"))
        return b.op("Split", [qkv, b.const([E, E, E])], 3, axis=1)

    def layer_output(self, b, spec, W, x, context):
        pre = spec.layer_norm == "pre"
        x = b.op("Add", [x, b.gemm(context, W("out_proj.weight"), W("out_proj.bias"))])
        if not pre:
            x = b.layer_norm(x, W("ln_attn.weight"), W("ln_attn.bias"), LN_EPS)
        h = b.layer_norm(x, W("ln_ffn.weight"), W("ln_ffn.bias"), LN_EPS) if pre else x
        h = _activation(b, b.gemm(h, W("fc1.weight"), W("fc1.bias")), spec.activation)
        x = b.op("Add", [x, b.gemm(h, W("fc2.weight"), W("fc2.bias"))])
        if not pre:
            x = b.layer_norm(x, W("ln_ffn.weight"), W("ln_ffn.bias"), LN_EPS)
        return x

    def head_input(self, b, spec, W, x):
        if W("final_layer_norm.weight") is not None:
            x = b.layer_norm(x, W("final_layer_norm.weight"), W("final_layer_norm.bias"), LN_EPS)
        if W("project_out.weight") is not None:
            x = b.op("MatMul", [x, W("project_out.weight")])
        return x

    # -- torch ---------------------------------------------------------------------------------
    def torch_embed(self, w, ids, positions):
        import torch.nn.functional as F

        x = F.embedding(ids, w["embed_tokens.weight"])
        if "project_in.weight" in w:
            x = x @ w["project_in.weight"]
        return x + F.embedding(positions + 2, w["embed_positions.weight"])

    def torch_layer_input(self, w, spec, x, positions, dtype):
        h = _torch_layer_norm(x, w, "ln_attn", dtype) if spec.layer_norm == "pre" else x
        return torch_linear(h, w, "qkv").split(spec.hidden_size, dim=-1)

    def torch_layer_output(self, w, spec, x, context, dtype):
        import torch

        pre = spec.layer_norm == "pre"
        x = x + torch_linear(context, w, "out_proj")
        if not pre:
            x = _torch_layer_norm(x, w, "ln_attn", dtype)
        h = _torch_layer_norm(x, w, "ln_ffn", dtype) if pre else x
        h = torch_linear(h, w, "fc1")
        h = torch.relu(h) if spec.activation == "relu" else torch.nn.functional.gelu(h)
        x = x + torch_linear(h, w, "fc2")
        if not pre:
            x = _torch_layer_norm(x, w, "ln_ffn", dtype)
        return x

    def torch_head_input(self, w, spec, x, dtype):
        if "final_layer_norm.weight" in w:
            x = _torch_layer_norm(x, w, "final_layer_norm", dtype)
        if "project_out.weight" in w:
            x = x @ w["project_out.weight"]
        return x

    # -- transformers ---------------------------------------------------------------------------
    def hf_embed(self, model, ids, positions):
        decoder = model.model.decoder
        x = decoder.embed_tokens(ids)
        if decoder.project_in is not None:
            x = decoder.project_in(x)
        return x + decoder.embed_positions(None, 0, position_ids=positions)

    def hf_layer(self, model, index, hidden, mask, positions):
        out = self.hf_layers(model)[index](hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def hf_keys_values(self, model, index, hidden, positions):
        layer = self.hf_layers(model)[index]
        attn = layer.self_attn
        h = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        B, S = hidden.shape[:2]
        shape = (B, S, attn.num_heads, attn.head_dim)
        return attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)

    def hf_head(self, model, hidden):
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return model.lm_head(hidden)


def _activation(b, x: str, kind: str) -> str:
    if kind == "relu":
        return b.op("Relu", [x])
    # exact (erf) GELU, as torch.nn.functional.gelu
    dt = np.float16 if b.dtype == "float16" else np.float32
    erf = b.op("Erf", [b.op("Mul", [x, b.const(1 / np.sqrt(2), dt)])])
    half = b.op("Mul", [x, b.const(0.5, dt)])
    return b.op("Mul", [half, b.op("Add", [erf, b.const(1.0, dt)])])


def _torch_layer_norm(x, w, name: str, dtype):
    import torch

    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS)
    return y.to(dtype)
