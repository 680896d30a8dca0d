"""One trial, shared by the search, the confirm stage and ``study train``: the training loop (``training.py``), its
checkpoints, scoring a model (``evaluation.py``: validation each epoch, test at confirm), captioning photos
(``inference.py``), the metrics (``metrics.py``, ``ptb.py``), the precision a device runs at, which epoch's model
is kept (``selection.py``) and the image-blind floor (``floor.py``). Its configuration is ``study.config``.
"""
