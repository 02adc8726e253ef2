"""What a pretrained encoder is used for: evaluation (``evaluate``: kNN, linear probe, few-shot),
fine-tuning (``finetune``, its folder ``finetune_folder``), the timm / Hub export (``export``) and the
pictures (``visualize``); ``jobs`` holds the commands that read a trained run, one function each. Imports
the model and training layers."""
