"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory layers to a Hugging Face causal LM, finetunes only the few memory value rows a
batch reads most (ranked by a KL or TF-IDF selector against background text), and compares that with
LoRA and full finetuning on three probes: MedMCQA accuracy (learning), WikiText perplexity and TriviaQA
accuracy (forgetting), with the paper's numbers as defaults; every section below lifts out with its imports.
Start with `python smf.py train --method smf --selector kl` and `python smf.py eval --probe all`; see --help.
"""
import argparse, contextlib, dataclasses, functools, glob, hashlib, inspect, io, json, math, os, random, shutil
import re, signal, statistics, sys, time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

# -----------------------------------------------------------------------------------------------------------
# Config

@dataclass
class MemoryConfig:
    layers: tuple = (6, 12, 18)   # 0-based decoder layers that get their own memory
    mode: str = "additive"        # "additive": mlp(x) + alpha*memory(x); "replacement": memory(x) instead of mlp
    n_keys: int = 128             # sub-keys per half; the memory holds n_keys**2 value rows
    heads: int = 4                # each head has its own two sub-key sets
    key_dim: int = 256            # query/key width, split into two halves of key_dim // 2
    topk: int = 16                # candidates per half, and rows read per head after re-ranking
    alpha_init: float = 0.01      # additive mode only: the learned per-layer scale starts here

@dataclass
class TrainConfig:  # the comments are the `train --help` texts
    method: str = "smf"           # retrofit (new memory, trained on background text) | smf | lora | full
    lr: float = None              # peak learning rate; default per method: retrofit/smf 5e-4, lora 2e-4, full 5e-5
    epochs: float = None          # passes over the training data; default 2 for retrofit, 3 for the others
    micro_batch: int = 4          # sequences per micro-batch (SMF picks top_t rows per micro-batch)
    grad_accum: int = 4           # micro-batches per optimizer step: effective batch 16 sequences
    forward_batch: int = None     # sequences per forward, k × micro_batch (default: a step); never changes the update
    max_len: int = 1024           # tokens per training sequence; longer texts are cut there
    warmup: int = 100             # optimizer steps of linear warm-up, then cosine decay to zero
    clip: float = 1.0             # largest gradient L2 norm per step (0: no clipping)
    weight_decay: float = 0.0     # per lr unit: decoupled under AdamW, added to the gradient under SGD
    optimizer: str = "adamw"      # adamw | sgd (Lin et al. use SGD with lr ~2 for SMF)
    selector: str = "kl"          # smf: how a micro-batch ranks the rows it read, against background text
    top_t: int = 512              # smf: rows updated per memory layer per micro-batch
    train_scale: bool = False     # smf: also train each layer's alpha (the "+scale" rows of the table)
    background_examples: int = 2000  # smf: background texts (one batch each) behind the selector's statistics
    lora_r: int = 16              # lora: rank of the update
    lora_alpha: float = 32.0      # lora: the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05    # lora: dropout probability on the LoRA input only
    max_steps: int = None         # stop after this many optimizer steps (the schedule is laid over them)
    limit_train: int = None       # use only the first N training examples; default 60,000 MedMCQA, all OASST1
    seed: int = 0                 # shuffles the data (and the MedMCQA subset) and seeds every initialisation

    def __post_init__(self):  # the two defaults that depend on the method, resolved in one place
        self.lr = self.lr or METHOD_LR[self.method]
        self.epochs = self.epochs or (2 if self.method == "retrofit" else 3)

@dataclass
class EvalConfig:  # the probes' data and settings; the comments are their --help texts
    eval_medmcqa: str = "openlifescienceai/medmcqa"  # MedMCQA probe (validation split): hub id or local file
    wikitext: str = "Salesforce/wikitext"            # WikiText probe (test split): hub id or local file
    wikitext_config: str = "wikitext-103-v1"         # hub config of --wikitext
    triviaqa: str = "mandarjoshi/trivia_qa"          # TriviaQA probe (rc.nocontext validation): hub id or local file
    medmcqa_mode: str = "answer"                     # score ' L. option text' (the paper's) or the letter alone
    limit: int = 1000                                # examples per probe (lines of WikiText)
    batch_size: int = 16                             # MedMCQA questions per forward (TriviaQA: 2x, WikiText: 1/2)

METHOD_LR = {"retrofit": 5e-4, "smf": 5e-4, "lora": 2e-4, "full": 5e-5}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line `error: what — how to fix`."""

def require(ok, message):
    """The user-facing assert: when `ok` is false the command stops with `message` as its one-line error."""
    if not ok:
        raise UserError(message)

# -----------------------------------------------------------------------------------------------------------
# Data: every source is a hub id by default or a local .jsonl/.json/.parquet/.txt file in the hub's schema

def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    return (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
            or path.endswith((".jsonl", ".json", ".parquet", ".txt")))

def read_rows(source, hub_config=None, split="train"):
    """Rows of a data source as a list of dicts. Local files are read here; hub ids go through `datasets`."""
    if not is_local(source):
        try:
            import datasets  # imported here so that `eval`/`bench` run where `datasets` is not installed
            return list(datasets.load_dataset(source, hub_config, split=split))
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — download it first, or pass "
                            "a local file in the same schema") from e
    path, kind = os.path.expanduser(source), source.rsplit(".", 1)[-1]
    if not os.path.isfile(path) or kind not in ("jsonl", "json", "parquet", "txt"):
        problem = "is a folder" if os.path.isdir(path) else "has an unknown format" if os.path.isfile(path) else \
            "does not exist"
        raise UserError(f"data file {source} {problem} — check the path; give a .jsonl, .json, .parquet or .txt file")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        with open(path, encoding="utf-8") as f:
            if kind == "txt":
                return [{"text": line} for line in f.read().split("\n")]
            data = [json.loads(line) for line in f if line.strip()] if kind == "jsonl" else json.load(f)
    except (ValueError, OSError, ImportError) as e:
        raise UserError(f"data file {source} could not be read ({e}) — is it complete and in that format?") from e
    data = data.get("data") if isinstance(data, dict) else data
    require(isinstance(data, list), f"data file {source} holds no list of rows — write a JSON list of objects, or "
            '{"data": [...]}')
    return data

def check_fields(rows, fields, source):
    """Every row is an object holding each field in `fields` (name -> type); at least one row is left."""
    for i, row in enumerate(rows):
        for name, kind in fields.items():
            value = row.get(name) if isinstance(row, dict) else None
            found = "no such field" if value is None else f"type {type(value).__name__}"
            require(isinstance(value, kind) and value is not None, f"{source}: row {i} has no '{name}' field of type "
                    f"{kind.__name__} ({found}) — the file must use the hub schema")
    require(rows, f"{source}: no examples left after filtering — check the file and the filters")

def answer_index(cop, where):
    """MedMCQA's `cop` as 0..3 (0 = opa). Files written by other tools may hold "2" or 2.0: read those too."""
    with contextlib.suppress(ValueError, TypeError):
        if not isinstance(cop, bool) and float(cop) in (0, 1, 2, 3):
            return int(float(cop))
    raise UserError(f"{where} has cop={cop!r} — cop must be an integer 0..3 (0 = opa)")

def load_medmcqa(source="openlifescienceai/medmcqa", split="validation", limit=None, seed=None):
    """Single-answer rows (`choice_type == "single"`, kept when absent), shuffled with `seed`, the first `limit`."""
    rows = [r for r in read_rows(source, None, split) if not isinstance(r, dict) or
            r.get("choice_type", "single") == "single"]
    check_fields(rows, dict.fromkeys(("question", "opa", "opb", "opc", "opd"), str) | {"cop": object}, source)
    rows = [{**r, "cop": answer_index(r["cop"], f"{source}: row {i}")} for i, r in enumerate(rows)]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit]

def medmcqa_prompt(row):
    """The training text up to and including `Answer:`; the model must continue it with ` {L}. {option}`."""
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\nB. {row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")

def medmcqa_answer(row, option, letter_only=False):
    return f" {'ABCD'[option]}" + ("" if letter_only else f". {row['op' + 'abcd'[option]]}")

def medmcqa_text(row):
    """One training example: prompt, gold answer, and the explanation line when there is one. No EOS is
    appended (the published code appends none): it would teach the model to stop early, which moves the
    TriviaQA probe for a reason that is not forgetting."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    return text + f"\nExplanation: {row['exp']}" if (row.get("exp") or "").strip() else text

def load_wikitext(source="Salesforce/wikitext", config="wikitext-103-v1", limit=1000):
    """The first `limit` stripped non-empty lines of the test split, joined by a blank line."""
    rows = read_rows(source, config, "test")
    check_fields(rows, {"text": str}, source)
    lines = [r["text"].strip() for r in rows if r["text"].strip()][:limit]
    check_fields(lines, {}, source)  # at least one line
    return "\n\n".join(lines)

def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split; aliases include the answer value."""
    rows = read_rows(source, "rc.nocontext", "validation")[:limit]
    check_fields(rows, {"question": str, "answer": dict}, source)
    out = []
    for i, r in enumerate(rows):
        aliases, value = r["answer"].get("aliases") or [], r["answer"].get("value") or ""
        require(isinstance(aliases, list) and all(isinstance(a, str) for a in aliases + [value]), f"{source}: row "
                f"{i} has answer aliases that are not a list of strings — the file must use the hub schema")
        aliases = aliases + [value] if value else aliases  # (a string would have become an alias per character)
        require(aliases, f"{source}: row {i} has no answer aliases — the file must use the hub schema")
        out.append((r["question"], aliases))
    return out

def load_background(source="OpenAssistant/oasst1", limit=None):
    """OASST1 English assistant replies ranked 0 or 1, at least 50 characters: the general-text corpus."""
    rows = read_rows(source, None, "train")
    check_fields(rows, {"text": str}, source)
    texts = [r["text"] for r in rows if r.get("lang", "en") == "en" and r.get("role", "assistant") == "assistant"
             and r.get("rank", 0) in (0, 1) and len(r["text"]) >= 50]
    check_fields(texts, {}, source)  # at least one text
    return texts[:limit]

def autocast(device):
    """bf16 autocast on a GPU (trainable weights stay fp32); plain fp32 on a CPU."""
    return torch.autocast("cuda", torch.bfloat16) if str(device).startswith("cuda") else contextlib.nullcontext()

def sync(device):
    """Waits for the GPU so that wall-clock timings are true; returns None so `sync(d) or t` reads as t."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()

def pad_batch(seqs, pad_id, left=False, device="cpu"):
    """(ids, mask), both (B, T): right padding for scoring, left padding for generation."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)

# -----------------------------------------------------------------------------------------------------------
# Memory layer: product keys (Lample et al. 2019) with the Memory+ output (Berges et al. 2024)

class ProductKeyMemory(nn.Module):
    """N = n_keys**2 value rows, looked up without scoring all N: each head splits its query in two halves,
    takes the top-k sub-keys of each half, re-ranks the k*k sums and reads the best k rows. Row index is
    i1 * n_keys + i2. Set `read_hook` to see the rows each token reads (counting them, as the selectors do)
    and, if it returns a mask, to let only those reads pass gradient to the values (how SMF trains few rows)."""

    def __init__(self, dim, n_keys=128, heads=4, key_dim=256, topk=16):
        super().__init__()
        assert key_dim % 2 == 0 and topk <= n_keys
        self.n_keys, self.heads, self.key_dim, self.topk = n_keys, heads, key_dim, topk
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.read_hook = None  # rows (M, H*k) -> None, or bool (M, H*k): the reads whose value rows may learn
        self.reset_parameters()

    def reset_parameters(self):
        dim = self.values.shape[1]
        nn.init.uniform_(self.keys, -self.key_dim ** -0.5, self.key_dim ** -0.5)
        nn.init.normal_(self.values, std=dim ** -0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=dim ** -0.5)
            nn.init.zeros_(lin.bias)

    def lookup(self, x):  # x (M, dim) -> scores (M, heads, topk), rows (M, heads, topk)
        """In fp32 even under bf16 autocast or bf16 weights (it costs M*H*2*n_keys*half multiply-adds): in
        bf16, rounding could let a padding or batch change alter which rows a token reads."""
        k, half = self.topk, self.key_dim // 2
        with torch.autocast(x.device.type, enabled=False):
            q = F.linear(x.float(), self.query.weight.float(), self.query.bias.float())
            q = q.view(-1, self.heads, 2, half)                                   # (M, H, 2, half)
            sub = torch.einsum("mhcd,hcnd->mhcn", q, self.keys.float())           # (M, H, 2, n_keys)
        sub_scores, sub_idx = sub.topk(k, dim=-1)                             # (M, H, 2, k)
        pair = sub_scores[:, :, 0, :, None] + sub_scores[:, :, 1, None, :]    # (M, H, k, k)
        scores, best = pair.flatten(2).topk(k, dim=-1)                        # (M, H, k)
        i1 = sub_idx[:, :, 0].gather(-1, best // k)
        i2 = sub_idx[:, :, 1].gather(-1, best % k)
        return scores, i1 * self.n_keys + i2

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        xf = x.reshape(-1, x.shape[-1])                                       # (M, dim)
        scores, rows = self.lookup(xf)
        weights = scores.float().softmax(dim=-1)                              # (M, H, k), each head sums to 1
        rows, weights = rows.flatten(1), weights.flatten(1).to(self.values.dtype)  # (M, H*k)
        keep = self.read_hook(rows.detach()) if self.read_hook is not None else None
        if keep is None:
            read = F.embedding_bag(rows, self.values, per_sample_weights=weights, mode="sum")
        else:  # weights*keep + weights*(1-keep) = weights: the same read; but the second bag reads detached
            # values, so only the kept reads pass gradient to value rows (all still pass it to keys and query)
            keep = keep.to(weights.dtype)                                        # (M, H*k), 1 = may learn
            read = (F.embedding_bag(rows, self.values, per_sample_weights=weights * keep, mode="sum")
                    + F.embedding_bag(rows, self.values.detach(), per_sample_weights=weights * (1 - keep), mode="sum"))
        out = self.w2(read.to(xf.dtype) * F.silu(self.w1(xf)))
        return out.view(x.shape)

# -----------------------------------------------------------------------------------------------------------
# Attaching memory or LoRA to a Hugging Face model whose decoder blocks are model.model.layers[i].mlp

class MemoryBlock(nn.Module):
    """Stands where a decoder layer's FFN stood and sees the same input (after the post-attention norm)."""

    def __init__(self, mlp, memory, mode, alpha_init=0.01):
        super().__init__()
        self.mlp = mlp if mode == "additive" else None  # replacement drops the FFN's weights
        self.memory = memory
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if mode == "additive" else None

    def forward(self, x):
        out = self.memory(x)
        return out if self.mlp is None else self.mlp(x) + self.alpha * out

def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    require(layers is not None and all(hasattr(layer, "mlp") for layer in layers), f"{type(model).__name__} has no "
            "model.model.layers[i].mlp — use a Qwen2/Llama/Mistral-style causal LM")
    return layers

def add_memory(model, cfg: MemoryConfig):
    """Puts a fresh fp32 ProductKeyMemory beside (or instead of) the FFN at each of cfg.layers."""
    layers = decoder_layers(model)
    require(cfg.mode in ("additive", "replacement"), f"memory mode {cfg.mode} is unknown — use additive/replacement")
    require(len(set(cfg.layers)) == len(cfg.layers), f"memory layers {list(cfg.layers)} name a layer twice — give "
            "each layer once")
    for i in cfg.layers:
        require(0 <= i < len(layers), f"memory layer {i} is out of range — the model has layers 0..{len(layers) - 1}")
        require(not memory_blocks(layers[i]), f"layer {i} already has memory — start from the base model, or train "
                "this checkpoint's memory with --method smf")
    device = next(model.parameters()).device
    for i in cfg.layers:
        memory = ProductKeyMemory(model.config.hidden_size, cfg.n_keys, cfg.heads, cfg.key_dim, cfg.topk)
        layers[i].mlp = MemoryBlock(layers[i].mlp, memory, cfg.mode, cfg.alpha_init).to(device)
    return memory_blocks(model)

def memory_blocks(model):
    return [m for m in model.modules() if isinstance(m, MemoryBlock)]

class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x), with A kaiming-uniform and B zero, so at init y = base(x)."""

    def __init__(self, base: nn.Linear, r=16, alpha=32.0, dropout=0.05):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the LoRA update: same outputs in eval mode, no overhead."""
        w = self.base.weight
        merged = nn.Linear(w.shape[1], w.shape[0], bias=self.base.bias is not None, device=w.device, dtype=w.dtype)
        merged.weight.copy_((w.float() + self.scale * self.lora_B.float() @ self.lora_A.float()).to(w.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

def add_lora(model, r=16, alpha=32.0, dropout=0.05, targets=LORA_TARGETS):
    """Wraps every nn.Linear whose attribute name is in `targets`; returns {module path: LoRALinear}."""
    wrapped = {}
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
                wrapped[f"{path}.{name}"] = getattr(parent, name)
    return wrapped

def merge_lora(model):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model

# -----------------------------------------------------------------------------------------------------------
# Checkpoints: small files on top of a parent model, swapped in whole, read back by load_model

def read_json(path):
    with open(path) as f:
        return json.load(f)

def write_atomic(path, text):
    """Writes a results file under a temporary name, then renames it: readers never see half a file."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}: {e.filename}) — choose a writable --out") from e

def sibling(out, suffix):
    """`.<name>.<suffix>` beside `out`, on its file system so that a rename moves it."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.{suffix}")

@contextlib.contextmanager
def replacing(out):
    """Yields an empty staging folder to build a checkpoint (and its training log) in. When the block ends
    without error, the staging folder replaces `out` by two renames with Ctrl-C blocked between them: `out`
    holds the old or the new checkpoint, whole, at every moment. A lock file keeps a second run out."""
    lock, staged, old = sibling(out, "lock"), sibling(out, "tmp"), sibling(out, "old")
    signals = {signal.SIGINT, signal.SIGTERM}  # blocked between the two renames below
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        with open(lock) as f:
            pid = int(f.read())
        os.kill(pid, 0)  # raises if that process is gone: its lock is stale and is taken over below
        raise UserError(f"another run (process {pid}) is writing {out} — wait for it, or choose another --out")
    with open(lock, "w") as f:
        f.write(str(os.getpid()))
    try:
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(staged):  # safetensors writes 0600: give the files the permissions of the rest
            os.chmod(os.path.join(staged, name), 0o666 & ~umask)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # a Ctrl-C waits until `out` is whole again
        try:
            if os.path.exists(out):
                os.rename(out, old)
            os.rename(staged, out)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(out):
                os.rename(old, out)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        os.remove(lock)

def save_checkpoint(folder, meta, tensors=None, model=None, tokenizer=None, extra=None):
    """`meta` (the kind: memory | smf | lora | full, the parent, every setting) goes into config.json as `smf`.
    Small kinds store `tensors` in weights.safetensors; `full` is a whole HF folder (model and tokenizer);
    `extra` maps more file names to tensors."""
    from safetensors.torch import save_file
    if model is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    for name, named in (({"weights.safetensors": tensors} if model is None else {}) | (extra or {})).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, os.path.join(folder, name))
    config = read_json(os.path.join(folder, "config.json")) if model is not None else {}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "smf": meta}, f, indent=2)

def checkpoint_meta(path):
    """The `smf` entry of a checkpoint's config.json, or None for a plain model or hub id."""
    config = os.path.join(path, "config.json")
    return read_json(config).get("smf") if os.path.isfile(config) else None

def parent_of(path, meta):
    """A checkpoint's parent: relative to the checkpoint first (the folders can move together), else as written."""
    parent = os.path.join(path, meta["parent"])
    return parent if os.path.isfile(os.path.join(parent, "config.json")) else meta["parent"]

def checkpoint_chain(path):
    """The local folders a model is built from: `path`, its parent, grandparent, ... (a hub id ends it)."""
    chain = []
    while is_local(path) and os.path.isfile(os.path.join(path, "config.json")) and path not in chain:
        chain.append(path)
        if (meta := checkpoint_meta(path)) is None or meta["kind"] == "full":
            break
        path = parent_of(path, meta)
    return chain

def check_out(out, start_model, overwrite):
    """Refuses, before anything runs, an --out whose replacement would destroy a model: the one this run
    starts from or any parent of it, a folder that is not an smf checkpoint, or (without --overwrite) one."""
    if os.path.realpath(out) in map(os.path.realpath, checkpoint_chain(start_model)):
        raise UserError(f"--out {out} is the model this run starts from, or one of its parents — choose a new folder")
    if os.path.isdir(out) and os.listdir(out):
        is_checkpoint = checkpoint_meta(out) and not any(os.path.isdir(f.path) for f in os.scandir(out))
        require(is_checkpoint, f"--out {out} holds files that are not an smf checkpoint — choose a new, empty folder")
        require(overwrite, f"--out {out} already holds a checkpoint — pass --overwrite to replace it (once the new "
                "one is complete), or choose a new folder")

def fingerprint(path):
    """sha256 of a local model's weight files (None for a hub id). A child checkpoint records its parent's, so
    loading it onto weights that changed since is an error rather than a silent mix."""
    if not (is_local(path) and os.path.isdir(path)):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")) and name != "background_stats.safetensors":
            with open(os.path.join(path, name), "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()

def smf_patch(before, trained):
    """What an SMF checkpoint stores of its `trained` tensors: of a value table only the rows that changed since
    `before` (as `<name>.index` and `<name>.rows`), anything else (alpha, with --train-scale) whole."""
    patch = {}
    for name, t in trained.items():
        if name in before:
            patch[f"{name}.index"] = index = (before[name] != t).any(dim=1).nonzero()[:, 0]
            patch[f"{name}.rows"] = t[index]
        else:
            patch[name] = t
    return patch

def load_model(path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes (parents loaded first)."""
    if is_local(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is neither a Hugging Face model nor an smf checkpoint (no config.json) — point "
                        "--model at the folder holding config.json" if os.path.isdir(path) else
                        f"model path {path} does not exist — check the path or give a hub id")
    meta = checkpoint_meta(path) if is_local(path) else None
    if meta is None or meta["kind"] == "full":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"could not load model '{path}' ({str(e).splitlines()[0][:150]}) — check the path, or "
                            "download the model while online") from e
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one
        return model.eval(), tokenizer
    parent = parent_of(path, meta)
    require(not is_local(parent) or os.path.isfile(os.path.join(parent, "config.json")), f"the parent "
            f"{meta['parent']} of {path} is missing — restore it, or train {path} again")
    require(meta.get("parent_sha256") in (None, fingerprint(parent)), f"the parent {meta['parent']} of {path} has "
            f"changed since it was trained — restore that parent, or train {path} again")
    model, tokenizer = load_model(parent, device, dtype)
    from safetensors.torch import load_file
    try:
        tensors = load_file(os.path.join(path, "weights.safetensors"), device=str(device))
    except Exception as e:
        raise UserError(f"{path}/weights.safetensors is missing or damaged ({type(e).__name__}) — train the "
                        "checkpoint again") from e
    if meta["kind"] == "memory":
        add_memory(model, MemoryConfig(**meta["memory"]))
    elif meta["kind"] == "lora":
        add_lora(model, meta["train"]["lora_r"], meta["train"]["lora_alpha"], 0.0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():  # whole tensors, or smf_patch's changed rows of a value table
            name = key.removesuffix(".rows").removesuffix(".index")
            require(name in params and (key != name or params[name].shape == t.shape), f"{path}: {key} does not "
                    "fit the model it builds on — train the checkpoint again")
            if key.endswith(".rows"):
                params[name][tensors[f"{name}.index"]] = t.to(dtype)
            elif key == name:
                params[name].copy_(t)
    return merge_lora(model).to(dtype).eval(), tokenizer

# -----------------------------------------------------------------------------------------------------------
# Row selection (per memory layer): which value rows a micro-batch may update

@dataclass
class BackgroundStats:
    df: torch.Tensor      # (N,) background batches that read row i at least once
    reads: torch.Tensor   # (N,) total background reads of row i
    batches: int          # B, the number of background batches

def tfidf_scores(counts, background: BackgroundStats):
    """(c_i / sum c) * ln((B + 1) / (df_i + 1)): read often now, by few background batches.
    counts (N,) for one micro-batch, or (G, N) for G of them."""
    tf = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    return tf * torch.log((background.batches + 1) / (background.df.double() + 1))

def kl_scores(counts, background: BackgroundStats):
    """p_i ln(p_i / q_i): row i's term of KL(batch reads || add-one-smoothed background reads)."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    q = (background.reads.double() + 1) / (background.reads.double() + 1).sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))

def select_rows(scores, counts, top_t):
    """Boolean mask of the top_t accessed rows by score, ties broken by lower row index; unaccessed rows are
    never chosen. scores, counts: (N,) or (G, N), one row of choices per micro-batch."""
    scores = torch.where(counts > 0, scores, torch.full_like(scores, -math.inf))
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_t]  # stable: index order
    return torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, best, (counts > 0).gather(-1, best))

def token_groups(mask, group_size):
    """(B*T,) the group of each token (sequence index // group_size), -1 for pads: micro-batches in training,
    single examples for the background statistics."""
    group = torch.arange(mask.shape[0], device=mask.device)[:, None] // group_size
    return group.expand_as(mask).masked_fill(mask == 0, -1).flatten()

def count_reads(rows, group, n_groups, n_rows):
    """(n_groups, n_rows) how often the tokens of each group read each row; pads (group -1) never count."""
    real = (group >= 0)[:, None].expand_as(rows)
    key = group.clamp(min=0)[:, None] * n_rows + rows
    counts = torch.bincount(key.flatten(), weights=real.flatten().float(), minlength=n_groups * n_rows)
    return counts.view(n_groups, n_rows).long()

@torch.no_grad()
def select_reads(rows, group, n_groups, background, score_fn, top_t):
    """SMF's choice inside one forward pass that holds several micro-batches: each micro-batch chooses its
    top_t rows, and a read may pass gradient to its value row only if its own micro-batch chose that row.
    rows (M, S): rows read by each token; group (M,): the token's micro-batch, -1 for pads.
    Returns keep (M, S) bool and the chosen rows as a (n_groups, N) mask. No host sync: it runs mid-forward."""
    counts = count_reads(rows, group, n_groups, background.df.shape[0])                  # (G, N)
    chosen = select_rows(score_fn(counts, background), counts, top_t)
    return chosen[group.clamp(min=0)[:, None], rows] & (group >= 0)[:, None], chosen

def gate_reads(rows, step_chosen, **select):
    """The read hook SMF installs in a memory layer for one forward pass (its inputs bound by the caller):
    select_reads, plus the rows any micro-batch chose added to `step_chosen` (N,) for the optimizer."""
    keep, chosen = select_reads(rows, **select)
    step_chosen |= chosen.any(0)
    return keep

def add_background_reads(rows, group, n_examples, stats):
    """The read hook behind background_stats: df counts the examples that read a row, not the reads."""
    counts = count_reads(rows, group, n_examples, stats.df.shape[0])                   # (examples, N)
    stats.reads += counts.sum(0).cpu()
    stats.df += (counts > 0).sum(0).cpu()

@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_size=16, device="cpu"):
    """df, total reads and B for each memory layer, from the model in eval mode with one example per batch
    (examples are run `batch_size` at a time, but each counts as its own background batch)."""
    blocks = memory_blocks(model)
    n = blocks[0].memory.values.shape[0]
    stats = [BackgroundStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), len(texts))
             for _ in blocks]
    model.eval()
    for start in tqdm(range(0, len(texts), batch_size), desc="background stats"):
        ids, mask = pad_batch([tokenizer(t)["input_ids"][:max_len] for t in texts[start:start + batch_size]],
                              tokenizer.pad_token_id, device=device)
        for b, s in zip(blocks, stats):
            b.memory.read_hook = functools.partial(add_background_reads, group=token_groups(mask, 1),
                                                   n_examples=len(ids), stats=s)
        with autocast(device):
            model(input_ids=ids, attention_mask=mask)
    for b in blocks:
        b.memory.read_hook = None
    return stats

def stats_tensors(stats):
    """The content of background_stats.safetensors; read_background_stats reads it back."""
    return {"batches": torch.tensor(stats[0].batches)} | {f"{j}.{k}": getattr(s, k).cpu() for j, s in
                                                          enumerate(stats) for k in ("df", "reads")}

def read_background_stats(path, model):
    from safetensors.torch import load_file
    blocks = memory_blocks(model)
    n_layers, n_rows = len(blocks), blocks[0].memory.values.shape[0]
    try:
        t = load_file(path)
        stats = [BackgroundStats(t[f"{j}.df"], t[f"{j}.reads"], int(t["batches"])) for j in range(n_layers)]
    except Exception as e:
        raise UserError(f"background statistics {path} could not be read ({type(e).__name__}: {e}) — drop "
                        "--background-stats to compute them") from e
    if len(t) != 1 + 2 * n_layers or any(s.df.shape != (n_rows,) or s.reads.shape != (n_rows,) for s in stats):
        raise UserError(f"background statistics {path} are for another memory (this one has {n_layers} layers of "
                        f"{n_rows} rows) — drop --background-stats to compute them")
    return stats

# -----------------------------------------------------------------------------------------------------------
# Training: one plain loop for every method

def get_lr(step, total, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

def length_grouped_batches(lengths, batch, rng):
    """Shuffled batches of similar lengths, so padding wastes little: sort within random chunks of 64
    batches, cut, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = 64 * batch
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch] for i in range(0, len(part), batch)]
    rng.shuffle(batches)
    return batches

class RowSparseAdamW:
    """AdamW (or SGD) that updates only the given rows of 2-D parameters. The moments and step count of a row
    change only when it is selected, so rows chosen earlier never drift (masking the gradient of a dense
    AdamW would keep moving them through their stale moments)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sgd=False):
        self.params, self.betas, self.eps, self.wd, self.sgd = list(params), betas, eps, weight_decay, sgd
        self.state = [None] * len(self.params)

    @torch.no_grad()
    def step(self, rows_per_param, grads_per_param, lr):
        """rows: (R,) distinct row indices of each parameter; grads: (R, dim), those rows' gradients."""
        for i, (p, rows, g) in enumerate(zip(self.params, rows_per_param, grads_per_param)):
            g = g.float()
            w = p.index_select(0, rows).float()
            if self.sgd:  # weight decay as torch.optim.SGD applies it: added to the gradient
                p.index_copy_(0, rows, (w - lr * (g + self.wd * w)).to(p.dtype))
                continue
            if self.state[i] is None:
                self.state[i] = (torch.zeros_like(p, dtype=torch.float), torch.zeros_like(p, dtype=torch.float),
                                 torch.zeros(p.shape[0], device=p.device))
            m, v, t = self.state[i]
            (b1, b2), t_r = self.betas, t[rows] + 1                # (R,) per-row step counts
            m_r = b1 * m.index_select(0, rows) + (1 - b1) * g
            v_r = b2 * v.index_select(0, rows) + (1 - b2) * g * g
            m.index_copy_(0, rows, m_r), v.index_copy_(0, rows, v_r), t.index_copy_(0, rows, t_r)
            update = (m_r / (1 - b1 ** t_r)[:, None]) / ((v_r / (1 - b2 ** t_r)[:, None]).sqrt() + self.eps)
            p.index_copy_(0, rows, (w * (1 - lr * self.wd) - lr * update).to(p.dtype))

def clip_grads(grads, max_norm):
    """Scales the gradients in place so that their joint L2 norm is at most max_norm (0: no clipping)."""
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if max_norm:
        for g in grads:
            g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return float(norm)

def train(model, tokenizer, texts, cfg: TrainConfig, background=None, device="cpu", log_path=None,
          record_selected=False):
    """Trains `model` in place on `texts`. Which parameters train is already set (requires_grad) by the
    caller; for SMF, `background` holds one BackgroundStats per memory layer. Returns the per-step history."""
    smf = cfg.method == "smf"
    blocks = memory_blocks(model) if smf else []
    values = [b.memory.values for b in blocks]
    alphas = [b.alpha for b in memory_blocks(model) if b.alpha is not None]  # logged each step
    dense = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in values)]
    lr_peak, sgd = cfg.lr, cfg.optimizer == "sgd"
    dense_opt = (torch.optim.SGD(dense, lr=lr_peak, weight_decay=cfg.weight_decay) if sgd else torch.optim.AdamW(
        dense, lr=lr_peak, weight_decay=cfg.weight_decay, fused=str(device).startswith("cuda"))) if dense else None
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=sgd)
    background = [BackgroundStats(s.df.to(device), s.reads.to(device), s.batches) for s in background or []]

    # The texts as they are, cut at max_len; no EOS (see medmcqa_text). A text of one token has no target.
    examples = [e for e in (tokenizer(t)["input_ids"][: cfg.max_len] for t in texts[: cfg.limit_train]) if len(e) > 1]
    require(examples, "no training text has two tokens or more — check the training data")
    rng, seqs_per_step = random.Random(cfg.seed), cfg.micro_batch * cfg.grad_accum
    total = math.ceil(cfg.epochs * math.ceil(len(examples) / seqs_per_step))
    total = min(total, cfg.max_steps or total)
    if cfg.warmup >= total:
        print(f"warning: warm-up ({cfg.warmup} steps) >= all {total} steps: the lr never reaches {lr_peak:g} and "
              "this run learns little — lower --warmup or train longer", file=sys.stderr)
    score_fn = kl_scores if cfg.selector == "kl" else tfidf_scores
    queue, history, log = [], [], open(log_path, "w", buffering=1) if log_path else None  # line-buffered
    model.train()
    bar = tqdm(range(total), desc=f"train {cfg.method}")
    for step in bar:
        if not queue:  # a new seeded shuffle at each epoch boundary
            queue = length_grouped_batches([len(e) for e in examples], seqs_per_step, rng)
        batch = queue.pop(0)  # one optimizer step: grad_accum micro-batches of similar lengths
        n_targets = sum(len(examples[i]) - 1 for i in batch)  # the loss is normalised over the whole step
        t0, loss_sum, n_tokens = time.perf_counter(), 0.0, sum(len(examples[i]) for i in batch)
        step_chosen = [torch.zeros(v.shape[0], dtype=torch.bool, device=v.device) for v in values]  # SMF
        forward_batch = cfg.forward_batch or seqs_per_step  # several micro-batches per forward: same gradient
        for c in range(0, len(batch), forward_batch):
            ids, mask = pad_batch([examples[i] for i in batch[c:c + forward_batch]], tokenizer.pad_token_id,
                                  device=device)
            for j, b in enumerate(blocks):  # this pass's token groups, bound in: the hook runs inside layer j
                b.memory.read_hook = functools.partial(
                    gate_reads, step_chosen=step_chosen[j], group=token_groups(mask, cfg.micro_batch),
                    n_groups=math.ceil(len(ids) / cfg.micro_batch), background=background[j], score_fn=score_fn,
                    top_t=cfg.top_t)
            with autocast(device):
                logits = model(input_ids=ids, attention_mask=mask).logits               # (B, T, vocab)
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                  # pads never count
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / n_targets
            require(torch.isfinite(loss), f"the loss became {loss.item()} at step {step + 1} — lower --lr or check "
                    "the data; no checkpoint was written by this run")
            loss.backward()
            loss_sum += loss.item()
        union = [c.nonzero()[:, 0] for c in step_chosen]  # rows chosen by any micro-batch, per memory layer
        union_grads = [v.grad.index_select(0, u) for v, u in zip(values, union)]
        for v in values:
            v.grad = None
        grad_norm = clip_grads([p.grad for p in dense if p.grad is not None] + union_grads, cfg.clip)
        lr = get_lr(step, total, lr_peak, cfg.warmup)
        if dense_opt:
            for param_group in dense_opt.param_groups:
                param_group["lr"] = lr
            dense_opt.step()
        sparse_opt.step(union, union_grads, lr)
        for p in dense:
            p.grad = None
        step_time = sync(device) or time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
                  "tokens": n_tokens, "tokens_per_s": n_tokens / step_time}
        if alphas:  # the additive memory's reach, and its values' gradient, scale with alpha: worth watching
            record["alpha"] = [round(a.item(), 6) for a in alphas]
        if smf:
            record["rows_updated"] = [len(u) for u in union]
        if log:  # JSON has no NaN: a non-finite number is written as null
            log.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                  for k, v in record.items()}) + "\n")
        history.append(record | ({"selected": [u.cpu() for u in union]} if record_selected else {}))
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    for b in blocks:
        b.memory.read_hook = None
    if log:
        log.close()
    model.eval()
    return history

def prepare_model(model, method, mem_cfg=None, lora_cfg=None, train_scale=False, device="cpu"):
    """Adds what the method trains and freezes the rest: retrofit = every memory tensor; smf = the value
    tables (+ alpha with train_scale); lora = A and B; full = everything. On a GPU the frozen weights are
    kept in bf16 (they only ever run under bf16 autocast) and the trainable ones in fp32."""
    if method == "retrofit":
        add_memory(model, mem_cfg)
    blocks = memory_blocks(model)
    require(blocks or method not in ("retrofit", "smf"), "the model has no memory layers — smf trains from a "
            "retrofit checkpoint (--method retrofit)")
    require(not (method == "smf" and train_scale and blocks[0].alpha is None), "--train-scale needs additive memory "
            "— replacement memory has no alpha")
    model.requires_grad_(method == "full")
    if method == "lora":
        add_lora(model, *lora_cfg)  # A and B are created trainable
    for b in blocks if method in ("retrofit", "smf") else []:
        b.memory.requires_grad_(method == "retrofit")
        b.memory.values.requires_grad_(True)
        if b.alpha is not None:
            b.alpha.requires_grad_(method == "retrofit" or train_scale)
    model.to(device)
    for p in model.parameters():
        p.data = p.data.float() if p.requires_grad or not str(device).startswith("cuda") else p.data.bfloat16()
    return model

# -----------------------------------------------------------------------------------------------------------
# Evaluation: zero-shot, no chat template, greedy; batched so that the batch size never changes an answer

def cache_kwargs(model, cache):
    """The KV-cache argument under its name in this transformers version (`cache` from 5.2x, else `past_key_values`)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}

@torch.no_grad()
def eval_medmcqa(model, tokenizer, rows, letter_only=False, batch_size=16):
    """Accuracy of argmax over the 4 options of the mean per-token log-likelihood of ` {L}. {option}` after
    the prompt. The mean (not the sum) keeps long options from being penalised for their length; the letter
    mode scores ` A`..` D` alone. Each prompt runs once and its KV cache serves all four continuations."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    prompts, options = [], []  # token ids: one prompt and four continuations per question
    for row in rows:
        prompt = tokenizer(medmcqa_prompt(row))["input_ids"]
        for option in range(4):
            ids = tokenizer(medmcqa_prompt(row) + medmcqa_answer(row, option, letter_only))["input_ids"]
            assert ids[:len(prompt)] == prompt, "the prompt must tokenize as a prefix of prompt + answer"
            options.append(ids[len(prompt):])
        prompts.append(prompt)
    scores = []
    for s in tqdm(range(0, len(rows), batch_size), desc="medmcqa"):
        p_ids, p_mask = pad_batch(prompts[s:s + batch_size], tokenizer.pad_token_id, left=True, device=device)
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)                                     # (Q, P)
        cache = DynamicCache()
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache))
        after_prompt = out.logits[:, -1].float().log_softmax(-1)                         # (Q, vocab)
        cache.batch_repeat_interleave(4)
        c_ids, c_mask = pad_batch(options[4 * s:4 * (s + batch_size)], tokenizer.pad_token_id, device=device)
        c_pos = p_pos[:, -1:].repeat_interleave(4, 0) + 1 + torch.arange(c_ids.shape[1], device=device)
        mask = torch.cat([p_mask.repeat_interleave(4, 0), c_mask], dim=1)
        logits = model(input_ids=c_ids, attention_mask=mask, position_ids=c_pos, use_cache=True,
                       **cache_kwargs(model, cache)).logits.float()                        # (4Q, C, vocab)
        rest = logits[:, :-1].log_softmax(-1).gather(-1, c_ids[:, 1:, None])[..., 0]     # (4Q, C - 1)
        first_lp = after_prompt.gather(-1, c_ids[:, 0].view(-1, 4)).view(-1, 1)           # (4Q, 1)
        token_lp = torch.cat([first_lp, rest], dim=1)                                      # (4Q, C)
        scores += ((token_lp * c_mask).sum(1) / c_mask.sum(1)).tolist()                 # mean over real tokens
    preds = torch.tensor(scores).view(-1, 4).argmax(-1).tolist()
    correct = sum(p == row["cop"] for p, row in zip(preds, rows))
    return {"acc": correct / len(rows), "n": len(rows), "predictions": preds,
            "scores": [scores[i:i + 4] for i in range(0, len(scores), 4)],
            "protocol": f"zero-shot, mean log-likelihood of {'letter' if letter_only else 'letter + option text'}"}

@torch.no_grad()
def eval_wikitext(model, tokenizer, text, window=1024, stride=512, batch_size=8):
    """Token perplexity with a sliding window: each window starts `stride` after the last and scores only the
    tokens no earlier window scored, so every token but the first (which has no context) counts once."""
    device = next(model.parameters()).device
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 2, "perplexity needs at least two tokens"
    spans, start, scored_to = [], 0, 1  # (window start, window end, first token this window scores)
    while True:
        end = min(start + window, len(ids))
        spans.append((start, end, scored_to))
        scored_to = end
        if end == len(ids):
            break
        start += stride
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(spans), batch_size), desc="wikitext"):
        chunk = spans[b:b + batch_size]  # left padding puts every window's scored tokens at the end
        x, mask = pad_batch([ids[s:e] for s, e, _ in chunk], tokenizer.pad_token_id, left=True, device=device)
        n_logits = max(e - scored_from for _, e, scored_from in chunk) + 1  # only where a scored token is predicted
        logits = model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=n_logits).logits[:, :-1].float()                   # (B, n_logits - 1, vocab)
        token_lp = logits.gather(-1, x[:, 1 - n_logits:, None])[..., 0] - logits.logsumexp(-1)
        for i, (s, e, scored_from) in enumerate(chunk):
            nll -= token_lp[i, scored_from - e:].double().sum().item()
            count += e - scored_from
    assert count == len(ids) - 1
    return {"ppl": math.exp(nll / count), "tokens": count,
            "protocol": f"token perplexity, window {window}, stride {stride}"}

def normalize_answer(s):
    """TriviaQA normalisation: lower case, drop articles, keep [a-z0-9 .-], collapse spaces."""
    s = re.sub(r"\b(a|an|the)\b", " ", s.lower())
    return " ".join(re.sub(r"[^a-z0-9 .\-]", " ", s).split())

def alias_contained(prediction, aliases):
    """The paper's metric: some normalised alias occurs inside the normalised generation."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))

def exact_match(prediction, aliases):
    """The stricter metric: the generation up to its first newline, period or comma equals an alias."""
    answer = normalize_answer(re.split(r"[\n.,]", prediction, maxsplit=1)[0])
    return answer != "" and answer in {normalize_answer(a) for a in aliases}

@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=32):
    """Greedy continuations of a batch of prompts: left padding, positions counted from each prompt's first
    real token, and a KV cache, so every row decodes as it would alone."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, left=True, device=device)
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                                              # (B, T)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1).masked_fill(done, tokenizer.pad_token_id)         # (B,)
        out.append(nxt)
        done |= nxt == tokenizer.eos_token_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache_kwargs(model, cache)).logits
    eos = tokenizer.eos_token_id
    rows = [row[:row.index(eos)] if eos in row else row for row in torch.stack(out, 1).tolist()]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]

def eval_triviaqa(model, tokenizer, rows, batch_size=32, max_new_tokens=32):
    """Alias-containment accuracy (the paper's) and exact match, both from one greedy generation per question.
    Questions are batched by prompt length to waste little padding; answers do not depend on the batching."""
    prompts = [f"Question: {q}\nAnswer:" for q, _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    preds = [None] * len(rows)
    for b in tqdm(range(0, len(rows), batch_size), desc="triviaqa"):
        idx = order[b:b + batch_size]
        for i, text in zip(idx, greedy_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens)):
            preds[i] = text
    contained = [alias_contained(p, a) for p, (_, a) in zip(preds, rows)]
    exact = [exact_match(p, a) for p, (_, a) in zip(preds, rows)]
    return {"alias_contains_acc": sum(contained) / len(rows), "exact_match": sum(exact) / len(rows), "n": len(rows),
            "predictions": preds, "protocol": f"zero-shot greedy, {max_new_tokens} new tokens"}

# -----------------------------------------------------------------------------------------------------------
# Commands: train, eval, bench, table

PROBES = ("medmcqa", "wikitext", "triviaqa")
RETROFIT_CARRIES = ("model", "seed", "device", "micro_batch", "grad_accum", "forward_batch", "max_len", "background",
                    "debug") + tuple(f"memory_{f.name}" for f in dataclasses.fields(MemoryConfig))

def memory_config(args):
    """The MemoryConfig that the --memory-* flags describe."""
    return MemoryConfig(**{f.name: getattr(args, f"memory_{f.name}") for f in dataclasses.fields(MemoryConfig)})

def load_probes(args, names=PROBES):
    """Every probe's data, read before any model loads, so that a wrong source fails in seconds."""
    loaders = {"medmcqa": lambda: load_medmcqa(args.eval_medmcqa, "validation", args.limit),
               "wikitext": lambda: load_wikitext(args.wikitext, args.wikitext_config, args.limit),
               "triviaqa": lambda: load_triviaqa(args.triviaqa, args.limit)}
    data = {}
    for name in names:
        try:
            data[name] = loaders[name]()
        except UserError as e:  # name the flag to change
            raise UserError(f"--{'eval-medmcqa' if name == 'medmcqa' else name}: {e}") from e
    return data

def retrofit_first(args, mem_cfg):
    """The one-liner `train --method smf` from a model without memory retrofits it first into <out>_retrofit
    with the retrofit recipe, or reuses the retrofit there if it was made from the same model and memory."""
    out = args.out.rstrip("/") + "_retrofit"
    if os.path.isdir(out) and (meta := checkpoint_meta(out) or {}).get("kind") == "memory":
        path = lambda p: os.path.realpath(p) if is_local(p) else p
        wanted = {"base model": path(args.model), **json.loads(json.dumps(dataclasses.asdict(mem_cfg)))}
        found = {"base model": path(parent_of(out, meta)), **meta["memory"]}
        for key in wanted:
            require(found[key] == wanted[key], f"the retrofit {out} has {key} {found[key]}, this run asks for "
                    f"{wanted[key]} — move it away to retrofit again, or choose another --out")
        print(f"reusing the retrofit checkpoint {out}")
        return out
    print(f"{args.model} has no memory layers: retrofitting it first into {out}, with the retrofit recipe")
    retrofit = build_parser().parse_args(["train", "--method", "retrofit", "--out", out])
    retrofit.__dict__.update({name: getattr(args, name) for name in RETROFIT_CARRIES})
    check_args(retrofit)
    run_train(retrofit, args.device)
    return out

def run_train(args, device):
    """Checks all it can first (--out, memory, data, probes), trains in a staging folder that holds the log too,
    swaps the checkpoint in, prints a summary, and evaluates the checkpoint when --eval-out is given."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    mem_cfg, method = memory_config(args), cfg.method
    check_out(args.out, args.model, args.overwrite)
    memory = next((m["memory"] for m in map(checkpoint_meta, checkpoint_chain(args.model)) if m and m["kind"] ==
                   "memory"), None)  # the settings of the retrofit the model is built on, if any
    require(not memory or method not in ("retrofit", "full"), f"{args.model} already has memory layers — {method} "
            "starts from a model without memory; train this one with --method smf")
    n_rows = (memory or dataclasses.asdict(mem_cfg))["n_keys"] ** 2
    require(method != "smf" or cfg.top_t <= n_rows, f"--top-t {cfg.top_t} is larger than the memory — it has "
            f"{n_rows} rows")
    texts = load_background(args.background, cfg.limit_train) if method == "retrofit" else \
        [medmcqa_text(r) for r in load_medmcqa(args.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)]
    probes = load_probes(args) if args.eval_out else None
    parent = retrofit_first(args, mem_cfg) if method == "smf" and not memory else args.model
    parent_stats = os.path.join(parent, "background_stats.safetensors")  # made by the retrofit, passed down
    stats_file = args.background_stats or (parent_stats if method == "smf" and os.path.isfile(parent_stats) else None)
    bg_texts = load_background(args.background, cfg.background_examples) if method == "retrofit" or (
        method == "smf" and not stats_file) else None
    selection, lora = ("selector", "top_t", "train_scale"), ("lora_r", "lora_alpha", "lora_dropout")
    skip = {"retrofit": selection + lora, "smf": lora, "lora": selection + ("background_examples",)}.get(
        method, selection + lora + ("background_examples",))  # record only the settings that apply
    import transformers
    meta = {"kind": {"retrofit": "memory"}.get(method, method), "method": method, "seed": cfg.seed,
            "parent": os.path.relpath(parent, args.out) if is_local(parent) else parent,
            "parent_sha256": fingerprint(parent), "train": {k: v for k, v in vars(cfg).items() if k not in skip},
            "data": {"train": args.background if method == "retrofit" else args.medmcqa,
                     **({"background": stats_file or args.background} if method in ("retrofit", "smf") else {})},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            **({"memory": dataclasses.asdict(mem_cfg)} if method == "retrofit" else {})}
    try:
        with replacing(args.out) as staged:  # the log is written beside the new checkpoint
            t0 = time.time()
            torch.manual_seed(cfg.seed)
            model, tokenizer = load_model(parent, device)
            prepare_model(model, method, mem_cfg, (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout), cfg.train_scale,
                          device)
            trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
            if method == "smf":
                stats = read_background_stats(stats_file, model) if stats_file else \
                    background_stats(model, tokenizer, bg_texts, cfg.max_len, device=device)
                before = {name: p.detach().clone() for name, p in trained.items() if name.endswith(".values")}
            history = train(model, tokenizer, texts, cfg, stats if method == "smf" else None, device,
                            os.path.join(staged, "train_log.jsonl"))
            meta["train"]["total_steps"] = len(history)
            if method == "retrofit":  # and its background statistics: every SMF run from it shares them
                stats = background_stats(model, tokenizer, bg_texts, cfg.max_len, device=device)
            extra = {"background_stats.safetensors": stats_tensors(stats)} if method in ("retrofit", "smf") else None
            save_checkpoint(staged, meta, smf_patch(before, trained) if method == "smf" else trained,
                            model if method == "full" else None, tokenizer, extra)
    except OSError as e:
        raise UserError(f"cannot write to {args.out} ({e.strerror}: {e.filename}) — choose a writable --out") from e
    size, last = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out)), history[-1]
    print(f"\n== {method} finished: {len(history)} steps, {sum(h['tokens'] for h in history):,} tokens, "
          f"{time.time() - t0:.0f}s, final loss {last['loss']:.4f}\n"
          f"   checkpoint {args.out} ({size / 2 ** 20:.1f} MB, kind {meta['kind']}, parent {meta['parent']})\n"
          f"   log        {os.path.join(args.out, 'train_log.jsonl')}"
          + (f"\n   rows updated per layer in the last step {last['rows_updated']}" if "rows_updated" in last else "")
          + (f"\n   alpha per layer {last['alpha']}" if "alpha" in last else "")
          + f"\n   evaluate:  python smf.py eval --model {args.out} --probe all")
    if args.eval_out:  # evaluate the checkpoint as load_model reads it, in this process
        run_eval(argparse.Namespace(**{**vars(args), "model": args.out, "out": args.eval_out, "add_memory": False,
                                       "probe": "all"}), device, probes)
    return model

def run_eval(args, device, probes=None):
    """Evaluates --model on the chosen probes, prints one line per probe, and writes the results JSON (with
    the probes that finished, and `unfinished`, if one fails)."""
    names = PROBES if args.probe == "all" else (args.probe,)
    probes = probes or load_probes(args, names)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model, tokenizer = load_model(args.model, device, dtype)
    if args.add_memory:  # untrained memory, e.g. to check that alpha = 0.01 barely moves the probes
        add_memory(model, memory_config(args))
        model.to(dtype)
    evaluate = {"medmcqa": lambda rows: eval_medmcqa(model, tokenizer, rows, args.medmcqa_mode == "letter",
                                                     args.batch_size),
                "wikitext": lambda text: eval_wikitext(model, tokenizer, text, batch_size=max(1, args.batch_size // 2)),
                "triviaqa": lambda rows: eval_triviaqa(model, tokenizer, rows, 2 * args.batch_size)}
    results = {"model": args.model}
    try:
        for probe in names:
            t0, r = time.time(), evaluate[probe](probes[probe])
            metrics = " ".join(f"{k} {r[k]:.4f}" for k in ("acc", "ppl", "alias_contains_acc", "exact_match") if k in r)
            print(f"{probe:9s} {metrics}  n={r.get('n', r.get('tokens'))}  ({r['protocol']}; {time.time() - t0:.1f}s)")
            results[probe] = r
    finally:
        unfinished = [n for n in names if n not in results]
        if args.out and len(results) > 1:
            write_atomic(args.out, json.dumps(results | ({"unfinished": unfinished} if unfinished else {}), indent=2))
            print(f"wrote {args.out}" + (f" without {', '.join(unfinished)}" if unfinished else ""))
    return results

SHAPES = {  # random-weight models for `bench`: the real Qwen2.5-0.5B dimensions, and a small one
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}

def toy_tokenizer(texts, vocab_size=512):
    """A byte-level BPE trained on `texts` with Qwen's special tokens: for tests and `bench`, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>",
                            "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")

class IdsTokenizer:
    """Stands in for a tokenizer when `bench` trains on made-up token ids (given as the `texts`)."""
    eos_token_id = pad_token_id = 0
    __call__ = staticmethod(lambda ids: {"input_ids": list(ids)})

def timed(fn, device, repeats=3):
    """Seconds per call of fn, after one warm-up call, quietly (no progress bars between bench's rows)."""
    with contextlib.redirect_stderr(io.StringIO()):
        fn()
        t0 = sync(device) or time.perf_counter()
        for _ in range(repeats):
            fn()
        return (sync(device) or time.perf_counter() - t0) / repeats

def run_bench(args, device):
    """Training steps of every method on random tokens, the memory layer against the FFN, and eval speed."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config
    import resource
    cuda, B, T = str(device).startswith("cuda"), args.batch_size, args.seq_len
    config = AutoConfig.from_pretrained(args.model) if args.model else Qwen2Config(**SHAPES[args.shape],
                                                                                   max_position_embeddings=max(4096, T))

    def make_model():  # the named weights with --model (unless --random-init), else random ones
        if args.model and not args.random_init:
            return load_model(args.model, device)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config), None
    L, d = config.num_hidden_layers, config.hidden_size
    mem_cfg, n = MemoryConfig(layers=tuple(sorted({L // 4, L // 2, 3 * L // 4}))), 128 ** 2   # layers 6, 12, 18 of 24
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if k in gpu), None)
    flops_per_token = 6 * sum(p.numel() for p in make_model()[0].parameters()) + 12 * L * d * T  # plain transformer
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, config.vocab_size, (T,), generator=g).tolist() for _ in range(B * (args.steps + 2))]
    background = [BackgroundStats(torch.randint(0, 50, (n,), device=device), torch.randint(0, 500, (n,), device=device),
                                  2000) for _ in mem_cfg.layers]
    micro, tokens_per_s = math.gcd(4, B), {}  # SMF's micro-batches of 4, all in one forward pass
    print(f"bench: {args.model or args.shape} ({L} layers, hidden {d}) on {gpu}; batch {B} x {T} tokens, {args.steps} "
          f"timed steps\n{'method':10s} {'tokens/s':>10s} {'ms/step':>9s} {'peak mem':>10s} {'MFU':>6s} {'select':>7s}")
    for method in ("full", "lora", "smf", "retrofit"):
        torch.manual_seed(0)
        model = make_model()[0]
        if method == "smf" and not memory_blocks(model):
            add_memory(model, mem_cfg)
        prepare_model(model, method, mem_cfg, (16, 32.0, 0.05), False, device)
        cfg = TrainConfig(method=method, micro_batch=micro, grad_accum=B // micro, max_len=T, max_steps=args.steps + 2,
                          warmup=1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bars between the rows
            hist = train(model, IdsTokenizer(), examples, cfg, background, device)[2:]  # after 2 warm-up steps
        step_s = sum(h["step_time"] for h in hist) / len(hist)
        tokens_per_s[method] = tok_s = B * T / step_s
        peak_mem = (torch.cuda.max_memory_allocated() if cuda  # else the process's peak
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        mfu, select = f"{100 * flops_per_token * tok_s / peak:5.1f}%" if peak else "-", "-"
        if method == "smf":  # the selectors' own cost, timed apart so that training runs without host syncs
            rows = torch.randint(0, n, (B * T, mem_cfg.heads * mem_cfg.topk), device=device)
            group = torch.arange(B * T, device=device) // (micro * T)
            t = timed(lambda: select_reads(rows, group, cfg.grad_accum, background[0], kl_scores, 512), device)
            select = f"{100 * len(mem_cfg.layers) * t / step_s:.1f}%"
        print(f"{method:10s} {tok_s:10.0f} {1000 * step_s:9.1f} {peak_mem / 2 ** 30:8.2f}GB {mfu:>6s} {select:>7s}")
        del model
    print(f"SMF tokens/s / full finetuning tokens/s: {tokens_per_s['smf'] / tokens_per_s['full']:.2f}")

    # one memory layer against the SwiGLU FFN beside it, at the real width (hidden 896, N = 16,384)
    x = torch.randn(2048, 896, device=device, requires_grad=True)
    ffn_in, ffn_out = nn.Linear(896, 2 * 4864, bias=False).to(device), nn.Linear(4864, 896, bias=False).to(device)
    memory = ProductKeyMemory(896).to(device)
    swiglu = lambda x: ffn_out(F.silu(ffn_in(x)[:, :4864]) * ffn_in(x)[:, 4864:])

    def fwd_bwd(f):
        with autocast(device):
            y = f(x)
        y.float().sum().backward()
    t_ffn, t_mem = timed(lambda: fwd_bwd(swiglu), device), timed(lambda: fwd_bwd(memory), device)
    print(f"memory layer fwd+bwd / SwiGLU FFN fwd+bwd (hidden 896, N=16384, 2048 tokens, "
          f"{torch.bfloat16 if cuda else torch.float32}): {t_mem / t_ffn:.2f} ({1000 * t_mem:.1f} ms vs "
          f"{1000 * t_ffn:.1f} ms)")
    if not args.eval_n:
        return
    # evaluation throughput on synthetic prompts, batch size 1 against the default
    rng, words = random.Random(0), "the of patient acute nerve blood cell drug most common cause treatment".split()
    sentence = lambda n: " ".join(rng.choice(words) for _ in range(n))
    model, tokenizer = make_model()
    tokenizer = tokenizer or toy_tokenizer([sentence(50)] * 200, 400)
    model = model.eval().to(torch.bfloat16 if cuda else torch.float32)
    mcq = [{"question": sentence(20), **{f"op{c}": sentence(4) for c in "abcd"}, "cop": 0} for _ in range(args.eval_n)]
    tqa, text = [(sentence(12), ["x"]) for _ in range(args.eval_n)], sentence(args.eval_n * 60)
    for bs in (1, args.eval_batch_size):
        mq = args.eval_n / timed(lambda: eval_medmcqa(model, tokenizer, mcq, batch_size=bs), device, 1)
        tq = args.eval_n / timed(lambda: eval_triviaqa(model, tokenizer, tqa, batch_size=bs), device, 1)
        wt = len(tokenizer(text)["input_ids"]) / timed(lambda: eval_wikitext(model, tokenizer, text, batch_size=bs),
                                                       device, 1)
        print(f"eval batch {bs:3d}: MedMCQA {mq:8.1f} q/s   TriviaQA {tq:8.1f} q/s   WikiText {wt:10.0f} tokens/s")

TABLE_ROWS = [  # (row name, results folder)
    ("Base", "base"), ("Retrofit (additive)", "retrofit_additive"), ("Retrofit (replacement)", "retrofit_replacement"),
    ("SMF replacement KL", "smf_replacement_kl"), ("SMF replacement TF-IDF", "smf_replacement_tfidf"),
    ("SMF additive KL", "smf_additive_kl"), ("SMF additive TF-IDF", "smf_additive_tfidf"),
    ("SMF additive +scale KL", "smf_additive_scale_kl"), ("SMF additive +scale TF-IDF", "smf_additive_scale_tfidf"),
    ("LoRA", "lora"), ("Full finetuning", "full")]
TABLE_COLUMNS = [("MedMCQA acc", "medmcqa", "acc", 100), ("WikiText ppl", "wikitext", "ppl", 1),
                 ("TriviaQA alias acc", "triviaqa", "alias_contains_acc", 100),
                 ("TriviaQA EM", "triviaqa", "exact_match", 100)]

def run_table(args, device=None):
    """Mean ± sample std over the seeds found in RESULTS_DIR/<row>/seed*/eval.json, and the change vs Base."""
    results = {folder: [read_json(f) for f in sorted(glob.glob(os.path.join(args.results_dir, folder, "seed*",
                                                                                    "eval.json")))]
               for _, folder in TABLE_ROWS}
    require(any(results.values()), f"{args.results_dir} holds no <row>/seed<S>/eval.json — run run_all.sh first, or "
            "point at its OUT folder")

    def summary(folder, probe, key, scale):  # (mean, sample std, n) over the seeds, or None
        xs = [scale * r[probe][key] for r in results[folder] if probe in r]
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)) if xs else None
    markdown = ["| row | n | " + " | ".join(f"{col[0]} | Δ" for col in TABLE_COLUMNS) + " |", "|---" * 10 + "|"]
    csv = [",".join(["row", "n"] + [f"{col[0]} {s}" for col in TABLE_COLUMNS for s in ("mean", "std", "delta")])]
    for name, folder in TABLE_ROWS:
        cells, numbers, n = [], [], 0
        for col in TABLE_COLUMNS:
            s, b = summary(folder, *col[1:]), summary("base", *col[1:])
            delta, n = s[0] - b[0] if s and b else None, s[2] if s else n
            cells += [f"{s[0]:.2f} ± {s[1]:.2f}" if s else "missing", "" if delta is None else f"{delta:+.2f}"]
            numbers += ([f"{s[0]:.4f}", f"{s[1]:.4f}"] if s else ["", ""]) + ["" if delta is None else f"{delta:.4f}"]
        markdown.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        csv.append(",".join([name, str(n)] + numbers))
    write_atomic(os.path.join(args.results_dir, "table.md"), "\n".join(markdown) + "\n")
    write_atomic(os.path.join(args.results_dir, "table.csv"), "\n".join(csv) + "\n")
    print("\n".join(markdown))

# -----------------------------------------------------------------------------------------------------------
# CLI

class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):  # no abbreviations: `eval --medmcqa` must not silently mean --medmcqa-mode
        super().__init__(**{"allow_abbrev": False, "formatter_class": HelpFormatter, **kwargs})

    def error(self, message):  # a mistyped flag gets the same one-line error as every other mistake
        print(f"error: {message} — see `python {self.prog} --help`", file=sys.stderr)
        sys.exit(2)

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # show each default unless there is none or the text gives it
        text = action.help or ""
        no_default = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        return text if no_default or "default" in text else text + " (default: %(default)s)"

def config_comments(cls):
    """{field: the comment beside it in the source}: a config class is the one place a setting is explained."""
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines()[1:]:
        if match := re.match(r"\s+(\w+): [^#]*# (.*)", line):
            name, comments[match[1]] = match[1], match[2]
        elif line.strip().startswith("#") and name:
            comments[name] += " " + line.strip("# ")
    return comments

CHOICES = {"method": tuple(METHOD_LR), "optimizer": ("adamw", "sgd"), "selector": ("kl", "tfidf"),
           "mode": ("additive", "replacement"), "medmcqa_mode": ("answer", "letter"),
           "wikitext_config": ("wikitext-103-v1", "wikitext-2-raw-v1")}

def add_config_flags(group, cls, prefix="", given_only=False):
    """A flag per field of a config dataclass, its comment as the help. With given_only the flags default to
    None, so that check_args can tell what was given before it fills in the dataclass defaults."""
    comments = config_comments(cls)
    for f in dataclasses.fields(cls):
        shown = given_only and f.default is not None and f.default is not False  # else HelpFormatter shows it
        text = comments[f.name] + (f" (default: {f.default})" if shown else "")
        kind = {"action": "store_true"} if f.type is bool else {"type": int, "nargs": "+"} if f.type is tuple else \
            {"type": f.type, "choices": CHOICES.get(f.name)}
        group.add_argument(f"--{prefix}{f.name}".replace("_", "-"), default=None if given_only else f.default,
                           help=text, **kind)

EXAMPLES = """examples:
  python smf.py eval --model Qwen/Qwen2.5-0.5B-Instruct --probe all --out base.json
  python smf.py train --method smf --selector kl        # retrofits the base into runs/smf_retrofit first
  python smf.py train --method retrofit --memory-mode replacement --out runs/retro_repl
  python smf.py train --method smf --model runs/retro_repl --selector tfidf --out runs/smf_repl_tfidf
  python smf.py train --method lora --out runs/lora --eval-out runs/lora/eval.json
  python smf.py bench --shape tiny
  python smf.py table results/"""

def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    memory = Parser(add_help=False)
    add_config_flags(memory.add_argument_group("memory layers (a new memory: retrofit, or eval --add-memory)"),
                     MemoryConfig, "memory_")

    e = sub.add_parser("eval", parents=[common, memory], help="evaluate a model on the probes", epilog=EXAMPLES)
    e.add_argument("--model", default=DEFAULT_MODEL, help="hub id, HF folder or smf checkpoint")
    e.add_argument("--probe", default="all", choices=list(PROBES) + ["all"])
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--add-memory", action="store_true", help="add untrained memory (the --memory-* flags) first")
    add_config_flags(e.add_argument_group("probes"), EvalConfig)

    t = sub.add_parser("train", parents=[common, memory], help="retrofit, smf, lora or full finetuning",
                       epilog=EXAMPLES)
    t.add_argument("--model", default=DEFAULT_MODEL, help="start from: a base model (hub id or folder), a retrofit "
                   "or an smf checkpoint (smf)")
    t.add_argument("--out", help="checkpoint folder (default runs/<method>)")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out, once the new one "
                   "is complete")
    t.add_argument("--medmcqa", default="openlifescienceai/medmcqa", help="training data (train split): hub id or "
                   "local file")
    t.add_argument("--background", default="OpenAssistant/oasst1", help="background text: the retrofit's "
                   "training data and the selectors' reference; hub id or local file")
    t.add_argument("--background-stats", help="smf: reuse the background_stats.safetensors of an earlier smf run")
    add_config_flags(t.add_argument_group("recipe (the paper's by default)"), TrainConfig, given_only=True)
    probes = t.add_argument_group("evaluation after training (only with --eval-out)")
    probes.add_argument("--eval-out", help="after training, evaluate the checkpoint on all probes into this JSON")
    add_config_flags(probes, EvalConfig)

    b = sub.add_parser("bench", parents=[common], help="training and evaluation speed on a random-weight model")
    b.add_argument("--shape", default="tiny", choices=list(SHAPES))
    b.add_argument("--model", help="bench this model (hub id or folder) instead of a named shape")
    b.add_argument("--random-init", action="store_true", help="with --model: its architecture, random weights")
    b.add_argument("--batch-size", type=int, help="sequences per step; default 16 on a GPU, 4 on a CPU")
    b.add_argument("--seq-len", type=int, help="tokens per sequence; default 512 on a GPU, 256 on a CPU")
    b.add_argument("--steps", type=int, default=5, help="timed optimizer steps per method")
    b.add_argument("--eval-n", type=int, default=32, help="questions per eval throughput row (0: skip them)")
    b.add_argument("--eval-batch-size", type=int, default=16, help="the batched eval row's batch size")

    tb = sub.add_parser("table", help="the results table of a run_all.sh folder")
    tb.add_argument("results_dir", help="the OUT folder of run_all.sh")
    tb.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p

RANGES = [  # (flags, test, what a good value is)
    ("lr epochs lora_alpha", lambda v: 0 < v < math.inf, "> 0 and finite"),
    ("micro_batch grad_accum forward_batch max_steps limit_train background_examples lora_r top_t batch_size limit "
     "memory_n_keys memory_heads memory_topk steps seq_len eval_batch_size", lambda v: v > 0, "> 0"),
    ("clip weight_decay warmup eval_n", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_len", lambda v: v >= 2, ">= 2 (a text needs two tokens to have a target)"),
    ("memory_key_dim", lambda v: v > 0 and v % 2 == 0, "even and > 0 (it is split in two halves)")]

def check_args(args):
    """Every bad value a user can give, caught before any model or data is loaded."""
    for names, ok, need in RANGES:
        for name in names.split():
            value = getattr(args, name, None)
            require(value is None or ok(value), f"--{name.replace('_', '-')} {value} is out of range — give a value "
                    f"{need}")
    if args.command in ("train", "eval"):
        require(args.memory_topk <= args.memory_n_keys, f"--memory-topk {args.memory_topk} exceeds --memory-n-keys "
                f"{args.memory_n_keys} — lower it")
        require(len(set(args.memory_layers)) == len(args.memory_layers), f"--memory-layers {args.memory_layers} "
                "names a layer twice — give each layer once")
    if args.command != "table":
        n_gpus = torch.cuda.device_count()
        require(re.fullmatch(r"cpu|cuda(:\d+)?", args.device), f"--device {args.device} is not a device this runs on "
                "— use cpu, cuda or cuda:N")
        require(args.device == "cpu" or int(args.device[5:] or 0) < n_gpus, f"--device {args.device}: this torch "
                f"sees {n_gpus} CUDA GPU(s) — use --device cpu, or a CUDA build of torch on a machine with a GPU")
    if args.command == "train":
        given = [f"--{n.replace('_', '-')}" for n in ("selector", "top_t", "train_scale", "background_stats")
                 if getattr(args, n) is not None]
        require(args.method in (None, "smf") or not given, f"{'/'.join(given)} only apply to --method smf — drop "
                f"them for {args.method}")
        for f in dataclasses.fields(TrainConfig):
            if getattr(args, f.name) is None:
                setattr(args, f.name, f.default)
        args.out = args.out or os.path.join("runs", args.method)
        require(not args.forward_batch or args.forward_batch % args.micro_batch == 0, f"--forward-batch "
                f"{args.forward_batch} is not a multiple of --micro-batch {args.micro_batch} — a forward pass holds "
                "whole micro-batches")
    if args.command == "bench":
        cuda = str(args.device).startswith("cuda")
        args.batch_size, args.seq_len = args.batch_size or (16 if cuda else 4), args.seq_len or (512 if cuda else 256)

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        command = {"train": run_train, "eval": run_eval, "bench": run_bench, "table": run_table}[args.command]
        command(args, getattr(args, "device", "cpu"))
    except KeyboardInterrupt:
        print("error: interrupted — finished checkpoints and results are intact; rerun to continue", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the one-line promise holds for the unforeseen too
        if args.debug:
            raise
        message = str(e) if isinstance(e, UserError) else (f"unexpected {type(e).__name__}: {str(e).strip()[:300]} — "
                                                            "rerun with --debug for the traceback")
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)

if __name__ == "__main__":
    main()
