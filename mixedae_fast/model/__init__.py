"""The model layer: MixedAE as docs/method.md states it (``mixedae``), its homologous attention
(``attention``), the HC objective (``hc``) and the losses (``losses``). Imports the kernels, the config
and nothing of the training loop, the data pipelines or the downstream jobs."""
