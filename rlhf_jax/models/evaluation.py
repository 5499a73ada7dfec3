"""One evaluation for every method: samples on held-out prompts, their KL to the SFT policy,
their gold score and their reward-model score; and best-of-n sampling as a method of its own.

    evaluate = make_policy_evaluator(sft, tokenizer, prompts, gold_fn=vader, reward=rm)
    evaluate(graphdef, params)  -> {'kl', 'kl_sem', 'gold', 'gold_sem', 'rm', 'length', ...}
    best_of_n(sft, tokenizer, prompts, reward=rm, gold_fn=vader, ns=(1, 2, 4, ..., 64))
    evaluate = make_accuracy_evaluator(tokenizer, problems, verifier, samples_per_prompt=8, ks=(1, 8))
    evaluate(graphdef, params)  -> {'accuracy', 'accuracy_sem', 'pass@1', 'pass@8', 'length_correct', ...}

A task with a checkable answer (a verifier, e.g. rlhf_jax.data.arithmetic:arithmetic_reward)
is judged by accuracy instead: greedy (one argmax response per problem) or K samples per problem
at a temperature, with the unbiased pass@k of Chen et al. (2021) from those K.

KL is the sequence KL(policy || SFT) on the held-out prompts, estimated from the policy's own
samples (one estimator for every method, k1 summed over the response tokens):

    KL ~= mean over samples y ~ pi(.|x) of  sum_t [log pi(y_t | x, y_<t) - log sft(y_t | x, y_<t)]

both at the evaluation temperature (1.0 by default: the policy as the distribution it defines).
Every policy is sampled with the same keys on the same prompts (common random numbers), so the
differences between methods are not sampling noise of the evaluation. Best-of-n keeps, of n SFT
samples per prompt, the one the reward model scores highest; its KL to the SFT policy is the
analytic `log n - (n - 1) / n` (Stiennon et al. 2020, appendix; exact for distinct samples).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from rlhf_jax.models import model as model_lib, sampling


def make_scorer(graphdef, tokenizer, seq_len: int, batch_size: int = 64):
    """score(params, prompts, responses) -> [N] float64 raw rewards of a reward model, in
    fixed-size batches (one compile; the last batch is padded with empty rows, dropped)."""
    score_batch = jax.jit(lambda params, tokens, mask: model_lib.reward_scores(graphdef, params, tokens, mask))

    def score(params, prompts, responses):
        tokens, mask = sampling.encode_prompt_responses(tokenizer, prompts, responses, seq_len)
        n = len(tokens)
        pad = -n % batch_size
        tokens = np.concatenate([tokens, np.full((pad, seq_len), tokenizer.pad_id, np.int32)])
        mask = np.concatenate([mask, np.zeros((pad, seq_len), np.int32)])
        out = [np.asarray(score_batch(params, tokens[i:i + batch_size], mask[i:i + batch_size]))
               for i in range(0, len(tokens), batch_size)]
        return np.concatenate(out)[:n].astype(np.float64) if out else np.zeros([0])

    return score


def make_reward(reward_model, tokenizer, seq_len: int):
    """(model_config, graphdef, params, normalization) of runs.load_reward_model ->
    fn(prompts, responses) -> [N] normalised rewards."""
    _, graphdef, params, normalization = reward_model
    score = make_scorer(graphdef, tokenizer, seq_len)
    return lambda prompts, responses: (score(params, prompts, responses) - normalization["mean"]) / normalization["std"]


def sample(graphdef, params, tokenizer, prompts: list[str], *, samples_per_prompt: int, max_prompt_len: int,
           max_new_tokens: int, temperature: float, batch_size: int, seed: int, greedy: bool = False) -> dict:
    """K samples per prompt (rows p*K ... p*K+K-1 share prompt p), in calls of `batch_size` rows
    whose keys are fold_in(key(seed), call): the same keys for every policy. greedy: the argmax
    token at every step (the keys are then unused; log-probs still at `temperature`).

    Returns {'texts': [N*K] str, 'tokens', 'attention_mask' [N*K, P+T], 'response_mask' [N*K, T],
    'logprobs' [N*K] summed sampler log-probs (temperature, unfiltered)}.
    """
    k = samples_per_prompt
    tokens, mask = sampling.encode_prompts(tokenizer, prompts, max_prompt_len)
    tokens, mask = np.repeat(tokens, k, axis=0), np.repeat(mask, k, axis=0)
    n = len(tokens)
    pad = -n % batch_size  # fixed-size calls: one compiled program
    tokens = np.concatenate([tokens, np.full((pad, max_prompt_len), tokenizer.pad_id, np.int32)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
    parts = []
    for call, start in enumerate(range(0, len(tokens), batch_size)):
        out = sampling.generate(graphdef, params, tokens[start:start + batch_size], mask[start:start + batch_size],
                                jax.random.fold_in(jax.random.key(seed), call), max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature,
                                greedy=greedy)
        parts.append(jax.device_get({key: out[key] for key in ("tokens", "attention_mask", "response",
                                                               "response_mask", "logprobs")}))
    out = {key: np.concatenate([p[key] for p in parts])[:n] for key in parts[0]}
    return {"texts": sampling.decode_responses(tokenizer, out["response"], out["response_mask"]),
            "tokens": out["tokens"], "attention_mask": out["attention_mask"],
            "response_mask": out["response_mask"], "logprobs": out["logprobs"].sum(axis=1)}


def make_logprob_fn(graphdef, temperature: float, batch_size: int):
    """fn(params, tokens, attention_mask, response_mask) -> [N] summed log-probs of the response
    tokens (the last T columns) under `params`, in fixed-size batches."""
    fn = jax.jit(lambda params, tokens, mask, target: model_lib.sequence_logprobs(
        graphdef, params, tokens, mask, target, temperature))

    def logprobs(params, tokens, attention_mask, response_mask):
        n, t = response_mask.shape
        target = np.concatenate([np.zeros((n, tokens.shape[1] - t), np.int32), response_mask], axis=1)
        pad = -n % batch_size
        padded = [np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) for x in (tokens, attention_mask, target)]
        out = [np.asarray(fn(params, *(x[i:i + batch_size] for x in padded)))
               for i in range(0, n + pad, batch_size)]
        return np.concatenate(out)[:n].astype(np.float64)

    return logprobs


def _mean_and_sem(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def make_policy_evaluator(sft, tokenizer, prompts: list[str], *, gold_fn=None, reward=None,
                          samples_per_prompt: int = 1, max_prompt_len: int = 64, max_new_tokens: int = 96,
                          temperature: float = 1.0, batch_size: int = 64, seed: int = 0):
    """evaluate(graphdef, params) -> metrics of the policy's samples on `prompts`.

    sft: (graphdef, params) of the reference policy for the KL. gold_fn(prompt, response) and
    reward(prompts, responses) (see make_reward) are optional. Metrics: kl (nats per response)
    and kl_sem, gold / gold_sem, rm / rm_sem, length (response tokens), and the texts ('samples').
    """
    sft_graphdef, sft_params = sft
    sft_logprobs = make_logprob_fn(sft_graphdef, temperature, batch_size)
    row_prompts = [p for p in prompts for _ in range(samples_per_prompt)]

    def evaluate(graphdef, params) -> dict:
        out = sample(graphdef, params, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                     max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
                     batch_size=batch_size, seed=seed)
        ref = sft_logprobs(sft_params, out["tokens"], out["attention_mask"], out["response_mask"])
        metrics = {}
        metrics["kl"], metrics["kl_sem"] = _mean_and_sem(out["logprobs"] - ref)
        if gold_fn is not None:
            metrics["gold"], metrics["gold_sem"] = _mean_and_sem([gold_fn(p, r) for p, r in zip(row_prompts, out["texts"])])
        if reward is not None:
            metrics["rm"], metrics["rm_sem"] = _mean_and_sem(reward(row_prompts, out["texts"]))
        metrics["length"] = float(out["response_mask"].sum(axis=1).mean())
        metrics["samples"] = list(zip(row_prompts, out["texts"]))
        return metrics

    return evaluate


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats."""
    return math.log(n) - (n - 1) / n


def best_of_n(policy, tokenizer, prompts: list[str], *, reward, gold_fn, ns=(1, 2, 4, 8, 16, 32, 64),
              max_prompt_len: int = 64, max_new_tokens: int = 96, temperature: float = 1.0,
              batch_size: int = 256, seed: int = 0) -> list[dict]:
    """Best-of-n for every n in `ns` from one set of max(ns) samples per prompt: best-of-n uses
    the first n of them. Returns [{'n', 'kl', 'gold', 'gold_sem', 'rm', 'rm_sem'}] per n."""
    graphdef, params = policy
    k = max(ns)
    out = sample(graphdef, params, tokenizer, prompts, samples_per_prompt=k, max_prompt_len=max_prompt_len,
                 max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    row_prompts = [p for p in prompts for _ in range(k)]
    rm = np.asarray(reward(row_prompts, out["texts"])).reshape(len(prompts), k)
    gold = np.asarray([gold_fn(p, r) for p, r in zip(row_prompts, out["texts"])]).reshape(len(prompts), k)
    rows = []
    for n in ns:
        best = np.argmax(rm[:, :n], axis=1)  # [num_prompts]
        picked = np.arange(len(prompts))
        g, g_sem = _mean_and_sem(gold[picked, best])
        r, r_sem = _mean_and_sem(rm[picked, best])
        rows.append({"n": int(n), "kl": best_of_n_kl(n), "gold": g, "gold_sem": g_sem, "rm": r, "rm_sem": r_sem})
    return rows


# ----------------------------------------------------------------------------------------------
# Accuracy against a verifier (tasks with a checkable answer, e.g. rlhf_jax.data.arithmetic).


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples of which c are right (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1): the probability that at least
    one of k samples drawn without replacement from the n is right, 1 - C(n-c, k) / C(n, k)."""
    n, c = int(num_samples), int(num_correct)
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= num_samples, got k={k}, num_samples={n}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be in [0, {n}], got {c}")
    if n - c < k:
        return 1.0
    # prod_{i=n-c+1}^{n} (1 - k / i): the ratio of binomials without big integers.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def accuracy_metrics(prompts: list[str], responses: list[str], verifier, *, samples_per_prompt: int = 1,
                     ks=(1,), lengths=None) -> dict:
    """Accuracy of K responses per prompt judged by `verifier(prompt, response) -> 1.0 | 0.0`.

    prompts: [N] problems; responses: [N*K], rows p*K ... p*K+K-1 answer prompt p (the layout of
    `sample`). lengths: optional [N*K] response lengths (tokens). Returns
        accuracy, accuracy_sem   mean over all N*K responses; the sem is over the N problems'
                                 per-problem accuracies (the K samples of a problem are not
                                 independent draws of the task)
        pass@k (each k in ks)    mean over problems of the unbiased pass@k from the K samples
        length, length_correct, length_incorrect   mean response length (when lengths are given;
                                 nan where no response falls in the group)
        correct                  [N*K] the verifier's 0/1 per response
    """
    k_samples = int(samples_per_prompt)
    if len(responses) != len(prompts) * k_samples:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x samples_per_prompt={k_samples}")
    correct = np.asarray([float(verifier(p, r)) for p, r in
                          zip((p for p in prompts for _ in range(k_samples)), responses)], np.float64)
    per_problem = correct.reshape(len(prompts), k_samples)
    metrics = {}
    metrics["accuracy"] = float(correct.mean())
    metrics["accuracy_sem"] = _mean_and_sem(per_problem.mean(axis=1))[1]
    for k in ks:
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(k_samples, c, k) for c in per_problem.sum(axis=1)]))
    if lengths is not None:
        lengths = np.asarray(lengths, np.float64)
        right = correct > 0.5
        metrics["length"] = float(lengths.mean())
        metrics["length_correct"] = float(lengths[right].mean()) if right.any() else float("nan")
        metrics["length_incorrect"] = float(lengths[~right].mean()) if (~right).any() else float("nan")
    metrics["correct"] = correct.tolist()
    return metrics


def make_accuracy_evaluator(tokenizer, prompts: list[str], verifier, *, samples_per_prompt: int = 1, ks=(1,),
                            greedy: bool = False, temperature: float = 1.0, max_prompt_len: int = 64,
                            max_new_tokens: int = 96, batch_size: int = 64, seed: int = 0):
    """evaluate(graphdef, params) -> accuracy_metrics of the policy's K samples per prompt, plus
    'samples' [(prompt, response)] in row order. Every policy gets the same sampling keys.
    greedy: one argmax response per prompt (samples_per_prompt must be 1)."""
    if greedy and samples_per_prompt != 1:
        raise ValueError(f"greedy decoding gives one response per prompt; got samples_per_prompt={samples_per_prompt}")
    row_prompts = [p for p in prompts for _ in range(samples_per_prompt)]

    def evaluate(graphdef, params) -> dict:
        out = sample(graphdef, params, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                     max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
                     batch_size=batch_size, seed=seed, greedy=greedy)
        metrics = accuracy_metrics(prompts, out["texts"], verifier, samples_per_prompt=samples_per_prompt, ks=ks,
                                   lengths=out["response_mask"].sum(axis=1))
        metrics["samples"] = list(zip(row_prompts, out["texts"]))
        return metrics

    return evaluate
