"""Demonstration data (`datasets.py`, file checks and downloads in `files.py`) and the import of the reference
implementation's published checkpoints and datasets (`convert.py`, `python -m loaders.convert`). Used by pre-training,
`--dataset`, and by fine-tuning only for `--checkpoint paper` or a checkpoint of irom-princeton/dppo."""
