"""CPU-scale smoke run: synthetic data, a tiny random SD1.5-family UNet, fp32, a few steps.

Needs no files and no network:

    python -m bdpo_jax.train --config configs/tiny.py --workdir /tmp/bdpo_tiny
    python -m bdpo_jax.train --config configs/tiny.py --workdir W --config.train.steps=50
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.pretrained = ""
    config.model.unet_config = "tiny:sd15"  # presets.tiny_unet_config sized to the data
    config.model.compute_dtype = "float32"
    config.model.remat = False
    # fp32 without remat: at policy == reference the median |inside| measured 0 to 3e-5 (tiny;
    # bench/dpo_signal.py, tests), far below the 0.01 the run warns at: no extra forward
    config.dpo.matched_forward = False

    config.data.source = "synthetic"
    config.data.synthetic_num_records = 64
    config.data.synthetic_latent_shape = (4, 8, 8)
    config.data.synthetic_text_shape = (8, 32)

    config.dpo.beta = 500.0  # moderate: the tiny random model's mse gaps are large
    config.dpo.ref_update_every = 10

    config.optim.learning_rate = 1e-4
    config.optim.scale_lr = False
    config.optim.warmup_steps = 2

    config.train.steps = 20
    config.train.global_batch_size = 8  # divisible by 8 fake CPU devices too
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 2

    # pure FSDP over every device: (1, 1) on one CPU, (1, 8) on the tests' 8 fake devices, where
    # the tiny UNet's kernels (>= 1024 elements) are then sharded like a real model's
    config.mesh.shape = (1, -1)
    config.mesh.fsdp_min_size = 1024
    return config
