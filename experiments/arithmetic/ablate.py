"""The ablation researchers run first: the GRPO family on the arithmetic task, from one SFT run,
3 seeds each (trained in one vmapped program per method), judged by held-out accuracy as they
train (rlhf_jax/drivers/compare.py, ablation mode).

    rlhf-jax compare --config=experiments/arithmetic/ablate.py --workdir=runs/ablate \
        --config.sft=runs/arithmetic/sft

Methods (experiments/arithmetic/rl.py:<preset>: the task's RL config under the paper preset):
GRPO, Dr. GRPO, DAPO, DAPO without clip-higher (clip_high = clip_low = 0.2), GSPO, CISPO, RLOO
(leave-one-out REINFORCE, no KL) and REINFORCE++. Scaled to a 2-core CPU: 8 prompts x 8 samples
per step, 60 steps, held-out accuracy on 64 test problems (8 samples each at temperature 1)
every 10 steps. Curves: held-out accuracy, the lengths of correct and incorrect responses,
token entropy, the clip ratios. Contrasts: the two published observations the issue names.
"""

import ml_collections

RL = "experiments/arithmetic/rl.py"
SCALE = ("num_steps=61", "batch_size=8", "samples_per_prompt=8", "eval_every=10", "eval_split=test",
         "num_eval_prompts=64", "log_every=1", "checkpoint_every=61", "sample_every=0")


def method(preset, *overrides):
    return ml_collections.ConfigDict(dict(config=f"{RL}:{preset}", knob="", knob_values=(),
                                          overrides=SCALE + tuple(overrides)))


def get_config():
    c = ml_collections.ConfigDict()
    c.sft = "runs/arithmetic/sft"
    c.reward_model = ""  # the verifier is every method's reward
    c.num_seeds = 3
    c.methods = ml_collections.ConfigDict()
    c.methods.grpo = method("grpo")
    c.methods.dr_grpo = method("dr_grpo")
    c.methods.dapo = method("dapo")
    c.methods.dapo_no_clip_higher = method("dapo", "clip_high=0.2")
    c.methods.gspo = method("gspo")
    c.methods.cispo = method("cispo")
    c.methods.rloo = method("grpo", "loss=rloo", "kl_placement=none", "kl_coef=0.0")
    c.methods.reinforce_pp = method("reinforce_pp")
    c.curves = ("eval/scores", "val/length_correct", "val/length_incorrect", "policy/entropy_avg",
                "policy/clip_ratio/low_mean", "policy/clip_ratio/high_mean")
    c.window = 5
    # (baseline, treatment, metric, claim): the claim holds here when the treatment's change of
    # the metric over training is below the baseline's.
    c.contrasts = (
        ("grpo", "dr_grpo", "val/length_incorrect",
         "Dr. GRPO paper (Liu et al. 2025): GRPO's per-response length normalisation lets incorrect "
         "responses grow longer; Dr. GRPO's constant normaliser does not"),
        ("dapo", "dapo_no_clip_higher", "policy/entropy_avg",
         "DAPO paper (Yu et al. 2025): without clip-higher the policy's entropy collapses"),
    )
    return c
