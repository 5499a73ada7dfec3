"""Pre-training / SFT: the loss against NumPy, data-parallel and FSDP equality, resume."""

import functools

import jax
import numpy as np
import pytest

from configs import datasets, mesh as mesh_configs, models, optimizers
from configs.stages import language_model_stage
from rlhf_jax.apps import cli
from rlhf_jax.data import builders, loaders
from rlhf_jax.models import model as model_lib
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import checkpoints, mesh as mesh_lib, metrics as metrics_lib
from rlhf_jax.runtime.optim import make_optimizer, make_train_step
from rlhf_jax.stages import pretrain, registry, runs


def micro_model():
    m = models.tiny()
    m.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=64)
    return m


def micro_config(stage, data_dir, **kw):
    c = language_model_stage(stage, num_steps=kw.pop("num_steps", 8), batch_size=8, seq_len=64, learning_rate=3e-3)
    c.model = micro_model()
    c.data = datasets.reviews(num_train=200, num_validation=40) if stage == "pretrain" else \
        datasets.reviews_sft(num_train=200, num_validation=40)
    c.data_dir = str(data_dir)
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def sft_source(tmp_path_factory):
    return builders.load_dataset(datasets.reviews_sft(num_train=200, num_validation=40),
                                 str(tmp_path_factory.mktemp("data")))


def numpy_next_token_loss(logits, tokens, loss_mask):
    logits = logits[:, :-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    targets = tokens[:, 1:]
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    m = loss_mask[:, 1:].astype(bool)
    return -picked[m].mean()


def test_sft_loss_counts_response_tokens_only(sft_source):
    tok = ByteTokenizer()
    batch = loaders.sft_batches(sft_source["train"], tok, 64, 8, seed=0)[0]
    graphdef, params = model_lib.init_params(micro_model(), seed=1)
    loss, metrics = pretrain.language_model_loss(params, graphdef, batch)
    outputs, _ = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["attention_mask"])
    expected = numpy_next_token_loss(np.asarray(outputs["logits"]), batch["tokens"], batch["loss_mask"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert int(metrics["num_tokens"]) == int(batch["loss_mask"][:, 1:].sum())
    # Prompt targets do not count: changing the loss mask on them changes nothing only if it is 0 there.
    prompt_and_pad = batch["loss_mask"] == 0
    assert prompt_and_pad.any() and (batch["loss_mask"].sum(1) > 0).all()


def run_steps(mesh_config, num_steps=3):
    mesh = mesh_lib.make_mesh(mesh_config)
    graphdef, params = model_lib.init_params(micro_model(), seed=0)
    # eps 1e-3: Adam's g / (sqrt(v) + eps) stays linear in a ~0 gradient, so the reduction-order
    # noise of such a gradient (different on 1 and 8 devices) is not blown up into a whole step.
    optimizer = make_optimizer(optimizers.adam(1e-2, eps=1e-3))
    state, shardings = mesh_lib.shard_state({"params": params, "opt_state": optimizer.init(params)}, mesh)
    step = make_train_step(lambda p, b: pretrain.language_model_loss(p, graphdef, b), optimizer, mesh,
                                    shardings)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(num_steps):
        tokens = rng.integers(0, 256, (16, 64)).astype(np.int32)
        batch = dict(tokens=tokens, positions=np.broadcast_to(np.arange(64, dtype=np.int32), (16, 64)).copy(),
                     attention_mask=np.ones((16, 64), np.int32), loss_mask=np.ones((16, 64), np.int32))
        state, metrics = step(state, mesh_lib.shard_batch(batch, mesh), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("name, data, fsdp", [("data-parallel", -1, 1), ("fsdp", 1, -1), ("2x4", 2, 4)])
def test_multi_device_step_equals_single_device(name, data, fsdp):
    ref_state, ref_losses = single_device_reference()
    state, losses = run_steps(_mesh(data, fsdp))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if fsdp != 1:  # Parameters and Adam moments really are split on the fsdp axis.
        emb = [x for x in jax.tree.leaves(state["params"]) if x.ndim == 2][0]
        assert "fsdp" in str(emb.sharding.spec)
        moments = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) == 2]
        assert any("fsdp" in str(m.sharding.spec) for m in moments)


@functools.lru_cache(maxsize=1)
def single_device_reference():
    return run_steps(_mesh(1, 1))


def _mesh(data, fsdp):
    c = mesh_configs.data_parallel()
    c.data, c.fsdp = data, fsdp
    return c


class CrashAt:
    """Batches that raise at one step: a run that dies mid-way (after its step-4 checkpoint)."""

    def __init__(self, batches, step):
        self.batches, self.step = batches, step

    def __getitem__(self, i):
        if i == self.step:
            raise RuntimeError(f"simulated crash at step {i}")
        return self.batches[i]

    def __len__(self):
        return len(self.batches)


def test_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = micro_config("pretrain", tmp_path / "data", num_steps=8, checkpoint_every=4, eval_every=4)
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    registry.run_stage(config, straight)
    real = loaders.pretrain_batches
    with monkeypatch.context() as m:
        m.setattr(loaders, "pretrain_batches", lambda *a, **k: CrashAt(real(*a, **k), 6) if k.get("shuffle", True) else real(*a, **k))
        with pytest.raises(RuntimeError, match="simulated crash at step 6"):
            registry.run_stage(config, crashed)
    assert not checkpoints.is_finished(crashed)
    registry.run_stage(config, crashed)  # Same command again: resumes from step 4.
    _, _, a = runs.load_policy(straight)
    _, _, b = runs.load_policy(crashed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metrics_lib.read_metrics(crashed) == metrics_lib.read_metrics(straight)


def test_sft_starts_from_the_pretrain_checkpoint(tmp_path):
    pre = str(tmp_path / "pre")
    registry.run_stage(micro_config("pretrain", tmp_path / "data", num_steps=4), pre, allow_config_change=True)
    _, _, pre_params = runs.load_policy(pre)
    config = micro_config("sft", tmp_path / "data", init_from=pre)
    _, _, init = pretrain.init_params_for(config)
    for x, y in zip(jax.tree.leaves(pre_params), jax.tree.leaves(init)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sample_command_prints_several_responses(tmp_path, capsys):
    run = str(tmp_path / "pre")
    registry.run_stage(micro_config("pretrain", tmp_path / "data", num_steps=2), run, allow_config_change=True)
    capsys.readouterr()
    assert cli.main(["sample", f"--workdir={run}", "--prompt=The hotel", "--num=3", "--max_new_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3 and out.count("The hotel") == 3


def test_export_command_writes_a_checkpoint_that_imports_to_the_same_logits(tmp_path, capsys):
    from rlhf_jax.models.hf_import import graphdef_for, load_hf_checkpoint

    run = str(tmp_path / "pre")
    registry.run_stage(micro_config("pretrain", tmp_path / "data", num_steps=2), run, allow_config_change=True)
    assert cli.main(["export", f"--workdir={run}", f"--out={tmp_path / 'hf'}"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    model_config, graphdef, params = runs.load_policy(run)
    config, exported = load_hf_checkpoint(str(tmp_path / "hf"))
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10) + 60
    mask = np.ones_like(tokens)
    ours = model_lib.apply(graphdef, params, tokens, model_lib.positions_from_mask(mask), mask)[0]["logits"]
    theirs = model_lib.apply(graphdef_for(config), exported, tokens, model_lib.positions_from_mask(mask), mask)[0]
    np.testing.assert_array_equal(theirs["logits"], ours)
    assert cli.main(["export", f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}"]) == 2


def test_sft_with_lora_trains_adapters_and_exports_merged(tmp_path, capsys):
    """SFT with LoRA on a pre-training run: the checkpoint holds adapters only, the policy a later
    stage loads (and `rlhf-jax export` writes) is base + adapters, and the loss went down."""
    from configs import lora as lora_configs
    from rlhf_jax.models.hf_import import load_hf_checkpoint

    pre, sft = str(tmp_path / "pre"), str(tmp_path / "sft")
    registry.run_stage(micro_config("pretrain", tmp_path / "data", num_steps=2), pre, allow_config_change=True)
    config = micro_config("sft", tmp_path / "data", num_steps=8, init_from=pre, lora=lora_configs.rank(4))
    config.optimizer.learning_rate = 1e-2
    registry.run_stage(config, sft)
    rows = metrics_lib.read_metrics(sft)
    assert rows[-1]["loss"] < rows[0]["loss"]
    _, state = registry.load_run(sft)
    assert set(state["params"]) == {"lora"}
    _, _, merged = runs.load_policy(sft)
    _, _, base = runs.load_policy(pre)
    assert not np.allclose(merged["blocks"]["mlp"]["up"]["kernel"][...], base["blocks"]["mlp"]["up"]["kernel"][...])
    assert cli.main(["export", f"--workdir={sft}", f"--out={tmp_path / 'hf'}"]) == 0
    _, exported = load_hf_checkpoint(str(tmp_path / "hf"))
    np.testing.assert_allclose(exported["blocks"]["mlp"]["up"]["kernel"][...],
                               merged["blocks"]["mlp"]["up"]["kernel"][...], rtol=1e-6)
