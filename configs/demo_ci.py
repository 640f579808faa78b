"""CI size of the demo (tests/test_demo.py, `python -m bdpo_demo --ci`): every stage, a
few steps each, one full and one LoRA DPO run. Not meant to show anything but that the pipeline works."""

from configs import demo


def get_config():
    config = demo.get_config()
    d = config.demo
    d.channels = (8, 16)
    d.sft_per_prompt = 1
    d.base_steps = 4
    d.base_batch = 8
    d.pair_prompts = 24
    d.pairs_per_prompt = 1
    d.sample_steps = 2
    d.sample_batch = 12
    d.dpo_steps = 3
    d.dpo_batch = 8  # divisible by the 8 fake CPU devices of the tests
    d.ref_update_every = 2
    d.runs = ("balanced=majority", "balanced_lora=majority-lora")
    d.eval_prompts = 6  # of the 108 held-out prompts
    d.eval_seeds = 2
    d.bootstrap = 200
    d.grid_prompts = 2
    config.train.log_every = 2
    return config
