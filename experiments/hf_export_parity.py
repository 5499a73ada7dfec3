"""Export a run's policy and load it in `transformers`: the max logit difference against ours.

    python experiments/hf_export_parity.py --workdir=<run with a policy> [--out=/tmp/export]
    python experiments/hf_export_parity.py --preset=llama_tiny      # a random model of a preset

Needs the `torch` extra (`bash scripts/install.sh torch`). Appends one line to
experiments/results/hf_export_parity.jsonl.
"""

import argparse
import tempfile

import numpy as np

from configs import models
from rlhf_jax.models import hf_export, model as M
from rlhf_jax.runtime import benchmarking
from rlhf_jax.stages import runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="")
    parser.add_argument("--preset", default="", help="instead of a run: a random model of configs/models.py")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch
    import transformers

    if args.workdir:
        config, graphdef, params = runs.load_policy(args.workdir)
    else:
        config = getattr(models, args.preset)()
        graphdef, params = M.init_params(config, seed=0)
    out = args.out or tempfile.mkdtemp()
    hf_export.export_hf(config, params, out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()

    rng = np.random.RandomState(0)
    tokens = rng.randint(0, min(config.vocab_size, 256), (4, 48)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :10] = 0  # one left-padded row
    ours = np.asarray(M.apply(graphdef, params, tokens, M.positions_from_mask(mask), mask)[0]["logits"])
    with torch.no_grad():
        position_ids = torch.tensor(np.asarray(M.positions_from_mask(mask)), dtype=torch.long)
        theirs = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                          position_ids=position_ids).logits.float().numpy()
    real = mask.astype(bool)
    diff = float(np.abs(ours[real] - theirs[real]).max())
    result = {"source": args.workdir or f"random {args.preset}", "architecture": hf_export.hf_architecture(config),
              "layers": config.num_layers, "d_model": config.d_model, "vocab_size": config.vocab_size,
              "transformers": transformers.__version__, "max_abs_logit_diff": diff,
              "logit_scale": float(np.abs(ours[real]).max())}
    print(result)
    benchmarking.record_result("hf_export_parity", result)


if __name__ == "__main__":
    main()
