"""Every configuration field of bdpo_jax, with its default and a one-line comment.

Variants (sd15.py, sd21.py, sdxl.py, tiny.py, demo.py) import `get_config` from here
and override fields only. Run:

    python -m bdpo_jax.train --config configs/default.py --workdir W [--config.a.b=v]
"""

import ml_collections

from bdpo_jax import labels


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameter init (when not loaded), noise, timesteps and data order

    # --- model: the UNet and where its weights come from -----------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or folder
    config.model.subfolder = "unet"  # subfolder of `pretrained` holding the UNet ('' for none)
    config.model.unet_config = ""  # path/name of a UNet config.json to init randomly instead
    config.model.param_dtype = "float32"  # dtype the trained params are stored in
    config.model.compute_dtype = "bfloat16"  # dtype of activations and matmuls
    config.model.remat = True  # checkpoint each resnet and transformer layer (diffusers' grain)
    config.model.attention = "auto"  # 'auto' | 'xla' | 'cudnn' for jax.nn.dot_product_attention
    config.model.prediction_type = "epsilon"  # 'epsilon', 'v_prediction' (SD2.1-768), 'sample'
    config.model.init_checkpoint = ""  # Orbax checkpoint dir to take params from ('' = pretrained)

    # --- LoRA: adapters on a frozen base instead of full fine-tuning (bdpo_jax.lora) --------
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0  # adapter rank r (0 = full fine-tuning; the base is frozen when > 0)
    config.lora.alpha = 0.0  # scale = alpha / rank (0 = rank: scale 1, as diffusers' scripts)
    config.lora.targets = ("to_q", "to_k", "to_v", "to_out.0")  # layers, by diffusers name/suffix
    config.lora.include_ff = False  # also adapt the feed-forward layers ff.net.0.proj, ff.net.2

    # --- diffusion schedule (the base model's DDPM scheduler) -------------------------------
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.num_train_timesteps = 1000  # T of the DDPM schedule
    config.diffusion.beta_schedule = "scaled_linear"  # 'scaled_linear' | 'linear'
    config.diffusion.beta_start = 0.00085  # first beta
    config.diffusion.beta_end = 0.012  # last beta
    config.diffusion.vae_scaling_factor = 0.18215  # latents = sample * factor; the data's wins
    # label mode 'sft' only: SNR loss weights capped at gamma (0 = off, plain mean mse as the
    # authors' --sft); Diffusion-DPO's loss is unweighted. 'min_snr': Min-SNR-gamma (diffusers'
    # --snr_gamma); 'truncated_snr': clip(SNR, 1, gamma) (bdpo_jax.schedules.snr_loss_weights)
    config.diffusion.snr_gamma = 0.0
    config.diffusion.snr_weighting = "min_snr"  # 'min_snr' | 'truncated_snr'
    # label mode 'sft' only: the per-element error (bdpo_jax.loss.per_image_error): 'l2' (the
    # mse, the authors'), 'l1', 'pseudo_huber' (c * (sqrt(d^2 + c^2) - c), c = huber_c)
    config.diffusion.loss_type = "l2"  # 'l2' | 'l1' | 'pseudo_huber'
    config.diffusion.huber_c = 0.1  # 'pseudo_huber' only: c, where squared turns absolute
    # label mode 'sft' only: the timesteps' distribution (bdpo_jax.schedules.timestep_probabilities).
    # 'uniform' (DDPM, the authors'); 'lognormal_sigma': EDM's ln sigma ~ N(mean, std^2) on the
    # schedule's timesteps, mixed with `timestep_uniform_share` of uniform timesteps
    config.diffusion.timestep_sampling = "uniform"
    config.diffusion.timestep_log_sigma_mean = -1.2  # EDM's P_mean
    config.diffusion.timestep_log_sigma_std = 1.2  # EDM's P_std
    config.diffusion.timestep_uniform_share = 0.0  # share of uniform timesteps mixed in (0..1)

    # --- data -------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.source = "shards"  # 'shards' (ArrayRecord from scorers_torch) | 'synthetic'
    config.data.path = ""  # folder of shards + manifest.json (required for 'shards')
    config.data.shuffle = True  # seeded shuffle of records (per epoch)
    config.data.num_workers = 0  # Grain worker processes (0 = read in the main process)
    config.data.prefetch = 2  # batches prefetched ahead of the step
    config.data.read_threads = 0  # reader threads per process (0: best on local disk; >0 for NFS)
    config.data.random_flip = True  # pick a stored flipped view at random when present
    config.data.drop_tied_labels = True  # a pair whose label is 0 (tie) is replaced by a random
    # non-tied pair drawn from (seed, global position): batches stay independent of the hosts
    # synthetic source (CPU smoke tests): random moments, embeddings and scores made in-process
    config.data.synthetic_num_records = 64  # size of the synthetic dataset
    config.data.synthetic_latent_shape = (4, 8, 8)  # [C, H, W] of synthetic latents
    config.data.synthetic_text_shape = (8, 32)  # [L, D] of synthetic text embeddings
    config.data.synthetic_num_scorers = 4  # K of synthetic scores
    config.data.synthetic_pooled_dim = 0  # P of synthetic pooled embeds + add_time_ids (0 = none)
    config.data.synthetic_num_time_ids = 6  # length of add_time_ids: 6 (SDXL, Kolors), 5 (refiner)

    # --- labels: how a pair's preference is decided (all from the same shards) -----------
    config.label = ml_collections.ConfigDict()
    # 'majority' (BalancedDPO) | 'single' | 'human' | 'weighted_sum' (Eq. 10) | 'score_sum' |
    # 'normalized_sum' | 'random_scorer' | 'soft_vote' | 'smpo' | 'sft' (see bdpo_jax/labels.py)
    config.label.mode = "majority"
    config.label.scorer = ""  # scorer name for mode 'single' (and smpo's reward model)
    config.label.weights = ""  # 'name=w,...' for weighted/score/normalized_sum ('' = all 1/K)
    config.label.smpo_lo = labels.SMPO_LO  # 'smpo': score mapped to 0 (SmPO's PickScore low end)
    config.label.smpo_hi = labels.SMPO_HI  # 'smpo': score mapped to 1 (SmPO's PickScore high end)
    config.label.smpo_scale = labels.SMPO_SCALE  # 'smpo': (2 sigmoid(n_1 - n_2) - 1) * scale

    # --- DPO --------------------------------------------------------------------------------
    config.dpo = ml_collections.ConfigDict()
    config.dpo.beta = 5000.0  # Diffusion-DPO beta (applied once: inside = -0.5*beta*diff)
    config.dpo.ref_update_every = 100  # T: reference <- policy every T steps (0 = never)
    config.dpo.ref_update = "copy"  # 'copy' (BalancedDPO) or 'ema'
    config.dpo.ref_ema_decay = 0.99  # decay for ref_update='ema'
    config.dpo.proportion_empty_prompts = 0.2  # text-conditioning dropout probability
    # loss VALUE of policy and reference from one forward program (bit-equal at policy == ref,
    # so bf16 rounding x beta/2 cannot fake a signal), gradient straight-through; costs one more
    # forward and a params-sized temporary. On: without it the full SD1.5 in bf16 gave median
    # |inside| 0.995 at policy == ref on CPU XLA (bench/dpo_signal.py; 0 with it)
    config.dpo.matched_forward = True

    # --- optimisation -----------------------------------------------------------------------
    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adamw"  # 'adamw' | 'adafactor'
    config.optim.learning_rate = 1e-8  # base lr (per sample when scale_lr)
    config.optim.scale_lr = True  # Diffusion-DPO: lr *= global batch * accumulation
    config.optim.warmup_steps = 500  # linear warm-up steps
    config.optim.schedule = "constant"  # 'constant' | 'cosine' after warm-up
    config.optim.b1 = 0.9  # Adam beta1
    config.optim.b2 = 0.999  # Adam beta2
    config.optim.eps = 1e-8  # Adam epsilon
    config.optim.weight_decay = 1e-2  # decoupled weight decay
    config.optim.grad_clip_norm = 1.0  # global-norm clip (0 = off)
    config.optim.grad_accum_steps = 1  # micro-batches per optimiser step (a lax.scan in the step)
    config.optim.adafactor_decay_rate = 0.8  # Adafactor second-moment decay exponent (HF: -0.8)
    config.optim.adafactor_clip_threshold = 1.0  # Adafactor update clipping (HF clip_threshold)

    # --- training loop ----------------------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    config.train.steps = 2000  # optimiser steps
    config.train.global_batch_size = 128  # pairs per optimiser step (over all devices)
    config.train.log_every = 10  # steps between metric logs
    config.train.checkpoint_every = 500  # steps between checkpoints (the last step is saved too)
    config.train.keep_checkpoints = 3  # checkpoints kept
    config.train.sample_every = 0  # steps between sample grids (0 = off)
    config.train.async_checkpoints = True  # write checkpoints in the background
    config.train.progress_bar = True  # tqdm progress bar on the console (process 0)

    # --- sharding ---------------------------------------------------------------------------
    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1)  # (data, fsdp) sizes; -1 takes the rest; the batch uses both axes
    config.mesh.fsdp_min_size = 2**18  # params with fewer elements stay replicated
    # (regex on the param path, tactic) pairs, first match wins; tactic 'replicate' | 'fsdp' |
    # explicit spec 'None,None,None,fsdp'; unmatched leaves use 'fsdp' (see bdpo_jax.sharding)
    config.mesh.rules = ()

    # --- sampling: sample grids during training (the batch's prompts; bdpo_jax.grids) -------
    config.sample = ml_collections.ConfigDict()
    config.sample.scheduler = "ddim"  # 'ddim' | 'dpmpp' (DPM-Solver++ 2M) | 'euler'
    config.sample.num_steps = 50  # denoising steps
    config.sample.guidance_scale = 7.5  # classifier-free guidance
    config.sample.timestep_spacing = "leading"  # 'leading' | 'linspace' | 'trailing' (SD: leading)
    config.sample.steps_offset = 1  # added to 'leading' timesteps (SD scheduler configs: 1)
    config.sample.set_alpha_to_one = False  # DDIM's final alpha_cumprod: 1 or alphas_cumprod[0]
    # dpmpp/euler: Karras et al.'s noise levels (diffusers' use_karras_sigmas; "DPM++ 2M Karras")
    config.sample.use_karras_sigmas = False
    config.sample.vae = ""  # VAE for sample grids: folder/hub id ('' = model.pretrained's vae/)
    return config
