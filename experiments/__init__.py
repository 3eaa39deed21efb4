"""The paper's experiments (ExPLAIND, Eichin et al., arXiv:2505.20076) reproduced on this project's store and engine.

One module per experiment, each runnable as ``python -m experiments.<name>`` and resumable (finished pieces are
kept under the results directory and reused):

- ``experiments.pruning``: parameter pruning by element-wise ExPLAIND scores against magnitude and random pruning.
- ``experiments.pruning_grokked``: the same on the grokked modular-addition transformer (the paper's configuration).
- ``experiments.lds``: the linear datamodeling score of per-sample scores against retraining on random subsets.
- ``experiments.grokking``: grokking at the paper's configuration, the pipeline-alignment test and a decomposition.

Pure functions (importance, masks, metrics, rank correlations) live in ``experiments.scores`` and are tested in
``tests/app/test_experiments.py``. This package imports ``explaind_store``, ``engine`` and ``explaind_app``; none of
them imports it.
"""
