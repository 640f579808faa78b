"""SD1.5 with SmPO's smoothed PickScore label (JaydenLyh/SmPO): label mode 'smpo', beta 2000.

    python -m bdpo_jax.train --config configs/smpo_sd15.py --workdir runs/sd15_smpo \
        --config.data.path=/data/pickapic_sd15_shards

The label is (2 sigmoid(n_1 - n_2) - 1) * 10 on PickScore normalised with
n = (s - 0.11544) / (0.28202 - 0.11544) (config.label.smpo_*, defaults from bdpo_jax.labels);
the shards must carry a 'pickscore' scorer. SmPO's SD1.5 beta is 2000 (5000 for SDXL). Not
reproduced here: SmPO starts from an SFT checkpoint (set config.model.init_checkpoint to an SFT
run of label mode 'sft') and estimates the trajectory by DDIM/ReNoise inversion instead of
forward noising. Everything else is configs/sd15.py (the BalancedDPO paper's setting).
"""

from configs import sd15


def get_config():
    config = sd15.get_config()
    config.label.mode = "smpo"
    config.label.scorer = "pickscore"  # SmPO's reward model
    config.dpo.beta = 2000.0  # SmPO's SD1.5 value
    return config
