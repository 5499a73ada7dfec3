"""The method comparison: its summary arithmetic, and one tiny end-to-end run of every kind of
method (PPO, RLOO, a DPO variant, best-of-n) through the same evaluation."""

import json
import os

import numpy as np
import pytest

from configs import models
from configs.reward import reward_stage
from rlhf_jax.data import builders
from rlhf_jax.drivers import compare
from rlhf_jax.models import model as model_lib
from rlhf_jax.runtime import checkpoints, config as config_lib
from rlhf_jax.stages import pretrain, runs

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_summary_is_mean_and_std_over_seeds_and_best_respects_the_budget():
    rows = [{"method": "a", "value": 0.1, "seed": s, "kl": kl, "gold": g, "rm": 0.0}
            for s, (kl, g) in enumerate([(2.0, 0.3), (4.0, 0.5)])]
    rows += [{"method": "b", "value": 1.0, "seed": 0, "kl": 20.0, "gold": 0.9, "rm": 1.0}]
    summary = {s["method"]: s for s in compare.summarize(rows)}
    assert summary["a"]["kl"] == pytest.approx(3.0) and summary["a"]["kl_std"] == pytest.approx(1.0)
    assert summary["a"]["gold"] == pytest.approx(0.4) and summary["a"]["gold_std"] == pytest.approx(0.1)
    assert compare.best_at_budget(list(summary.values()), 6.0)["method"] == "a"
    assert compare.best_at_budget(list(summary.values()), 25.0)["method"] == "b"
    assert compare.best_at_budget(list(summary.values()), 1.0) is None


def micro_model():
    config = models.tiny()
    config.update(dict(max_len=128, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64))
    return config


def fake_reward_run(workdir, sft_dir):
    """A finished reward run of random params with a stored preference set beside it."""
    config = reward_stage(num_steps=1, batch_size=8, seq_len=96)
    config.model = micro_model()
    config.init_from = sft_dir
    config_lib.write_resolved_config(config, workdir)
    graphdef, params = model_lib.replace_head_with_scalar(*model_lib.init_params(config.model, "lm", 5),
                                                          config.model)
    runs.write_reward_model(workdir, config, params, None)
    checkpoints.mark_finished(workdir, "fake reward run")
    pairs = [{"prompt": f"Review {i}:", "chosen": " good great.", "rejected": " bad."} for i in range(32)]
    builders.write_preferences({"train": pairs, "validation": pairs[:8]},
                               os.path.join(workdir, "preferences", "tfds"), "preferences")


@pytest.mark.slow
def test_every_kind_of_method_is_trained_and_evaluated(tmp_path):
    sft, rm, data = str(tmp_path / "sft"), str(tmp_path / "reward"), str(tmp_path / "data")
    pretrain.save_random_run(sft, micro_model())
    fake_reward_run(rm, sft)
    spec = os.path.join(ROOT, "experiments", "reviews", "compare.py")
    common = (f"data_dir={data}", "batch_size=8", "num_steps=2", "max_new_tokens=8", "max_prompt_len=16")
    ppo_common = ("adaptive_kl=False", "gold_function=", "sample_every=0", "checkpoint_every=2", "num_minibatches=2",
                  "log_every=1", "model.max_len=128", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
                  "model.num_kv_heads=2", "model.d_ff=64") + common
    dpo_common = ("eval_every=0", "num_steps=2", "checkpoint_every=2", "batch_size=8", "seq_len=48", "log_every=1",
                  "model.max_len=128", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
                  "model.num_kv_heads=2", "model.d_ff=64")
    overrides = [("sft", sft), ("reward_model", rm), ("num_seeds", "2"), ("data_dir", data),
                 ("methods.ppo.knob_values", "(0.1,)"), ("methods.ppo.overrides", repr(ppo_common)),
                 ("methods.rloo.knob_values", "(0.1,)"),
                 ("methods.rloo.overrides", repr(ppo_common + ("loss=rloo", "samples_per_prompt=2", "batch_size=4"))),
                 ("methods.dpo.knob_values", "(0.1, 0.3)"), ("methods.dpo.overrides", repr(dpo_common)),
                 ("best_of_n.ns", "(1, 2, 4)"), ("eval.num_prompts", "6"), ("eval.max_new_tokens", "8"),
                 ("eval.batch_size", "8")]
    for other in ("grpo", "robust_dpo", "ipo", "slic_hinge", "simpo"):
        overrides.append((f"methods.{other}.knob_values", "()"))
    workdir = str(tmp_path / "compare")
    compare.run_comparison(spec, overrides, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]
    methods = {(r["method"], r["value"], r["seed"]) for r in rows}
    assert {("ppo", 0.1, 0), ("ppo", 0.1, 1), ("rloo", 0.1, 1), ("dpo", 0.1, 0), ("dpo", 0.3, 1), ("sft", 0.0, 0),
            ("best_of_n", 4.0, 0)} <= methods
    sft_row = next(r for r in rows if r["method"] == "sft")
    assert abs(sft_row["kl"]) < 1e-3  # the SFT policy against itself
    for r in rows:
        assert np.isfinite([r["kl"], r["gold"], r["rm"]]).all(), r
    # the two seeds of a run are different policies (data order / rollouts differ)
    ppo_rows = [r for r in rows if r["method"] == "ppo"]
    assert ppo_rows[0]["kl"] != ppo_rows[1]["kl"]
    assert os.path.getsize(os.path.join(workdir, "frontier.png")) > 5000
    assert "| dpo | loss.beta | 0.3 |" in open(os.path.join(workdir, "results.md")).read()
    # a second call trains nothing and reads every cached evaluation
    mtime = os.path.getmtime(os.path.join(workdir, "ppo", "kl_coef=0.1", "eval.json"))
    compare.run_comparison(spec, overrides, workdir)
    assert os.path.getmtime(os.path.join(workdir, "ppo", "kl_coef=0.1", "eval.json")) == mtime


def test_ablation_table_and_contrasts_from_the_runs_metrics(tmp_path):
    """The ablation's table (start / end means of the logged curves, with the seeds' std) and a
    contrast checked both ways, from hand-written metrics of two 3-seed runs."""
    def fake_run(name, lengths):
        run_dir = tmp_path / name
        run_dir.mkdir()
        rows = [{"step": i, "eval/scores": 0.1 * i, "eval/scores_std": 0.01, "val/length_incorrect": v,
                 "val/length_incorrect_std": 1.0} for i, v in enumerate(lengths)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return name, 0.0, str(run_dir)

    trained = [fake_run("grpo", [10, 12, 14, 16, 18, 20, 25, 30]), fake_run("dr_grpo", [10, 11, 10, 10, 9, 9, 9, 9])]
    config = config_lib.ml_collections.ConfigDict(dict(
        sft="sft", num_seeds=3, window=5, curves=("eval/scores", "val/length_incorrect"),
        contrasts=(("grpo", "dr_grpo", "val/length_incorrect", "incorrect responses grow under GRPO only"),
                   ("dr_grpo", "grpo", "val/length_incorrect", "the same claim, reversed"))))
    summary = compare.write_curves(config, str(tmp_path), trained)
    # window 2 = a quarter of the 8 logged values
    assert summary["grpo"]["val/length_incorrect"]["start"] == (11.0, 1.0)
    assert summary["grpo"]["val/length_incorrect"]["end"] == (27.5, 1.0)
    np.testing.assert_allclose(summary["dr_grpo"]["eval/scores"]["end"], (0.65, 0.01))
    text = (tmp_path / "ablation.md").read_text()
    assert "| grpo | 0.05 +- 0.01 -> 0.65 +- 0.01 | 11 +- 1 -> 27.5 +- 1 | 8 | - |" in text
    assert "change +16.5" in text and "change -1.5" in text and "seed spread of 1.4" in text
    assert text.count("**consistent with**") == 1 and text.count("**contradicted by**") == 1
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "ablation.json").read_text())["dr_grpo"]["steps"] == 8
