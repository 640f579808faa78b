"""Built-in image scorers; importing this package registers them in `SCORERS`.

Heavy libraries (transformers, open_clip) are imported only when a scorer is built.
"""

from scorers_torch.scorers import aesthetic, clip_score, hps, imagereward, pickscore  # noqa: F401
