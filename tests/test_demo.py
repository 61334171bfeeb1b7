"""`jreason demo` end to end (shortened): every artifact the README promises is there and sound,
for the SFT stage and the GRPO stage that starts from its export."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jreason.model.store import load_model
from jreason.model.transformer import abstract_model


def test_demo_writes_run_directory(tmp_path):
    run = tmp_path / "demo"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jreason",
            "demo",
            f"run_dir={run}",
            "steps=12",
            "profile_steps=[3, 5]",
            "log_every=4",
            "checkpoint.every=6",
            "eval.every=6",
            "eval.num_examples=8",
            "eval.max_new_tokens=16",
            "tokenizer.train_examples=300",
            "rl.steps=2",
            "rl.eval.num_examples=4",
            "rl.rollout.prompts_per_step=2",
            "rl.rollout.group_size=4",
            "rl.rollout.max_tokens=16",
            "rl.algo.minibatches=1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SFT held-out accuracy" in proc.stdout and "RL held-out accuracy" in proc.stdout

    report = json.loads((run / "report.json").read_text())
    assert report["step"] == 12 and 0.0 <= report["eval"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]  # it learns something
    assert sum("eval_accuracy" in r for r in records) == 2  # step 6 and the end
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "12",
        "6",
    ]
    assert any((run / "tb").iterdir())
    assert len(list((run / "profile").rglob("*.xplane.pb"))) == 1  # the profiled window

    # the exported model is a transformers model with the same logits
    export = run / "export-hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    cfg, params = load_model(export)
    model, _ = abstract_model(cfg)
    tokens = np.arange(1, 21)[None] % cfg.vocab_size
    ours, _ = model.apply(params, jnp.asarray(tokens), jnp.arange(20)[None])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)
    assert (export / "tokenizer.model").is_file()

    # the RL stage started from that export and wrote its own run directory
    rl = run / "rl"
    rl_report = json.loads((rl / "report.json").read_text())
    assert rl_report["step"] == 2
    assert {"eval_before", "eval"} <= set(rl_report)
    rl_records = [json.loads(line) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_records if "reward" in r] == [1, 2]
    assert (rl / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (rl / "export-hf" / "model.safetensors").is_file()
