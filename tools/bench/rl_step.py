"""One GRPO step (rollout + update): jreason vs tunix's GRPO learner, side by side, one run.

What is compared. The same tiny random Qwen2 (default: hidden 128, 4 layers, 4 heads / 2 KV
heads, FFN 384, vocab 512, tied embeddings, fp32) with identical weights: jreason creates them,
writes HF safetensors (`jreason.model.hf.save_hf`), and both sides load that directory
(`load_hf` / `tunix.models.qwen2.params.create_model_from_safe_tensors`); a greedy decode must
agree token for token between jreason's engine and tunix's sampler before anything is timed.
One GRPO step on both sides is: P prompts (default 8) x G completions (default 8) = 64
completions of 32-token prompts + 64 new tokens, temperature 1.0, no stop token (every
completion runs to the token budget, so both sides do the same work), a reward that is a
function of the decoded text (the fraction of even token ids) so rewards vary within groups,
GRPO advantages, the clipped loss with seq-mean-token-mean aggregation, no KL (beta / kl_coef
0, so no reference model), and one AdamW update (clip-by-global-norm 1.0, constant lr 1e-5,
weight decay 0.1, b2 0.95) on one minibatch holding all 64 rows.

How. tunix runs its real learner: `GRPOLearner.train` on an `RLCluster` whose actor, rollout
and reference roles share one 1-device CPU mesh (fsdp x tp = 1 x 1; actor and rollout then
share the weights, so there is no weight sync), rollout engine "vanilla"
(`tunix.generate.sampler.Sampler`). Its rollout is timed by wrapping `RLCluster.generate`, the
whole step by wrapping `GRPOLearner._run_global_step` (and blocking on the updated params).
jreason (with `model.scan_layers: false`: a Python loop over the layers in training, as tunix's
Qwen2 has) runs the pieces of `jreason.train.rl.loop.train_rl` directly (same calls, minus
checkpoints, metrics files and eval): `Engine.set_params` + `rollout.generate_groups` (the
decode engine, 64 slots) = rollout; then `compute_advantages`, `build_rows`, the
old-log-prob forward and the compiled `make_train_step` update, blocked on its metrics. Steps
alternate: each tunix step is followed by one jreason step (hooked in after tunix's timing
window closes), so both see the same machine load; the first `--warmup` steps of each (which
compile) are reported separately as "first steps" and excluded; medians of the rest.

Also reported: the update's MFU on this CPU, model FLOPs (2 x params x tokens per forward plus
attention's QK^T and AV; fwd + bwd = 3 forwards) over the
update time and over the fp32 rate of a jitted 2048^3 matmul measured in the same run; and the
first `--warmup` steps of each stack (compilation). jreason[trainer] is built after
jreason[engine] and reuses the engine's compiled decode functions, so its first steps compile
only its own train step.

jreason is timed twice per round, with the two old-log-prob modes of `algo.old_logprobs`:
"trainer" (the default) and "engine" (the rollout's own log-probs as pi_old). With one update
per step the trainer mode needs no extra forward: the update runs at the rollout's weights, so
pi_old is stop_gradient of the loss's own log-probs (loop.py, losses.py), which is also what
tunix does with num_iterations=1. The rows differ only in the ratio's denominator.

Left out: tokenization (both sides use the same trivial whitespace tokenizer over "t<id>"
words), logging/metric backends (none on either side), checkpoints, eval, dynamic sampling,
multi-epoch/minibatch updates. tunix quirks kept as they are: its sampler treats a sampled
pad id (0) as padding, and its rollout uses the same PRNG seed every step.

Environment. google-tunix 0.1.7 resolves to jax 0.10.2 / flax 0.12.8 / optax 0.2.8 (the same as
jreason) but pins safetensors<0.8 and pulls ~40 packages jreason does not need (tensorflow-
datasets, numba, datasets, kagglehub, ...), and downgrades transformers/huggingface_hub/tokenizers,
so it lives in its own virtualenv that also sees jreason:

    python3.11 -m venv /tmp/tunix-venv
    /tmp/tunix-venv/bin/pip install google-tunix==0.1.7
    /tmp/tunix-venv/bin/pip install --no-deps -e .    # or: echo $PWD > <site-packages>/jreason.pth
    JAX_PLATFORMS=cpu /tmp/tunix-venv/bin/python tools/bench/rl_step.py
    JAX_PLATFORMS=cpu /tmp/tunix-venv/bin/python tools/bench/rl_step.py --reps 2 --no-record
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, device_name  # noqa: E402
from tunix_peer import PAD, TunixGreedy, WordTokenizer, cpu_mesh, load_qwen2  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "demo": (128, 4, 4, 2, 384, 512),
    "small": (256, 4, 4, 2, 768, 1024),
}


class JreasonTokenizer(WordTokenizer):
    pad_id = PAD  # jreason reads pad_id as an attribute


def text_reward(text: str) -> float:
    """Fraction of even token ids in the completion: varies within a group, length-independent."""
    ids = [int(w[1:]) for w in text.split()]
    return float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0


class TextReward:
    """The duck type `rollout.generate_groups` scores with (`parts`, `terms`)."""

    terms = (("even", 1.0, {}),)

    def parts(self, completion: str, n_tokens: int, example) -> dict[str, float]:
        return {"even": text_reward(completion)}


def tunix_reward(prompts, completions, **_) -> list[float]:
    return [text_reward(c) for c in completions]


def prompt_batches(n: int, prompts: int, length: int, vocab: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [" ".join(f"t{i}" for i in rng.integers(1, vocab, size=length)) for _ in range(prompts)]
        for _ in range(n)
    ]


def write_weights(shape: tuple, path: Path, seed: int, init_std: float = 0.1):
    """Random jreason Qwen2 params saved as HF safetensors; returns the jreason ModelConfig."""
    from jreason.model.config import ModelConfig
    from jreason.model.hf import save_hf
    from jreason.model.transformer import init_model

    hidden, layers, heads, kv, inter, vocab = shape
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        d_ff=inter,
        family="qwen2",
        qkv_bias=True,
        tie_embeddings=True,
        norm_eps=1e-6,
        pad_token_id=PAD,
        # wider than the usual 0.02, so that greedy decoding of the random model is not one
        # repeated token and the parity check below means something
        init_std=init_std,
    )
    _, params = init_model(cfg, jax.random.key(seed))
    # init_model leaves the q/k/v biases at zero: randomize them so the bias path is checked too
    rng = np.random.default_rng(seed)
    for name in ("q_bias", "k_bias", "v_bias"):
        b = params["layers"]["attn"][name]
        params["layers"]["attn"][name] = jax.numpy.asarray(
            rng.normal(0, 0.02, b.shape).astype(np.float32)
        )
    save_hf(path, cfg, params, overwrite=True)
    return cfg


# ---- jreason ----------------------------------------------------------------------------------


class JreasonGRPO:
    """The body of `train_rl`'s step loop, on the pieces it calls (loop.py)."""

    def __init__(self, ckpt: Path, args, old_logprobs: str):
        from jreason.decode.engine import Engine
        from jreason.model.hf import load_hf
        from jreason.model.transformer import abstract_model, param_axes
        from jreason.train import state as state_lib
        from jreason.train.config import MeshConfig, OptimConfig
        from jreason.train.rl.config import AlgoConfig, RolloutConfig
        from jreason.train.rl.losses import make_loss
        from jreason.train.setup import make_mesh
        from jreason.train.step import compile_step, make_train_step

        self.args, self.old_mode = args, old_logprobs
        self.mesh = make_mesh(MeshConfig())
        cfg, params = load_hf(ckpt, self.mesh)
        # a Python loop over the layers in training, as tunix's Qwen2 (model.scan_layers)
        cfg = cfg.replace(scan_layers=False)
        self.model, _ = abstract_model(cfg)
        self.tok = JreasonTokenizer(cfg.vocab_size)
        self.reward = TextReward()
        self.rollout = RolloutConfig(
            prompts_per_step=args.prompts,
            group_size=args.group,
            max_tokens=args.new_tokens,
            temperature=1.0,
            max_slots=args.prompts * args.group,
        )
        self.algo = AlgoConfig(old_logprobs=old_logprobs)
        self.seq_len = args.prompt_len + args.new_tokens
        self.n_rows = args.prompts * args.group
        optim = OptimConfig(
            lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=1.0
        )
        optimizer, schedule = state_lib.make_optimizer(optim, 1000)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        st_sh = state_lib.state_shardings(optimizer, shapes, param_axes(cfg), self.mesh)
        self.state = jax.jit(lambda p: state_lib.init_state(p, optimizer, 0), out_shardings=st_sh)(
            params
        )
        a, r, model = self.algo, self.rollout, self.model
        loss_fn = make_loss(
            "ppo_clip",
            eps_low=a.eps_low,
            eps_high=a.eps_high,
            kl_coef=a.kl_coef,
            kl_estimator=a.kl_estimator,
            entropy_coef=a.entropy_coef,
            tis_cap=a.tis_cap,
            temperature=r.temperature,
        )
        self.step_fn = compile_step(
            make_train_step(model, optimizer, schedule, loss_fn), st_sh, self.mesh
        )
        self.engine = Engine(
            model,
            self.state["params"],
            max_slots=r.max_slots,
            max_len=min(self.seq_len + 1, cfg.max_seq_len),
            pad_id=PAD,
            detokenize=self.tok.decode,
        )
        self.n_steps = 0

    def greedy(self, prompts: list[list[int]], n: int) -> np.ndarray:
        """Greedy tokens from a separate engine (the RL one keeps its own cache size)."""
        from jreason.decode.engine import Engine, Request

        engine = Engine(
            self.model,
            self.state["params"],
            max_slots=len(prompts),
            max_len=len(prompts[0]) + n + 1,
        )
        rids = [engine.submit(Request(p, max_tokens=n)) for p in prompts]
        results = engine.run_until_idle()
        return np.array([results[r].tokens for r in rids])

    def logprobs(self, prompts: np.ndarray, completions: np.ndarray) -> np.ndarray:
        """log p(completion token | prefix), teacher-forced, with the trainer's forward."""
        from jreason.train.rl.losses import token_logprobs

        rows = np.concatenate([prompts, completions], axis=1)
        B, T = rows.shape[0], rows.shape[1] - 1
        lp, _ = token_logprobs(
            self.model,
            self.state["params"],
            rows[:, :-1],
            np.broadcast_to(np.arange(T), (B, T)),
            np.ones((B, T), np.int32),
            rows[:, 1:],
        )
        return np.asarray(lp)[:, -completions.shape[1] :]

    def step(self, prompts: list[str]) -> dict:
        from jreason.data.tasks.base import Example
        from jreason.train.rl import rollout as rollout_lib
        from jreason.train.rl.advantages import compute_advantages
        from jreason.train.sft import to_global_batch

        self.n_steps += 1
        step = self.n_steps
        examples = [Example(str(i), p, "", "") for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        self.engine.set_params(self.state["params"])
        groups = rollout_lib.generate_groups(
            self.engine,
            self.tok,
            examples,
            self.rollout,
            self.reward,
            task_name=None,
            seed=0,
            step=step,
        )
        t1 = time.perf_counter()
        rewards_pg = np.array([[s.reward for s in g] for g in groups], np.float32)
        adv_pg = np.asarray(compute_advantages(self.algo.advantage, rewards_pg))
        rows = rollout_lib.build_rows(
            groups,
            adv_pg,
            n_rows=self.n_rows,
            seq_len=self.seq_len,
            loss_agg=self.algo.loss_agg,
            max_len_norm=self.rollout.max_tokens,
            pad_id=PAD,
        )
        order = np.random.default_rng([0, step]).permutation(self.n_rows)
        rows = {k: v[order] for k, v in rows.items()}
        # as loop.py: one update at the rollout's weights takes pi_old from the loss's own
        # forward (NaN = "the current policy"); "engine" uses the rollout's log-probs
        rows["old_logprobs_bt"] = (
            rows["engine_logprobs_bt"]
            if self.old_mode == "engine"
            else np.full_like(rows["loss_mask"], np.nan)
        )
        del rows["engine_logprobs_bt"]
        batch = to_global_batch(rows, self.mesh, 1)
        self.state, metrics = self.step_fn(self.state, batch)
        metrics = jax.device_get(metrics)
        t2 = time.perf_counter()
        lengths = [len(s.result.tokens) for g in groups for s in g]
        return {
            "step": t2 - t0,
            "rollout": t1 - t0,
            "update": t2 - t1,
            "tokens": sum(lengths),
            "reward": float(rewards_pg.mean()),
            "loss": float(metrics["loss"]),
        }


# ---- tunix ------------------------------------------------------------------------------------


class TunixGRPO:
    def __init__(self, ckpt: Path, jcfg, args):
        import optax
        from tunix.rl import rl_cluster as rl_cluster_lib
        from tunix.rl.grpo import grpo_learner
        from tunix.rl.rollout import base_rollout

        self.args = args
        self.mesh = cpu_mesh()
        self.model, self.config = load_qwen2(ckpt, jcfg, self.mesh)
        self.tok = WordTokenizer(jcfg.vocab_size)
        cache = args.prompt_len + args.new_tokens
        rollout_config = base_rollout.RolloutConfig(
            max_tokens_to_generate=args.new_tokens,
            max_prompt_length=args.prompt_len,
            kv_cache_size=cache,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_tokens=[self.tok.eos_id()],
        )
        optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(args.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
        )
        Role = rl_cluster_lib.Role
        cluster_config = rl_cluster_lib.ClusterConfig(
            role_to_mesh={
                Role.ACTOR: self.mesh,
                Role.REFERENCE: self.mesh,
                Role.ROLLOUT: self.mesh,
            },
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=optimizer,
                eval_every_n_steps=10**9,
                max_steps=args.warmup + args.reps,
                pbar_description=None,
            ),
            rollout_config=rollout_config,
        )
        self.cluster = rl_cluster_lib.RLCluster(
            actor=self.model, reference=None, tokenizer=self.tok, cluster_config=cluster_config
        )
        self.learner = grpo_learner.GRPOLearner(
            rl_cluster=self.cluster,
            algo_config=grpo_learner.GRPOConfig(
                num_generations=args.group, num_iterations=1, beta=0.0, epsilon=0.2
            ),
            reward_fns=tunix_reward,
        )
        self.times: list[dict] = []

    def greedy(self, prompts: list[str], n: int) -> np.ndarray:
        peer = TunixGreedy(self.model, self.config, self.tok, self.args.prompt_len, n)
        return peer.generate(np.array([self.tok.encode(p) for p in prompts]))

    def logprobs(self, prompts: np.ndarray, completions: np.ndarray) -> np.ndarray:
        from flax import nnx
        from tunix.rl import common

        graphdef, state = nnx.split(self.model)
        with jax.set_mesh(self.mesh):
            lp = common.compute_per_token_logps(
                graphdef,
                state,
                prompt_tokens=jax.numpy.asarray(prompts),
                completion_tokens=jax.numpy.asarray(completions),
                pad_id=PAD,
                eos_id=self.tok.eos_id(),
            )
        return np.asarray(lp)

    def run(self, batches: list[list[str]], after_step) -> None:
        """learner.train over `batches`, timing each global step; `after_step(i)` runs between
        steps, outside the timed window (that is where the jreason step goes)."""
        from flax import nnx

        learner, cluster = self.learner, self.cluster
        gen, run_global = cluster.generate, learner._run_global_step
        current: dict = {}

        def timed_generate(*a, **k):
            t0 = time.perf_counter()
            out = gen(*a, **k)  # returns host lists: the device work is done
            current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - t0
            current["tokens"] = current.get("tokens", 0) + sum(len(t) for t in out.tokens)
            return out

        def timed_global_step(*a, **k):
            current.clear()
            t0 = time.perf_counter()
            run_global(*a, **k)
            jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
            current["step"] = time.perf_counter() - t0
            current["update"] = current["step"] - current["rollout"]
            self.times.append(dict(current))
            after_step(len(self.times) - 1)

        cluster.generate = timed_generate
        learner._run_global_step = timed_global_step
        learner.train([{"prompts": np.array(b)} for b in batches])


# ---- the run ----------------------------------------------------------------------------------


def measure_matmul(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a jitted fp32 (n x n) @ (n x n) here: the compute roof for the update's MFU."""
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        b = a + len(times)  # a fresh operand each time
        b.block_until_ready()
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def update_flops(cfg, rows: int, seq: int, forwards: float) -> float:
    """Model FLOPs of `forwards` forward-equivalents over rows x seq tokens (fwd+bwd = 3):
    2 x params x tokens + attention's QK^T and AV (4 x layers x seq^2 x heads x head_dim)."""
    n_params = cfg.vocab_size * cfg.d_model + cfg.n_layers * (
        cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        + 3 * cfg.d_model * cfg.d_ff
    )
    per_row = 2 * n_params * seq + 4 * cfg.n_layers * seq**2 * cfg.n_heads * cfg.head_dim
    return forwards * rows * per_row


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="demo", choices=sorted(SIZES))
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=2, help="first steps (compile), not timed")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per side (medians)")
    ap.add_argument("--greedy-check", type=int, default=16, help="tokens of the parity check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    args = ap.parse_args(argv)
    from importlib.metadata import version

    try:
        import tunix  # noqa: F401
    except ImportError:
        sys.exit("tunix is not installed here: run this with the tunix virtualenv (see --help)")

    versions = {p: version(p) for p in ("google-tunix", "jax", "flax", "optax")}
    print(f"versions: {versions}; load average at start {loadavg()}", flush=True)

    shape = SIZES[args.size]
    n_steps = args.warmup + args.reps
    batches = prompt_batches(n_steps, args.prompts, args.prompt_len, shape[-1], args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        jcfg = write_weights(shape, Path(tmp), args.seed)
        setup, ours = {}, {}
        for m in ("engine", "trainer"):
            t0 = time.perf_counter()
            ours[m] = JreasonGRPO(Path(tmp), args, m)
            setup[m] = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = TunixGRPO(Path(tmp), jcfg, args)
        setup["tunix"] = time.perf_counter() - t0

    # parity: the same weights and model semantics, greedy, before any update
    tok = WordTokenizer(jcfg.vocab_size)
    check = prompt_batches(1, 4, args.prompt_len, jcfg.vocab_size, args.seed + 1)[0]
    a = ours["engine"].greedy([tok.encode(p) for p in check], args.greedy_check)
    b = theirs.greedy(check, args.greedy_check)
    same = a.shape == b.shape and bool((a == b).all())
    print(
        f"greedy {args.greedy_check} tokens x {len(check)} prompts: jreason engine vs tunix "
        f"sampler {'identical' if same else 'DIFFER'} (first row {a[0].tolist()})",
        flush=True,
    )
    assert same, f"greedy outputs differ: refusing to time different models\n{a}\n{b}"
    # and the log-probs the losses use, teacher-forced on random (non-greedy) completions
    rng = np.random.default_rng(args.seed + 2)
    comp = rng.integers(1, jcfg.vocab_size, size=(len(check), args.new_tokens))
    prom = np.array([tok.encode(p) for p in check])
    dlogp = float(np.abs(ours["engine"].logprobs(prom, comp) - theirs.logprobs(prom, comp)).max())
    print(f"teacher-forced log-probs, {comp.size} tokens: max |jreason - tunix| = {dlogp:.1e}")
    assert dlogp < 1e-3, "log-probs differ: refusing to time different models"

    ours_times: dict[str, list[dict]] = {m: [] for m in ours}

    def after_tunix_step(i: int) -> None:
        # alternate: one step of each jreason variant after each tunix step
        for m, g in ours.items():
            ours_times[m].append(g.step(batches[i]))
        t = theirs.times[i]
        print(
            f"step {i}: tunix {t['step']:.2f}s (rollout {t['rollout']:.2f}) | "
            + " | ".join(
                f"jreason[{m}] {ours_times[m][i]['step']:.2f}s "
                f"(rollout {ours_times[m][i]['rollout']:.2f})"
                for m in ours
            )
            + f" | load {loadavg()}",
            flush=True,
        )

    theirs.run(batches, after_tunix_step)
    assert len(theirs.times) == n_steps, f"tunix ran {len(theirs.times)} steps, not {n_steps}"

    def med(times: list[dict], key: str) -> float:
        return statistics.median(t[key] for t in times[args.warmup :])

    def first(times: list[dict]) -> str:
        return ", ".join(f"{t['step']:.1f}" for t in times[: args.warmup])

    n_params = sum(x.size for x in jax.tree.leaves(ours["engine"].state["params"]))
    completions = args.prompts * args.group
    peak = measure_matmul()
    print(f"fp32 matmul (2048^3, jitted): {peak:.1f} GFLOP/s", flush=True)
    seq = args.prompt_len + args.new_tokens
    tunix_step = med(theirs.times, "step")
    rows = []
    for name, times, init, forwards in (
        ("tunix GRPOLearner", theirs.times, setup["tunix"], 3),
        ("jreason (old logprobs: engine)", ours_times["engine"], setup["engine"], 3),
        ("jreason (old logprobs: trainer, default)", ours_times["trainer"], setup["trainer"], 3),
    ):
        step = med(times, "step")
        flops = update_flops(jcfg, completions, seq, forwards)
        rows.append(
            {
                "stack": name,
                "step s": f"{step:.3f}",
                "rollout s": f"{med(times, 'rollout'):.3f}",
                "update s": f"{med(times, 'update'):.3f}",
                "rollout tok/s": f"{completions * args.new_tokens / med(times, 'rollout'):,.0f}",
                "update MFU": f"{flops / med(times, 'update') / 1e9 / peak:.1%}",
                "speedup vs tunix": f"{tunix_step / step:.2f}x",
                f"first {args.warmup} steps s (compile)": first(times),
                "setup s": f"{init:.1f}",
            }
        )
    tokens = {
        n: t[-1]["tokens"] for n, t in (("tunix", theirs.times), ("jreason", ours_times["engine"]))
    }
    print(f"generated tokens in the last step: {tokens}; load average at end {loadavg()}")
    append_report(
        f"GRPO step (fp32, Qwen2 {args.size} {n_params / 1e6:.2f}M, {args.prompts} prompts x "
        f"{args.group} completions, {args.prompt_len}-token prompts + {args.new_tokens} new "
        f"tokens, 1 AdamW update): jreason vs tunix {versions['google-tunix']} GRPOLearner; "
        f"medians of {args.reps} alternating steps after {args.warmup}; fp32 matmul roof "
        f"{peak:.0f} GFLOP/s; load average at end {loadavg()}",
        rows,
        command="JAX_PLATFORMS=cpu /tmp/tunix-venv/bin/python tools/bench/rl_step.py "
        + " ".join(sys.argv[1:]),
        device=device_name(),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
