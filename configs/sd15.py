"""SD1.5 BalancedDPO with the paper's hyper-parameters (Pick-a-Pic v2, 512 px, 4 scorers).

2000 steps, reference update every T=100 steps, AdamW, effective batch 128, lr 1e-8 with
warm-up, beta 5000 (Diffusion-DPO's SD1.5 value). Shards from scorers_torch.preprocess:

    python -m bdpo_jax.train --config configs/sd15.py --workdir runs/sd15_bdpo \
        --config.data.path=/data/pickapic_sd15_shards

Learning-rate scaling: the paper states "lr 1e-8" but not whether Diffusion-DPO's --scale_lr was
on. This config keeps scale_lr=True (as Diffusion-DPO's launchers do): the peak lr is
1e-8 x 128 pairs = 1.28e-6. Set --config.optim.scale_lr=False for a literal 1e-8.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config.model.subfolder = "unet"
    config.model.prediction_type = "epsilon"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = True

    config.data.source = "shards"
    config.data.path = ""  # required: --config.data.path=...

    config.label.mode = "majority"  # BalancedDPO

    config.dpo.beta = 5000.0
    config.dpo.ref_update_every = 100  # T
    config.dpo.ref_update = "copy"
    config.dpo.proportion_empty_prompts = 0.2

    config.optim.optimizer = "adamw"
    config.optim.learning_rate = 1e-8
    config.optim.scale_lr = True  # explicit choice: peak lr = 1e-8 * 128 = 1.28e-6
    config.optim.warmup_steps = 500
    config.optim.schedule = "constant"
    config.optim.weight_decay = 1e-2
    config.optim.grad_clip_norm = 1.0
    config.optim.grad_accum_steps = 1  # raise when 128 pairs do not fit (e.g. 4 on one A100)

    config.train.steps = 2000
    config.train.global_batch_size = 128  # effective batch (pairs per optimiser step)
    config.train.log_every = 10
    config.train.checkpoint_every = 250
    config.train.keep_checkpoints = 3
    return config
