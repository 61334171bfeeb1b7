"""Every configs/rl/*.yaml loads; the real recipes' numbers fit together and fit their hardware.

A recipe names its hardware in `# key: value` header lines, as configs/launch does:
`accelerator` / `devices` / `hosts` for the mesh in the file, and optionally `alt-accelerator` /
`alt-devices` / `alt-hosts` / `alt-overrides` for a second target reached with those
`key=value` overrides. Per target, without building a model:
- the mesh (data x fsdp x tensor, -1 = the rest) covers the accelerator's devices, and the
  device and host counts are the accelerator's (TPU names through launch/tpu.py);
- the rows of an update split into whole microbatches per process, and a microbatch splits
  evenly over data x fsdp (what the loop's `_local_rows` and `to_global_batch` need);
- attention_impl cudnn only on GPUs.
Per recipe: data.seq_len holds the longest row, a prompt of MAX_PROMPT_TOKENS (the recipes say
to drop longer ones) plus max_tokens, or plus the chunk size in Markovian mode, within the
model preset's context; the Markovian budget reaches max_tokens; the overlong reward ends where
generation does; rewards name registered terms; file sources that evaluate name eval files.
Configs without an accelerator header (the demo, or any other quick config) only have to load.
"""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from jreason.config import repo_root
from jreason.decode.markovian import MarkovianConfig
from jreason.train.rl.config import RLConfig, load_rl_config
from jreason.train.rl.rewards import combine

ROOT = repo_root()
CONFIGS = sorted((ROOT / "configs" / "rl").glob("*.yaml"))
MAX_PROMPT_TOKENS = 1024  # the longest rendered prompt (query) a recipe promises to hold
GPUS = {"8xH100": (8, 1)}  # accelerator -> (devices, hosts); TPU names via launch/tpu.py
RECIPES = {
    "grpo_r1zero_qwen2.5-1.5b.yaml",
    "dapo_qwen2.5-7b.yaml",
    "delethink_r1distill-1.5b.yaml",
}


def _load_tpu():
    if "launch_tpu" in sys.modules:  # tests/launch loads it under the same name
        return sys.modules["launch_tpu"]
    spec = importlib.util.spec_from_file_location("launch_tpu", ROOT / "launch" / "tpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _header(path: Path) -> dict[str, str]:
    keys = "accelerator|devices|hosts|alt-accelerator|alt-devices|alt-hosts|alt-overrides"
    return {k: v.strip() for k, v in re.findall(rf"^# ({keys}): (.+)$", path.read_text(), re.M)}


def _targets():
    """(path, prefix) for the file's own target and, if it names one, its alt target."""
    out = []
    for path in CONFIGS:
        claim = _header(path)
        for prefix in ("", "alt-"):
            if f"{prefix}accelerator" in claim:
                out.append(
                    pytest.param(path, prefix, id=f"{path.stem}-{claim[prefix + 'accelerator']}")
                )
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_rl_config_loads(path):
    cfg = load_rl_config(path)  # the project's strict loader: keys, types, row divisibility
    assert cfg.steps > 0 and cfg.rows_per_step % cfg.algo.minibatches == 0
    combine(cfg.algo.rewards)  # reward names and params, as the loop checks them at start


def test_the_recipes_are_there_and_name_their_hardware():
    named = {p.name for p in CONFIGS if "accelerator" in _header(p)}
    assert named >= RECIPES, RECIPES - named


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name in RECIPES], ids=lambda p: p.name)
def test_recipe_lengths_and_rewards(path):
    cfg = load_rl_config(path)
    r, mk = cfg.rollout, cfg.rollout.markovian
    longest = MAX_PROMPT_TOKENS + (mk.chunk_size if mk.chunk_size else r.max_tokens)
    assert cfg.data.seq_len >= longest, (cfg.data.seq_len, longest)
    # the engine's cache is seq_len + 1 long, capped by the model's context
    preset = yaml.safe_load((ROOT / "configs" / "models" / f"{cfg.model.preset}.yaml").read_text())
    assert cfg.data.seq_len + 1 <= preset["max_seq_len"]
    if mk.chunk_size:
        m = mk.carryover if mk.carryover is not None else mk.chunk_size // 2
        budget = MarkovianConfig(mk.chunk_size, mk.keep_head, m - mk.keep_head, mk.max_chunks)
        assert r.max_tokens <= budget.max_trace_tokens(), "max_tokens past the chunk budget"
    overlong = cfg.algo.rewards.get("overlong")
    if overlong is not None:  # the soft punishment ramps up to where generation stops
        assert overlong["max_len"] == r.max_tokens
    if cfg.data.source != "task" and cfg.eval.num_examples:
        assert cfg.data.eval_paths, "evaluation on a file source reads data.eval_paths"
    # data.global_batch is unused by RL; the recipes set it to the rows of one update so the
    # SFT-side grad_accum check and the TPU launcher's worker split see the real number
    assert cfg.data.global_batch == cfg.rows_per_step // cfg.algo.minibatches


@pytest.mark.parametrize("path, prefix", _targets())
def test_recipe_mesh_and_rows_fit_the_accelerator(path, prefix):
    claim = _header(path)
    name = claim[f"{prefix}accelerator"]
    devices, hosts = int(claim[f"{prefix}devices"]), int(claim[f"{prefix}hosts"])
    overrides = claim.get(f"{prefix}overrides", "").split() if prefix else []
    cfg: RLConfig = load_rl_config(path, overrides)

    tpu = None
    if name in GPUS:
        assert (devices, hosts) == GPUS[name]
    else:
        tpu = _load_tpu()
        acc = tpu.accelerator(name)
        assert (acc.chips, acc.workers) == (devices, hosts)
        tpu.check_config(path, overrides, acc)  # the launcher's own pre-flight check agrees

    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        assert devices % rest == 0
        sizes[sizes.index(-1)] = devices // rest
    assert math.prod(sizes) == devices, (sizes, devices)

    # one update = rows_per_step / minibatches rows; every process builds all rows and feeds
    # its 1/hosts share as grad_accum microbatches; a microbatch splits over data x fsdp
    update = cfg.rows_per_step // cfg.algo.minibatches
    accum = cfg.optim.grad_accum
    assert update % hosts == 0 and (update // hosts) % accum == 0, (update, hosts, accum)
    assert (update // accum) % (sizes[0] * sizes[1]) == 0, (update, accum, sizes)

    if tpu is not None:
        assert cfg.model.attention_impl != "cudnn", "cudnn attention is for GPUs"
