"""SDXL base (1024 px) BalancedDPO: Adafactor, beta 5000, 200 warm-up steps, SDXL's VAE
scaling 0.13025.

    python -m bdpo_jax.train --config configs/sdxl.py --workdir runs/sdxl_bdpo \
        --config.data.path=/data/pickapic_sdxl_shards --config.mesh.shape='(1,-1)'

Shards carry both text encoders' penultimate states concatenated (2048 wide), the pooled
embedding of encoder 2 and add_time_ids [1024, 1024, 0, 0, 1024, 1024] (fp16-fix VAE latents).
FSDP over all devices (mesh (1, -1)) is the usual choice: params + reference + Adafactor states.
"""

from configs import sd15


def get_config():
    config = sd15.get_config()
    config.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
    config.model.prediction_type = "epsilon"
    config.diffusion.vae_scaling_factor = 0.13025
    config.dpo.beta = 5000.0
    config.optim.optimizer = "adafactor"  # as Diffusion-DPO's SDXL runs
    config.optim.learning_rate = 1e-8
    config.optim.scale_lr = True
    config.optim.warmup_steps = 200  # Diffusion-DPO's SDXL launcher (SD1.5's: 500)
    config.mesh.shape = (1, -1)
    return config
