"""The built-in CPU demo (python -m bdpo_demo): a procedural world, 32x32 pixel-space UNet.

The trainer fields are shared by the base SFT run and every DPO run; `config.demo` holds the
demo's sizes and per-stage settings (bdpo_demo/pipeline.py reads them). Every stage goes
through the real code: preprocessing CLI, trainer, JAX sampler, evaluation protocol.

    python -m bdpo_demo --out demo_out            # this config
    python -m bdpo_demo --out demo_ci --ci        # configs/demo_ci.py (CI size)
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.pretrained = ""
    config.model.unet_config = ""  # set by the demo: OUT/unet_config.json (bdpo_demo.model)
    config.model.compute_dtype = "float32"
    config.model.remat = False
    # fp32 without remat: at policy == reference the median |inside| measured 0 to 3e-5 (tiny;
    # bench/dpo_signal.py, tests), far below the 0.01 the run warns at: no extra forward
    config.dpo.matched_forward = False
    # x0-prediction ('sample'): the UNet outputs the clean image, so a short-trained model's
    # errors come out smooth. With v-prediction the final image is sqrt(a) x_t - sqrt(1 - a) v:
    # the short-trained base never learnt to cancel the last step's noise, which left grain on
    # every background, and the measures count grain as object pixels (README: the base recipes
    # compared with python -m bdpo_demo.base_study)
    config.model.prediction_type = "sample"
    # pixel space: 2x2-unshuffled pixels in [-1, 1] (bdpo_demo.model), DDPM's linear schedule
    config.diffusion.beta_schedule = "linear"
    config.diffusion.beta_start = 0.0001
    config.diffusion.beta_end = 0.02
    config.diffusion.vae_scaling_factor = 1.0

    config.data.path = ""  # set by the demo per stage
    config.data.random_flip = False  # a flip would move "left" objects to the right
    config.dpo.proportion_empty_prompts = 0.1  # CFG needs the unconditional model too

    config.optim.scale_lr = False
    config.optim.weight_decay = 0.0
    config.train.log_every = 10
    config.train.checkpoint_every = 100000  # only the final step is saved
    config.train.keep_checkpoints = 1
    config.train.async_checkpoints = False

    config.sample.scheduler = "dpmpp"  # DPM-Solver++ 2M: sharper than DDIM at 10 steps
    config.sample.timestep_spacing = "trailing"  # few-step sampling starts at t = 999
    # "DPM++ 2M Karras": noise levels from t = 999 down to t = 0 (sigma 0.01). The trailing
    # timesteps alone end at t = 124 (sigma 0.43), so each image was the base's x0 estimate
    # from that noise level: softer edges, fewer shapes (README: what the base draws)
    config.sample.use_karras_sigmas = True

    d = config.demo = ml_collections.ConfigDict()
    d.seed = 0  # seeds rendering, training, sampling and evaluation
    d.channels = (32, 64, 64)  # UNet block_out_channels, one per level
    d.pixel_fold = 2  # pixels folded into channels per side: 2 = 12x16x16 latents, 1 = RGB 32x32
    d.plain_levels = 1  # UNet levels without attention, from the first (16x16 here)
    # the world's image side in px (bdpo_demo.world.IMAGE_SIZE; renders, flaws and UNet follow
    # it; 16 with pixel_fold = 1 is the README's "Another resolution" study)
    d.image_size = 32
    # stage 1-2: flawed renders and the base SFT run
    d.train_seeds = 1  # --seeds N: pairs + DPO runs for seeds seed .. seed + N - 1, one base
    d.sft_per_prompt = 20  # flawed renders per training prompt (72 of the 180: world.split_specs)
    d.flaw_rate = 0.45  # probability of each flaw (colour, shape, position, blur), independent
    # the 15-minute budget on 2 cores sets the sizes below (README: what the base draws)
    d.base_steps = 2000  # SFT optimiser steps
    d.base_batch = 32  # SFT images per step
    d.base_lr = 2e-3  # SFT Adam peak learning rate
    d.base_warmup = 50  # SFT warm-up steps
    d.base_schedule = "cosine"  # SFT learning rate after warm-up: cosine decay to 0
    # SFT loss weights (config.diffusion.snr_gamma, snr_weighting): the x0 error weighted by
    # clip(SNR_t, 1, 5). Unweighted, the base's x0 estimate of a nearly clean render was no
    # better than its estimate at t = 124 (README: what the base draws)
    d.base_snr_gamma = 5.0
    d.base_snr_weighting = "truncated_snr"  # 'min_snr' | 'truncated_snr'
    d.base_loss_type = "l2"  # SFT per-element error (config.diffusion.loss_type): l2 | l1 | ...
    d.base_huber_c = 0.1  # 'pseudo_huber' only: its c (config.diffusion.huber_c)
    # SFT timesteps (config.diffusion.timestep_sampling, timestep_uniform_share): half drawn
    # from EDM's noise levels (ln sigma ~ N(-1.2, 1.2^2): most at sigma < 1, where edges and
    # shapes are decided), half uniform (the noisy timesteps the sampler starts from). Uniform
    # timesteps alone spend half the steps at sigma > 3 (README: what the base draws)
    d.base_timestep_sampling = "lognormal_sigma"  # 'uniform' | 'lognormal_sigma'
    d.base_timestep_uniform_share = 0.5
    # stage 3: on-policy pairs
    d.pair_prompts = 0  # training prompts to sample pairs for (0 = all 72; spread evenly)
    d.pairs_per_prompt = 2  # pairs sampled per prompt (2 images each, different seeds)
    d.sample_steps = 12  # sampler steps for pair sampling and evaluation (Karras: 8 lost colour)
    d.guidance = 3.0  # classifier-free guidance scale
    d.sample_batch = 50  # images per sampler call (fixed: one compile)
    # stage 4: DPO runs
    d.dpo_steps = 30  # optimiser steps per run
    d.dpo_batch = 8  # pairs per step
    d.dpo_lr = 3e-5  # Adam learning rate
    d.dpo_warmup = 5  # warm-up steps
    d.beta = 1000.0  # Diffusion-DPO beta
    d.ref_update_every = 20  # T for BalancedDPO (reference <- policy every T steps)
    d.lora_rank = 8  # '-lora' runs: LoRA adapters of this rank on the frozen base
    d.lora_lr = 1e-3  # '-lora' runs: Adam learning rate of the adapters
    # name -> label mode (single:<scorer> for one scorer; '-noref' suffix: ref_update_every=0;
    # '-lora' suffix: LoRA adapters on the frozen base instead of full fine-tuning)
    d.runs = (
        "balanced=majority",
        "colour=single:colour",
        "shape=single:shape",
        "position=single:position",
        "sharpness=single:sharpness",
        "weighted_sum=weighted_sum",
        "score_sum=score_sum",
        "balanced_noref=majority-noref",
        "balanced_lora=majority-lora",
    )
    # stage 5: evaluation (the paper's protocol: best of `eval_seeds`, win rates vs base)
    d.eval_prompts = 100  # held-out prompts (never in SFT or pair data), spread; 0 = all 108
    d.eval_seeds = 5  # images per prompt and model
    d.bootstrap = 2000  # paired bootstrap resamples per win-rate cell (winrates.csv; 0 = off)
    d.grid_prompts = 6  # prompts in the image grid (base, balanced, single-scorer runs)
    d.grid_scale = 4  # grid cells: 32 px images enlarged 4x without smoothing
    return config
