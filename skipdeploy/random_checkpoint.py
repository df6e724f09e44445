"""Random checkpoints for tests, the demo and benchmarks (no downloads): OPT, Llama, Mistral, Qwen2.

``make_checkpoint`` writes a Hugging Face checkpoint directory with ``save_pretrained``; the
tiny ones get a byte-level BPE tokenizer trained on a few lines of text, so that the text path
can be exercised offline. Needs the ``export`` extra.

A shape's ``"family"`` key (``"llama"``, ``"mistral"``, ``"qwen2"``; absent means OPT) picks the
transformers config and model class. OPT checkpoints are exactly what they always were. The
other families follow Llama's token conventions: ``bos_token_id=1``, ``eos_token_id=2`` and no pad
token, and their tokenizer (``make_llama_tokenizer``) has ``<unk>=0, <s>=1, </s>=2`` so that config
and tokenizer agree (OPT's ``make_tokenizer`` has ``<s>=0, <pad>=1, </s>=2``, which would not).
Fresh RMSNorm weights are all ones and fresh biases all zeros, so a graph that dropped either
would still match; for those families the norm weights become ``1 + 0.1 * normal`` and every
linear bias (Qwen2's q/k/v) ``normal(0, 0.5)``, whatever ``weight_scale``.

Rope settings are written in the transformers 5 form, ``rope_parameters`` (``rope_theta`` inside
it, plus ``rope_type`` and the scaling fields); transformers 4 gets them as ``rope_theta`` and
``rope_scaling``.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

_TIED_SMALL = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def _rope(theta: float, **scaling) -> dict:
    return dict(rope_type=scaling.pop("rope_type", "default"), rope_theta=theta, **scaling)


def _llama3(factor: float, original: int) -> dict:
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=original)


# Real shapes (from the models' config.json), for benchmarks; "tiny" shapes for tests.
SHAPES = {
    "tiny": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=512,
                 max_position_embeddings=128, word_embed_proj_dim=64),
    "small": dict(num_hidden_layers=8, hidden_size=128, num_attention_heads=4, ffn_dim=512, vocab_size=512,
                  max_position_embeddings=256, word_embed_proj_dim=128),
    "tiny-post-ln": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=512,
                         max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False),
    "opt-125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, ffn_dim=3072,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768),
    "opt-350m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, ffn_dim=4096,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512,
                     do_layer_norm_before=False),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "tiny-llama": dict(_TIED_SMALL, family="llama"),
    # Positions past 16 fall in llama3's scaled range; untied, unlike tiny-llama.
    "tiny-llama3": dict(_TIED_SMALL, family="llama", tie_word_embeddings=False,
                        rope_parameters=_rope(10000.0, **_llama3(8.0, 16))),
    # head_dim 24, not hidden / heads = 16: graphs must not derive it.
    "tiny-llama-head-dim": dict(_TIED_SMALL, family="llama", head_dim=24),
    "tiny-mistral": dict(_TIED_SMALL, family="mistral", tie_word_embeddings=False, sliding_window=None),
    "tiny-qwen2": dict(_TIED_SMALL, family="qwen2", rms_norm_eps=1e-6),
    "smollm2-135m": dict(family="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=_rope(100000.0)),
    "smollm2-360m": dict(family="llama", num_hidden_layers=32, hidden_size=960, num_attention_heads=15,
                         num_key_value_heads=5, head_dim=64, intermediate_size=2560, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=_rope(100000.0)),
    "tinyllama-1.1b": dict(family="llama", num_hidden_layers=22, hidden_size=2048, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=64, intermediate_size=5632, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_parameters=_rope(10000.0)),
    # Qwen2Config takes no head_dim; 896 / 14 is 64 anyway.
    "qwen2.5-0.5b": dict(family="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters=_rope(1000000.0)),
    "llama-3.2-1b": dict(family="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=_rope(500000.0, **_llama3(32.0, 8192))),
}

# family -> transformers class name prefix (…Config, …ForCausalLM)
_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

_TEXT = [
    "def greet(name):\n    return 'hello ' + name\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "The quick brown fox jumps over the lazy dog.",
    "SkipDecode runs fewer layers for later tokens and keeps the KV cache intact.",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
]


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, as llama.cpp's "qwen2").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_bpe(vocab_size: int, special_tokens: list[str], qwen2_split: bool = False):
    """A byte-level BPE trained on ``_TEXT``; the special tokens take ids 0, 1, ... in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if qwen2_split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    return tok


def make_tokenizer(vocab_size: int):
    """A byte-level BPE in OPT's conventions: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_llama_tokenizer(vocab_size: int):
    """A byte-level BPE in Llama's conventions: <unk>=0, <s>=1 (BOS, prepended), </s>=2 (EOS), no pad.

    It normalizes and splits text exactly as Qwen2's tokenizer does, because transformers'
    AutoTokenizer rebuilds a qwen2 checkpoint's tokenizer that way from its vocabulary, ignoring
    tokenizer.json's own settings: with any other split, Hugging Face and the runtime (which reads
    tokenizer.json) would tokenize the same text differently.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size, ["<unk>", "<s>", "</s>"], qwen2_split=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_checkpoint(out: str | Path, shape: str = "tiny", seed: int = 0, weight_scale: float = 1.0,
                    tokenizer: bool | None = None, dtype: str | None = None, device: str | None = None,
                    **overrides) -> Path:
    """Write a randomly initialised checkpoint of ``SHAPES[shape]``'s family; ``weight_scale``
    widens logit margins.

    Random tiny models have near-tied logits; scaling the 2-D weights by ~3 separates them, so
    that token-for-token comparisons are meaningful.

    ``dtype`` (``"float16"``, ``"bfloat16"``; default float32) and ``device`` (e.g. ``"cuda"``)
    build the weights that way from the start, for big shapes: an opt-1.3b initialised on a GPU
    in float16 takes seconds and writes half the bytes, where float32 on the CPU takes minutes.
    The same seed gives different weights on a different device or dtype.
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    params = {**SHAPES[shape], **overrides}
    family = params.pop("family", "opt")
    with _building(torch, dtype, device):
        if family == "opt":
            from transformers import OPTConfig, OPTForCausalLM

            config = OPTConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, **params)
            model = OPTForCausalLM(config).eval()
        else:
            config, model = _family_model(family, params)
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
    if family != "opt":  # after the scaling, which leaves 1-D tensors alone anyway
        _perturb_norms_and_biases(model)
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer if tokenizer is not None else config.vocab_size <= 4096:
        make = make_tokenizer if family == "opt" else make_llama_tokenizer
        make(min(config.vocab_size, 512)).save_pretrained(out)
    return out


@contextlib.contextmanager
def _building(torch, dtype: str | None, device: str | None):
    """Create tensors in ``dtype`` on ``device`` inside (torch's defaults restored after)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unsupported checkpoint dtype {dtype!r}; use float32, float16 or bfloat16")
        torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def _family_model(family: str, params: dict):
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: opt, {', '.join(_FAMILIES)}")
    config_cls = getattr(transformers, f"{_FAMILIES[family]}Config")
    model_cls = getattr(transformers, f"{_FAMILIES[family]}ForCausalLM")
    if "rope_parameters" not in inspect.signature(config_cls.__init__).parameters:
        # transformers 4 would keep rope_parameters as an unused attribute: silently unscaled rope.
        rope = dict(params.pop("rope_parameters", None) or {})
        if "rope_theta" in rope:
            params["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            params["rope_scaling"] = rope
    config = config_cls(bos_token_id=1, eos_token_id=2, pad_token_id=None, **params)
    return config, model_cls(config).eval()


def _perturb_norms_and_biases(model) -> None:
    """Make the all-ones norm weights and all-zeros biases of a fresh model matter (see the module doc)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
