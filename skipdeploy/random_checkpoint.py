"""Random OPT checkpoints for tests, the demo and benchmarks (no downloads).

``make_checkpoint`` writes a Hugging Face checkpoint directory with ``save_pretrained``; the
tiny ones get a byte-level BPE tokenizer trained on a few lines of text, so that the text path
can be exercised offline. Needs the ``export`` extra.
"""

from __future__ import annotations

from pathlib import Path

# Real OPT shapes, for benchmarks; "tiny" shapes for tests.
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
}

_TEXT = [
    "def greet(name):\n    return 'hello ' + name\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "The quick brown fox jumps over the lazy dog.",
    "SkipDecode runs fewer layers for later tokens and keeps the KV cache intact.",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
]


def make_tokenizer(vocab_size: int):
    """A byte-level BPE in OPT's conventions: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_checkpoint(out: str | Path, shape: str = "tiny", seed: int = 0, weight_scale: float = 1.0,
                    tokenizer: bool | None = None, **overrides) -> Path:
    """Write a randomly initialised OPT checkpoint; ``weight_scale`` widens logit margins.

    Random tiny models have near-tied logits; scaling the 2-D weights by ~3 separates them, so
    that token-for-token comparisons are meaningful.
    """
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    params = {**SHAPES[shape], **overrides}
    config = OPTConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1, **params)
    model = OPTForCausalLM(config).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer if tokenizer is not None else config.vocab_size <= 4096:
        make_tokenizer(min(config.vocab_size, 512)).save_pretrained(out)
    return out
