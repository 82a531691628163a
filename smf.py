"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory layers to a Hugging Face causal LM, finetunes only the few memory value rows a
batch reads most (ranked by a KL or TF-IDF selector against background text), and compares that with
LoRA and full finetuning on three probes: MedMCQA accuracy (learning), WikiText perplexity and TriviaQA
accuracy (forgetting), with the paper's numbers as defaults; every section below lifts out with its imports.
Start with `python smf.py train --method smf --selector kl` and `python smf.py eval --probe all`; see --help.
"""
import argparse, contextlib, dataclasses, functools, glob, inspect, io, json, math, os, random, re
import shutil, statistics, sys, tempfile, time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
STATS = "background_stats.safetensors"  # a retrofit's (and an SMF run's) background statistics, beside its weights

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
    medmcqa: str = "openlifescienceai/medmcqa"  # training data (train split): hub id or local file
    background: str = "OpenAssistant/oasst1"    # general text: the retrofit's data, the selectors' reference
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
    background_examples: int = 2000  # background texts (one batch each) behind the selectors' statistics
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
    medmcqa_mode: str = "answer"                     # score ' L. option text' (the paper's) or the letter alone
    wikitext: str = "Salesforce/wikitext"            # WikiText probe (test split): hub id or local file
    triviaqa: str = "mandarjoshi/trivia_qa"          # TriviaQA probe (rc.nocontext validation): hub id or local file
    repetition_penalty: float = None                 # TriviaQA: default the model's generation_config (1.0: greedy)
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
# Data: every source is a hub id by default or a local .jsonl (or .txt) file in the hub's schema

def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    return (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
            or path.endswith((".jsonl", ".txt")))

def read_rows(source, hub_config=None, split="train"):
    """(where, row) pairs, `where` a row's place for errors: its line in a file (every line counted) or its number."""
    if not is_local(source):
        try:
            import datasets  # imported here so that `eval`/`bench` run where `datasets` is not installed
            return [(f"row {i}", r) for i, r in enumerate(datasets.load_dataset(source, hub_config, split=split), 1)]
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — download it first, or pass "
                            "a local file in the same schema") from e
    path, kind, where = os.path.expanduser(source), source.rsplit(".", 1)[-1], "its start"
    require(os.path.isfile(path) and kind in ("jsonl", "txt"), f"data file {source} " + ("is a folder" if
            os.path.isdir(path) else "has an unknown format" if os.path.isfile(path) else "does not exist") +
            " — check the path; give a .jsonl (what datasets' to_json writes) or .txt file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        rows = []
        for i, line in enumerate(lines, 1):
            where = f"line {i}"
            if kind == "txt" or line.strip():
                rows.append((where, {"text": line} if kind == "txt" else json.loads(line)))
        return rows
    except (ValueError, OSError) as e:
        raise UserError(f"data file {source} could not be read at {where} ({e}) — is it complete and in that "
                        "format?") from e

def check_fields(rows, fields, source):
    """Every (where, row) pair holds each field of `fields` (name -> type); at least one row is left."""
    for where, row in rows if fields else []:  # (no fields: `rows` may be plain texts)
        for name, kind in fields.items():
            value = row.get(name) if isinstance(row, dict) else None
            found = "missing" if not isinstance(row, dict) or name not in row else "null" if value is None else \
                f"of type {type(value).__name__}"
            require(isinstance(value, kind) and value is not None, f"{source}: {where}: field '{name}' is {found}, "
                    f"not {'a value' if kind is object else kind.__name__} — the file must use the hub schema")
    require(rows, f"{source}: no examples left after filtering — check the file and the filters")

def load_medmcqa(source="openlifescienceai/medmcqa", split="validation", limit=None, seed=None):
    """Single-answer rows (`choice_type == "single"`, kept when absent), shuffled with `seed`, the first `limit`."""
    rows = [(w, r) for w, r in read_rows(source, None, split) if not isinstance(r, dict) or
            r.get("choice_type", "single") == "single"]
    check_fields(rows, dict.fromkeys(("question", "opa", "opb", "opc", "opd"), str) | {"cop": object}, source)
    for where, r in rows:  # cop is 0..3 (0 = opa); other tools' exports may write "2" or 2.0
        require(str(r["cop"]).removesuffix(".0") in ("0", "1", "2", "3"), f"{source}: {where} has cop={r['cop']!r} — "
                "cop must be an integer 0..3 (0 = opa)")
    rows = [{**r, "cop": int(float(r["cop"]))} for _, r in rows]
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
    """Prompt, gold answer and the explanation line if any. No EOS (the published code appends none): it would teach
    the model to stop early, which moves the TriviaQA probe for a reason that is not forgetting."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    return text + f"\nExplanation: {row['exp']}" if (row.get("exp") or "").strip() else text

def load_wikitext(source="Salesforce/wikitext", config="wikitext-103-v1", limit=1000):
    """The first `limit` stripped non-empty lines of the test split, joined by a blank line."""
    rows = read_rows(source, config, "test")
    check_fields(rows, {"text": str}, source)
    lines = [r["text"].strip() for _, r in rows if r["text"].strip()][:limit]
    check_fields(lines, {}, source)  # at least one line
    return "\n\n".join(lines)

def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split; aliases include the answer value."""
    rows = read_rows(source, "rc.nocontext", "validation")[:limit]
    check_fields(rows, {"question": str, "answer": dict}, source)
    out = []
    for where, r in rows:  # aliases as a string would be an alias per character
        aliases, value = r["answer"].get("aliases") or [], r["answer"].get("value") or ""
        require(isinstance(aliases, list) and all(isinstance(a, str) for a in aliases + [value]) and (aliases or value),
                f"{source}: {where} has no answer aliases as a list of strings — the file must use the hub schema")
        out.append((r["question"], aliases + [value] if value else aliases))
    return out

def load_background(source="OpenAssistant/oasst1", limit=None):
    """OASST1 English assistant replies ranked 0 or 1, at least 50 characters: the general-text corpus."""
    rows = read_rows(source, None, "train")
    check_fields(rows, {"text": str}, source)
    texts = [r["text"] for _, r in rows if r.get("lang", "en") == "en" and r.get("role", "assistant") == "assistant"
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

def progress(iterable, desc):
    """A progress bar on a terminal, none in a log file (its carriage returns would make one endless line)."""
    return tqdm(iterable, desc=desc, disable=None)

def pad_batch(seqs, pad_id, left=False, device="cpu"):
    """(ids, mask), both (B, T): right padding for scoring, left padding for generation."""
    T = max(len(s) for s in seqs)
    ids, mask = torch.full((len(seqs), T), pad_id, dtype=torch.long), torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)

# -----------------------------------------------------------------------------------------------------------
# Memory layer: product keys (Lample et al. 2019) with the Memory+ output (Berges et al. 2024)

class ProductKeyMemory(nn.Module):
    """N = n_keys**2 value rows, looked up without scoring all N: each head takes the top-k sub-keys of each half
    of its query, re-ranks the k*k sums and reads the best k rows (row i1 * n_keys + i2). `read_hook` sees the
    rows each token reads and may return a mask: only those reads pass gradient to the values (how SMF learns)."""

    def __init__(self, dim, n_keys=128, heads=4, key_dim=256, topk=16):
        super().__init__()
        assert key_dim % 2 == 0 and topk <= n_keys
        self.n_keys, self.heads, self.key_dim, self.topk = n_keys, heads, key_dim, topk
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.read_hook = None  # rows (M, H*k) -> None, or bool (M, H*k): the reads whose value rows may learn
        nn.init.uniform_(self.keys, -key_dim ** -0.5, key_dim ** -0.5)
        nn.init.normal_(self.values, std=dim ** -0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=dim ** -0.5)
            nn.init.zeros_(lin.bias)

    def lookup(self, x):  # x (M, dim) -> scores (M, heads, topk), rows (M, heads, topk)
        """In fp32 even under bf16 (it is cheap): bf16 rounding could let padding or batching change the rows read."""
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
        self.mlp, self.memory = mlp if mode == "additive" else None, memory  # replacement drops the FFN's weights
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if mode == "additive" else None

    def forward(self, x):
        out = self.memory(x)
        return out if self.mlp is None else self.mlp(x) + self.alpha * out

def add_memory(model, cfg: MemoryConfig):
    """Puts a fresh fp32 ProductKeyMemory beside (or instead of) the FFN at each of cfg.layers."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    require(layers is not None and all(hasattr(layer, "mlp") for layer in layers), f"{type(model).__name__} has no "
            "model.model.layers[i].mlp — use a Qwen2/Llama/Mistral-style causal LM")
    require(cfg.mode in ("additive", "replacement"), f"memory mode {cfg.mode} is unknown — use additive/replacement")
    require(cfg.topk <= cfg.n_keys, f"--memory-topk {cfg.topk} exceeds --memory-n-keys {cfg.n_keys} — lower it")
    require(len(set(cfg.layers)) == len(cfg.layers), f"memory layers {list(cfg.layers)} name a layer twice — give "
            "each layer once")
    require(all(0 <= i < len(layers) for i in cfg.layers), f"memory layers {list(cfg.layers)} are out of range — the "
            f"model has layers 0..{len(layers) - 1}")
    require(not memory_blocks(model), "the model already has memory — start from the base model, or train its memory "
            "with --method smf")
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

def add_lora(model, r=16, alpha=32.0, dropout=0.05, targets=LORA_TARGETS):
    """Wraps every nn.Linear whose attribute name is in `targets` in a LoRALinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))

@torch.no_grad()
def merge_lora(model):
    """Folds each LoRA update into its base weight (in fp32) and unwraps it: same outputs in eval mode, no overhead."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                w.copy_((w.float() + child.scale * child.lora_B.float() @ child.lora_A.float()).to(w.dtype))
                setattr(parent, name, child.base)
    return model

# -----------------------------------------------------------------------------------------------------------
# Checkpoints: small files on top of a parent model, swapped in whole, read back by load_model

def read_json(path, fix):
    """A JSON file's content, or a one-line error naming the file and how to `fix` it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} could not be read ({type(e).__name__}: {e}) — {fix}") from e

def write_atomic(path, text):
    """Writes under a temporary name, then renames: a reader never sees half a file, nor a stray temporary one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            f.write(text)
        os.replace(f.name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}.tmp{os.getpid()}")

def check_outputs(writes, reads, overwrite=False):
    """Rule 1, for each (flag, path, is_folder) written: the right kind, a writable place, not the current folder nor
    what the run reads or else writes; a checkpoint is replaced only with `overwrite`, if it holds only its files."""
    for flag, path, is_folder in writes:
        real, cwd = os.path.realpath(path), os.getcwd()
        for other, what in [(os.path.realpath(p), "this run reads") for p in reads] + [(cwd, "is the current folder")] \
                + [(os.path.realpath(p), "this run writes") for _, p, folder in writes if folder and p != path]:
            relation = "is" if real == other else "holds" if other.startswith(real + os.sep) else "lies inside" \
                if real.startswith(other + os.sep) and other != cwd else None
            require(relation is None, f"{flag} {path} {relation} {other}, which {what} — choose another path")
        require(not os.path.exists(real) or os.path.isdir(real) == is_folder, f"{flag} {path} is "
                f"{'a file' if is_folder else 'a folder'} — give a new {'folder' if is_folder else 'file name'}")
        place = os.path.dirname(real)
        while not os.path.exists(place):
            place = os.path.dirname(place)
        require(os.path.isdir(place) and os.access(place, os.W_OK), f"{flag} {path} cannot be written ({place} is "
                f"{'not writable' if os.path.isdir(place) else 'a file'}) — choose a writable place")
        if is_folder and os.path.isdir(path) and os.listdir(path):
            meta = checkpoint_meta(path)
            require(meta, f"{flag} {path} holds files that are not an smf checkpoint — choose a new, empty folder")
            extra = sorted(set(os.listdir(path)) - set(meta.get("files", ())))
            require(not extra, f"{flag} {path} also holds {', '.join(extra)}, which replacing the checkpoint would "
                    "delete — move them out, or choose another folder")
            require(overwrite, f"{flag} {path} already holds a checkpoint — pass --overwrite to replace it (once the "
                    "new one is complete), or choose a new folder")

@contextlib.contextmanager
def replacing(out, overwrite=False):
    """Yields a staging folder, this run's own, that becomes `out` if the block ends without error: one rename, which
    fails if another run wrote `out` meanwhile; with `overwrite` the old checkpoint is renamed aside first, and back
    if the second rename fails or is interrupted (Ctrl-C is an exception). Before the swap, `out` is untouched."""
    place, name = os.path.split(os.path.abspath(out))  # beside `out`, on its file system, so that a rename moves it
    os.makedirs(place, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=place)
    old = staged + ".old"
    try:
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes 0700 and safetensors 0600: give the usual permissions
        for name in os.listdir(staged):
            os.chmod(os.path.join(staged, name), 0o666 & ~umask)
        try:
            if overwrite and os.path.exists(out):
                os.rename(out, old)
            os.rename(staged, out)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(out):
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

def save_checkpoint(folder, meta, tensors, extra=None):
    """weights.safetensors, the `extra` {file: tensors}, and config.json's `smf`: `meta` and the folder's files."""
    from safetensors.torch import save_file
    for name, named in ({"weights.safetensors": tensors} | (extra or {})).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, os.path.join(folder, name))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"smf": {**meta, "files": sorted(set(os.listdir(folder)) | {"config.json"})}}, f, indent=2)

def checkpoint_meta(path):
    """The `smf` entry of a checkpoint's config.json, or None for a plain model or hub id."""
    config = os.path.join(path, "config.json")
    content = read_json(config, "restore the file, or train or download that model again") if is_local(path) and \
        os.path.isfile(config) else {}
    return content.get("smf") if isinstance(content, dict) else None

def parent_of(path, meta):
    """A checkpoint's parent: beside it as recorded (moved together), else where it was (copied alone), or a hub id."""
    for parent in (os.path.join(path, meta["parent"]), meta.get("parent_abs", "")):
        if os.path.isfile(os.path.join(parent, "config.json")):
            return parent
    return meta["parent"]

def checkpoint_chain(path):
    """The local folders a model is built from: `path`, its parent, grandparent, ... (a hub id ends it)."""
    chain = []
    while is_local(path) and os.path.isfile(os.path.join(path, "config.json")) and path not in chain:
        chain.append(path)
        meta = checkpoint_meta(path)
        if meta is None:
            break
        path = parent_of(path, meta)
    return chain

def model_memory(path):
    """The memory settings of the retrofit a model is built on, or None for a model without memory."""
    metas = [checkpoint_meta(p) for p in checkpoint_chain(path)]
    return next((m["memory"] for m in metas if m and m["kind"] == "memory"), None)

def check_weight_files(folder):
    """Names a damaged (say, truncated) weight file, which transformers and safetensors would not."""
    from safetensors import safe_open
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as e:
            raise UserError(f"{file} is damaged ({' '.join(str(e).split())}) — restore it, or train or download "
                            f"{folder} again") from e

def smf_patch(before, trained):
    """What an SMF checkpoint stores of its `trained` tensors: of a value table only the rows that changed since
    `before` (as `<name>.index` and `<name>.rows`), anything else (alpha, with --train-scale) whole."""
    patch = {name: t for name, t in trained.items() if name not in before}
    for name in before:
        index = (before[name] != trained[name]).any(dim=1).nonzero()[:, 0]   # exact: a change of 1e-9 counts
        patch |= {f"{name}.index": index, f"{name}.rows": trained[name][index]}
    return patch

def load_model(path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes (parents loaded first)."""
    if is_local(path):
        require(os.path.isfile(os.path.join(path, "config.json")), f"{path} is neither a Hugging Face model nor an smf "
                "checkpoint (no config.json) — point --model at the folder holding config.json" if os.path.isdir(path)
                else f"model path {path} does not exist — check the path or give a hub id")
        check_weight_files(path)
    meta = checkpoint_meta(path)
    if meta is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        require(not is_local(path) or glob.glob(os.path.join(path, "tokenizer*")) or glob.glob(os.path.join(path,
                "vocab.*")), f"{path} has no tokenizer — save the model's tokenizer into it (save_pretrained)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        except Exception as e:
            raise UserError(f"could not load model '{path}' ({type(e).__name__}: {' '.join(str(e).split())[:150]}) — "
                            "check the path, or download the model while online") from e
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one
        return model.eval(), tokenizer
    parent = parent_of(path, meta)
    require(not is_local(parent) or os.path.isfile(os.path.join(parent, "config.json")), f"the parent "
            f"{meta['parent']} of {path} is missing — restore it, or train {path} again")
    require(meta.get("parent_id") == (checkpoint_meta(parent) or {}).get("id"), f"the parent {meta['parent']} of "
            f"{path} has been trained again since — restore that parent, or train {path} again")
    model, tokenizer = load_model(parent, device, dtype)
    from safetensors.torch import load_file
    weights = os.path.join(path, "weights.safetensors")
    require(os.path.isfile(weights), f"{weights} is missing — restore it, or train {path} again")
    tensors = load_file(weights, device=str(device))
    if meta["kind"] == "memory":
        add_memory(model, MemoryConfig(**meta["memory"]))
    elif meta["kind"] == "lora":
        add_lora(model, meta["train"]["lora_r"], meta["train"]["lora_alpha"], 0.0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():  # whole tensors, or smf_patch's changed rows of a value table
            name = key.removesuffix(".rows").removesuffix(".index")
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
    """(c_i / sum c) * ln((B + 1) / (df_i + 1)): read often now, by few background batches. counts (N,) or (G, N)."""
    tf = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    return tf * torch.log((background.batches + 1) / (background.df.double() + 1))

def kl_scores(counts, background: BackgroundStats):
    """p_i ln(p_i / q_i): row i's term of KL(batch reads || add-one-smoothed background reads)."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    q = (background.reads.double() + 1) / (background.reads.double() + 1).sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))

def select_rows(scores, counts, top_t):
    """Mask of the top_t read rows by score (ties: lower row first; unread: never). (N,) or (G, N) per micro-batch."""
    scores = torch.where(counts > 0, scores, torch.full_like(scores, -math.inf))
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_t]  # stable: index order
    return torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, best, (counts > 0).gather(-1, best))

def token_groups(mask, group_size):
    """(B*T,) each token's group (sequence index // group_size: a micro-batch, or an example), -1 for pads."""
    group = torch.arange(mask.shape[0], device=mask.device)[:, None] // group_size
    return group.expand_as(mask).masked_fill(mask == 0, -1).flatten()

def count_reads(rows, group, n_groups, n_rows):
    """(n_groups, n_rows) how often the tokens of each group read each row; pads (group -1) never count."""
    real = (group >= 0)[:, None].expand_as(rows)
    key = group.clamp(min=0)[:, None] * n_rows + rows
    counts = torch.bincount(key.flatten(), weights=real.flatten().float(), minlength=n_groups * n_rows)
    return counts.view(n_groups, n_rows).long()

@torch.no_grad()
def select_reads(rows, group, n_groups, background, score_fn, top_t, step_chosen=None):
    """SMF's choice in a forward of several micro-batches: each picks its top_t rows, and a read passes gradient only
    if its own micro-batch picked its row. rows (M, S) read by each token of group (M,) (-1: pad). Returns keep
    (M, S) and the picks (n_groups, N), also ORed into `step_chosen` (N,). No host sync: it runs mid-forward."""
    counts = count_reads(rows, group, n_groups, background.df.shape[0])                  # (G, N)
    chosen = select_rows(score_fn(counts, background), counts, top_t)
    if step_chosen is not None:
        step_chosen |= chosen.any(0)
    return chosen[group.clamp(min=0)[:, None], rows] & (group >= 0)[:, None], chosen

def add_background_reads(rows, group, n_examples, stats):
    """The read hook behind background_stats: df counts the examples that read a row, not the reads."""
    counts = count_reads(rows, group, n_examples, stats.df.shape[0])                   # (examples, N)
    stats.reads += counts.sum(0).cpu()
    stats.df += (counts > 0).sum(0).cpu()

@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_size=16, device="cpu"):
    """df, reads and B per memory layer, in eval mode; examples run `batch_size` at a time, each its own batch."""
    blocks = memory_blocks(model)
    n = blocks[0].memory.values.shape[0]
    stats = [BackgroundStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), len(texts))
             for _ in blocks]
    model.eval()
    for start in progress(range(0, len(texts), batch_size), "background stats"):
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

# -----------------------------------------------------------------------------------------------------------
# Training: one plain loop for every method

def get_lr(step, total, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

class RowSparseAdamW:
    """AdamW (or SGD) updating only the given rows of 2-D parameters, their moments and step counts too: rows chosen
    earlier never drift (masking the gradient of a dense AdamW would move them through their stale moments)."""

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

def train(model, tokenizer, texts, cfg, background=None, device="cpu", log_path=None, record_selected=False):
    """Trains the parameters that require grad in place; SMF gets one BackgroundStats per layer. Returns the history."""
    smf, sgd = cfg.method == "smf", cfg.optimizer == "sgd"
    blocks = memory_blocks(model) if smf else []
    values = [b.memory.values for b in blocks]
    alphas = [b.alpha for b in memory_blocks(model) if b.alpha is not None]  # logged: the reach scales with alpha
    dense = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in values)]
    dense_opt = (torch.optim.SGD(dense, lr=cfg.lr, weight_decay=cfg.weight_decay) if sgd else torch.optim.AdamW(
        dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=str(device).startswith("cuda"))) if dense else None
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=sgd)
    background = [BackgroundStats(s.df.to(device), s.reads.to(device), s.batches) for s in background or []]
    examples = [e for e in ((t if isinstance(t, list) else tokenizer(t)["input_ids"])[: cfg.max_len]  # or token ids
                            for t in texts[: cfg.limit_train]) if len(e) > 1]  # no EOS (see medmcqa_text)
    require(examples, "no training text has two tokens or more — check the training data")
    rng, seqs_per_step = random.Random(cfg.seed), cfg.micro_batch * cfg.grad_accum
    total = min(math.ceil(cfg.epochs * math.ceil(len(examples) / seqs_per_step)), cfg.max_steps or math.inf)
    if cfg.warmup >= total:
        print(f"warning: warm-up ({cfg.warmup} steps) >= all {total} steps: the lr never reaches {cfg.lr:g} and "
              "this run learns little — lower --warmup or train longer", file=sys.stderr)
    score_fn = kl_scores if cfg.selector == "kl" else tfidf_scores
    queue, history, log = [], [], open(log_path or os.devnull, "w", buffering=1)  # line-buffered
    model.train()
    bar = progress(range(total), f"train {cfg.method}")
    for step in bar:
        if not queue:  # each epoch a new seeded shuffle, sorted by length within chunks of 64 steps (little padding)
            order, chunk = rng.sample(range(len(examples)), len(examples)), 64 * seqs_per_step
            parts = [sorted(order[c:c + chunk], key=lambda i: len(examples[i])) for c in range(0, len(order), chunk)]
            queue = [part[i:i + seqs_per_step] for part in parts for i in range(0, len(part), seqs_per_step)]
            rng.shuffle(queue)
        batch = queue.pop(0)  # one optimizer step: grad_accum micro-batches of similar lengths
        n_targets = sum(len(examples[i]) - 1 for i in batch)  # the loss is normalised over the whole step
        t0, loss_sum, n_tokens = time.perf_counter(), 0.0, sum(len(examples[i]) for i in batch)
        step_chosen = [torch.zeros(v.shape[0], dtype=torch.bool, device=v.device) for v in values]  # SMF
        forward_batch = cfg.forward_batch or seqs_per_step  # several micro-batches per forward: same gradient
        for c in range(0, len(batch), forward_batch):
            ids, mask = pad_batch([examples[i] for i in batch[c:c + forward_batch]], tokenizer.pad_token_id,
                                  device=device)
            group, n_groups = token_groups(mask, cfg.micro_batch), math.ceil(len(ids) / cfg.micro_batch)
            for j, b in enumerate(blocks):  # the hook runs inside layer j; this pass's groups are bound in
                b.memory.read_hook = lambda rows, j=j, group=group, n_groups=n_groups: select_reads(
                    rows, group, n_groups, background[j], score_fn, cfg.top_t, step_chosen[j])[0]
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
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        if dense_opt:
            dense_opt.param_groups[0]["lr"] = lr
            dense_opt.step()
        sparse_opt.step(union, union_grads, lr)
        for p in dense:
            p.grad = None
        step_time = sync(device) or time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
                  "tokens": n_tokens, "tokens_per_s": n_tokens / step_time}
        record |= ({"alpha": [round(a.item(), 6) for a in alphas]} if alphas else {}) | (
            {"rows_updated": [len(u) for u in union]} if smf else {})
        log.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
                              for k, v in record.items()}) + "\n")
        history.append(record | ({"selected": [u.cpu() for u in union]} if record_selected else {}))
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    for b in blocks:
        b.memory.read_hook = None
    log.close()
    model.eval()
    return history

def prepare_model(model, method, mem_cfg=None, lora_cfg=None, train_scale=False, device="cpu"):
    """Adds what the method trains, freezes the rest (retrofit: all memory; smf: values, + alpha with train_scale;
    lora: A, B; full: all). On a GPU frozen weights are bf16 (run under autocast only), trainable ones fp32."""
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

def tail_logprobs(model, seqs, n_scored, pad_id):
    """[(n,) log-probabilities of the last n tokens of each sequence] from one forward: left padding, positions
    from each sequence's first real token (a row scores as it would alone), logits only where a scored token is."""
    ids, mask = pad_batch(seqs, pad_id, left=True, device=next(model.parameters()).device)
    k = max(n_scored)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=k + 1).logits[:, -k - 1:-1].float()                     # (B, k, vocab)
    token_lp = logits.gather(-1, ids[:, -k:, None])[..., 0] - logits.logsumexp(-1)         # (B, k)
    return [token_lp[i, k - n:] for i, n in enumerate(n_scored)]

@torch.no_grad()
def eval_medmcqa(model, tokenizer, rows, letter_only=False, batch_size=16):
    """Accuracy of the argmax over the 4 options of the mean per-token log-likelihood of ` {L}. {option}` (the mean
    keeps long options from losing for their length; letter mode: ` A`..` D`). The gold answer's NLL moves long
    before the argmax flips: it shows learning that accuracy on 1,000 questions cannot yet resolve."""
    seqs, n_answer = [], []  # prompt + answer token ids, four per question, and the answer's length
    for row in rows:
        prompt = tokenizer(medmcqa_prompt(row))["input_ids"]
        for option in range(4):
            ids = tokenizer(medmcqa_prompt(row) + medmcqa_answer(row, option, letter_only))["input_ids"]
            assert ids[:len(prompt)] == prompt, "the prompt must tokenize as a prefix of prompt + answer"
            seqs.append(ids)
            n_answer.append(len(ids) - len(prompt))
    means, b, pad = [], 4 * batch_size, tokenizer.pad_token_id  # batch_size questions, their 4 options each
    for s in progress(range(0, len(seqs), b), "medmcqa"):
        means += [lp.mean().item() for lp in tail_logprobs(model, seqs[s:s + b], n_answer[s:s + b], pad)]
    scores = [means[i:i + 4] for i in range(0, len(means), 4)]
    preds = [max(range(4), key=s.__getitem__) for s in scores]
    correct = [int(p == row["cop"]) for p, row in zip(preds, rows)]
    gold_nlls = [-s[row["cop"]] for s, row in zip(scores, rows)]
    return {"acc": statistics.mean(correct), "gold_nll": statistics.mean(gold_nlls), "n": len(rows),
            "predictions": preds, "scores": scores, "correct": correct, "gold_nlls": gold_nlls,
            "protocol": f"zero-shot, mean log-likelihood of {'letter' if letter_only else 'letter + option text'}"}

@torch.no_grad()
def eval_wikitext(model, tokenizer, text, window=1024, stride=512, batch_size=8):
    """Token perplexity with a sliding window: each window starts `stride` after the last and scores only the
    tokens no earlier window scored, so every token but the first (which has no context) counts once."""
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 2, "perplexity needs at least two tokens"
    ends = [min(start + window, len(ids)) for start in range(0, max(1, len(ids) - window + stride), stride)]
    spans = [(i * stride, end, ends[i - 1] if i else 1) for i, end in enumerate(ends)]  # (start, end, first scored)
    nll, count = 0.0, 0
    for b in progress(range(0, len(spans), batch_size), "wikitext"):
        chunk = spans[b:b + batch_size]
        n_scored = [e - scored_from for _, e, scored_from in chunk]
        for lp in tail_logprobs(model, [ids[s:e] for s, e, _ in chunk], n_scored, tokenizer.pad_token_id):
            nll -= lp.double().sum().item()
        count += sum(n_scored)
    assert count == len(ids) - 1
    return {"ppl": math.exp(nll / count), "tokens": count,
            "protocol": f"token perplexity, window {window}, stride {stride}"}

def normalize_answer(s):
    """TriviaQA normalisation: lower case, drop articles, keep [a-z0-9 .-], collapse spaces."""
    s = re.sub(r"\b(a|an|the)\b", " ", s.lower())
    return " ".join(re.sub(r"[^a-z0-9 .\-]", " ", s).split())

def alias_contained(prediction, aliases):
    """The paper's metric: some normalised alias occurs inside the normalised generation (lenient by design)."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))

def exact_match(prediction, aliases):
    """The answer equals an alias: the first non-empty line, or a start of it ending where a sentence or clause does
    (`Paris. It is...`), at . , : ; ! ? before a space or the end, so `St. Louis`, `3.14`, `Washington, D.C.` stay
    whole. Thousands separators are dropped (`1,000` equals `1000`)."""
    norm = lambda s: normalize_answer(re.sub(r"(?<=\d),(?=\d{3}\b)", "", s))
    line = next((line.strip() for line in prediction.split("\n") if line.strip()), "")
    answers = {norm(line[:m.start()]) for m in re.finditer(r"[.,;:!?](?=\s|$)", line)} | {norm(line)}
    return bool((answers - {""}) & {norm(a) for a in aliases})

@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=32, repetition_penalty=1.0):
    """Greedy continuations, as `generate(do_sample=False)` makes them one at a time: left padding, positions from
    each prompt's first real token, and HF's repetition penalty (the logit of a token already in the row is divided
    by it if positive, multiplied if negative) over real tokens only, so batching changes nothing. No KV cache:
    rerunning the short rows costs a GPU about the same launches, and works with every transformers version."""
    device = next(model.parameters()).device
    ids, mask = pad_batch([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id, left=True,
                          device=device)
    start, seen, done = ids.shape[1], None, torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1).logits[:, -1].float()                            # (B, vocab)
        if seen is None:  # (B, vocab): which tokens each row holds, pads not counted
            seen = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, ids, mask) > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        nxt = torch.where(seen, penalised, logits).argmax(-1).masked_fill(done, tokenizer.pad_token_id)  # (B,)
        seen[torch.arange(len(nxt)), nxt] |= ~done
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, (~done)[:, None].long()], 1)
        done |= nxt == tokenizer.eos_token_id
        if done.all():
            break
    eos = tokenizer.eos_token_id
    new = [row[:row.index(eos)] if eos in row else row for row in ids[:, start:].tolist()]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]

def eval_triviaqa(model, tokenizer, rows, batch_size=32, max_new_tokens=32, repetition_penalty=None):
    """Alias containment (the paper's) and exact match of one greedy generation per question, batched by prompt
    length. The paper's generate(do_sample=False) applies the repetition penalty of the model's own
    generation_config.json (Qwen2.5-0.5B-Instruct sets one): so does this, unless `repetition_penalty` is given."""
    penalty = repetition_penalty or getattr(getattr(model, "generation_config", None), "repetition_penalty", 0) or 1.0
    prompts = [f"Question: {q}\nAnswer:" for q, _ in rows]
    order, preds = sorted(range(len(rows)), key=lambda i: len(prompts[i])), {}
    for b in progress(range(0, len(rows), batch_size), "triviaqa"):
        idx = order[b:b + batch_size]
        preds |= zip(idx, greedy_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, penalty))
    preds = [preds[i] for i in range(len(rows))]
    contained = [int(alias_contained(p, a)) for p, (_, a) in zip(preds, rows)]
    exact = [int(exact_match(p, a)) for p, (_, a) in zip(preds, rows)]
    return {"alias_contains_acc": statistics.mean(contained), "exact_match": statistics.mean(exact), "n": len(rows),
            "predictions": preds, "alias_correct": contained, "exact_correct": exact,
            "protocol": f"zero-shot greedy, {max_new_tokens} new tokens, repetition penalty {penalty:g}"}

# -----------------------------------------------------------------------------------------------------------
# Commands: train, eval, bench, table

PROBES = ("medmcqa", "wikitext", "triviaqa")
DATA_OPTIONS = ("medmcqa", "background", "eval_medmcqa", "wikitext", "triviaqa")
RETROFIT_SHARES = ("seed", "micro_batch", "grad_accum", "forward_batch", "max_len", "background", "background_examples")

def option_rules(args):
    """Rule 2: {option: (applies to this `train` run, to what)}. A given option that does not apply is refused, and
    config.json records only those that apply. Memory and statistics the model has are its own."""
    rules = {f.name: (bool(args.eval_out), "--eval-out") for f in dataclasses.fields(EvalConfig)}
    method, has_memory = args.method, bool(model_memory(args.model))
    has_stats = os.path.isfile(os.path.join(args.model, STATS))
    new_memory = method == "retrofit" or (method == "smf" and not has_memory)
    rules |= dict.fromkeys(("selector", "top_t", "train_scale"), (method == "smf", "--method smf"))
    rules |= dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout"), (method == "lora", "--method lora"))
    rules |= {f"memory_{f.name}": (new_memory, "a new memory (--method retrofit, or smf from a model without "
                                   "memory); the model's memory is its own") for f in dataclasses.fields(MemoryConfig)}
    rules["memory_alpha_init"] = (new_memory and args.memory_mode != "replacement", "a new additive memory")
    rules |= dict.fromkeys(("background", "background_examples"), (new_memory or (method == "smf" and not has_stats),
                           "a retrofit, whose background statistics its SMF runs reuse"))
    rules["medmcqa"] = (method != "retrofit", "--method smf, lora or full (a retrofit trains on --background)")
    return rules

def load_probes(args, names=PROBES):
    """Every probe's data, read before any model loads, so that a wrong source fails in seconds."""
    loaders = {"medmcqa": lambda: load_medmcqa(args.eval_medmcqa, "validation", args.limit),
               "wikitext": lambda: load_wikitext(args.wikitext, limit=args.limit),
               "triviaqa": lambda: load_triviaqa(args.triviaqa, args.limit)}
    data = {}
    for name in names:
        try:
            data[name] = loaders[name]()
        except UserError as e:  # name the flag to change
            raise UserError(f"--{'eval-medmcqa' if name == 'medmcqa' else name}: {e}") from e
    return data

def run_train(args, device):
    """`train` into a staging folder that becomes --out, then --eval-out. SMF from a model without memory first
    retrofits it into <out>_retrofit, with the retrofit recipe and the settings both stages share."""
    import transformers
    from safetensors.torch import load_file
    cfg, t0 = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}), time.time()
    mem_cfg = MemoryConfig(**{f.name: getattr(args, f"memory_{f.name}") for f in dataclasses.fields(MemoryConfig)})
    method, rules = cfg.method, option_rules(args)
    parent = args.out.rstrip("/") + "_retrofit" if method == "smf" and not model_memory(args.model) else args.model
    texts = None if method == "retrofit" else \
        [medmcqa_text(r) for r in load_medmcqa(cfg.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)]
    background = load_background(cfg.background) if rules["background"][0] else None
    probes = load_probes(args) if args.eval_out else None
    if parent != args.model:  # the one-liner
        shared = {f.name: getattr(args, f.name) if f.name in RETROFIT_SHARES else f.default for f in
                  dataclasses.fields(TrainConfig)} | {"method": "retrofit"}
        retrofit = TrainConfig(**shared)
        steps = math.ceil(retrofit.epochs * math.ceil(len(background) / (retrofit.micro_batch * retrofit.grad_accum)))
        print(f"{args.model} has no memory layers: retrofitting it first into {parent} with the retrofit recipe: "
              f"{len(background):,} background texts x {retrofit.epochs:g} epochs = {steps:,} steps (shorter: train "
              "--method retrofit --max-steps N --out R, then SMF from R)")
        run_train(argparse.Namespace(**{**vars(args), **shared, "out": parent, "eval_out": None, "overwrite": False}),
                  device)
    stats_file, local = os.path.join(parent, STATS), is_local(parent)
    stats_file = stats_file if method == "smf" and os.path.isfile(stats_file) else None
    meta = {"kind": {"retrofit": "memory"}.get(method, method), "method": method, "seed": cfg.seed,
            "id": os.urandom(8).hex(), "parent_id": (checkpoint_meta(parent) or {}).get("id"),  # a retrained parent
            "train": {k: v for k, v in vars(cfg).items() if rules.get(k, (True,))[0]},  # what applies (rule 2)
            "parent": os.path.relpath(parent, args.out) if local else parent, "parent_abs": os.path.abspath(parent)
            if local else parent, "versions": {"torch": torch.__version__,
            "transformers": transformers.__version__}, **({"memory": vars(mem_cfg)} if method == "retrofit" else {}),
            **({"background_stats": os.path.abspath(stats_file)} if stats_file else {})}
    with replacing(args.out, args.overwrite) as staged:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(parent, device)
        prepare_model(model, method, mem_cfg, (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout), cfg.train_scale, device)
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        make_stats = lambda: background_stats(model, tokenizer, background[:cfg.background_examples], cfg.max_len,
                                              device=device)
        if method == "smf":  # the parent's statistics (saved as below), or made now
            saved = load_file(stats_file) if stats_file else None
            stats = [BackgroundStats(saved[f"{j}.df"], saved[f"{j}.reads"], int(saved["batches"])) for j in
                     range(len(memory_blocks(model)))] if saved else make_stats()
            before = {name: p.detach().clone() for name, p in trained.items() if name.endswith(".values")}
        history = train(model, tokenizer, texts or background, cfg, stats if method == "smf" else None, device,
                        os.path.join(staged, "train_log.jsonl"))
        meta["train"]["total_steps"] = len(history)
        stats = make_stats() if method == "retrofit" else stats if method == "smf" else None  # SMF runs reuse them
        extra = {STATS: {"batches": torch.tensor(stats[0].batches)} | {f"{j}.{k}": getattr(s, k) for j, s in
                 enumerate(stats) for k in ("df", "reads")}} if stats else None
        save_checkpoint(staged, meta, smf_patch(before, trained) if method == "smf" else trained, extra)
    size, last = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out)), history[-1]
    watch = "".join(f"\n   {k} per layer in the last step: {last[k]}" for k in ("rows_updated", "alpha") if k in last)
    print(f"\n== {method} finished: {len(history)} steps, {sum(h['tokens'] for h in history):,} tokens, "
          f"{time.time() - t0:.0f}s, final loss {last['loss']:.4f}, checkpoint {args.out} ({size / 2 ** 20:.1f} MB, "
          f"kind {meta['kind']}, log train_log.jsonl){watch}\n   evaluate: python smf.py eval --model {args.out}")
    if args.eval_out:  # evaluate the checkpoint as load_model reads it, in this process
        run_eval(argparse.Namespace(**{**vars(args), "model": args.out, "out": args.eval_out, "probe": "all"}),
                 device, probes)
    return model

def run_eval(args, device, probes=None):
    """`eval`: a line per probe and the results JSON (if one fails: those that finished, and `unfinished`)."""
    names = PROBES if args.probe == "all" else (args.probe,)
    probes = probes or load_probes(args, names)
    model, tokenizer = load_model(args.model, device, torch.bfloat16 if "cuda" in str(device) else torch.float32)
    bs, letter, penalty = args.batch_size, args.medmcqa_mode == "letter", args.repetition_penalty
    evaluate = {"medmcqa": lambda rows: eval_medmcqa(model, tokenizer, rows, letter, bs),
                "wikitext": lambda text: eval_wikitext(model, tokenizer, text, batch_size=max(1, bs // 2)),
                "triviaqa": lambda rows: eval_triviaqa(model, tokenizer, rows, 2 * bs, repetition_penalty=penalty)}
    results = {"model": args.model}
    try:
        for probe in names:
            t0, r = time.time(), evaluate[probe](probes[probe])
            metrics = " ".join(f"{k} {r[k]:.4f}" for k in ("acc", "gold_nll", "ppl", "alias_contains_acc",
                                                           "exact_match") if k in r)
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

def run_bench(args, device):
    """Every method's training steps on random tokens and weights, and a memory layer's fwd+bwd against the FFN's."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cuda = str(device).startswith("cuda")
    B, T = args.batch_size or (16 if cuda else 4), args.seq_len or (512 if cuda else 256)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(4096, T))
    L = config.num_hidden_layers
    mem_cfg = MemoryConfig(layers=tuple(sorted({L // 4, L // 2, 3 * L // 4})))  # layers 6, 12, 18 of 24
    examples = torch.randint(config.vocab_size, (B * (args.steps + 2), T), generator=torch.Generator().manual_seed(0))
    background = [BackgroundStats(torch.randint(0, 50, (128 ** 2,)), torch.randint(0, 500, (128 ** 2,)), 2000)] * 3
    print(f"bench: {args.shape} on {torch.cuda.get_device_name() if cuda else 'cpu'}, {B} x {T} tokens a step")
    tokens_per_s = {}
    for method in ("full", "lora", "smf", "retrofit"):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
        if method == "smf":
            add_memory(model, mem_cfg)
        prepare_model(model, method, mem_cfg, (16, 32.0, 0.05), False, device)
        cfg = TrainConfig(method=method, micro_batch=math.gcd(4, B), grad_accum=B // math.gcd(4, B), max_len=T,
                          max_steps=args.steps + 2, warmup=1)
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bars between the rows
            history = train(model, argparse.Namespace(pad_token_id=0), examples.tolist(), cfg, background, device)[2:]
        step_s = statistics.mean(h["step_time"] for h in history)
        tokens_per_s[method] = B * T / step_s
        print(f"{method:9s} {tokens_per_s[method]:9.0f} tokens/s  {1000 * step_s:7.1f} ms/step")
    print(f"SMF tokens/s / full finetuning tokens/s: {tokens_per_s['smf'] / tokens_per_s['full']:.2f}")
    x = torch.randn(2048, 896, device=device, requires_grad=True)
    ffn_in, ffn_out = nn.Linear(896, 2 * 4864, bias=False).to(device), nn.Linear(4864, 896, bias=False).to(device)
    seconds = {}
    for name, layer in (("memory", ProductKeyMemory(896).to(device)),
                        ("ffn", lambda x: ffn_out(F.silu(ffn_in(x)[:, :4864]) * ffn_in(x)[:, 4864:]))):
        for i in range(4):  # a warm-up, then three timed fwd+bwd
            if i == 1:
                t0 = sync(device) or time.perf_counter()
            with autocast(device):
                layer(x).float().sum().backward()
        seconds[name] = (sync(device) or time.perf_counter() - t0) / 3
    t_mem, t_ffn = seconds["memory"], seconds["ffn"]
    print(f"memory layer fwd+bwd / SwiGLU FFN fwd+bwd (hidden 896, N=16384, 2048 tokens): {t_mem / t_ffn:.2f} "
          f"({1000 * t_mem:.1f} ms vs {1000 * t_ffn:.1f} ms)")

TABLE_ROWS = [  # (row name, results folder)
    ("Base", "base"), ("Retrofit (additive)", "retrofit_additive"), ("Retrofit (replacement)", "retrofit_replacement"),
    ("SMF replacement KL", "smf_replacement_kl"), ("SMF replacement TF-IDF", "smf_replacement_tfidf"),
    ("SMF additive KL", "smf_additive_kl"), ("SMF additive TF-IDF", "smf_additive_tfidf"),
    ("SMF additive +scale KL", "smf_additive_scale_kl"), ("SMF additive +scale TF-IDF", "smf_additive_scale_tfidf"),
    ("LoRA", "lora"), ("Full finetuning", "full")]
TABLE_COLUMNS = [  # (header, probe, key of the mean, key of the per-question values or None, scale)
    ("MedMCQA acc", "medmcqa", "acc", "correct", 100), ("MedMCQA gold NLL", "medmcqa", "gold_nll", "gold_nlls", 1),
    ("WikiText ppl", "wikitext", "ppl", None, 1),
    ("TriviaQA alias acc", "triviaqa", "alias_contains_acc", "alias_correct", 100),
    ("TriviaQA EM", "triviaqa", "exact_match", "exact_correct", 100)]

def paired_delta(runs, base, key, scale):
    """(Δ, half-width of its 95% interval) against Base, paired over questions: per question the row's mean over
    seeds minus Base's, then the mean and 1.96 standard errors. None unless all runs scored the same questions."""
    if len({len(r[key]) for r in runs + base}) != 1 or len(runs[0][key]) < 2:
        return None
    per_question = lambda rs: [statistics.mean(q) for q in zip(*(r[key] for r in rs))]
    d = [scale * (a - b) for a, b in zip(per_question(runs), per_question(base))]
    return statistics.mean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))

def run_table(args, device=None):
    """table.md: mean ± sample std over seeds (n per column; unfinished runs reported, not averaged), Δ vs Base."""
    found = {folder: [read_json(f, "rerun that stage's evaluation") for f in sorted(glob.glob(os.path.join(
        args.results_dir, folder, "seed*", "eval.json")))] for _, folder in TABLE_ROWS}
    require(any(found.values()), f"{args.results_dir} holds no <row>/seed<S>/eval.json — run run_all.sh first, or "
            "point at its OUT folder")
    done = {folder: [r for r in runs if "unfinished" not in r] for folder, runs in found.items()}  # the averaged
    lines = ["| row | " + " | ".join(f"{c[0]} | Δ vs Base" for c in TABLE_COLUMNS) + " |", "|---" * 11 + "|"]
    for name, folder in TABLE_ROWS:
        cells = []
        for _, probe, key, per_question, scale in TABLE_COLUMNS:
            runs, base = [r[probe] for r in done[folder] if probe in r], [r[probe] for r in done["base"] if probe in r]
            xs = [scale * r[key] for r in runs]
            cells.append(f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "") +
                         f" (n={len(xs)})" if xs else "missing")
            paired = paired_delta(runs, base, per_question, scale) if per_question and runs and base else None
            delta = statistics.mean(xs) - scale * statistics.mean(r[key] for r in base) if runs and base else None
            cells.append("" if delta is None or folder == "base" else f"{delta:+.2f}" if not paired else
                         f"{paired[0]:+.2f} [{paired[0] - paired[1]:+.2f}, {paired[0] + paired[1]:+.2f}]")
        unfinished = len(found[folder]) - len(done[folder])
        lines.append(f"| {name}{f' ({unfinished} unfinished)' if unfinished else ''} | " + " | ".join(cells) + " |")
    write_atomic(os.path.join(args.results_dir, "table.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))

# -----------------------------------------------------------------------------------------------------------
# CLI

class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):  # no abbreviations: `eval --medmcqa` must not silently mean --medmcqa-mode
        super().__init__(**{"allow_abbrev": False, **kwargs})

    def error(self, message):  # a mistyped flag gets the same one-line error as every other mistake
        print(f"error: {message} — see `python {self.prog} --help`", file=sys.stderr)
        sys.exit(2)

def config_comments(cls):
    """{field: the comment beside it in the source}: a config class is the one place a setting is explained."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*# (.*)$", inspect.getsource(cls), re.M))

CHOICES = {"method": tuple(METHOD_LR), "optimizer": ("adamw", "sgd"), "selector": ("kl", "tfidf"),
           "mode": ("additive", "replacement"), "medmcqa_mode": ("answer", "letter")}

def add_config_flags(group, cls, prefix=""):
    """A flag per field of a config dataclass, its comment as the help. Every flag defaults to None, so that
    check_args can tell what was given (rule 2) before it fills in the dataclass's default."""
    comments = config_comments(cls)
    for f in dataclasses.fields(cls):
        shown = f.default is not None and f.default is not False
        kind = {"action": "store_true"} if f.type is bool else {"type": int, "nargs": "+"} if f.type is tuple else \
            {"type": f.type, "choices": CHOICES.get(f.name)}
        group.add_argument(f"--{prefix}{f.name}".replace("_", "-"), default=None, **kind,
                           help=comments[f.name] + (f" (default: {f.default})" if shown else ""))

def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], epilog="examples: see README.md")
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N "
                        "(default: cuda when there is a GPU)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model = Parser(add_help=False)
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub id, HF folder or smf checkpoint; train starts from "
                       f"a base model, a retrofit (smf) or an smf checkpoint (smf) (default: {DEFAULT_MODEL})")
    e = sub.add_parser("eval", parents=[common, model], help="evaluate a model on the probes")
    e.add_argument("--probe", default="all", choices=list(PROBES) + ["all"], help="(default: all)")
    e.add_argument("--out", help="write the results as JSON here")
    add_config_flags(e.add_argument_group("probes"), EvalConfig)
    t = sub.add_parser("train", parents=[common, model], help="retrofit, smf, lora or full finetuning")
    t.add_argument("--out", help="checkpoint folder (default runs/<method>)")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out, once the new one "
                   "is complete")
    add_config_flags(t.add_argument_group("recipe (the paper's by default)"), TrainConfig)
    add_config_flags(t.add_argument_group("memory layers (a new memory: retrofit, or smf from a model without)"),
                     MemoryConfig, "memory_")
    probes = t.add_argument_group("evaluation after training (only with --eval-out)")
    probes.add_argument("--eval-out", help="after training, evaluate the checkpoint on all probes into this JSON")
    add_config_flags(probes, EvalConfig)
    b = sub.add_parser("bench", parents=[common], help="training speed of every method on a random-weight model")
    b.add_argument("--shape", default="tiny", choices=list(SHAPES), help="(default: tiny)")
    b.add_argument("--batch-size", type=int, help="sequences per step; default 16 on a GPU, 4 on a CPU")
    b.add_argument("--seq-len", type=int, help="tokens per sequence; default 512 on a GPU, 256 on a CPU")
    b.add_argument("--steps", type=int, default=5, help="timed optimizer steps per method (default: 5)")
    tb = sub.add_parser("table", help="the results table of a run_all.sh folder")
    tb.add_argument("results_dir", help="the OUT folder of run_all.sh")
    tb.add_argument("--debug", action="store_true", help="show the traceback of an error")
    tb.set_defaults(device="cpu")
    return p

RANGES = [  # (flags, test, what a good value is)
    ("lr epochs lora_alpha repetition_penalty", lambda v: 0 < v < math.inf, "> 0 and finite"),
    ("micro_batch grad_accum forward_batch max_steps limit_train background_examples lora_r top_t batch_size limit "
     "memory_n_keys memory_heads memory_topk steps seq_len", lambda v: v > 0, "> 0"),
    ("clip weight_decay warmup", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_len", lambda v: v >= 2, ">= 2 (a text needs two tokens to have a target)"),
    ("memory_key_dim", lambda v: v > 0 and v % 2 == 0, "even and > 0 (it is split in two halves)")]
PATH_OPTIONS = ("model", "out", "eval_out", "results_dir") + DATA_OPTIONS

def check_args(args):
    """Every mistake in the options, before any model or data loads: a value out of range, the device, an option
    that does not apply to this run (rule 2), a path it must not write (rule 1). Fills in the defaults."""
    for names, ok, need in RANGES:
        for name in names.split():
            value = getattr(args, name, None)
            require(value is None or ok(value), f"--{name.replace('_', '-')} {value} is out of range — give a value "
                    f"{need}")
    vars(args).update({n: os.path.expanduser(getattr(args, n)) for n in PATH_OPTIONS if getattr(args, n, None)})  # ~/x
    if args.command != "table":
        n_gpus = torch.cuda.device_count()
        require(re.fullmatch(r"cpu|cuda(:\d+)?", args.device) and (args.device == "cpu" or int(args.device[5:] or 0) <
                n_gpus), f"--device {args.device}: this torch sees {n_gpus} CUDA GPU(s) — use cpu, cuda or cuda:N")
    memory = model_memory(args.model) if args.command == "train" else None
    if args.command == "train":
        args.method = args.method or "smf"
        for name, (applies, where) in option_rules(args).items():
            require(applies or getattr(args, name, None) is None, f"--{name.replace('_', '-')} applies only to "
                    f"{where} — drop it from this run")
    configs = {"train": ((TrainConfig, ""), (MemoryConfig, "memory_"), (EvalConfig, "")), "eval": ((EvalConfig, ""),)}
    for cls, prefix in configs.get(args.command, ()):  # the defaults of the options not given
        for f in dataclasses.fields(cls):
            if getattr(args, prefix + f.name, 0) is None:
                setattr(args, prefix + f.name, f.default)
    writes = [("--out", getattr(args, "out", None), args.command == "train")]  # (flag, path, is_folder)
    if args.command == "train":
        require(not memory or args.method not in ("retrofit", "full"), f"{args.model} already has memory layers — "
                f"{args.method} starts from a model without memory; train this one with --method smf")
        require(not args.forward_batch or args.forward_batch % args.micro_batch == 0, f"--forward-batch "
                f"{args.forward_batch} is not a multiple of --micro-batch {args.micro_batch} — make it one")
        args.out = args.out or os.path.join("runs", args.method)
        writes = [("--out", args.out, True), ("--eval-out", args.eval_out, False)]
        if args.method == "smf" and not memory:  # the one-liner's retrofit
            retrofit = args.out.rstrip("/") + "_retrofit"
            require(not os.path.exists(retrofit), f"{retrofit} exists — train SMF from it (--model {retrofit}), or "
                    "move it away to retrofit again")
            writes.append(("--out", retrofit, True))
    if args.command == "table":
        writes = [("the table", os.path.join(args.results_dir, "table.md"), False)]
    reads = checkpoint_chain(args.model) if args.command in ("train", "eval") else []
    reads += [path for path in (getattr(args, name, None) for name in DATA_OPTIONS) if path and os.path.exists(path)]
    check_outputs([w for w in writes if w[1]], reads, getattr(args, "overwrite", False))

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        {"train": run_train, "eval": run_eval, "bench": run_bench, "table": run_table}[args.command](args, args.device)
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
