"""The configs package (big_vision style): each file's ``get_config(arg)`` returns a ConfigDict.

    python scripts/train.py --config=configs/grpo.py:reference --config.grpo.beta=0
    from configs import grpo; cfg = grpo.get_config("tiny")

Files import their siblings as ``from configs import common``; loaded by path (absl
``config_flags``) they first put the repository root on ``sys.path``. Nothing here imports JAX.
"""
