"""SD2.1 (768 px, v-prediction) BalancedDPO.

    python -m bdpo_jax.train --config configs/sd21.py --workdir runs/sd21_bdpo \
        --config.data.path=/data/pickapic_sd21_shards

Shards must be encoded with the SD2.1 VAE and OpenCLIP-H text encoder (1024-wide embeddings) at
768 px. The training target is the velocity (diffusers get_velocity), not the noise.
"""

from configs import sd15


def get_config():
    config = sd15.get_config()
    config.model.pretrained = "stabilityai/stable-diffusion-2-1"
    config.model.prediction_type = "v_prediction"
    return config
