"""Benchmark: one RLOO (and GRPO) policy-optimisation iteration, ours against TRL, same run.

    python experiments/bench_ppo.py [--losses rloo,grpo] [--iterations 5] [--warmup 2]
                                    [--prompts 16] [--samples 4] [--prompt_length 32]
                                    [--response_length 48] [--torch_threads 0] [--no_record]

TRL 1.16 has no PPO trainer; its `RLOOTrainer` and `GRPOTrainer` are compared with our
`ppo.py` stage at loss='rloo' and loss='grpo'. Both sides use the same setting:

    model       configs/models.tiny() (GPT-2 style, d_model 128, 2 layers, 4 heads, d_ff 512,
                vocab 264, tied embeddings, float32), random init; TRL gets a
                `transformers.GPT2LMHeadModel` of that size (saved to a temp dir, since TRL builds
                its reference model with `from_pretrained(model.config._name_or_path)`)
    tokenizer   bytes 0-255 = ids 0-255, pad 256, EOS 257 (ours: ByteTokenizer; TRL: a `tokenizers`
                byte-level BPE with no merges in `PreTrainedTokenizerFast`, built offline)
    batch       `--prompts` prompts of exactly `--prompt_length` bytes (no padding), `--samples`
                (K) responses each, up to `--response_length` new tokens, temperature 1, no
                top-k / top-p; responses stop at EOS (a random model draws it with p ~ 1/264 per
                token, so nearly every row runs to the full length on both sides)
    reward      fraction of the letter 'e' in the decoded response, a Python function on the host
    KL          beta 0.05 against a frozen reference copy on both sides (so both run the reference
                forward pass); RLOO: k1 in the sequence reward on both sides; GRPO: ours k1 in
                the reward, TRL's k3 in the per-token loss (its only option)
    update      one epoch, one minibatch = the whole rollout batch (TRL: per_device_train_batch_size
                = prompts x K, steps_per_generation 1, num_iterations 1), Adam, constant learning
                rate 1e-5, gradient clipping at norm 1; float32, no remat / gradient checkpointing

What is timed, per iteration (the first `--warmup` iterations are excluded: ours compiles there,
TRL allocates its caches; median and best of the next `--iterations` are reported):

    ours  `ppo.ppo_step(setup, state, batch, rng)` of `ppo.build(config)`, followed by
          block_until_ready on the new state and metrics: the jitted rollout (KV-cache sampling,
          policy and reference log-prob forward passes), device_get + decode + the host reward
          function + device_put of the scores, the jitted final_scores, and the jitted update
          (advantages, forward/backward, Adam step). The prompt batch is tokenized and placed
          once, outside the timed region.
    TRL   `trainer.train()` for warmup + iterations optimizer steps; a `TrainerCallback` times
          on_step_begin -> on_step_end, which covers `training_step` (its `_prepare_inputs`:
          prompt tokenization, `model.generate` with KV cache, decoding, reward function, the
          old-policy and reference log-prob passes where TRL does them, advantages; then the loss
          forward and backward), gradient clipping, `optimizer.step`, scheduler step and
          zero_grad. Not in the window: the dataloader fetch of the prompt strings and
          Trainer logging (logging_steps=1 so that per-step completion lengths can be checked).

Work that differs by design (see the report printed at the end):
    * the old log-probs: ours (since 2026-12-07) takes the sampler's, so its rollout runs no
      policy forward (the check forward every logprob_check_every=10 iterations falls outside
      the timed ones); TRL GRPO skips that pass when num_iterations == steps_per_generation == 1
      (it uses the detached log-probs of the loss forward), TRL RLOO always does it.
    * both compute log-probs without [B, N, V] logits in the loss: TRL with its chunked fused LM
      head, ours with models/lm_head.py (chunks of model.logits_chunk = 256 tokens).
    * ours is one jitted XLA program per phase; TRL is eager PyTorch with Python per-token
      generation (transformers `generate`, `disable_compile=True`).
    * JAX and PyTorch each use their own CPU thread pools (default sizes unless --torch_threads);
      they run one after the other. On a machine shared with other jobs, torch's OpenMP pool can
      be several times slower with 2 threads than with 1 (threads spin at barriers while the cores
      are taken); XLA's pool degrades far less. Measure on a quiet machine, or compare with
      `--torch_threads 1` (recorded as torch_threads).
    * RLOO loss: ours is REINFORCE on the summed sequence log-prob (one on-policy epoch), TRL's
      the clipped sequence-ratio surrogate; the same forward/backward work either way.

Needs the optional reference stack: pip install -e '.[torch]' plus trl. Runs offline (the HF hub
is never contacted: HF_HUB_OFFLINE=1, everything built locally). Results are printed and
appended to experiments/results/bench_ppo.jsonl with the machine and date.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import argparse
import functools
import logging
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from configs import models, optimizers, ppo as ppo_configs
from rlhf_jax.models import model as model_lib, sampling
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import benchmarking
from rlhf_jax.stages import ppo, pretrain

LEARNING_RATE = 1e-5
KL_COEF = 0.05
CLIP_EPS = 0.2
PAD_ID, EOS_ID, BOS_ID = 256, 257, 258


# ----------------------------------------------------------------------------- shared setting


def frac_e(prompt: str, response: str) -> float:
    """The reward on both sides: fraction of the response's characters that are 'e'."""
    del prompt
    return response.count("e") / max(len(response), 1)


def make_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """n distinct ASCII prompts of exactly `length` bytes (= tokens under both tokenizers)."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz      "))
    return [f"{i:03d} " + "".join(rng.choice(alphabet, length - 4)) for i in range(n)]


def summarise(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "best_s": min(times), "times_s": [round(t, 4) for t in times]}


# ----------------------------------------------------------------------------- ours


def ours_config(loss, args, sft_dir):
    c = ppo_configs.base(num_steps=args.warmup + args.iterations)
    c.model = models.tiny()
    c.model.max_len = max(c.model.max_len, args.prompt_length + args.response_length)
    c.init_from = sft_dir
    c.reward_function = f"{__name__}:frac_e"  # imported by ppo.build ('__main__' when run as a script)
    c.gold_function = ""
    c.loss = loss
    c.samples_per_prompt = args.samples
    c.batch_size = args.prompts
    c.max_prompt_len = args.prompt_length
    c.max_new_tokens = args.response_length
    c.temperature, c.top_k, c.top_p = 1.0, 0, 1.0
    c.missing_eos = "keep"
    c.truncate_token = ""
    c.kl_estimator = "k1"
    c.kl_coef = KL_COEF
    c.adaptive_kl = False
    c.whiten_rewards = False
    c.clip_low = c.clip_high = CLIP_EPS
    c.entropy_coef = 0.0
    c.ppo_epochs = 1
    c.num_minibatches = 1
    c.optimizer = optimizers.adam(LEARNING_RATE, eps=1e-8, grad_clip_norm=1.0)
    c.sample_every = 0
    return c


def make_sft_run(workdir, model_config):
    """A random finished 'SFT run' on disk, so ppo.build builds the state the stage builds.
    Returns its parameter count."""
    return model_lib.count_params(pretrain.save_random_run(workdir, model_config))


def ours_iteration_times(loss, args, prompt_texts, tmp):
    """Wall-clock seconds of each `ppo_step` call (rollout + host reward + update), as train() runs it."""
    sft_dir = os.path.join(tmp, "sft")
    config = ours_config(loss, args, sft_dir)
    config.prompts = tuple(prompt_texts)  # one batch holds every prompt (batch_size = --prompts)
    n_params = make_sft_run(sft_dir, config.model)
    setup = ppo.build(config)
    assert isinstance(setup.tokenizer, ByteTokenizer)
    batch = setup.batch_fn(0)
    tokens = batch["prompts"]["prompt_tokens"]
    assert tokens.shape == (args.prompts, args.prompt_length), tokens.shape
    assert int(np.asarray(batch["prompts"]["prompt_mask"]).min()) == 1  # no padding

    times, lengths, state, rng = [], [], setup.state, jax.random.key(config.seed)
    for i in range(args.warmup + args.iterations):
        rng, step_rng = jax.random.split(rng)
        t0 = time.perf_counter()
        state, metrics, _ = ppo.ppo_step(setup, state, {**batch, "step": i}, step_rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        lengths.append(float(metrics["val/mean_response_length"]))
    return times, lengths, n_params


def ours_phase_times(loss, args, prompt_texts, tmp, peak_flops):
    """Where one of our iterations goes: each phase jitted and timed on its own (best of
    `--iterations`), and its achieved FLOP/s as a fraction of the measured matmul peak.

    generate   sampling.generate of the whole rollout batch (KV cache, every token to the end)
    forwards   the rollout's full-sequence passes: policy log-probs (+ values) and reference
    host       device_get + decode + the Python reward function + device_put of the scores
    update     the jitted update (advantages, forward/backward, optimizer step), state donated
    """
    sft_dir = os.path.join(tmp, "sft_phases")
    config = ours_config(loss, args, sft_dir)
    config.prompts = tuple(prompt_texts)
    make_sft_run(sft_dir, config.model)
    setup = ppo.build(config)
    models_, c = setup.models, config
    prompts = setup.batch_fn(0)["prompts"]
    state = setup.state
    samples = setup.rollout(state, setup.frozen, prompts, jax.random.key(0))
    k, p = c.samples_per_prompt, args.prompt_length

    @jax.jit
    def generate(policy, prompts, rng):
        return sampling.generate(models_.graphdef, policy, jnp.repeat(prompts["prompt_tokens"], k, 0),
                                 jnp.repeat(prompts["prompt_mask"], k, 0), rng, max_new_tokens=c.max_new_tokens,
                                 eos_id=models_.eos_id, pad_id=models_.pad_id, temperature=c.temperature)

    @jax.jit
    def forwards(state, frozen, tokens, mask):
        policy = ppo.forward(models_, state.params["policy"], state.params["value"], tokens, mask, p)
        return policy, ppo.forward(models_, frozen["ref"], None, tokens, mask, p, with_values=False)

    def host():
        response, mask = jax.device_get((samples.response, samples.response_mask))
        texts = sampling.decode_responses(setup.tokenizer, response, mask)
        raw = np.asarray([frac_e("", t) for t in texts], np.float32)
        return jax.device_put(raw, samples.has_eos.sharding)

    scores = setup.final_scores(host(), samples.has_eos, samples.response_mask.sum(-1))
    holder = {"state": state}

    def update():
        holder["state"], metrics = setup.update(holder["state"], samples, scores, jax.random.key(1), setup.frozen["ref"])
        jax.block_until_ready(metrics)

    best = functools.partial(benchmarking.best_time, repeats=args.iterations)
    times = {
        "generate": best(lambda: jax.block_until_ready(generate(holder["state"].params["policy"], prompts,
                                                                 jax.random.key(2)))),
        "forwards": best(lambda: jax.block_until_ready(forwards(holder["state"], setup.frozen, samples.tokens,
                                                                samples.attention_mask))),
        "host": best(lambda: jax.block_until_ready(host())),
        "update": best(update),
    }
    # FLOPs: 2 per weight per token forward, 6 forward + backward (PaLM's 6N + attention term).
    b, n = args.prompts * k, args.response_length
    train_flops_per_token = model_lib.flops_per_token(c.model, p + n)
    value_passes = 1 if loss == "ppo" and c.value_model != "policy" else 0
    flops = {
        "generate": b * n * train_flops_per_token / 3,
        "forwards": (2 + value_passes) * b * (p + n) * train_flops_per_token / 3,
        "host": 0.0,
        "update": (1 + value_passes) * b * (p + n) * train_flops_per_token * c.ppo_epochs,
    }
    return {phase: {"s": t, "fraction_of_peak": flops[phase] / t / peak_flops} for phase, t in times.items()}


# ----------------------------------------------------------------------------- TRL


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what `tokenizers`' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_hf_tokenizer():
    """Our ByteTokenizer as a `PreTrainedTokenizerFast`: byte b -> id b, <pad> 256, <eos> 257, <bos> 258."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])  # ids 256, 257, 258, in this order
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 padding_side="left", truncation_side="left")
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    text = "Hello, wörld!"
    assert hf(text)["input_ids"] == ByteTokenizer().encode(text), hf(text)["input_ids"]
    assert hf.decode(ByteTokenizer().encode(text) + [EOS_ID], skip_special_tokens=True) == text
    return hf


def hf_model_dir(model_config, tmp) -> str:
    """A random `GPT2LMHeadModel` of our size, saved (TRL reloads the reference from its path)."""
    import torch
    import transformers

    hf = transformers.GPT2Config(vocab_size=model_config.vocab_size, n_positions=model_config.max_len,
                                 n_embd=model_config.d_model, n_layer=model_config.num_layers,
                                 n_head=model_config.num_heads, n_inner=model_config.d_ff, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                                 layer_norm_epsilon=model_config.norm_eps, tie_word_embeddings=True,
                                 bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf)
    path = os.path.join(tmp, "hf_policy")
    model.save_pretrained(path)
    return path


def trl_iteration_times(loss, args, prompt_texts, tmp):
    """Seconds of each TRL optimizer step (on_step_begin -> on_step_end) of trainer.train()."""
    import datasets
    import torch
    import transformers
    import trl

    model_config = ours_config(loss, args, "").model
    model_path = hf_model_dir(model_config, tmp)
    tokenizer = byte_hf_tokenizer()
    total = args.warmup + args.iterations
    # One epoch holding every step's prompts, in order: each step sees the same `--prompts` prompts.
    dataset = datasets.Dataset.from_dict({"prompt": list(prompt_texts) * total})

    def reward(prompts, completions, **kwargs):
        return [frac_e(p, c) for p, c in zip(prompts, completions)]

    common = dict(
        output_dir=os.path.join(tmp, f"trl_{loss}"), report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, seed=0,
        per_device_train_batch_size=args.prompts * args.samples, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.samples,
        max_completion_length=args.response_length, temperature=1.0, top_k=0, top_p=1.0,
        beta=KL_COEF, epsilon=CLIP_EPS, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=total,
        logging_steps=1, log_completions=False, shuffle_dataset=False, dataloader_num_workers=0,
        use_vllm=False, model_init_kwargs={"dtype": "float32"},
    )
    if loss == "rloo":
        trainer_cls, trl_config = trl.RLOOTrainer, trl.RLOOConfig(**common, normalize_advantages=False)
    else:  # ours: clipped token loss, masked mean over the batch's tokens (= 'dapo' on one process)
        trainer_cls, trl_config = trl.GRPOTrainer, trl.GRPOConfig(**common, loss_type="dapo", scale_rewards="group")

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self.t0 = [], [], None

        def on_step_begin(self, args_, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    timer = StepTimer()
    trainer = trainer_cls(model=model_path, reward_funcs=reward, args=trl_config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.remove_callback(transformers.ProgressCallback)
    assert trainer.model.device.type == "cpu" and trainer.model.dtype == torch.float32
    assert not trainer.model.is_activation_checkpointing
    assert (trainer.ref_model is not None) == (KL_COEF != 0.0)
    trainer.train()
    assert len(timer.times) == total, (len(timer.times), total)
    return timer.times, timer.lengths


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", default="rloo", help="comma-separated: rloo, grpo, ppo (ours only: TRL "
                        "1.16 has no PPO trainer)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first iterations (compile, caches)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt (K)")
    parser.add_argument("--prompt_length", type=int, default=32, help="prompt tokens (bytes)")
    parser.add_argument("--response_length", type=int, default=48, help="max new tokens")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--no_record", action="store_true", help="print only; do not append to results")
    args = parser.parse_args()
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    if not set(losses) <= {"rloo", "grpo", "ppo"} or not losses:
        parser.error(f"--losses {args.losses!r}: expected a comma-separated subset of rloo, grpo, ppo")
    if args.samples < 2 or args.prompt_length < 5 or args.iterations < 1:
        parser.error("need --samples >= 2, --prompt_length >= 5, --iterations >= 1")

    prompt_texts = make_prompts(args.prompts, args.prompt_length)
    result = {"model": "tiny", "prompts": args.prompts, "samples_per_prompt": args.samples,
              "rollout_batch": args.prompts * args.samples, "prompt_length": args.prompt_length,
              "response_length": args.response_length, "iterations": args.iterations, "warmup": args.warmup,
              "kl_coef": KL_COEF, "dtype": "float32"}
    try:
        import torch
        import transformers
        import trl
    except ImportError as e:
        raise SystemExit(f"the TRL comparison needs the reference stack (pip install -e '.[torch]' trl): {e}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    result.update(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__,
                  torch_threads=torch.get_num_threads())

    peak = benchmarking.matmul_peak_flops(jnp.float32)
    result["matmul_peak_flops"] = peak
    for loss in losses:
        with tempfile.TemporaryDirectory() as tmp:
            times, lengths, n_params = ours_iteration_times(loss, args, prompt_texts, tmp)
            result["params"] = n_params
            ours = summarise(times[args.warmup:])
            ours["first_iteration_s"] = times[0]  # includes jit compilation
            ours["mean_response_length"] = float(np.mean(lengths[args.warmup:]))
            ours["phases"] = ours_phase_times(loss, args, prompt_texts, tmp, peak)
            print(f"{loss}: ours by phase: " + ", ".join(
                f"{name} {v['s']:.3f} s ({100 * v['fraction_of_peak']:.1f}% of peak)"
                for name, v in ours["phases"].items()), flush=True)
            if loss == "ppo":  # ours only
                result["ours_ppo"] = ours
                print(f"ppo: ours {ours['median_s']:.3f} s/iteration (median; best {ours['best_s']:.3f})", flush=True)
                continue
            times, lengths = trl_iteration_times(loss, args, prompt_texts, tmp)
            theirs = summarise(times[args.warmup:])
            theirs["first_iteration_s"] = times[0]
            if lengths:
                theirs["mean_response_length"] = float(np.mean(lengths[args.warmup:]))
        result[f"ours_{loss}"], result[f"trl_{loss}"] = ours, theirs
        result[f"{loss}_speedup_ours_over_trl"] = theirs["median_s"] / ours["median_s"]
        print(f"{loss}: ours {ours['median_s']:.3f} s/iteration (median; best {ours['best_s']:.3f}, "
              f"first {ours['first_iteration_s']:.1f}), TRL {trl.__version__} {theirs['median_s']:.3f} s/iteration "
              f"(best {theirs['best_s']:.3f}, first {theirs['first_iteration_s']:.1f}); "
              f"ours is {result[f'{loss}_speedup_ours_over_trl']:.2f}x faster (TRL time / ours); "
              f"mean response length ours {ours['mean_response_length']:.1f}, "
              f"TRL {theirs.get('mean_response_length', float('nan')):.1f}", flush=True)

    for k, v in result.items():
        print(f"{k:32s} {v:,.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    if not args.no_record:
        print("written to", benchmarking.record_result("bench_ppo", result))


if __name__ == "__main__":
    main()
