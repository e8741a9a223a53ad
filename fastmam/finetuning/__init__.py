"""Fine-tuning a pretrained encoder for action recognition, and testing it (``fastmam/finetune.py``).

sources: where raw videos come from (an annotation list, or held-out synthetic clips labelled by motion class);
views: TSN segment sampling and the multi-view test (temporal clips x spatial crops); testing: the multi-view test
itself (every video once across ranks, top-1/top-5, mean per-class accuracy, predictions, confusion matrix);
config, model, init, augment: the fine-tuning recipe.
"""
