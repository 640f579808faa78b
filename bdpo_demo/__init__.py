"""The built-in CPU demo, an application on top of bdpo_jax and scorers_torch.

`python -m bdpo_demo --out demo_out` runs every stage (see pipeline.py); no library module
imports this package (docs/ARCHITECTURE.md).
"""
