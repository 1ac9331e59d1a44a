"""jquant on a click-prediction model: float vs 8-bit vs 4-bit embedding QAT, converted.

A small recommender (one ``EmbeddingBag`` per categorical field, concatenated, then an
MLP) on a deterministic synthetic click log drawn with numpy from ``--seed``:

* fields: ``user`` and ``item`` (Zipf-like popularity), ``context`` (uniform), and
  ``history``: a bag of 1-8 previously seen items, padded to 8 with id 0
  (``padding_idx=0``: padding is left out of the bag's mean);
* a hidden logistic ground truth: ``logit = <u_user + mean(h_history), v_item> +
  b_item + b_context`` (random latent vectors), clicks drawn ``~ Bernoulli(sigmoid)``, so
  accuracy and AUC have a Bayes ceiling the table reports too.

Stages (either Flax front end, ``--front linen|nnx``):

1. float training (optax Adam, sigmoid cross-entropy);
2. weight-only PTQ of the tables to 4 bits (``float_qparams_weight_only_qconfig_4bit``,
   rows quantized at ``convert``): no training, the baseline QAT has to beat;
3. QAT of the tables with ``default_embedding_qat_qconfig`` (8-bit rows, per-row float
   scale / zero point) and with its 4-bit twin ``default_embedding_qat_qconfig_4bit``,
   starting from the float weights; the MLP stays float (``qconfig_spec`` names only the
   ``EmbeddingBag`` type), as the tables hold almost all the bytes;
4. ``convert``: the tables become packed 8-bit / 4-bit rows (``nnq.EmbeddingBag``), and
   the converted models are evaluated.

Prints a table: method | accuracy | AUC | parameter bytes (AUC computed with numpy).
Deterministic for a given seed.

    python examples/embedding_bag_4bit.py [--front linen|nnx] [--epochs N]
                                          [--qat-epochs N] [--seed S] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn)

import jquant as jq
import jquant.linen as jl
import jquant.nnx as jqn

HIST = 8                                   # history bag length (padded with id 0)
FIELDS = ("user", "item", "context", "history")
EMB_INIT_STD = 0.05

SIZES = {   # vocabularies (history ids are item ids + 1; 0 pads), samples, model widths
    "full": dict(user=1000, item=500, context=24, n_train=60_000, n_test=10_000, dim=16,
                 hidden=(64, 32), batch=512, eval_batch=2000),
    "quick": dict(user=300, item=200, context=12, n_train=12_000, n_test=4_000, dim=16,
                  hidden=(32, 16), batch=256, eval_batch=2000),
}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------

def _zipf(rng, n, size, a=0.8):
    p = 1.0 / np.arange(1, n + 1) ** a
    ids = rng.permutation(n)                      # popularity rank -> id
    return ids[rng.choice(n, size=size, p=p / p.sum())]


def make_data(seed, sz):
    """``(x_train, y_train, x_test, y_test, bayes_test_logits)``; ``x``: int32 ``(N, 3 + HIST)``
    = user, item, context, history[HIST] (history ids are item + 1, 0 = padding)."""
    rng = np.random.default_rng(seed)
    n = sz["n_train"] + sz["n_test"]
    k = 4
    u_vec = rng.normal(size=(sz["user"], k))
    v_vec = rng.normal(size=(sz["item"], k))
    h_vec = rng.normal(size=(sz["item"], k)) * 0.7
    b_user = rng.normal(size=sz["user"])
    b_item = rng.normal(size=sz["item"])
    b_hist = rng.normal(size=sz["item"])
    b_ctx = rng.normal(size=sz["context"]) * 0.5
    user = _zipf(rng, sz["user"], n)
    item = _zipf(rng, sz["item"], n)
    ctx = rng.integers(0, sz["context"], n)
    length = rng.integers(1, HIST + 1, n)
    hist_items = _zipf(rng, sz["item"], (n, HIST))
    mask = np.arange(HIST)[None, :] < length[:, None]
    hist = np.where(mask, hist_items + 1, 0)
    h_mean = (h_vec[hist_items] * mask[..., None]).sum(1) / length[:, None]
    hb = (b_hist[hist_items] * mask).sum(1) / length
    raw = (0.5 * np.einsum("nk,nk->n", u_vec[user] + h_mean, v_vec[item]) + b_user[user]
           + b_item[item] + hb + b_ctx[ctx])
    logit = 2.5 * (raw - raw.mean()) / raw.std()
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    x = np.concatenate([user[:, None], item[:, None], ctx[:, None], hist], 1).astype(np.int32)
    t = sz["n_train"]
    return x[:t], y[:t], x[t:], y[t:], logit[t:]


def auc(y, score):
    """ROC AUC (Mann-Whitney U with average ranks for ties), numpy only."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    i = 0
    while i < len(s):                              # average ranks of tied scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = 0.5 * (i + j) + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------
# Linen front end
# ------------------------------------------------------------------------------------------

class LinenCTR(nn.Module):
    vocab: tuple            # (user, item, context, history)
    dim: int
    hidden: tuple

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(EMB_INIT_STD)
        cols = (x[:, 0:1], x[:, 1:2], x[:, 2:3], x[:, 3:])
        embs = [jl.EmbeddingBag(n, self.dim, mode="mean" if f == "history" else "sum",
                                padding_idx=0 if f == "history" else None,
                                embedding_init=init, name=f)(c)
                for f, n, c in zip(FIELDS, self.vocab, cols)]
        h = jnp.concatenate(embs, -1)
        for i, w in enumerate(self.hidden):
            h = nn.relu(nn.Dense(w, name=f"fc{i + 1}")(h))
        return nn.Dense(1, name="out")(h)[:, 0]


def _bce(logits, y):
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()


class LinenFront:
    """Each stage's state is a list ``[model, variables, opt_state]``; steps are jitted."""

    def __init__(self, seed, vocab, sz, lr):
        self.seed = seed
        self.model = LinenCTR(vocab, sz["dim"], sz["hidden"])
        self.tx = optax.adam(lr)
        self.qtx = optax.adam(lr / 3)

        def step(model, tx, v, opt, x, y):
            def loss(p):
                logits, upd = model.apply({**v, "params": p}, x, mutable=["quant_stats"])
                return _bce(logits, y), upd
            (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
            u, opt = tx.update(g, opt, v["params"])
            return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt, l
        self._step = jax.jit(step, static_argnums=(0, 1))
        self._predict = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)

    def _init(self, model, x):
        return dict(jax.jit(model.init)(jax.random.PRNGKey(self.seed), x[:1]))

    def float_init(self, x):
        v = self._init(self.model, x)
        return [self.model, v, self.tx.init(v["params"]), self.tx]

    def prepare(self, float_st, qconfig, x, qat):
        prep = jl.prepare_qat if qat else jl.prepare
        pm = prep(self.model, {jl.EmbeddingBag: qconfig})
        v = self._init(pm, x)
        v["params"] = float_st[1]["params"]
        return [pm, v, self.qtx.init(v["params"]), self.qtx]

    def step(self, st, x, y):
        st[1], st[2], l = self._step(st[0], st[3], st[1], st[2], x, y)
        return l

    def predict(self, st, x):
        return self._predict(st[0], st[1], x)

    def convert(self, st):
        return list(jl.convert(st[0], st[1]))

    def param_bytes(self, st):
        return jl.parameter_bytes(st[1])


# ------------------------------------------------------------------------------------------
# NNX front end
# ------------------------------------------------------------------------------------------

class NNXCTR(nnx.Module):
    def __init__(self, vocab, dim, hidden, seed):
        r = nnx.Rngs(seed)
        init = nnx.initializers.normal(EMB_INIT_STD)
        self.user = jqn.EmbeddingBag(vocab[0], dim, mode="sum", embedding_init=init, rngs=r)
        self.item = jqn.EmbeddingBag(vocab[1], dim, mode="sum", embedding_init=init, rngs=r)
        self.context = jqn.EmbeddingBag(vocab[2], dim, mode="sum", embedding_init=init, rngs=r)
        self.history = jqn.EmbeddingBag(vocab[3], dim, mode="mean", padding_idx=0,
                                        embedding_init=init, rngs=r)
        widths = (4 * dim,) + tuple(hidden)
        self.fcs = nnx.List([nnx.Linear(a, b, rngs=r) for a, b in zip(widths, widths[1:])])
        self.out = nnx.Linear(widths[-1], 1, rngs=r)

    def __call__(self, x):
        h = jnp.concatenate([self.user(x[:, 0:1]), self.item(x[:, 1:2]),
                             self.context(x[:, 2:3]), self.history(x[:, 3:])], -1)
        for fc in self.fcs:
            h = nnx.relu(fc(h))
        return self.out(h)[:, 0]


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: _bce(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _nnx_forward(model, x):
    return model(x)


class NNXFront:
    """Each stage's state is ``[model, optimizer]``; the steps update the model in place."""

    def __init__(self, seed, vocab, sz, lr):
        self.seed, self.vocab, self.sz, self.lr = seed, vocab, sz, lr

    def float_init(self, x):
        m = NNXCTR(self.vocab, self.sz["dim"], self.sz["hidden"], self.seed)
        return [m, nnx.Optimizer(m, optax.adam(self.lr), wrt=nnx.Param)]

    def prepare(self, float_st, qconfig, x, qat):
        prep = jqn.prepare_qat if qat else jqn.prepare
        qm = prep(float_st[0], {jqn.EmbeddingBag: qconfig})      # a copy
        qm.train()
        return [qm, nnx.Optimizer(qm, optax.adam(self.lr / 3), wrt=nnx.Param)]

    def step(self, st, x, y):
        return _nnx_step(st[0], st[1], x, y)

    def predict(self, st, x):
        st[0].eval()
        return _nnx_forward(st[0], x)

    def convert(self, st):
        st[0].eval()
        return [jqn.convert(st[0])]

    def param_bytes(self, st):
        return jqn.parameter_bytes(st[0])


# ------------------------------------------------------------------------------------------
# the workflow
# ------------------------------------------------------------------------------------------

def _train(front, st, xtr, ytr, epochs, batch, rng, progress, label):
    n_steps = len(xtr) // batch
    task = progress.add_task(label, total=max(epochs * n_steps, 1), info="")
    for _ in range(epochs):
        idx = rng.permutation(len(xtr))
        for i in range(n_steps):
            j = idx[i * batch:(i + 1) * batch]
            loss = front.step(st, jnp.asarray(xtr[j]), jnp.asarray(ytr[j]))
            progress.update(task, advance=1, info=f"loss {float(loss):.4f}")


def _evaluate(front, st, x, y, eval_batch):
    """(accuracy, AUC) on the test set, in batches of one compiled shape."""
    logits = np.concatenate([np.asarray(front.predict(st, jnp.asarray(x[i:i + eval_batch])))
                             for i in range(0, len(x), eval_batch)])
    return float(np.mean((logits > 0) == (y > 0.5))), auc(y, logits)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--front", choices=("linen", "nnx"), default="linen")
    p.add_argument("--epochs", type=int, default=None, help="float epochs (default 5; quick 3)")
    p.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="small vocabularies and data set, fewer epochs (CI)")
    args = p.parse_args(argv)
    sz = SIZES["quick" if args.quick else "full"]
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 5)
    qat_epochs = args.qat_epochs if args.qat_epochs is not None else 1
    warnings.filterwarnings("ignore", module="jquant")
    t_start = time.perf_counter()
    xtr, ytr, xte, yte, bayes_logits = make_data(args.seed, sz)
    vocab = (sz["user"], sz["item"], sz["context"], sz["item"] + 1)
    rng = np.random.default_rng(args.seed + 1)
    front = (LinenFront if args.front == "linen" else NNXFront)(args.seed, vocab, sz, 3e-3)
    ev = lambda st: _evaluate(front, st, xte, yte, sz["eval_batch"])  # noqa: E731
    rows = {}                                      # method -> (accuracy, AUC, param bytes)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    x0 = jnp.asarray(xtr[:1])

    with Progress(*columns, console=console) as progress:
        fst = front.float_init(x0)
        _train(front, fst, xtr, ytr, epochs, sz["batch"], rng, progress, "float training")
        float_bytes = front.param_bytes(fst)
        rows["float"] = (*ev(fst), float_bytes)

        pst = front.prepare(fst, jq.float_qparams_weight_only_qconfig_4bit, x0, qat=False)
        cst = front.convert(pst)                  # rows observed here, as torch's from_float
        rows["PTQ 4-bit (no training)"] = (*ev(cst), front.param_bytes(cst))

        for bits, qconfig in ((8, jq.default_embedding_qat_qconfig),
                              (4, jq.default_embedding_qat_qconfig_4bit)):
            qst = front.prepare(fst, qconfig, x0, qat=True)
            _train(front, qst, xtr, ytr, qat_epochs, sz["batch"], rng, progress,
                   f"QAT {bits}-bit")
            rows[f"QAT {bits}-bit (fake quant)"] = (*ev(qst), float_bytes)
            cst = front.convert(qst)
            rows[f"QAT {bits}-bit -> int{bits}"] = (*ev(cst), front.param_bytes(cst))

    bayes = (float(np.mean((bayes_logits > 0) == (yte > 0.5))), auc(yte, bayes_logits))
    total = time.perf_counter() - t_start
    print(f"\nsynthetic clicks, jquant.{args.front}: {len(ytr)} train / {len(yte)} test samples, "
          f"{epochs} float epochs, {qat_epochs} QAT epochs, seed {args.seed}; click rate "
          f"{yte.mean():.3f}; ground-truth (Bayes) accuracy {bayes[0]:.4f}, AUC {bayes[1]:.4f}")
    print(f"{'method':<28}{'accuracy':>9}{'AUC':>9}{'param bytes':>13}")
    for name, (acc, a, nbytes) in rows.items():
        print(f"{name:<28}{acc:>9.4f}{a:>9.4f}{nbytes:>13}")
    print(f"(tables: {sum(vocab)} rows x {sz['dim']}; the MLP stays float; total "
          f"{total:.1f} s)")
    sys.stdout.flush()
    return {"rows": rows, "bayes": bayes, "seconds": total}


if __name__ == "__main__":
    main()
