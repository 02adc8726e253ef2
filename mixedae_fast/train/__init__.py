"""The training layer: config to loaders (``data``), device and precision (``device``), the optimiser and
its schedule (``optim``), one training step (``step``), the loop around it (``engine``), checkpoints and
run folders (``checkpoint``, ``runs``), several ranks (``distributed``), loggers and the profiler.
Imports the model layer and the pipelines, never the downstream jobs."""
