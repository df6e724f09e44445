"""Schedule-aware fine-tuning and quality evaluation (issue 6).

Not part of the runtime core: ``forward`` and ``finetune`` import torch and transformers;
``evaluate`` and ``data`` run on the runtime alone (an export is made first when given a
checkpoint).
"""
