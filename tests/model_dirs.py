"""Model directories the way users pass them to the CLI, built in seconds with no download.

A random tiny Qwen3 saved as a jreason checkpoint next to a sentencepiece tokenizer trained on
task text (byte fallback, ChatML and think tags as single tokens): what `generate`, `eval` and
`serve` tests load.
"""

import jax
import numpy as np

from jreason.data.tasks import get_task
from jreason.model import load_config
from jreason.model.store import save_model
from jreason.model.transformer import abstract_model
from jreason.tokenizer import load_tokenizer, train_sentencepiece


def tiny_chat_model(root, max_len: int = 128):
    """A jreason model dir (random tiny Qwen3 + a sentencepiece tokenizer trained on task text)."""
    task = get_task("arithmetic")
    lines = []
    for ex in task.generate(0, 200):
        lines += [ex.prompt, task.reference_completion(ex)]
    train_sentencepiece(lines, 384, root / "tok" / "tokenizer")
    tok = load_tokenizer(root / "tok" / "tokenizer.model")
    cfg = load_config("tiny-qwen3", [f"vocab_size={tok.vocab_size}", f"max_seq_len={max_len}"])
    # random weights drawn with numpy (jax's init compiles for seconds on a busy CPU): norm
    # scales 1, the rest N(0, 0.2) so greedy continuations are not all one token
    _, shapes = abstract_model(cfg)
    rng = np.random.default_rng(0)

    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(s.shape, s.dtype)
        return (0.2 * rng.standard_normal(s.shape)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    # two thirds of the vocab are byte-fallback pieces, which a random model then mostly
    # writes; shrinking their (tied) embeddings makes it write readable pieces, <think> and
    # <|im_end|> too, while byte pieces stay possible
    byte = np.array([tok.id_to_token(i).startswith("<0x") for i in range(tok.vocab_size)])
    params["embed"] = np.where(byte[:, None], params["embed"] * 0.5, params["embed"])
    return save_model(root / "model", cfg, params, tokenizer_dir=root / "tok")
