"""rlhf_jax.losses against independent NumPy re-derivations written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses as L


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _right_padded_mask(rng, b, t, min_len=1):
    lengths = rng.integers(min_len, t + 1, size=b)
    return np.arange(t)[None, :] < lengths[:, None]


# ---------------------------------------------------------------- masked statistics, whitening


def test_masked_mean_var_whiten(rng):
    x = rng.normal(size=(4, 7)).astype(np.float32)
    mask = _right_padded_mask(rng, 4, 7, min_len=2)
    x_nan = np.where(mask, x, np.nan).astype(np.float32)
    sel = x[mask]
    np.testing.assert_allclose(L.masked_mean(x_nan, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(L.masked_sum(x_nan, mask), sel.sum(), rtol=1e-5)
    np.testing.assert_allclose(L.masked_var(x_nan, mask), sel.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(
        L.masked_var(x_nan, mask, unbiased=False), sel.var(), rtol=1e-5
    )
    rows = np.array([x[i][mask[i]].mean() for i in range(4)])
    np.testing.assert_allclose(L.masked_mean(x_nan, mask, axis=1), rows, rtol=1e-5)

    w = np.asarray(L.whiten(x_nan, mask))
    expected = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert np.all(w[~mask] == 0)
    w2 = np.asarray(L.whiten(x_nan, mask, shift_mean=False))
    np.testing.assert_allclose(w2[mask], expected[mask] + sel.mean(), rtol=1e-4, atol=1e-5)
    # Whitened values have mean 0 and (sample) variance 1 over the mask.
    np.testing.assert_allclose(w[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(w[mask].var(ddof=1), 1.0, rtol=1e-4)
    # Gradient through whitening is finite despite NaN in padding.
    g = jax.grad(lambda v: jnp.sum(L.whiten(v, mask) ** 3))(jnp.asarray(x_nan))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)


def test_masked_mean_of_empty_mask_is_zero():
    assert float(L.masked_mean(jnp.ones(3), jnp.zeros(3, bool))) == 0.0


# ---------------------------------------------------------------- language-model losses


def test_next_token_loss_matches_numpy(rng):
    b, t, v = 3, 6, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, t))
    mask = np.zeros((b, t), bool)
    mask[0, 2:] = True
    mask[1, 1:4] = True
    mask[2, :] = True
    logits[~np.roll(mask, -1, axis=1)] = np.nan  # logits of uncounted predictions: NaN
    logits[:, -1] = np.nan  # the last position predicts nothing

    loss, metrics = L.next_token_loss(logits, tokens, mask)

    lp = _np_log_softmax(np.nan_to_num(logits[:, :-1]))
    tgt = tokens[:, 1:]
    m = mask[:, 1:]
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, nll[m].mean(), rtol=1e-5)
    acc = (np.nan_to_num(logits[:, :-1]).argmax(-1) == tgt)[m].mean()
    np.testing.assert_allclose(metrics["accuracy"], acc)
    assert int(metrics["num_tokens"]) == m.sum()

    g = jax.grad(lambda lg: L.next_token_loss(lg, tokens, mask)[0])(jnp.asarray(logits))
    assert np.all(np.isfinite(g))


def test_token_logprobs_temperature_and_entropy(rng):
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    tokens = rng.integers(0, 9, size=(2, 5))
    for temp in (1.0, 0.7):
        lp = _np_log_softmax(logits / temp)
        expected = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(L.token_logprobs(logits, tokens, temp), expected, rtol=1e-5)
    lp = _np_log_softmax(logits)
    np.testing.assert_allclose(
        L.entropy_from_logits(logits), -(np.exp(lp) * lp).sum(-1), rtol=1e-5
    )
    # -inf logits (top-k filtered vocabulary) give a finite entropy.
    masked = jnp.asarray(logits).at[..., :4].set(-jnp.inf)
    ent = np.asarray(L.entropy_from_logits(masked))
    lp2 = _np_log_softmax(logits[..., 4:])
    np.testing.assert_allclose(ent, -(np.exp(lp2) * lp2).sum(-1), rtol=1e-5)
    # Uniform distribution has entropy log V.
    np.testing.assert_allclose(L.entropy_from_logits(jnp.zeros(9)), math.log(9), rtol=1e-6)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_article_table():
    def bt(diff):
        return float(L.bradley_terry_loss(jnp.array([diff]), jnp.array([0.0]))[0])

    assert bt(5.0) < 0.05  # better response clearly ahead: small loss
    assert bt(0.0) == pytest.approx(math.log(2), abs=1e-6)  # undecided: log 2 = 0.693
    assert bt(-5.0) == pytest.approx(5.0, abs=0.01)  # wrong order: about the difference
    assert bt(-50.0) == pytest.approx(50.0, rel=1e-5)  # large and still finite
    assert bt(100.0) >= 0.0 and math.isfinite(bt(100.0))
    for d in np.linspace(0.01, 20, 25):
        assert 0.0 < bt(float(d)) < 0.6932


def test_bradley_terry_value_metrics_and_gradient(rng):
    rc = rng.normal(size=8).astype(np.float32) * 2
    rr = rng.normal(size=8).astype(np.float32) * 2
    margin = np.abs(rng.normal(size=8)).astype(np.float32)
    c = 0.01
    loss, m = L.bradley_terry_loss(rc, rr, margin=margin, center_coef=c)
    d = rc - rr - margin
    expected = np.mean(-np.log(_np_sigmoid(d))) + c * np.mean((rc + rr) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean(rc > rr))
    np.testing.assert_allclose(m["margin_mean"], np.mean(rc - rr), rtol=1e-5)
    np.testing.assert_allclose(m["reward_mean"], np.concatenate([rc, rr]).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["reward_std"], np.concatenate([rc, rr]).std(), rtol=1e-5)

    # Gradient without extras: d/d r_chosen = -(1 - sigmoid(d)) / B, d/d r_rejected = minus that.
    gc, gr = jax.grad(lambda a, b: L.bradley_terry_loss(a, b)[0], argnums=(0, 1))(rc, rr)
    analytic = -(1.0 - _np_sigmoid(rc - rr)) / len(rc)
    np.testing.assert_allclose(gc, analytic, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gr, -analytic, rtol=1e-5, atol=1e-7)
    # With margin and centering.
    gc, gr = jax.grad(
        lambda a, b: L.bradley_terry_loss(a, b, margin=margin, center_coef=c)[0], argnums=(0, 1)
    )(rc, rr)
    centre = 2 * c * (rc + rr) / len(rc)
    analytic = -(1.0 - _np_sigmoid(d)) / len(rc)
    np.testing.assert_allclose(gc, analytic + centre, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gr, -analytic + centre, rtol=1e-5, atol=1e-7)
    # Gradient is stable for huge differences.
    g = jax.grad(lambda a: L.bradley_terry_loss(a, jnp.zeros(2))[0])(jnp.array([-1e4, 1e4]))
    np.testing.assert_allclose(g, [-0.5, 0.0], atol=1e-6)


# ---------------------------------------------------------------- DPO family


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_dpo(kind, pc, pr, rc, rr, lc, lr, beta, eps=0.0, gamma=0.5):
    """Per-pair DPO-family losses in float64, with hand-derived d loss / d pc and d loss / d pr.

    Returns (losses, d_pc, d_pr, reward_c, reward_r), all [B].
    """
    pc, pr, rc, rr, lc, lr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr, lc, lr))
    sig = lambda x: np.exp(_np_log_sigmoid(x))
    if kind == "simpo":
        rew_c, rew_r = beta * pc / lc, beta * pr / lr
        z = rew_c - rew_r - gamma
        losses = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
        dz = -(1 - eps) * sig(-z) + eps * sig(z)  # d/dz log sigmoid(z) = sigmoid(-z)
        return losses, dz * beta / lc, -dz * beta / lr, rew_c, rew_r
    rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    z = rew_c - rew_r  # beta * h
    if kind == "sigmoid":
        losses = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
        dz = -(1 - eps) * sig(-z) + eps * sig(z)
    elif kind == "robust":
        losses = (-(1 - eps) * _np_log_sigmoid(z) + eps * _np_log_sigmoid(-z)) / (1 - 2 * eps)
        dz = (-(1 - eps) * sig(-z) - eps * sig(z)) / (1 - 2 * eps)
    elif kind == "hinge":
        losses = np.maximum(0.0, 1.0 - z)
        dz = np.where(z < 1.0, -1.0, 0.0)
    elif kind == "ipo":
        u = (pc - rc) / lc - (pr - rr) / lr - 1.0 / (2.0 * beta)
        return u**2, 2 * u / lc, -2 * u / lr, rew_c, rew_r
    else:
        raise AssertionError(kind)
    return losses, dz * beta, -dz * beta, rew_c, rew_r


def _dpo_batch(rng, b=8):
    """Summed response log-probs of plausible size, with log-ratio differences of both signs."""
    lc = rng.integers(3, 40, size=b).astype(np.float32)
    lr = rng.integers(3, 40, size=b).astype(np.float32)
    pc = (-lc * rng.uniform(0.5, 2.5, size=b)).astype(np.float32)
    pr = (-lr * rng.uniform(0.5, 2.5, size=b)).astype(np.float32)
    rc = (pc + rng.normal(size=b) * 8).astype(np.float32)
    rr = (pr + rng.normal(size=b) * 8).astype(np.float32)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize(
    "kind,eps",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),
        ("robust", 0.0),
        ("robust", 0.2),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("simpo", 0.0),
        ("simpo", 0.1),
    ],
)
def test_dpo_loss_value_metrics_and_gradient(rng, kind, eps):
    pc, pr, rc, rr, lc, lr = _dpo_batch(rng)
    beta, gamma = 0.1, 0.5
    kw = dict(kind=kind, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    kw.update(chosen_lengths=lc, rejected_lengths=lr)
    loss, m = L.dpo_loss(pc, pr, rc, rr, **kw)

    losses, d_pc, d_pr, rew_c, rew_r = _np_dpo(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma)
    if kind == "hinge":  # both sides of the hinge, and no pair on its kink
        assert 0 < np.mean(rew_c - rew_r < 1) < 1 and np.all(np.abs(1 - (rew_c - rew_r)) > 1e-3)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"], losses.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], rew_c.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], rew_r.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], (rew_c - rew_r).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(rew_c > rew_r))
    assert 0 < float(m["rewards/accuracies"]) < 1  # the batch has pairs of both orders
    np.testing.assert_allclose(m["logps/chosen"], pc.astype(np.float64).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], pr.astype(np.float64).mean(), rtol=1e-6)

    # The hand-derived NumPy gradients agree with central differences of the NumPy loss.
    def np_mean_loss(a, b_):
        return _np_dpo(kind, a, b_, rc, rr, lc, lr, beta, eps, gamma)[0].mean()

    pc64, pr64, h = pc.astype(np.float64), pr.astype(np.float64), 1e-6
    fd_pc = [(np_mean_loss(pc64 + h * e, pr64) - np_mean_loss(pc64 - h * e, pr64)) / (2 * h)
             for e in np.eye(len(pc))]
    fd_pr = [(np_mean_loss(pc64, pr64 + h * e) - np_mean_loss(pc64, pr64 - h * e)) / (2 * h)
             for e in np.eye(len(pc))]
    np.testing.assert_allclose(fd_pc, d_pc / len(pc), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(fd_pr, d_pr / len(pc), rtol=1e-5, atol=1e-9)

    # jax.grad of the mean loss; the reference log-probs are constants.
    grads = jax.grad(lambda *a: L.dpo_loss(*a, **kw)[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    np.testing.assert_allclose(grads[0], d_pc / len(pc), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads[1], d_pr / len(pc), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


def test_dpo_loss_hand_computed():
    def dpo(pc, pr, rc, rr, kind="sigmoid", **kw):
        arr = lambda x: jnp.array([x], jnp.float32)
        return L.dpo_loss(arr(pc), arr(pr), arr(rc), arr(rr), kind=kind, **kw)

    # h = 0: every sigmoid-type loss is log 2 whatever the smoothing.
    for kind, eps in [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.0), ("robust", 0.3)]:
        loss, _ = dpo(-3.0, -5.0, -3.0, -5.0, kind, beta=0.1, label_smoothing=eps)
        assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    # h = (-3 + 4) - (-5 + 4) = 2, beta = 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.3132617.
    loss, m = dpo(-3.0, -5.0, -4.0, -4.0, beta=0.5)
    assert float(loss) == pytest.approx(0.3132617, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5)
    assert float(m["rewards/rejected"]) == pytest.approx(-0.5)
    assert float(m["rewards/margins"]) == pytest.approx(1.0)
    assert float(m["rewards/accuracies"]) == 1.0
    assert float(m["logps/chosen"]) == -3.0 and float(m["logps/rejected"]) == -5.0
    # hinge at h = 0 is 1; at beta h = 1 it is 0.
    assert float(dpo(-3.0, -5.0, -3.0, -5.0, "hinge", beta=0.1)[0]) == pytest.approx(1.0)
    assert float(dpo(-3.0, -5.0, -4.0, -4.0, "hinge", beta=0.5)[0]) == pytest.approx(0.0)
    # ipo at h_avg = 0 is (1 / (2 beta))^2 = 25 for beta = 0.1; an empty response is not NaN.
    lens = dict(chosen_lengths=jnp.array([4.0]), rejected_lengths=jnp.array([0.0]))
    assert float(dpo(-3.0, 0.0, -3.0, 0.0, "ipo", beta=0.1, **lens)[0]) == pytest.approx(25.0)
    # simpo with equal average log-probs: -log sigmoid(-gamma) = log(1 + e^0.5).
    lens = dict(chosen_lengths=jnp.array([2.0]), rejected_lengths=jnp.array([4.0]))
    loss, m = dpo(-3.0, -6.0, 0.0, 0.0, "simpo", beta=2.0, simpo_gamma=0.5, **lens)
    assert float(loss) == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(-3.0)  # beta * pi / len
    assert float(m["rewards/rejected"]) == pytest.approx(-3.0)
    # Robust DPO is unbiased under label flips with rate eps: its expectation over a flip of
    # the pair, (1 - eps) l(h) + eps l(-h), is the clean DPO loss -log sigmoid(beta h).
    for h in (-3.0, 0.5, 4.0):
        eps = 0.2
        fwd = float(dpo(h, 0.0, 0.0, 0.0, "robust", beta=0.7, label_smoothing=eps)[0])
        bwd = float(dpo(0.0, h, 0.0, 0.0, "robust", beta=0.7, label_smoothing=eps)[0])
        clean = -_np_log_sigmoid(0.7 * h)
        assert (1 - eps) * fwd + eps * bwd == pytest.approx(clean, rel=1e-5)
    # Stable for huge log-ratio differences of either sign.
    big = jnp.array([-1e4, 1e4], jnp.float32)
    zeros = jnp.zeros(2)
    loss = L.dpo_loss(big, zeros, zeros, zeros, kind="sigmoid", beta=0.1)[0]
    assert float(loss) == pytest.approx(500.0, rel=1e-5)
    g = jax.grad(lambda x: L.dpo_loss(x, zeros, zeros, zeros, kind="sigmoid", beta=0.1)[0])(big)
    np.testing.assert_allclose(g, [-0.05, 0.0], atol=1e-7)


def test_simpo_ignores_reference_logps(rng):
    pc, pr, rc, rr, lc, lr = _dpo_batch(rng)
    kw = dict(kind="simpo", beta=2.0, chosen_lengths=lc, rejected_lengths=lr)
    loss, m = L.dpo_loss(pc, pr, rc, rr, **kw)
    nan = np.full_like(rc, np.nan)
    for ref_c, ref_r in [(rc * 3 + 1, rr - 7), (nan, nan)]:
        loss2, m2 = L.dpo_loss(pc, pr, ref_c, ref_r, **kw)
        assert float(loss2) == float(loss)
        for k in m:
            assert float(m2[k]) == float(m[k]), k
    g = jax.grad(lambda a: L.dpo_loss(a, pr, nan, nan, **kw)[0])(pc)
    assert np.all(np.isfinite(g))


def test_dpo_loss_rejects_bad_arguments():
    x = jnp.zeros(3)
    for kind in ("ipo", "simpo"):
        with pytest.raises(ValueError, match=kind):
            L.dpo_loss(x, x, x, x, kind=kind, beta=0.1)
        with pytest.raises(ValueError, match=kind):
            L.dpo_loss(x, x, x, x, kind=kind, beta=0.1, chosen_lengths=jnp.ones(3))
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge, simpo"):
        L.dpo_loss(x, x, x, x, kind="kto", beta=0.1)
    with pytest.raises(ValueError, match="robust"):
        L.dpo_loss(x, x, x, x, kind="robust", beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="hinge"):
        L.dpo_loss(x, x, x, x, kind="hinge", beta=0.1, label_smoothing=0.1)


def test_dpo_loss_with_traced_beta(rng):
    # beta as a traced argument of a jitted step, vmapped as a per-seed coefficient in a
    # vmapped train state.
    pc, pr, rc, rr, lc, lr = _dpo_batch(rng)
    betas = np.array([0.05, 0.1, 0.5], np.float32)
    for kind in L.DPO_KINDS:
        eps = 0.1 if kind in ("sigmoid", "robust", "simpo") else 0.0

        @jax.jit
        @jax.vmap
        def f(beta):
            return L.dpo_loss(pc, pr, rc, rr, kind=kind, beta=beta, label_smoothing=eps,
                              chosen_lengths=lc, rejected_lengths=lr)

        losses, m = f(jnp.asarray(betas))
        for i, beta in enumerate(betas):
            want = _np_dpo(kind, pc, pr, rc, rr, lc, lr, float(beta), eps)
            np.testing.assert_allclose(losses[i], want[0].mean(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m["rewards/chosen"][i], want[3].mean(), rtol=1e-5,
                                       atol=1e-6)

# ---------------------------------------------------------------- GAE


def _np_gae(rewards, values, mask, gamma, lam):
    """Textbook loop over each row's real positions (skipping masked ones)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b])[0]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, np.where(mask, adv + values, 0.0)


def _np_gae_trl(rewards, values, gamma, lam):
    """TRL's loop on right-padded, zero-filled arrays."""
    t_len = rewards.shape[1]
    lastgaelam = 0.0
    out = []
    for t in reversed(range(t_len)):
        nextvalues = values[:, t + 1] if t < t_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    return np.stack(out[::-1], axis=1)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_python_loop(rng, gamma, lam):
    b, t = 4, 9
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    mask = _right_padded_mask(rng, b, t)
    mask[0, :3] = False  # a masked prompt on the left
    mask[1, 4] = False  # a hole
    adv, ret = L.generalized_advantage_estimate(
        np.where(mask, rewards, np.nan), np.where(mask, values, np.nan), mask, gamma, lam
    )
    exp_adv, exp_ret = _np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, exp_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~mask] == 0)

    # On right-padded masks it equals TRL's loop over zero-filled arrays.
    mask = _right_padded_mask(rng, b, t)
    r0, v0 = np.where(mask, rewards, 0), np.where(mask, values, 0)
    adv, _ = L.generalized_advantage_estimate(r0, v0, mask, gamma, lam)
    np.testing.assert_allclose(
        adv, np.where(mask, _np_gae_trl(r0, v0, gamma, lam), 0), rtol=1e-5, atol=1e-5
    )


def test_gae_single_step_and_monte_carlo():
    # gamma = lam = 1: advantages are reward-to-go minus value.
    r = np.array([[0.0, 0.0, 1.0, 0.0]], np.float32)
    v = np.array([[0.5, 0.2, 0.3, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0]], bool)
    adv, ret = L.generalized_advantage_estimate(r, v, m, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.8, 0.7, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------- KL and rewards


def test_kl_estimators(rng):
    lp = rng.normal(size=(3, 5)).astype(np.float32)
    ref = rng.normal(size=(3, 5)).astype(np.float32)
    d = lp - ref
    r = np.exp(ref - lp)
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k1"), d, rtol=1e-6)
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k2"), 0.5 * d**2, rtol=1e-6)
    k3 = (r - 1) - np.log(r)
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "k3"), k3, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.kl_penalty(lp, ref, "abs"), np.abs(d), rtol=1e-6)
    assert np.all(np.asarray(L.kl_penalty(lp, ref, "k3")) >= 0)
    with pytest.raises(ValueError, match="k1"):
        L.kl_penalty(lp, ref, "nope")


def test_kl_estimators_are_unbiased_on_samples():
    # E_{x~p}[k1] = E[k3] = KL(p || q) for two categorical distributions.
    rng = np.random.default_rng(1)
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    kl = np.sum(p * np.log(p / q))
    x = rng.choice(3, size=200_000, p=p)
    lp, lq = np.log(p)[x], np.log(q)[x]
    assert float(jnp.mean(L.kl_penalty(lp, lq, "k1"))) == pytest.approx(kl, abs=0.01)
    assert float(jnp.mean(L.kl_penalty(lp, lq, "k3"))) == pytest.approx(kl, abs=0.01)


def test_per_token_rewards():
    scores = np.array([2.0, -1.0, 5.0], np.float32)
    nan = np.nan
    kl = np.array([[0.1, 0.2, 0.3, nan], [0.5, nan, nan, nan], [1, 1, 1, 1]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    out = np.asarray(L.per_token_rewards(scores, kl, mask, 0.1))
    expected = np.array(
        [[-0.01, -0.02, -0.03 + 2.0, 0.0], [-0.05 - 1.0, 0, 0, 0], [0, 0, 0, 0]], np.float32
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    # Works with a traced coefficient (adaptive controller inside jit).
    out2 = jax.jit(L.per_token_rewards)(scores, kl, mask, jnp.float32(0.1))
    np.testing.assert_allclose(out2, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- PPO losses


def _np_ppo_policy(lp, old, adv, mask, eps):
    ratio = np.exp(lp - old)
    a = -adv * ratio
    b = -adv * np.clip(ratio, 1 - eps, 1 + eps)
    return (
        np.maximum(a, b)[mask].mean(),
        (b > a)[mask].mean(),
        0.5 * ((lp - old) ** 2)[mask].mean(),
        ratio[mask].mean(),
    )


def test_symmetric_clip_policy_loss_is_ppos_surrogate(rng):
    b, t = 4, 6
    lp = rng.normal(size=(b, t)).astype(np.float32) * 0.3 - 2
    old = lp + rng.normal(size=(b, t)).astype(np.float32) * 0.3
    adv = rng.normal(size=(b, t)).astype(np.float32)
    mask = _right_padded_mask(rng, b, t)
    nanify = lambda x: np.where(mask, x, np.nan).astype(np.float32)
    loss, m = L.policy_loss(nanify(lp), nanify(old), nanify(adv), mask)
    e_loss, e_cf, e_kl, e_ratio = _np_ppo_policy(lp, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, e_loss, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], e_loss, rtol=1e-5)
    np.testing.assert_allclose(m["clip_ratio/region_mean"], e_cf, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], e_kl, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], e_ratio, rtol=1e-5)
    assert 0 < float(m["clip_ratio/region_mean"]) < 1

    # Gradient: -adv * ratio / N where unclipped term is active, 0 where clipped; 0 at padding.
    g = np.asarray(
        jax.grad(lambda x: L.policy_loss(x, nanify(old), nanify(adv), mask)[0])(
            jnp.asarray(nanify(lp))
        )
    )
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
    ratio = np.exp(lp - old)
    unclipped_active = ~((-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio))
    expected_g = np.where(mask & unclipped_active, -adv * ratio / mask.sum(), 0.0)
    np.testing.assert_allclose(g, expected_g, rtol=1e-4, atol=1e-7)


def test_clip_policy_loss_on_policy_is_minus_mean_advantage(rng):
    lp = rng.normal(size=(2, 5)).astype(np.float32)
    adv = rng.normal(size=(2, 5)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    loss, m = L.policy_loss(lp, lp, adv, mask)
    np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-5)
    assert float(m["clip_ratio/region_mean"]) == 0.0 and float(m["approx_kl"]) == 0.0


def test_ppo_value_loss(rng):
    b, t, c = 4, 6, 0.2
    v = rng.normal(size=(b, t)).astype(np.float32)
    old = v + rng.normal(size=(b, t)).astype(np.float32) * 0.3
    ret = rng.normal(size=(b, t)).astype(np.float32)
    mask = _right_padded_mask(rng, b, t)
    nanify = lambda x: np.where(mask, x, np.nan).astype(np.float32)
    loss, m = L.ppo_value_loss(nanify(v), nanify(old), nanify(ret), mask, c)
    l1 = (v - ret) ** 2
    l2 = (np.clip(v, old - c, old + c) - ret) ** 2
    np.testing.assert_allclose(loss, 0.5 * np.maximum(l1, l2)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["value_loss"], loss)
    np.testing.assert_allclose(m["value_clipfrac"], (l2 > l1)[mask].mean(), rtol=1e-6)
    g = np.asarray(
        jax.grad(lambda x: L.ppo_value_loss(x, nanify(old), nanify(ret), mask, c)[0])(
            jnp.asarray(nanify(v))
        )
    )
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)


# ---------------------------------------------------------------- sequence-level estimators


def test_reinforce_loss_gradient():
    seq_lp = jnp.array([-3.0, -1.0, -2.0])
    adv = jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(L.reinforce_loss(seq_lp, adv), -np.mean([-3.0, 2.0, -1.0]))
    g_lp, g_adv = jax.grad(L.reinforce_loss, argnums=(0, 1))(seq_lp, adv)
    np.testing.assert_allclose(g_lp, -np.asarray(adv) / 3)
    np.testing.assert_allclose(g_adv, 0.0)  # advantages are constants
    np.testing.assert_allclose(L.baseline_advantages(jnp.array([1.0, 3.0]), 2.0), [-1.0, 1.0])


def test_rloo_and_grpo_advantages(rng):
    s = rng.normal(size=(3, 4)).astype(np.float32)
    k = s.shape[1]
    expected = np.stack(
        [[s[p, i] - np.mean(np.delete(s[p], i)) for i in range(k)] for p in range(3)]
    )
    np.testing.assert_allclose(L.rloo_advantages(s), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(L.rloo_advantages(s), axis=1), 0.0, atol=1e-5)
    with pytest.raises(ValueError):
        L.rloo_advantages(np.ones((2, 1)))

    mean = s.mean(1, keepdims=True)
    std = s.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(L.grpo_advantages(s), (s - mean) / (std + 1e-4), rtol=1e-5)
    # Equal scores in a group: zero advantage, not NaN.
    np.testing.assert_allclose(L.grpo_advantages(np.full((1, 4), 3.0)), 0.0)


# ---------------------------------------------------------------- adaptive KL


def test_adaptive_kl_coef():
    # Matches OpenAI's AdaptiveKLController.update, including the +-20% clip.
    def ref(coef, kl, target, horizon, n):
        err = np.clip(kl / target - 1, -0.2, 0.2)
        return coef * (1 + err * n / horizon)

    for kl in (0.0, 3.0, 6.0, 6.6, 100.0):
        got = float(L.adaptive_kl_coef(0.15, kl, 6.0, 10000, 512))
        assert got == pytest.approx(ref(0.15, kl, 6.0, 10000, 512), rel=1e-6)
    assert float(L.adaptive_kl_coef(0.15, 100.0, 6.0, 10000, 512)) > 0.15
    assert float(L.adaptive_kl_coef(0.15, 0.0, 6.0, 10000, 512)) < 0.15
    jitted = jax.jit(L.adaptive_kl_coef)(jnp.float32(0.15), jnp.float32(7.2), 6.0, 10000, 512)
    assert float(jitted) == pytest.approx(0.15 * (1 + 0.2 * 512 / 10000), rel=1e-6)


# ---------------------------------------------------------------- GRPO family (issue 18)
#
# The reference below is written row by row over the real tokens only (no masks, no where), in
# float64. Gradients w.r.t. logprobs come from central finite differences of that reference;
# CISPO's stop-gradient is modelled by passing the log-probs that form the ratio separately
# (`ratio_logprobs`) and differencing only the other argument.


def _np_policy_terms(lp, old, adv, mask, kind, clip_low, clip_high, ratio_logprobs=None):
    """[(row, per-token terms over the row's real tokens)] for rows with real tokens."""
    rlp = lp if ratio_logprobs is None else ratio_logprobs
    rows = []
    for i in range(lp.shape[0]):
        idx = np.flatnonzero(mask[i])
        if idx.size == 0:
            continue
        a = adv[i, idx]
        if kind == "gspo":
            s = math.exp(np.sum(rlp[i, idx] - old[i, idx]) / idx.size)
            a_seq = np.mean(a)
            term = -min(s * a_seq, min(max(s, 1 - clip_low), 1 + clip_high) * a_seq)
            rows.append((i, np.full(idx.size, term)))
            continue
        r = np.exp(rlp[i, idx] - old[i, idx])
        clipped = np.clip(r, 1 - clip_low, 1 + clip_high)
        if kind == "clip":
            rows.append((i, -np.minimum(r * a, clipped * a)))
        else:  # cispo
            rows.append((i, -clipped * a * lp[i, idx]))
    return rows


def _np_policy_loss(lp, old, adv, mask, kind, agg, clip_low, clip_high, max_len,
                    ratio_logprobs=None):
    rows = _np_policy_terms(lp, old, adv, mask, kind, clip_low, clip_high, ratio_logprobs)
    if not rows:
        return 0.0
    if agg == "token_mean":
        return np.concatenate([t for _, t in rows]).sum() / sum(t.size for _, t in rows)
    if agg == "seq_mean_token_mean":
        return np.mean([t.mean() for _, t in rows])
    return np.mean([t.sum() / max_len for _, t in rows])


def _np_fd_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[index] += h
        xm[index] -= h
        g[index] = (f(xp) - f(xm)) / (2 * h)
    return g


def _np_policy_metrics(lp, old, adv, mask, kind, clip_low, clip_high):
    ratios, advs, sq = [], [], []
    for i in range(lp.shape[0]):
        idx = np.flatnonzero(mask[i])
        if idx.size == 0:
            continue
        lr = lp[i, idx] - old[i, idx]
        if kind == "gspo":
            ratios.append(np.full(idx.size, math.exp(lr.mean())))
            advs.append(np.full(idx.size, adv[i, idx].mean()))
        else:
            ratios.append(np.exp(lr))
            advs.append(adv[i, idx])
        sq.append(lr**2)
    r, a = np.concatenate(ratios), np.concatenate(advs)
    low = (r < 1 - clip_low) & (a < 0)
    high = (r > 1 + clip_high) & (a > 0)
    return {
        "clip_ratio/low_mean": low.mean(),
        "clip_ratio/high_mean": high.mean(),
        "clip_ratio/region_mean": (low | high).mean(),
        "ratio_mean": r.mean(),
        "approx_kl": 0.5 * np.concatenate(sq).mean(),
    }


def _policy_batch(rng, t=7, spread=0.4):
    """Off-policy log-probs (token and sequence ratios on both sides of the clip range),
    mixed-sign advantages, padded rows including a fully padded one (row 3). NaN goes at
    the masked positions with _nanify."""
    lengths = np.array([t, 3, 1, 0, 5, t, 6, 2])
    b = lengths.size
    lp = rng.normal(size=(b, t)) * 0.5 - 2.0
    row_shift = rng.uniform(-0.5, 0.5, size=(b, 1))
    old = lp - row_shift - rng.normal(size=(b, t)) * spread
    adv = rng.normal(size=(b, t))
    mask = np.arange(t)[None, :] < lengths[:, None]
    return lp, old, adv, mask


def _nanify(x, mask):
    return np.where(mask, x, np.nan).astype(np.float32)


@pytest.mark.parametrize("kind", L.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("aggregation", L.POLICY_LOSS_AGGREGATIONS)
def test_policy_loss_value_gradient_and_metrics(rng, kind, aggregation):
    lp, old, adv, mask = _policy_batch(rng)
    # Sequence-level advantages for gspo (its A_i is the row mean; token-level ones also work).
    if kind == "gspo":
        adv = np.repeat(rng.normal(size=(lp.shape[0], 1)), lp.shape[1], axis=1)
    # The float32 inputs, read back as float64 for the reference.
    lp32, old32, adv32 = (np.float32(x) for x in (lp, old, adv))
    lp, old, adv = (np.float64(x) for x in (lp32, old32, adv32))
    clip_low, clip_high, max_len = 0.15, 0.3, 9
    kwargs = dict(kind=kind, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation,
                  max_len=max_len)

    fn = lambda x: L.policy_loss(x, _nanify(old, mask), _nanify(adv, mask), mask, **kwargs)
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(_nanify(lp, mask)))

    expected = _np_policy_loss(lp, old, adv, mask, kind, aggregation, clip_low, clip_high, max_len)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss)

    frozen = lp if kind == "cispo" else None  # CISPO: the ratio is a constant
    expected_g = _np_fd_grad(
        lambda x: _np_policy_loss(np.where(mask, x, 0.0), old, adv, mask, kind, aggregation,
                                  clip_low, clip_high, max_len, ratio_logprobs=frozen),
        np.where(mask, lp, 0.0))
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
    np.testing.assert_allclose(g, expected_g, rtol=1e-4, atol=1e-6)

    expected_m = _np_policy_metrics(lp, old, adv, mask, kind, clip_low, clip_high)
    # The data clip on both sides.
    assert expected_m["clip_ratio/low_mean"] > 0 and expected_m["clip_ratio/high_mean"] > 0
    for name, value in expected_m.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_policy_loss_metrics_use_trl_names():
    lp = jnp.zeros((2, 3))
    _, metrics = L.policy_loss(lp, lp, jnp.ones((2, 3)), jnp.ones((2, 3), bool))
    assert {"loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "ratio_mean", "approx_kl"} <= set(metrics)


def test_policy_loss_asymmetric_clip_binds_on_both_sides():
    # clip_low=0.1, clip_high=0.3 (DAPO clip-higher). One token per case, token_mean over 6.
    ratios = np.array([0.85, 0.95, 1.2, 1.4, 0.85, 1.4])
    adv = np.array([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
    lp = np.log(ratios)[None, :].astype(np.float32)
    old = np.zeros_like(lp)
    mask = np.ones_like(lp, bool)
    fn = lambda x: L.policy_loss(x, old, adv[None, :], mask, clip_low=0.1, clip_high=0.3)
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp))
    g = np.asarray(g)[0]
    # 0: below 1 - clip_low with A < 0 -> clipped (term -0.9 * -1), no gradient.
    # 1: inside, A < 0 -> unclipped.
    # 2: 1.2 is above 1 + clip_low but inside 1 + clip_high: still unclipped (asymmetry).
    # 3: above 1 + clip_high with A > 0 -> clipped at 1.3, no gradient.
    # 4, 5: outside the range on the side where the unclipped term is the pessimistic one.
    terms = np.array([0.9, 0.95, -1.2, -1.3, -0.85, 1.4])
    np.testing.assert_allclose(loss, terms.mean(), rtol=1e-5)
    expected_g = np.array([0.0, 0.95, -1.2, 0.0, -0.85, 1.4]) / 6
    np.testing.assert_allclose(g, expected_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["clip_ratio/low_mean"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/high_mean"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/region_mean"], 2 / 6, rtol=1e-6)
    # The symmetric clip at 0.1 would clip token 2 as well.
    _, g_sym = jax.value_and_grad(
        lambda x: L.policy_loss(x, old, adv[None, :], mask, clip_low=0.1, clip_high=0.1)[0])(
        jnp.asarray(lp))
    assert float(g_sym[0, 2]) == 0.0


@pytest.mark.parametrize("aggregation", L.POLICY_LOSS_AGGREGATIONS)
def test_cispo_gradient_is_clipped_ratio_times_advantage(rng, aggregation):
    lp, old, adv, mask = _policy_batch(rng, spread=0.6)
    fn = lambda x: L.policy_loss(x, _nanify(old, mask), _nanify(adv, mask), mask, kind="cispo",
                                 clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                                 max_len=11)[0]
    g = np.asarray(jax.grad(fn)(jnp.asarray(_nanify(lp, mask))))
    n = mask.sum(1)
    rows = np.flatnonzero(n)
    weight = {  # d loss / d term_it under each aggregation
        "token_mean": np.full(lp.shape[0], 1.0 / n.sum()),
        "seq_mean_token_mean": 1.0 / (np.maximum(n, 1) * rows.size),
        "seq_mean_token_sum_norm": np.full(lp.shape[0], 1.0 / (11 * rows.size)),
    }[aggregation][:, None]
    clipped = np.clip(np.exp(lp - old), 0.8, 1.28)
    assert np.any(np.exp(lp - old)[mask] > 1.28) and np.any(np.exp(lp - old)[mask] < 0.8)
    # The ratio is a constant: no d clip(r) / d logp term, even outside the clip range.
    np.testing.assert_allclose(g, np.where(mask, -clipped * adv * weight, 0.0),
                               rtol=1e-5, atol=1e-7)


def test_gspo_ratio_is_per_sequence(rng):
    lp, old, adv, mask = _policy_batch(rng, spread=0.1)
    adv_seq = rng.normal(size=(lp.shape[0],))
    adv = np.repeat(adv_seq[:, None], lp.shape[1], axis=1)
    _, metrics = L.policy_loss(_nanify(lp, mask), _nanify(old, mask), _nanify(adv, mask), mask,
                               kind="gspo")
    s = np.array([np.exp((lp[i] - old[i])[mask[i]].mean()) for i in range(lp.shape[0])
                  if mask[i].any()])
    n = mask.sum(1)[mask.any(1)]
    np.testing.assert_allclose(metrics["ratio_mean"], (s * n).sum() / n.sum(), rtol=1e-5)

    # Every token of a sequence gets the same gradient, (s_i / n_i) * (-A_i) * weight when
    # unclipped: the ratio is one number per sequence.
    fn = lambda x: L.policy_loss(x, _nanify(old, mask), _nanify(adv, mask), mask, kind="gspo",
                                 aggregation="seq_mean_token_mean")[0]
    g = np.asarray(jax.grad(fn)(jnp.asarray(_nanify(lp, mask))))
    checked = 0
    for i in range(lp.shape[0]):
        if not mask[i].any():
            assert np.all(g[i] == 0)
            continue
        row = g[i][mask[i]]
        np.testing.assert_allclose(row, row[0], rtol=1e-6)
        s_i = np.exp((lp[i] - old[i])[mask[i]].mean())
        if 0.8 < s_i < 1.2:
            n_rows = mask.any(1).sum()
            np.testing.assert_allclose(row[0], -adv_seq[i] * s_i / mask[i].sum() / n_rows,
                                       rtol=1e-4)
            checked += 1
    assert checked >= 3

    # The ratio is the geometric mean of the token ratios: moving one token's log-prob up
    # and another's down by the same amount changes nothing.
    shifted = lp.copy()
    shifted[0, 0] += 0.3
    shifted[0, 1] -= 0.3
    a = L.policy_loss(_nanify(lp, mask), old, adv, mask, kind="gspo")[0]
    b = L.policy_loss(_nanify(shifted, mask), old, adv, mask, kind="gspo")[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind", L.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("aggregation", L.POLICY_LOSS_AGGREGATIONS)
def test_policy_loss_empty_rows_contribute_nothing(rng, kind, aggregation):
    lp, old, adv, mask = _policy_batch(rng)
    kwargs = dict(kind=kind, aggregation=aggregation, max_len=7)
    full = mask.any(1)
    loss_all, g_all = jax.value_and_grad(
        lambda x: L.policy_loss(x, _nanify(old, mask), _nanify(adv, mask), mask, **kwargs)[0])(
        jnp.asarray(_nanify(lp, mask)))
    m = mask[full]
    loss_some, g_some = jax.value_and_grad(
        lambda x: L.policy_loss(x, _nanify(old[full], m), _nanify(adv[full], m), m, **kwargs)[0])(
        jnp.asarray(_nanify(lp[full], m)))
    np.testing.assert_allclose(loss_all, loss_some, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_all)[full], g_some, rtol=1e-6)
    assert np.all(np.asarray(g_all)[~full] == 0)

    # A batch with no real token at all: loss 0, gradient 0, metrics finite.
    empty = np.zeros_like(mask)
    (loss, metrics), g = jax.value_and_grad(
        lambda x: L.policy_loss(x, _nanify(old, empty), _nanify(adv, empty), empty, **kwargs),
        has_aux=True)(jnp.asarray(_nanify(lp, empty)))
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_policy_loss_on_policy_is_minus_mean_advantage(rng):
    lp = rng.normal(size=(3, 4)).astype(np.float32)
    adv = rng.normal(size=(3, 4)).astype(np.float32)
    mask = np.ones((3, 4), bool)
    for kind in ("clip", "gspo"):
        loss, m = L.policy_loss(lp, lp, adv, mask, kind=kind)
        np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-5)
        assert float(m["clip_ratio/region_mean"]) == 0.0 and float(m["approx_kl"]) == 0.0
    # On policy, PPO's (and GRPO's) gradient is the REINFORCE gradient, and so is CISPO's.
    g_clip = jax.grad(lambda x: L.policy_loss(x, lp, adv, mask)[0])(jnp.asarray(lp))
    g_cispo = jax.grad(lambda x: L.policy_loss(x, lp, adv, mask, kind="cispo")[0])(
        jnp.asarray(lp))
    np.testing.assert_allclose(g_clip, -adv / adv.size, rtol=1e-6)
    np.testing.assert_allclose(g_cispo, g_clip, rtol=1e-6)


def test_policy_loss_jits_with_static_kind_and_traced_clip(rng):
    lp, old, adv, mask = _policy_batch(rng)
    args = [jnp.asarray(_nanify(x, mask)) for x in (lp, old, adv)] + [jnp.asarray(mask)]

    @jax.jit
    def f(lp, old, adv, mask, clip_high):
        return L.policy_loss(lp, old, adv, mask, kind="clip", clip_high=clip_high,
                             aggregation="seq_mean_token_sum_norm", max_len=7)[0]

    eager = L.policy_loss(*args, kind="clip", clip_high=0.28,
                          aggregation="seq_mean_token_sum_norm", max_len=7)[0]
    np.testing.assert_allclose(f(*args, jnp.float32(0.28)), eager, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(kind="ppo"), ["kind", "clip", "gspo", "cispo"]),
        (dict(kind="GSPO"), ["kind"]),
        (dict(aggregation="token-mean"), ["aggregation", "token_mean", "seq_mean_token_mean",
                                          "seq_mean_token_sum_norm"]),
        (dict(aggregation="seq_mean_token_sum_norm"), ["max_len"]),
        (dict(aggregation="seq_mean_token_sum_norm", max_len=0), ["max_len"]),
        (dict(clip_low=1.0), ["clip_low", "[0, 1)"]),
        (dict(clip_low=-0.1), ["clip_low", "[0, 1)"]),
        (dict(clip_high=-0.2), ["clip_high", ">= 0"]),
    ],
)
def test_policy_loss_rejects_bad_arguments(kwargs, words):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError) as info:
        L.policy_loss(x, x, x, jnp.ones((2, 3), bool), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_grpo_advantages_dr_grpo_is_centred_only(rng):
    s = rng.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(L.grpo_advantages(s, scale=False), s - s.mean(1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    # Default unchanged (GRPO), and the positional arguments still work.
    std = s.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(L.grpo_advantages(s, 1e-3, 0),
                               (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-3),
                               rtol=1e-5)
    np.testing.assert_allclose(L.grpo_advantages(s),
                               (s - s.mean(1, keepdims=True)) / (std + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(L.grpo_advantages(np.full((1, 3), 2.0), scale=False), 0.0)


def test_reinforce_pp_advantages(rng):
    b, t = 4, 6
    r = rng.normal(size=(b, t))
    mask = np.arange(t)[None, :] < np.array([6, 2, 0, 4])[:, None]
    adv = np.asarray(L.reinforce_pp_advantages(_nanify(r, mask), mask))
    # Reward-to-go by a Python loop, then whitening over all real tokens with ddof=1.
    togo = np.zeros((b, t))
    for i in range(b):
        total = 0.0
        for j in reversed(range(t)):
            if mask[i, j]:
                total += np.float32(r[i, j])
                togo[i, j] = total
    vals = togo[mask]
    expected = (togo - vals.mean()) / math.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert np.all(adv[~mask] == 0)
    np.testing.assert_allclose(adv[mask].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[mask].std(ddof=1), 1.0, rtol=1e-5)

    # Outcome reward only (score on the last token): every token of a row shares the score.
    last = np.zeros((b, t))
    last[0, 5], last[1, 1], last[3, 3] = 1.0, -1.0, 0.5
    adv = np.asarray(L.reinforce_pp_advantages(last, mask))
    for i in (0, 1, 3):
        np.testing.assert_allclose(adv[i][mask[i]], adv[i][mask[i]][0], rtol=1e-6)
    # Nothing real: zeros, no NaN.
    assert np.all(np.asarray(L.reinforce_pp_advantages(r, np.zeros((b, t), bool))) == 0)


def test_overlong_penalty():
    def ref(length, max_len, cache_len):  # DAPO Eq. 13
        if length <= max_len - cache_len:
            return 0.0
        if length <= max_len:
            return ((max_len - cache_len) - length) / cache_len
        return -1.0

    lengths = np.arange(0, 30)
    got = np.asarray(L.overlong_penalty(lengths, max_len=20, cache_len=8))
    np.testing.assert_allclose(got, [ref(n, 20, 8) for n in lengths], rtol=1e-6, atol=1e-7)
    assert got[12] == 0.0 and got[13] == pytest.approx(-1 / 8) and got[20] == -1.0
    assert got.dtype == np.float32 and got.min() == -1.0
    hard = np.asarray(L.overlong_penalty(np.array([5, 10, 11]), max_len=10, cache_len=0))
    np.testing.assert_allclose(hard, [0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="cache_len"):
        L.overlong_penalty(lengths, max_len=10, cache_len=11)
    with pytest.raises(ValueError, match="max_len"):
        L.overlong_penalty(lengths, max_len=0, cache_len=0)
