"""What a pretrained encoder is used for: evaluation (``evaluate``: kNN, linear probe, few-shot),
fine-tuning (``finetune``, its folder ``finetune_folder``), the timm / Hub export (``export``) and the
pictures (``visualize``). Imports the model and training layers."""
