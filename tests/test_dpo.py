"""The DPO stage: log-probs of a pair in one forward, the sharded step, resume, seeds, learning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import datasets, models
from configs.dpo import dpo_stage
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import model as model_lib
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import checkpoints, config as config_lib, mesh as mesh_lib, metrics as metrics_lib
from rlhf_jax.runtime.optim import make_optimizer, make_train_step
from rlhf_jax.stages import dpo, registry, runs


def micro_model():
    config = models.tiny()
    config.update(dict(max_len=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64))
    return config


def marker_records(n, seed):
    """Pairs whose chosen response says 'great' where the rejected one says something else."""
    rng = np.random.default_rng(seed)
    words = ["fine", "ok", "bad", "meh", "good", "nice"]
    records = []
    for i in range(n):
        body = " ".join(rng.choice(words, size=3))
        records.append({"prompt": f"Review {i % 7}:", "chosen": f" {body} great.",
                        "rejected": f" {body} {rng.choice(words)}."})
    return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 'SFT run' and a preference dataset of marker pairs (train 64, validation 16)."""
    root = tmp_path_factory.mktemp("dpo")
    sft = str(root / "sft")
    from rlhf_jax.stages import pretrain

    pretrain.save_random_run(sft, micro_model())
    records = {"train": marker_records(64, 0), "validation": marker_records(16, 1)}
    builders.write_preferences(records, str(root / "prefs"), "preferences")
    return {"sft": sft, "prefs": str(root / "prefs"), "data": str(root / "data")}


def tiny_config(setup, **fields):
    c = dpo_stage(num_steps=8, batch_size=8, seq_len=40, learning_rate=3e-3)
    c.model = micro_model()
    c.init_from = setup["sft"]
    c.data = datasets.preferences("preferences")
    c.data_dir = setup["prefs"]
    c.log_every = 2
    c.checkpoint_every = 4
    c.eval_every = 4
    c.eval_prompts.data = datasets.reviews_sft(num_train=64, num_validation=32)
    c.eval_prompts.data_dir = setup["data"]
    c.eval_prompts.num = 8
    c.eval_prompts.max_new_tokens = 8
    c.gold_function = "rlhf_jax.people.labelers:vader_gold_score"
    c.progress_every_s = 1e9
    for key, value in fields.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    c.lock()
    return c


def test_pair_logprobs_sum_the_response_tokens_of_each_side():
    """One [2B, T] forward equals a per-row loop over log_softmax of the row's own forward."""
    config = micro_model()
    graphdef, params = model_lib.init_params(config, "lm", 3)
    batch = loaders.preference_batches(marker_records(4, 0), ByteTokenizer(), 40, 4, 0, shuffle=False)[0]
    chosen, rejected = jax.jit(lambda p, b: dpo.pair_logprobs(graphdef, p, b))(params, batch)
    for side, got in (("chosen", chosen), ("rejected", rejected)):
        for b in range(4):
            tokens, mask = batch[f"{side}_tokens"][b], batch[f"{side}_mask"][b]
            n = int(mask.sum())
            outputs, _ = model_lib.apply(graphdef, params, tokens[None, :n], jnp.arange(n)[None], mask[None, :n])
            logp = np.asarray(jax.nn.log_softmax(outputs["logits"][0]))
            targets = np.nonzero(batch[f"{side}_loss_mask"][b])[0]
            # the response (and its EOS) are the last tokens of the row; the prompt is not a target
            assert targets[-1] == n - 1 and targets[0] > 0
            expected = sum(logp[t - 1, tokens[t]] for t in targets)
            np.testing.assert_allclose(float(got[b]), expected, rtol=1e-5)


def test_loss_mask_starts_at_the_response():
    tok = ByteTokenizer()
    records = [{"prompt": "ab", "chosen": "cde", "rejected": "f"}]
    batch = loaders.preference_batches(records, tok, 8, 1, 0, shuffle=False)[0]
    # tokens: a b c d e EOS pad pad; targets are c d e EOS (columns 2..5)
    np.testing.assert_array_equal(batch["chosen_loss_mask"][0], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    # a response longer than the window keeps no prompt: its first token cannot be a target
    long = loaders.preference_batches([{"prompt": "ab", "chosen": "cdefghijk", "rejected": "f"}], tok, 4, 1, 0)[0]
    np.testing.assert_array_equal(long["chosen_loss_mask"][0], [0, 1, 1, 1])


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_eight_devices_equal_one_device(kind):
    assert jax.device_count() == 8
    config = micro_model()
    graphdef, params0 = model_lib.init_params(config, "lm", 0)
    batch = loaders.preference_batches(marker_records(16, 0), ByteTokenizer(), 40, 16, 0)[0]
    rng = np.random.default_rng(0)
    batch["ref_chosen_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
    batch["ref_rejected_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
    loss_config = ml_collections.ConfigDict(dict(kind=kind, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5))
    optimizer = make_optimizer(dpo_stage().optimizer)
    results = {}
    for name, (data, fsdp) in (("one", (1, 1)), ("eight", (-1, 1)), ("fsdp", (1, -1))):
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))
        params = jax.tree.map(jnp.copy, params0)
        state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
        step = make_train_step(lambda p, b: dpo.pair_loss(p, graphdef, b, loss_config), optimizer, mesh, shardings)
        for i in range(3):
            state, metrics = step(state, mesh_lib.shard_batch(batch, mesh), jax.random.key(i))
        results[name] = (jax.device_get(state["params"]), jax.device_get(metrics))
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"} <= set(results["one"][1])
    for other in ("eight", "fsdp"):
        for a, b in zip(jax.tree.leaves(results["one"][0]), jax.tree.leaves(results[other][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        for k in results["one"][1]:
            assert results["one"][1][k] == pytest.approx(results[other][1][k], rel=1e-4, abs=1e-5), (other, k)


def test_dpo_learns_the_marker_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """DPO raises held-out pair accuracy on the marker task; a run that dies after its step-4
    checkpoint and is run again ends in the uninterrupted run's state and metrics."""
    config = tiny_config(setup, num_steps=8)
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    registry.run_stage(config, straight)
    rows = metrics_lib.read_metrics(straight)
    assert rows[-1]["eval/rewards/accuracies"] > 0.8  # starts at chance (the policy is the reference)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert {"eval/gold", "eval/kl", "eval/loss"} <= set(rows[-1])

    real = loaders.preference_batches

    class CrashAt:
        def __init__(self, batches):
            self.batches = batches

        def __getitem__(self, i):
            if i == 6:
                raise RuntimeError("simulated crash at step 6")
            return self.batches[i]

    with monkeypatch.context() as m:
        m.setattr(loaders, "preference_batches",
                  lambda *a, **k: CrashAt(real(*a, **k)) if k.get("shuffle", True) and a[3] == 8 else real(*a, **k))
        with pytest.raises(RuntimeError, match="simulated crash"):
            registry.run_stage(config, crashed)
    assert not checkpoints.is_finished(crashed)
    registry.run_stage(config, crashed)
    _, _, a = runs.load_policy(straight)
    _, _, b = runs.load_policy(crashed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metrics_lib.read_metrics(crashed) == rows


def test_ref_logps_per_batch_equal_precomputed(setup, tmp_path):
    common = dict(num_steps=2, eval_every=0, checkpoint_every=2)
    a, b = str(tmp_path / "pre"), str(tmp_path / "per_batch")
    registry.run_stage(tiny_config(setup, precompute_ref_logps=True, **common), a)
    registry.run_stage(tiny_config(setup, precompute_ref_logps=False, **common), b)
    for x, y in zip(metrics_lib.read_metrics(a), metrics_lib.read_metrics(b)):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


def test_seeds_in_one_program_equal_separate_runs(setup, tmp_path):
    common = dict(num_steps=4, eval_every=0, checkpoint_every=4, log_every=1)  # _std is per step
    registry.run_stage(tiny_config(setup, num_seeds=2, **common), str(tmp_path / "both"))
    separate = []
    for seed in (0, 1):
        registry.run_stage(tiny_config(setup, seed=seed, **common), str(tmp_path / f"seed{seed}"))
        _, _, alone = runs.load_policy(str(tmp_path / f"seed{seed}"))
        _, _, vmapped = runs.load_policy(str(tmp_path / "both"), seed_index=seed)
        for x, y in zip(jax.tree.leaves(alone), jax.tree.leaves(vmapped)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        separate.append(metrics_lib.read_metrics(str(tmp_path / f"seed{seed}")))
    both = metrics_lib.read_metrics(str(tmp_path / "both"))
    for row, *singles in zip(both, *separate):
        for name in ("loss", "rewards/margins"):
            values = np.array([r[name] for r in singles])
            np.testing.assert_allclose(row[name], values.mean(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(row[name + "_std"], values.std(), rtol=1e-3, atol=1e-6)
    assert max(r["loss_std"] for r in both) > 0  # the seeds read the pairs in different orders


def test_bad_loss_kind_is_a_config_error(setup, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="loss.kind='dpo'"):
        registry.run_stage(tiny_config(setup, **{"loss.kind": "dpo"}), str(tmp_path / "bad"))


def test_sample_command_reads_a_dpo_run(setup, tmp_path, capsys):
    from rlhf_jax.apps import cli

    run = str(tmp_path / "run")
    registry.run_stage(tiny_config(setup, num_steps=2, eval_every=0, checkpoint_every=2), run)
    assert cli.main(["sample", f"--workdir={run}", "--prompt=Review 1:", "--num=2", "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    with pytest.raises(registry.NoPolicy, match="'reward' run"):
        config_lib.write_resolved_config(ml_collections.ConfigDict(dict(stage="reward")), str(tmp_path / "rm"))
        runs.load_policy(str(tmp_path / "rm"))


def test_dpo_with_lora_learns_and_hands_off_merged_params(setup, tmp_path):
    """LoRA rank 4: the checkpoint holds adapters only, DPO still learns the marker, and the
    policy a later stage loads is the SFT weights with the adapters merged (not the SFT's)."""
    from configs import lora as lora_configs

    config = tiny_config(setup, num_steps=8, lora=lora_configs.rank(4, alpha=8.0), **{"optimizer.learning_rate": 1e-2})
    workdir = str(tmp_path / "lora")
    registry.run_stage(config, workdir)
    rows = metrics_lib.read_metrics(workdir)
    assert rows[-1]["eval/rewards/accuracies"] > 0.8
    _, state = registry.load_run(workdir)
    assert set(state["params"]) == {"lora"}  # no second copy of the weights in the run
    _, _, merged = runs.load_policy(workdir)
    _, _, sft = runs.load_policy(setup["sft"])
    assert jax.tree.structure(merged) == jax.tree.structure(sft)
    q_merged, q_sft = merged["blocks"]["attn"]["query"]["kernel"][...], sft["blocks"]["attn"]["query"]["kernel"][...]
    assert not np.allclose(q_merged, q_sft)
    np.testing.assert_array_equal(merged["embed"]["embedding"][...], sft["embed"]["embedding"][...])
