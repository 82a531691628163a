"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory layers to a Hugging Face causal LM, finetunes only the few memory value rows a
batch reads most (ranked by a KL or TF-IDF selector against background text), and compares that with
LoRA and full finetuning on three probes: MedMCQA accuracy (learning), WikiText perplexity and TriviaQA
accuracy (forgetting). Every number comes from SPEC.md; every section below lifts out with its imports.

    python smf.py eval  --model Qwen/Qwen2.5-0.5B-Instruct --probe all
    python smf.py train --method smf --selector kl
    python smf.py bench --shape tiny
    python smf.py table results/
"""
import argparse, contextlib, dataclasses, functools, glob, inspect, io, json, math, os, random, shutil, statistics
import sys, tempfile, time
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
class TrainConfig:
    method: str = "smf"           # retrofit | smf | lora | full
    lr: float = None              # None: the method's default in METHOD_LR
    epochs: float = None          # None: 2 for retrofit, 3 otherwise
    micro_batch: int = 4          # sequences per micro-batch (SMF picks top_t rows per micro-batch)
    grad_accum: int = 4           # micro-batches per optimizer step: effective batch 16 sequences
    forward_batch: int = None     # sequences per forward pass (a multiple of micro_batch; None: a whole step).
                                  # It changes speed and memory only, never the update.
    max_len: int = 1024           # tokens per sequence, longer ones are truncated
    warmup: int = 100             # linear warm-up steps, then cosine to zero
    clip: float = 1.0             # gradient-norm clipping
    weight_decay: float = 0.0
    optimizer: str = "adamw"      # adamw | sgd (Lin et al. use SGD with lr ~2 for SMF)
    selector: str = "kl"          # smf: kl | tfidf
    top_t: int = 512              # smf: rows updated per memory layer per micro-batch
    train_scale: bool = False     # smf: also train the per-layer alpha (the "+scale" rows)
    background_examples: int = 2000  # smf: single-example batches behind the selector's statistics
    lora_r: int = 16
    lora_alpha: float = 32.0      # the LoRA update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05    # on the LoRA input only
    max_steps: int = None         # stop early (the schedule is then laid over max_steps)
    limit_train: int = None       # use only the first N training examples
    seed: int = 0


METHOD_LR = {"retrofit": 5e-4, "smf": 5e-4, "lora": 2e-4, "full": 5e-5}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line `error: what — how to fix`."""


# -----------------------------------------------------------------------------------------------------------
# Data: every source is a hub id by default or a local .jsonl/.json/.parquet/.txt file in the hub's schema


def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".parquet",
                                                                                       ".txt")) or path.count("/") > 1


def read_rows(source, hub_config=None, split="train"):
    """Rows of a data source as a list of dicts. Local files are read here; hub ids go through `datasets`."""
    if not is_local(source):
        try:
            import datasets  # imported here so that `eval`/`bench` run where `datasets` is not installed
            return list(datasets.load_dataset(source, hub_config, split=split))
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — "
                            "download it first, or pass a local file in the same schema") from e
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise UserError(f"data file {source} does not exist — check the path")
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, list) else list(data.get("data", data.get("rows", [])))
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                return [{"text": line} for line in f.read().split("\n")]
    except (ValueError, OSError, ImportError) as e:
        raise UserError(f"data file {source} could not be read ({e}) — is it complete and in that format?") from e
    raise UserError(f"data file {source} has an unknown format — use .jsonl, .json, .parquet or .txt")


def check_fields(rows, fields, source):
    for i, row in enumerate(rows):
        for name in fields:
            if not isinstance(row, dict) or row.get(name) is None:
                raise UserError(f"{source}: row {i} has no '{name}' field — the file must use the hub schema")
    if not rows:
        raise UserError(f"{source}: no examples left after filtering — check the file and the filters")


def load_medmcqa(source="openlifescienceai/medmcqa", split="validation", limit=None, seed=None):
    """Single-answer MedMCQA rows (the `choice_type == "single"` filter of SPEC.md; kept when the field is
    absent), shuffled with `seed` when given, the first `limit` kept. `cop` is 0-based (0 = opa)."""
    rows = [r for r in read_rows(source, None, split) if r.get("choice_type", "single") == "single"]
    check_fields(rows, ("question", "opa", "opb", "opc", "opd", "cop"), source)
    for i, r in enumerate(rows):
        if r["cop"] not in (0, 1, 2, 3):
            raise UserError(f"{source}: row {i} has cop={r['cop']!r} — cop must be 0..3 (0 = opa)")
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit]


def medmcqa_prompt(row):
    """The training text up to and including `Answer:`; the model must continue it with ` {L}. {option}`."""
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\nB. {row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")


def medmcqa_answer(row, option, letter_only=False):
    letter = "ABCD"[option]
    return f" {letter}" if letter_only else f" {letter}. {row['op' + 'abcd'[option]]}"


def medmcqa_text(row):
    """One training example: prompt, gold answer, and the explanation line when there is one."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    return text + f"\nExplanation: {row['exp']}" if (row.get("exp") or "").strip() else text


def load_wikitext(source="Salesforce/wikitext", config="wikitext-103-v1", limit=1000):
    """The first `limit` stripped non-empty lines of the test split, joined by a blank line."""
    rows = read_rows(source, config, "test")
    check_fields(rows[:1], ("text",), source)
    lines = [r["text"].strip() for r in rows if (r.get("text") or "").strip()][:limit]
    if not lines:
        raise UserError(f"{source}: no non-empty text lines — check the file")
    return "\n\n".join(lines)


def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split; aliases include the answer value."""
    rows = read_rows(source, "rc.nocontext", "validation")[:limit]
    check_fields(rows, ("question", "answer"), source)
    out = []
    for i, r in enumerate(rows):
        answer = r["answer"] if isinstance(r["answer"], dict) else {}
        aliases = list(answer.get("aliases") or []) + ([answer["value"]] if answer.get("value") else [])
        if not aliases:
            raise UserError(f"{source}: row {i} has no answer aliases — the file must use the hub schema")
        out.append((r["question"], aliases))
    return out


def load_background(source="OpenAssistant/oasst1", limit=None):
    """OASST1 English assistant replies ranked 0 or 1, at least 50 characters: the general-text corpus."""
    rows = read_rows(source, None, "train")
    check_fields(rows[:1], ("text",), source)
    keep = [r["text"] for r in rows if r.get("lang", "en") == "en" and r.get("role", "assistant") == "assistant"
            and r.get("rank", 0) in (0, 1) and len(r.get("text") or "") >= 50]
    check_fields([{"text": t} for t in keep], ("text",), source)
    return keep[:limit]


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
        k, half = self.topk, self.key_dim // 2
        q = self.query(x).view(-1, self.heads, 2, half)                       # (M, H, 2, half)
        sub = torch.einsum("mhcd,hcnd->mhcn", q, self.keys.to(q.dtype))      # (M, H, 2, n_keys)
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
        rows, weights = rows.flatten(1), weights.flatten(1)                   # (M, H*k)
        weights = weights.to(self.values.dtype)
        keep = self.read_hook(rows.detach()) if self.read_hook is not None else None
        if keep is None:
            read = F.embedding_bag(rows, self.values, per_sample_weights=weights, mode="sum")
        else:  # same output, but only the reads the hook keeps carry gradient into the value rows
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
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise UserError(f"{type(model).__name__} has no model.model.layers[i].mlp — use a Qwen2/Llama/Mistral-"
                        "style causal LM")
    return layers


def add_memory(model, cfg: MemoryConfig):
    """Puts a fresh fp32 ProductKeyMemory beside (or instead of) the FFN at each of cfg.layers."""
    layers = decoder_layers(model)
    if cfg.mode not in ("additive", "replacement"):
        raise UserError(f"memory mode '{cfg.mode}' is unknown — use additive or replacement")
    for i in cfg.layers:
        if not 0 <= i < len(layers):
            raise UserError(f"memory layer {i} is out of range — the model has layers 0..{len(layers) - 1}")
    device = next(model.parameters()).device
    for i in cfg.layers:
        memory = ProductKeyMemory(model.config.hidden_size, cfg.n_keys, cfg.heads, cfg.key_dim, cfg.topk)
        layers[i].mlp = MemoryBlock(layers[i].mlp, memory, cfg.mode, cfg.alpha_init).to(device)
    return memory_blocks(model)


def memory_blocks(model):
    return [m for m in model.modules() if isinstance(m, MemoryBlock)]


def memory_state(model):
    """Memory tensors keyed by `layer.name`, for the small memory checkpoints."""
    layers = decoder_layers(model)
    return {f"{i}.{name}": t for i, layer in enumerate(layers) if isinstance(layer.mlp, MemoryBlock)
            for name, t in layer.mlp.named_parameters() if not name.startswith("mlp.")}


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
# Checkpoints: small files on top of a parent model, written atomically, read back by load_model


def write_atomic(path, text):
    """Writes a results file under a temporary name, then renames it: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}: {e.filename}) — choose a writable --out") from e


def save_checkpoint(out, meta, tensors=None, model=None, tokenizer=None, extra=None):
    """`meta` names the kind (memory | smf | lora | full), the parent and every hyper-parameter. Small kinds
    store `tensors` in weights.safetensors beside a config.json; `full` is a whole HF model folder whose
    config.json carries the same `smf` entry; `extra` maps more file names to tensors. Files are written in a
    temporary folder and moved in with config.json last: a folder without config.json never loads, so an
    interrupted save leaves nothing usable."""
    from safetensors.torch import save_file
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, "config.json")):
            os.remove(os.path.join(out, "config.json"))
        tmp = tempfile.mkdtemp(prefix=".tmp", dir=out)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}: {e.filename}) — choose a writable --out") from e
    try:
        if model is not None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "config.json")) as f:
                config = json.load(f)
        else:
            extra = {"weights.safetensors": tensors, **(extra or {})}
            config = {}
        for name, named_tensors in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in named_tensors.items()}, os.path.join(tmp, name))
        config["smf"] = meta
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def checkpoint_meta(path):
    """The `smf` entry of a checkpoint's config.json, or None for a plain model or hub id."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("smf")


def load_model(path_or_id=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes (parents loaded first)."""
    local = is_local(path_or_id)
    if local and not os.path.isdir(path_or_id):
        raise UserError(f"model path {path_or_id} does not exist — check the path or give a hub id")
    if local and not os.path.isfile(os.path.join(path_or_id, "config.json")):
        raise UserError(f"{path_or_id} is neither a Hugging Face model nor an smf checkpoint (no config.json) — "
                        "point --model at the folder holding config.json")
    meta = checkpoint_meta(path_or_id) if local else None
    if meta is None or meta["kind"] == "full":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
            model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype).to(device)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"could not load model '{path_or_id}' ({str(e).splitlines()[0][:150]}) — check the "
                            "path, or download the model while online") from e
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one
        return model.eval(), tokenizer
    parent = os.path.join(path_or_id, meta["parent"])  # a relative parent is relative to the checkpoint
    if not os.path.isfile(os.path.join(parent, "config.json")):
        parent = meta["parent"]
    if meta["kind"] == "smf" and not os.path.isfile(os.path.join(parent, "config.json")):
        raise UserError(f"the parent {meta['parent']} of {path_or_id} is missing — restore the retrofit checkpoint")
    model, tokenizer = load_model(parent, device, dtype)
    from safetensors.torch import load_file
    try:
        tensors = load_file(os.path.join(path_or_id, "weights.safetensors"), device=str(device))
    except Exception as e:
        raise UserError(f"{path_or_id}/weights.safetensors is missing or damaged ({type(e).__name__}) — "
                        "train the checkpoint again") from e
    with torch.no_grad():
        if meta["kind"] == "memory":
            add_memory(model, MemoryConfig(**{**meta["memory"], "layers": tuple(meta["memory"]["layers"])}))
            state = memory_state(model)
            if set(state) != set(tensors):
                raise UserError(f"{path_or_id}: the memory tensors do not match its config — train it again")
            for k, t in state.items():
                t.copy_(tensors[k])
        elif meta["kind"] == "smf":
            state = memory_state(model)
            for k, t in tensors.items():
                if k.endswith(".rows"):
                    state[k[:-5] + ".memory.values"][tensors[k[:-5] + ".index"]] = t.to(dtype)
                elif k.endswith(".alpha"):
                    state[k].copy_(t)
        elif meta["kind"] == "lora":
            lora = add_lora(model, meta["train"]["lora_r"], meta["train"]["lora_alpha"], 0.0)
            for path, module in lora.items():
                module.lora_A.copy_(tensors[path + ".lora_A"])
                module.lora_B.copy_(tensors[path + ".lora_B"])
            merge_lora(model)
    return model.to(dtype).eval(), tokenizer


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


@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_size=16, device="cpu"):
    """df, total reads and B for each memory layer, from the model in eval mode with one example per batch
    (examples are run `batch_size` at a time, but each counts as its own background batch)."""
    blocks = memory_blocks(model)
    n = blocks[0].memory.values.shape[0]
    stats = [BackgroundStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), len(texts))
             for _ in blocks]
    model.eval()

    def add_reads(rows, s):  # one group per example: df counts the examples that read a row at least once
        counts = count_reads(rows, group, len(ids), n)                                       # (examples, N)
        s.reads += counts.sum(0).cpu()
        s.df += (counts > 0).sum(0).cpu()
    for b, s in zip(blocks, stats):
        b.memory.read_hook = functools.partial(add_reads, s=s)
    for start in tqdm(range(0, len(texts), batch_size), desc="background stats", leave=False):
        ids, mask = pad_batch([tokenizer(t)["input_ids"][:max_len] for t in texts[start:start + batch_size]],
                              tokenizer.pad_token_id, device=device)
        group = token_groups(mask, 1)
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
            if self.sgd:
                p.index_copy_(0, rows, (w - lr * g).to(p.dtype))
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
          keep_selected=False):
    """Trains `model` in place on `texts`. Which parameters train is already set (requires_grad) by the
    caller; for SMF, `background` holds one BackgroundStats per memory layer. Returns the per-step history."""
    smf = cfg.method == "smf"
    blocks = memory_blocks(model) if smf else []
    values = [b.memory.values for b in blocks]
    dense = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in values)]
    lr_peak = cfg.lr or METHOD_LR[cfg.method]
    if cfg.optimizer == "sgd":
        dense_opt = torch.optim.SGD(dense, lr=lr_peak) if dense else None
    else:
        dense_opt = torch.optim.AdamW(dense, lr=lr_peak, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                      fused=str(device).startswith("cuda")) if dense else None
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=cfg.optimizer == "sgd") if smf else None

    eos = [tokenizer.eos_token_id]  # so the model learns where an answer ends
    examples = [tokenizer(t)["input_ids"][: cfg.max_len - 1] + eos for t in texts[: cfg.limit_train]]
    rng = random.Random(cfg.seed)
    step_size = cfg.micro_batch * cfg.grad_accum
    forward_batch = cfg.forward_batch or step_size
    total = math.ceil((cfg.epochs or 3) * math.ceil(len(examples) / step_size))
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    score_fn = kl_scores if cfg.selector == "kl" else tfidf_scores
    queue, history, log = [], [], open(log_path, "w", buffering=1) if log_path else None  # line-buffered

    def gate(rows, j):  # runs inside memory layer j's forward: pick rows per micro-batch, gate the reads
        keep, chosen = select_reads(rows, group, math.ceil(len(ids) / cfg.micro_batch), background[j], score_fn,
                                    cfg.top_t)
        step_chosen[j] |= chosen.any(0)
        return keep
    for j, b in enumerate(blocks):
        b.memory.read_hook = functools.partial(gate, j=j)
    model.train()
    bar = tqdm(range(total), desc=f"train {cfg.method}", leave=False)
    for step in bar:
        if not queue:  # a new seeded shuffle at each epoch boundary
            queue = length_grouped_batches([len(e) for e in examples], step_size, rng)
        batch = queue.pop(0)  # one optimizer step: grad_accum micro-batches of similar lengths
        n_targets = sum(len(examples[i]) - 1 for i in batch)  # the loss is normalised over the whole step
        t0, loss_sum, n_tokens = time.perf_counter(), 0.0, sum(len(examples[i]) for i in batch)
        step_chosen = [torch.zeros(v.shape[0], dtype=torch.bool, device=v.device) for v in values]  # SMF
        for c in range(0, len(batch), forward_batch):  # several micro-batches per forward: same gradient, faster
            seqs = [examples[i] for i in batch[c:c + forward_batch]]
            ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device=device)
            group = token_groups(mask, cfg.micro_batch)                               # (B*T,) micro-batch, -1 = pad
            with autocast(device):
                logits = model(input_ids=ids, attention_mask=mask).logits               # (B, T, vocab)
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                  # pads never count
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / n_targets
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} at step {step + 1} — lower --lr or check the data; "
                                "no checkpoint was written by this run")
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
        if smf:
            sparse_opt.step(union, union_grads, lr)
        for p in dense:
            p.grad = None
        step_time = sync(device) or time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
                  "tokens_per_s": n_tokens / step_time}
        alphas = [round(b.alpha.item(), 6) for b in memory_blocks(model) if b.alpha is not None]
        if alphas:  # the additive memory's reach scales with alpha: worth watching (SPEC.md sec. 4)
            record["alpha"] = alphas
        if smf:
            record["rows_updated"] = [len(u) for u in union]
        if log:
            log.write(json.dumps(record) + "\n")
        if keep_selected:
            record["selected"] = [u.cpu() for u in union]
        history.append(record)
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
    if method in ("retrofit", "smf") and not blocks:
        raise UserError("the model has no memory layers — smf trains from a retrofit checkpoint (--method retrofit)")
    if method == "smf" and train_scale and blocks[0].alpha is None:
        raise UserError("--train-scale needs additive memory — replacement memory has no alpha")
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
    for s in tqdm(range(0, len(rows), batch_size), desc="medmcqa", leave=False):
        p_ids, p_mask = pad_batch(prompts[s:s + batch_size], tokenizer.pad_token_id, left=True, device=device)
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)                                     # (Q, P)
        cache = DynamicCache()
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache))
        first = out.logits[:, -1].float().log_softmax(-1)                                # (Q, vocab)
        cache.batch_repeat_interleave(4)
        c_ids, c_mask = pad_batch(options[4 * s:4 * (s + batch_size)], tokenizer.pad_token_id, device=device)
        c_pos = p_pos[:, -1:].repeat_interleave(4, 0) + 1 + torch.arange(c_ids.shape[1], device=device)
        mask = torch.cat([p_mask.repeat_interleave(4, 0), c_mask], dim=1)
        logits = model(input_ids=c_ids, attention_mask=mask, position_ids=c_pos, use_cache=True,
                       **cache_kwargs(model, cache)).logits.float()                        # (4Q, C, vocab)
        rest = logits[:, :-1].log_softmax(-1).gather(-1, c_ids[:, 1:, None])[..., 0]     # (4Q, C - 1)
        first_lp = first.gather(-1, c_ids[:, 0].view(-1, 4)).view(-1, 1)                  # (4Q, 1)
        token_lp = torch.cat([first_lp, rest], dim=1)                                      # (4Q, C)
        scores += ((token_lp * c_mask).sum(1) / c_mask.sum(1)).tolist()                 # mean over real tokens
    preds = torch.tensor(scores).view(-1, 4).argmax(-1).tolist()
    correct = sum(p == row["cop"] for p, row in zip(preds, rows))
    return {"acc": correct / len(rows), "n": len(rows), "predictions": preds,
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
    for b in tqdm(range(0, len(spans), batch_size), desc="wikitext", leave=False):
        chunk = spans[b:b + batch_size]  # left padding puts every window's scored tokens at the end
        x, mask = pad_batch([ids[s:e] for s, e, _ in chunk], tokenizer.pad_token_id, left=True, device=device)
        keep = max(e - first for _, e, first in chunk) + 1  # logits only where a scored token is predicted
        logits = model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep).logits[:, :-1].float()                       # (B, keep - 1, vocab)
        token_lp = logits.gather(-1, x[:, 1 - keep:, None])[..., 0] - logits.logsumexp(-1)
        for i, (s, e, first) in enumerate(chunk):
            nll -= token_lp[i, first - e:].double().sum().item()
            count += e - first
    assert count == len(ids) - 1
    return {"ppl": math.exp(nll / count), "tokens": count,
            "protocol": f"token perplexity, window {window}, stride {stride}"}


def normalize_answer(s):
    """TriviaQA normalisation: lower case, drop articles, keep [a-z0-9 .-], collapse spaces."""
    import re
    s = re.sub(r"\b(a|an|the)\b", " ", s.lower())
    return " ".join(re.sub(r"[^a-z0-9 .\-]", " ", s).split())


def alias_contained(prediction, aliases):
    """The paper's metric: some normalised alias occurs inside the normalised generation."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))


def exact_match(prediction, aliases):
    """The stricter metric: the generation up to its first newline, period or comma equals an alias."""
    import re
    first = normalize_answer(re.split(r"[\n.,]", prediction, maxsplit=1)[0])
    return first != "" and first in {normalize_answer(a) for a in aliases}


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
    for b in tqdm(range(0, len(rows), batch_size), desc="triviaqa", leave=False):
        idx = order[b:b + batch_size]
        for i, text in zip(idx, greedy_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens)):
            preds[i] = text
    contained = [alias_contained(p, a) for p, (_, a) in zip(preds, rows)]
    exact = [exact_match(p, a) for p, (_, a) in zip(preds, rows)]
    return {"alias_contains_acc": sum(contained) / len(rows), "exact_match": sum(exact) / len(rows), "n": len(rows),
            "predictions": preds, "protocol": f"zero-shot greedy, {max_new_tokens} new tokens"}


# -----------------------------------------------------------------------------------------------------------
# Commands: train, eval, bench, table


def memory_config(args, mode):
    return MemoryConfig(tuple(args.memory_layers), mode, args.memory_keys, args.memory_heads, args.memory_key_dim,
                        args.memory_topk)


def changed_rows(before, after):
    return (before != after).any(dim=1).nonzero()[:, 0]


def run_train(args, device):
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    mem_cfg = memory_config(args, args.memory_mode)
    meta = {"kind": {"retrofit": "memory"}.get(cfg.method, cfg.method), "method": cfg.method,
            "train": dataclasses.asdict(cfg), "seed": cfg.seed}
    parent = args.model
    parent_memory = (checkpoint_meta(parent) or {}).get("memory") or dataclasses.asdict(mem_cfg)
    if cfg.method == "smf" and cfg.top_t > parent_memory["n_keys"] ** 2:
        raise UserError(f"--top-t {cfg.top_t} is larger than the memory — it has {parent_memory['n_keys'] ** 2} rows")
    if cfg.method == "smf" and (checkpoint_meta(parent) or {}).get("kind") != "memory":
        retrofit_dir = os.path.join(args.out, "retrofit")  # the one-liner: retrofit first, once
        if checkpoint_meta(retrofit_dir):
            print(f"reusing the retrofit checkpoint {retrofit_dir}")
        else:
            print(f"{parent} has no memory layers: retrofitting it first into {retrofit_dir}")
            run_train(argparse.Namespace(**{**vars(args), "method": "retrofit", "out": retrofit_dir, "lr": None,
                                            "epochs": None, "eval_out": None}), device)
        parent = retrofit_dir
    try:  # fail now, not after hours of training
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {args.out} ({e.strerror}: {e.filename}) — choose a writable --out") from e
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(parent, device)
    prepare_model(model, cfg.method, mem_cfg, (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout), cfg.train_scale, device)
    if cfg.method == "retrofit":
        texts = load_background(args.background, cfg.limit_train)
        cfg.epochs = cfg.epochs or 2
        meta["memory"] = dataclasses.asdict(mem_cfg)
    else:
        texts = [medmcqa_text(r) for r in load_medmcqa(args.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)]
    background = None
    if cfg.method == "smf":
        from safetensors.torch import load_file
        n_layers = len(memory_blocks(model))
        if args.background_stats:
            t = load_file(args.background_stats)
            background = [BackgroundStats(t[f"{j}.df"], t[f"{j}.reads"], int(t["batches"])) for j in range(n_layers)]
        else:
            bg_texts = load_background(args.background, cfg.background_examples)
            background = background_stats(model, tokenizer, bg_texts, cfg.max_len, device=device)
        background = [BackgroundStats(s.df.to(device), s.reads.to(device), s.batches) for s in background]
        values_before = {k: v.detach().clone() for k, v in memory_state(model).items() if k.endswith(".values")}
    log_path = os.path.join(args.out, "train_log.jsonl")
    history = train(model, tokenizer, texts, cfg, background, device, log_path)
    print(f"trained {len(history)} steps; final loss {history[-1]['loss']:.4f}"
          + (f"; alpha {history[-1]['alpha']}" if history[-1].get("alpha") else ""))
    meta["parent"] = os.path.relpath(parent, args.out) if os.path.exists(parent) else parent  # found from the ckpt
    tensors, extra = None, None
    if cfg.method == "retrofit":
        tensors = memory_state(model)
    elif cfg.method == "smf":
        tensors, state = {}, memory_state(model)
        for key, before in values_before.items():  # key "<layer>.memory.values"; the patch: changed rows only
            i, after = key.split(".")[0], state[key].detach()
            tensors[f"{i}.index"] = index = changed_rows(before, after)
            tensors[f"{i}.rows"] = after[index]
            if cfg.train_scale:
                tensors[f"{i}.alpha"] = state[f"{i}.alpha"]
        stats = {"batches": torch.tensor(background[0].batches)}
        for j, s in enumerate(background):
            stats[f"{j}.df"], stats[f"{j}.reads"] = s.df.cpu(), s.reads.cpu()
        extra = {"background_stats.safetensors": stats}
    elif cfg.method == "lora":
        tensors = {f"{path}.{n}": getattr(m, n) for path, m in model.named_modules() if isinstance(m, LoRALinear)
                   for n in ("lora_A", "lora_B")}
    save_checkpoint(args.out, meta, tensors, model if cfg.method == "full" else None, tokenizer, extra)
    print(f"saved {meta['kind']} checkpoint to {args.out}")
    if args.eval_out:  # evaluate the checkpoint as load_model reads it, in this process
        run_eval(argparse.Namespace(**{**vars(args), "model": args.out, "out": args.eval_out, "add_memory": None,
                                            "probe": "all"}), device)
    return model


def run_eval(args, device):
    """Evaluates --model on the chosen probes, prints one line per probe, and writes the results JSON."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model, tokenizer = load_model(args.model, device, dtype)
    if args.add_memory:  # untrained memory, e.g. to check that alpha = 0.01 barely moves the probes
        add_memory(model, memory_config(args, args.add_memory))
        model.to(dtype)
    results = {"model": args.model}
    for probe in ["medmcqa", "wikitext", "triviaqa"] if args.probe == "all" else [args.probe]:
        t0 = time.time()
        if probe == "medmcqa":
            rows = load_medmcqa(args.eval_medmcqa, "validation", args.limit)
            r = eval_medmcqa(model, tokenizer, rows, args.medmcqa_mode == "letter", args.batch_size)
            line = f"acc {r['acc']:.4f}"
        elif probe == "wikitext":
            text = load_wikitext(args.wikitext, args.wikitext_config, args.limit)
            r = eval_wikitext(model, tokenizer, text, batch_size=max(1, args.batch_size // 2))
            line = f"ppl {r['ppl']:.4f} over {r['tokens']} tokens"
        else:
            r = eval_triviaqa(model, tokenizer, load_triviaqa(args.triviaqa, args.limit), 2 * args.batch_size)
            line = f"alias-contains {r['alias_contains_acc']:.4f} exact-match {r['exact_match']:.4f}"
        print(f"{probe:9s} {line}  n={r.get('n', r.get('tokens'))}  ({r['protocol']}; {time.time() - t0:.1f}s)")
        results[probe] = r
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


SHAPES = {  # random-weight models for `bench`: the real Qwen2.5-0.5B dimensions, and a small one
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def toy_tokenizer(texts, vocab_size=512):
    """A byte-level BPE trained on `texts` with Qwen's special tokens: for tests and `bench`, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def timed(fn, device, repeats=3):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    t0 = sync(device) or time.perf_counter()
    for _ in range(repeats):
        fn()
    return (sync(device) or time.perf_counter() - t0) / repeats


def run_bench(args, device):
    """Training steps of every method on random tokens, the memory layer against the FFN, and eval speed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config
    import resource
    is_cuda = str(device).startswith("cuda")
    if args.model:
        model_config = AutoConfig.from_pretrained(args.model)
    else:
        model_config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(4096, args.seq_len))

    def make_model():  # the named weights with --model (unless --random-init), else random ones
        if args.model and not args.random_init:
            return load_model(args.model, device)[0]
        with torch.device(device):
            return AutoModelForCausalLM.from_config(model_config)
    L, d = model_config.num_hidden_layers, model_config.hidden_size
    mem_cfg = MemoryConfig(layers=tuple(sorted({L // 4, L // 2, 3 * L // 4})))  # 6, 12, 18 of 24
    peak_flops = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    gpu = torch.cuda.get_device_name() if is_cuda else "cpu"
    peak = next((v for k, v in peak_flops.items() if k in gpu), None)
    print(f"bench: {args.shape if not args.model else args.model} ({L} layers, hidden {d}) on {gpu}; "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps")
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, model_config.vocab_size, (args.seq_len,), generator=g).tolist()
                for _ in range(args.batch_size * (args.steps + 2))]
    print(f"{'method':10s} {'tokens/s':>10s} {'ms/step':>9s} {'peak mem':>10s} {'MFU':>6s} {'select':>7s}")
    tokens_per_s = {}
    n_params = sum(p.numel() for p in make_model().parameters())  # of the plain transformer, for MFU:
    flops_per_token = 6 * n_params + 12 * L * d * args.seq_len     # 6 per parameter per token, plus attention
    for method in ("full", "lora", "smf", "retrofit"):
        torch.manual_seed(0)
        model = make_model()
        if method == "smf" and not memory_blocks(model):
            add_memory(model, mem_cfg)
        prepare_model(model, method, mem_cfg, (16, 32.0, 0.05), False, device)
        n = mem_cfg.n_keys ** 2
        background = [BackgroundStats(torch.randint(0, 50, (n,), device=device),
                                      torch.randint(0, 500, (n,), device=device), 2000) for _ in mem_cfg.layers]
        micro = math.gcd(4, args.batch_size)  # SMF's micro-batches of 4, all in one forward pass
        cfg = TrainConfig(method=method, micro_batch=micro, grad_accum=args.batch_size // micro, max_len=args.seq_len,
                          max_steps=args.steps + 2, warmup=1)
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bars between the rows
            hist = train(model, _ByteTok(), examples, cfg, background, device)[2:]  # 2 warm-up steps
        step_s = sum(h["step_time"] for h in hist) / len(hist)
        tok_s = args.batch_size * args.seq_len / step_s
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak, on a CPU
        mem = (torch.cuda.max_memory_allocated() if is_cuda else rss) / 2 ** 30
        mfu = f"{100 * flops_per_token * tok_s / peak:5.1f}%" if peak else "    -"
        if method == "smf":  # the selectors' own cost, timed apart so that training runs without host syncs
            M, S = args.batch_size * args.seq_len, mem_cfg.heads * mem_cfg.topk
            rows_read = torch.randint(0, n, (M, S), device=device)
            group = torch.arange(M, device=device) // (micro * args.seq_len)
            t_select = timed(lambda: select_reads(rows_read, group, cfg.grad_accum, background[0], kl_scores, 512),
                             device)
            select = len(mem_cfg.layers) * t_select / step_s
        tokens_per_s[method] = tok_s
        print(f"{method:10s} {tok_s:10.0f} {1000 * step_s:9.1f} {mem:8.2f}GB {mfu:>6s} "
              + (f"{100 * select:6.1f}%" if method == "smf" else "      -"))
        del model
    print(f"SMF tokens/s / full finetuning tokens/s: {tokens_per_s['smf'] / tokens_per_s['full']:.2f}")

    # one memory layer against the SwiGLU FFN beside it, at the real width (hidden 896, N = 16,384)
    dt = torch.bfloat16 if is_cuda else torch.float32
    x = torch.randn(2048, 896, device=device, requires_grad=True)
    ffn_in, ffn_out = nn.Linear(896, 2 * 4864, bias=False).to(device), nn.Linear(4864, 896, bias=False).to(device)
    memory = ProductKeyMemory(896).to(device)
    def fwd_bwd(f):
        with autocast(device):
            y = f(x)
        y.float().sum().backward()
    swiglu = lambda x: ffn_out(F.silu(ffn_in(x)[:, :4864]) * ffn_in(x)[:, 4864:])
    t_ffn, t_mem = timed(lambda: fwd_bwd(swiglu), device), timed(lambda: fwd_bwd(memory), device)
    print(f"memory layer fwd+bwd / SwiGLU FFN fwd+bwd (hidden 896, N=16384, 2048 tokens, {dt}): "
          f"{t_mem / t_ffn:.2f} ({1000 * t_mem:.1f} ms vs {1000 * t_ffn:.1f} ms)")

    if not args.eval_n:
        return
    # evaluation throughput on synthetic prompts, batch size 1 against the default
    words = "the of patient acute nerve blood which cell drug most common cause treatment".split()
    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(words) for _ in range(n))
    tokenizer = (AutoTokenizer.from_pretrained(args.model) if args.model
                 else toy_tokenizer([sentence(50) for _ in range(200)], 400))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = make_model().eval().to(dt)
    mcq = [{"question": sentence(20), "opa": sentence(4), "opb": sentence(4), "opc": sentence(4), "opd": sentence(4),
            "cop": 0} for _ in range(args.eval_n)]
    tqa = [(sentence(12), ["x"]) for _ in range(args.eval_n)]
    text = sentence(args.eval_n * 60)
    for bs in (1, args.eval_batch_size):
        with contextlib.redirect_stderr(io.StringIO()):
            mq = args.eval_n / timed(lambda: eval_medmcqa(model, tokenizer, mcq, batch_size=bs), device, 1)
            tq = args.eval_n / timed(lambda: eval_triviaqa(model, tokenizer, tqa, batch_size=bs), device, 1)
            wt = timed(lambda: eval_wikitext(model, tokenizer, text, batch_size=bs), device, 1)
        print(f"eval batch {bs:3d}: MedMCQA {mq:8.1f} q/s   TriviaQA {tq:8.1f} q/s   "
              f"WikiText {len(tokenizer(text)['input_ids']) / wt:10.0f} tokens/s")


class _ByteTok:
    """Stands in for a tokenizer when `bench` trains on random token ids (the ids are given as `texts`)."""
    eos_token_id, pad_token_id = 0, 0
    def __call__(self, ids):
        return {"input_ids": list(ids)}


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
    if not os.path.isdir(args.results_dir):
        raise UserError(f"results folder {args.results_dir} does not exist — run run_all.sh first")

    def summary(folder, probe, key, scale):  # (mean, sample std, n) over the seeds, or None
        files = sorted(glob.glob(os.path.join(args.results_dir, folder, "seed*", "eval.json")))
        xs = [scale * r[probe][key] for r in (json.load(open(f)) for f in files) if probe in r]
        return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)) if xs else None

    base = [summary("base", *col[1:]) for col in TABLE_COLUMNS]
    markdown = ["| row | n | " + " | ".join(f"{col[0]} | Δ" for col in TABLE_COLUMNS) + " |",
                "|---" * (2 + 2 * len(TABLE_COLUMNS)) + "|"]
    csv_lines = [",".join(["row", "n"] + [f"{col[0]} {s}" for col in TABLE_COLUMNS for s in ("mean", "std", "delta")])]
    for name, folder in TABLE_ROWS:
        cells, numbers, n = [], [], 0
        for col, b in zip(TABLE_COLUMNS, base):
            s = summary(folder, *col[1:])
            delta = s[0] - b[0] if s and b else None
            n = s[2] if s else n
            cells += [f"{s[0]:.2f} ± {s[1]:.2f}" if s else "missing", "" if delta is None else f"{delta:+.2f}"]
            numbers += [f"{s[0]:.4f}", f"{s[1]:.4f}"] if s else ["", ""]
            numbers.append("" if delta is None else f"{delta:.4f}")
        markdown.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
        csv_lines.append(",".join([name, str(n)] + numbers))
    write_atomic(os.path.join(args.results_dir, "table.md"), "\n".join(markdown) + "\n")
    write_atomic(os.path.join(args.results_dir, "table.csv"), "\n".join(csv_lines) + "\n")
    print("\n".join(markdown))


# -----------------------------------------------------------------------------------------------------------
# CLI


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a mistyped flag gets the same one-line error as every other mistake
        print(f"error: {message} — see `python {self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    memory = Parser(add_help=False)
    memory.add_argument("--memory-layers", type=int, nargs="+", default=[6, 12, 18])
    for name, default in (("keys", 128), ("heads", 4), ("key-dim", 256), ("topk", 16)):  # N = keys**2 rows
        memory.add_argument(f"--memory-{name}", type=int, default=default)
    data = Parser(add_help=False)
    data.add_argument("--eval-medmcqa", "--medmcqa-eval", dest="eval_medmcqa", default="openlifescienceai/medmcqa")
    data.add_argument("--wikitext", default="Salesforce/wikitext", help="hub id, or a local .txt/.jsonl/.parquet")
    data.add_argument("--wikitext-config", default="wikitext-103-v1", choices=["wikitext-103-v1", "wikitext-2-raw-v1"])
    data.add_argument("--triviaqa", default="mandarjoshi/trivia_qa")
    data.add_argument("--medmcqa-mode", default="answer", choices=["answer", "letter"])
    data.add_argument("--limit", type=int, default=1000, help="examples (lines for WikiText) per probe")
    data.add_argument("--batch-size", type=int, default=16)

    e = sub.add_parser("eval", parents=[common, memory, data], help="evaluate a model on the probes")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--probe", default="all", choices=["medmcqa", "wikitext", "triviaqa", "all"])
    e.add_argument("--medmcqa", dest="eval_medmcqa", help="local MedMCQA validation file (same as --eval-medmcqa)")
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--add-memory", choices=["additive", "replacement"], help="add untrained memory first")

    t = sub.add_parser("train", parents=[common, memory, data], help="retrofit, smf, lora or full finetuning")
    t.add_argument("--method", default="smf", choices=["retrofit", "smf", "lora", "full"])
    t.add_argument("--model", default=DEFAULT_MODEL, help="base model, or a retrofit checkpoint for smf")
    t.add_argument("--out", default=None, help="checkpoint folder (default runs/<method>)")
    t.add_argument("--memory-mode", default="additive", choices=["additive", "replacement"])
    t.add_argument("--medmcqa", default="openlifescienceai/medmcqa", help="training data: hub id or local file")
    t.add_argument("--background", default="OpenAssistant/oasst1", help="background corpus: hub id or local file")
    t.add_argument("--background-stats", help="reuse the background_stats.safetensors of an earlier smf run")
    t.add_argument("--selector", choices=["kl", "tfidf"])
    t.add_argument("--top-t", type=int)
    t.add_argument("--train-scale", action="store_true", help="smf: also train alpha")
    t.add_argument("--background-examples", type=int, default=2000)
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    for name, typ in (("lr", float), ("epochs", float), ("max-steps", int), ("limit-train", int),
                      ("forward-batch", int)):
        t.add_argument(f"--{name}", type=typ)
    for name, typ, default in (("micro-batch", int, 4), ("grad-accum", int, 4), ("max-len", int, 1024),
                               ("warmup", int, 100), ("clip", float, 1.0), ("weight-decay", float, 0.0),
                               ("lora-r", int, 16), ("lora-alpha", float, 32.0), ("lora-dropout", float, 0.05),
                               ("seed", int, 0)):
        t.add_argument(f"--{name}", type=typ, default=default)
    t.add_argument("--eval-out", help="after training, evaluate the checkpoint (all probes) into this JSON")

    b = sub.add_parser("bench", parents=[common], help="training and evaluation speed on a random-weight model")
    b.add_argument("--shape", default="tiny", choices=list(SHAPES))
    b.add_argument("--model", help="bench this model (hub id or folder) instead of a named shape")
    b.add_argument("--random-init", action="store_true", help="with --model: its architecture, random weights")
    b.add_argument("--batch-size", type=int, default=None, help="default: 16 on a GPU, 4 on a CPU")
    b.add_argument("--seq-len", type=int, default=None, help="default: 512 on a GPU, 256 on a CPU")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--eval-n", type=int, default=32, help="questions for the eval throughput rows (0: skip them)")
    b.add_argument("--eval-batch-size", type=int, default=16)

    tb = sub.add_parser("table", parents=[common], help="the results table from a run_all.sh folder")
    tb.add_argument("results_dir")
    return p


def check_args(args):
    """Every bad value a user can give, caught before any model is loaded."""
    positive = ["batch_size", "limit", "micro_batch", "grad_accum", "max_len", "max_steps", "limit_train", "epochs",
                "background_examples", "lora_r", "forward_batch", "memory_keys", "memory_heads", "memory_topk",
                "steps", "seq_len"]
    for name in positive:
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be positive, got {getattr(args, name)} — give a value > 0")
    if getattr(args, "lr", None) is not None and args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr} — give a learning rate > 0")
    if args.command == "train":
        if args.method != "smf" and (args.selector or args.top_t or args.train_scale):
            raise UserError(f"--selector/--top-t/--train-scale only apply to --method smf — drop them for "
                            f"{args.method}")
        args.selector, args.top_t = args.selector or "kl", 512 if args.top_t is None else args.top_t
        if args.top_t <= 0:
            raise UserError(f"--top-t must be positive, got {args.top_t} — give a number of rows > 0")
        args.out = args.out or os.path.join("runs", args.method)
        if args.forward_batch and args.forward_batch % args.micro_batch:
            raise UserError(f"--forward-batch {args.forward_batch} is not a multiple of --micro-batch "
                            f"{args.micro_batch} — a forward pass holds whole micro-batches")
    if args.command == "bench":
        cuda = str(args.device).startswith("cuda")
        args.batch_size, args.seq_len = args.batch_size or (16 if cuda else 4), args.seq_len or (512 if cuda else 256)
    if getattr(args, "memory_topk", None) and args.memory_topk > args.memory_keys:
        raise UserError(f"--memory-topk {args.memory_topk} exceeds --memory-keys {args.memory_keys} — lower it")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        {"train": run_train, "eval": run_eval, "bench": run_bench, "table": run_table}[args.command](args, args.device)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted — finished checkpoints and results are intact; rerun to continue", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
