"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory to a Hugging Face causal LM and finetunes only the value rows a batch reads
most (KL or TF-IDF against background text), beside LoRA and full finetuning; MedMCQA measures the
learning, WikiText and TriviaQA the forgetting. The method comes first, as the data flows, then the
plumbing. A method definition lifts out with the imports and the definitions named after `Needs:`
in its docstring (a constant's: its trailing comment), followed through their own `Needs:`; one
without `Needs:` needs nothing more. Start: `python smf.py train --method retrofit`, then smf."""
import argparse, collections, contextlib, dataclasses, functools, glob, hashlib, inspect, itertools
import json, math, os, pathlib, random, re, shutil, signal, statistics, sys, tempfile, textwrap
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

# --------------------------------------------------------------------------------------------------
# Shape letters, in every shape comment of the file
#   B  sequences in a batch     T  tokens per sequence (padded)     M = B*T  tokens, flattened
#   dim  the model's width      V  vocabulary        P, O  prompt, option tokens (A options each)
#   H  memory heads             k  rows a head reads (topk)         S = H*k  rows a token reads
#   N = n_keys**2  value rows of a memory (n_keys sub-keys per half)   D  background texts
#   G  groups that count their reads apart: micro-batches in training, texts in background_stats
#   R  distinct rows one optimizer step updates                     r  LoRA rank
#   Y  a forward's targets (real tokens that have a next token)      C  targets in a loss chunk

# --------------------------------------------------------------------------------------------------
# Config (the comments are the --help texts)

@dataclasses.dataclass
class MemoryConfig:  # the target paper's published config (layers 1/4, 1/2, 3/4 of the way up)
    layers: tuple = (6, 12, 18)  # 0-based decoder layers that get their own memory
    mode: str = "additive"  # "additive": mlp(x) + alpha*memory(x); "replacement": memory(x)
    n_keys: int = 128  # sub-keys per half; the memory holds n_keys**2 value rows
    heads: int = 4  # each head has its own two sub-key sets
    key_dim: int = 256  # query/key width, split into two halves of key_dim // 2
    topk: int = 16  # candidates per half, and rows read per head after re-ranking
    alpha_init: float = 0.01  # additive mode only: the learned per-layer scale starts here

@dataclasses.dataclass
class TrainConfig:
    """One training run; the defaults are the target paper's published recipe. A retrofit comes
    first: a new memory is random, and ranking its rows against background reads would rank noise
    until it is trained densely on general text (then background_stats). Needs: METHOD_LR."""
    method: str = "smf"  # retrofit (new memory, trained on background text) | smf | lora | full
    medmcqa: str = "openlifescienceai/medmcqa"  # training data (train split): hub id or file
    background: str = "OpenAssistant/oasst1"  # the retrofit's data, the selectors' reference
    lr: float = None  # peak learning rate; default: retrofit/smf 5e-4, lora 2e-4, full 5e-5
    epochs: float = None  # passes over the training data; default 2 for retrofit, else 3
    micro_batch: int = 4  # sequences per micro-batch (SMF picks top_t rows per micro-batch)
    grad_accum: int = 4  # micro-batches per optimizer step: effective batch 16 sequences
    forward_tokens: int = 4096  # padded tokens a forward, whole micro-batches (a larger one: alone)
    loss_chunk: int = 1024  # tokens whose vocabulary logits exist at once (the loss runs in chunks)
    max_len: int = 1024  # tokens per training sequence; longer texts are cut there
    warmup: int = 100  # optimizer steps of linear warm-up, then cosine decay to zero
    clip: float = 1.0  # largest gradient L2 norm per step (0: no clipping)
    weight_decay: float = 0.0  # AdamW: w -= lr * this * w a step; SGD: this * w joins the gradient
    optimizer: str = "adamw"  # adamw | sgd (Lin et al. use SGD with lr ~2 for SMF)
    selector: str = "kl"  # smf: how a micro-batch ranks the rows it read, against background
    top_t: int = 512  # smf: rows updated per memory layer per micro-batch
    train_scale: bool = False  # smf: also train each layer's alpha (the "+scale" rows)
    background_examples: int = 2000  # background texts behind the selectors (D)
    lora_r: int = 16  # lora: rank of the update
    lora_alpha: float = 32.0  # lora: the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05  # lora: dropout probability on the LoRA input only
    max_steps: int = None  # stop after this many optimizer steps (the schedule is laid over them)
    limit_train: int = None  # MedMCQA: this many random texts (default 60,000); OASST1: the first
    seed: int = 0  # shuffles the data (and the MedMCQA subset), seeds every initialisation

    def __post_init__(self):  # the two defaults that depend on the method, resolved in one place
        self.lr = self.lr or METHOD_LR[self.method]
        self.epochs = self.epochs or (2 if self.method == "retrofit" else 3)

@dataclasses.dataclass
class EvalConfig:
    medmcqa: str = "openlifescienceai/medmcqa"  # MedMCQA probe (validation split): hub id or file
    medmcqa_mode: str = "answer"  # score ' L. option text' (the paper's) or the letter alone
    wikitext: str = "Salesforce/wikitext"  # WikiText probe (test split): hub id or file
    triviaqa: str = "mandarjoshi/trivia_qa"  # TriviaQA probe (rc.nocontext validation): id or file
    repetition_penalty: float = None  # TriviaQA; default the model's generation_config's
    limit: int = 1000  # examples per probe (lines of WikiText)
    batch_size: int = 16  # MedMCQA questions per forward (TriviaQA: 2x, WikiText: 1/2)

METHOD_LR = {"retrofit": 5e-4, "smf": 5e-4, "lora": 2e-4, "full": 5e-5}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line `error: what — how to fix`."""

def require(ok, message):
    """The user-facing assert. Needs: UserError."""
    if not ok:
        raise UserError(message)

def pad_batch(seqs, pad_id, left=False, device="cpu"):
    """(ids, mask), both (B, T): right padding for scoring, left padding for generation."""
    rows = [torch.tensor(s, dtype=torch.long) for s in seqs]
    pad = functools.partial(nn.utils.rnn.pad_sequence, batch_first=True,
                            padding_side="left" if left else "right")
    ids, mask = pad(rows, padding_value=pad_id), pad([torch.ones_like(r) for r in rows])
    return ids.to(device), mask.to(device)

def model_dtype(device):
    """The GPU's dtype policy: bf16 frozen weights and autocast; fp32 on a CPU (tests patch it)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32

def autocast(device):
    """bf16 autocast where model_dtype is (trainable weights stay fp32). Needs: model_dtype."""
    dtype = model_dtype(device)
    return torch.autocast(torch.device(device).type, dtype, enabled=dtype == torch.bfloat16)

progress = functools.partial(tqdm, disable=None)  # no bar in a log: \r makes one endless line

# --------------------------------------------------------------------------------------------------
# Memory layer: product keys (Lample et al. 2019) with the Memory+ output (Berges et al. 2024)

class ProductKeyMemory(nn.Module):
    """N = n_keys**2 value rows of width dim, read without scoring all N. Product keys: a head
    splits its query in two halves, each scored against its own n_keys sub-keys; row (i1, i2),
    stored as i1 * n_keys + i2, scores s1[i1] + s2[i2]. The top k of the k*k sums of each half's
    top k are exactly the top k of all N rows (a row whose i1 is outside its half's top k is beaten
    by the k rows (j, i2) whose j are in it): 2 * n_keys scores, not N.
    A read is one lookup of a row by a token's head (one of its k), what the selectors count: S a
    token. Each head softmaxes its k scores, so a token's S weights sum to H; the readout, their
    weighted sum of rows, leaves through the Memory+ output w2(readout * silu(w1 x)), multiplied
    by silu(w1 x) of the token itself as in a SwiGLU FFN (no sigmoid gate on top). `read_gate`,
    when set, sees the rows each token reads and returns which reads may teach (pass gradient to)
    their value row, or None for all: SMF's row selection (ReadGate, below) enters there only.
    As the target paper's code: no query batch-norm (Lample et al.'s ties a token's rows to its
    batch); values per layer (Memory+ shares one pool); rows of norm ~1, w1 and w2 keeping a
    vector's scale (std dim^-1/2), small keys, nn.Linear's default biases."""

    def __init__(self, dim, n_keys=128, heads=4, key_dim=256, topk=16):
        super().__init__()
        assert key_dim % 2 == 0 and topk <= n_keys, "key_dim must be even, topk <= n_keys"
        self.n_keys, self.heads, self.key_dim, self.topk = n_keys, heads, key_dim, topk
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2))  # 2: the two halves
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))          # (N, dim)
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.read_gate = None  # rows (M, S) -> None, or bool (M, S)
        nn.init.uniform_(self.keys, -key_dim ** -0.5, key_dim ** -0.5)
        nn.init.normal_(self.values, std=dim ** -0.5)
        nn.init.xavier_uniform_(self.query.weight)
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=dim ** -0.5)

    def lookup(self, x):  # x (M, dim) -> scores (M, H, k), rows (M, H, k)
        """In fp32 even under bf16 autocast (cheap; bf16 scores would tie and swap rows). Batching
        moves a token's rows only by float rounding: of x (under bf16 autocast) and of scores."""
        k, half = self.topk, self.key_dim // 2
        with torch.autocast(x.device.type, enabled=False):
            q = F.linear(x.float(), self.query.weight.float(), self.query.bias.float())
            q = q.view(-1, self.heads, 2, half)                               # (M, H, 2, half)
            sub = torch.einsum("mhcd,hcnd->mhcn", q, self.keys.float())       # (M, H, 2, n_keys)
        sub_scores, sub_idx = sub.topk(k, dim=-1)                             # (M, H, 2, k)
        pair = sub_scores[:, :, 0, :, None] + sub_scores[:, :, 1, None, :]    # (M, H, k, k)
        scores, best = pair.flatten(2).topk(k, dim=-1)                        # (M, H, k)
        i1 = sub_idx[:, :, 0].gather(-1, best // k)                           # pair = (i1, i2)
        i2 = sub_idx[:, :, 1].gather(-1, best % k)
        return scores, i1 * self.n_keys + i2

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        xf = x.reshape(-1, x.shape[-1])                                       # (M, dim)
        scores, rows = self.lookup(xf)
        rows = rows.flatten(1)                                                # (M, S)
        weights = scores.float().softmax(-1).flatten(1).to(self.values.dtype)  # (M, S), sum H
        gate = self.read_gate(rows) if self.read_gate else None
        bag = functools.partial(F.embedding_bag, rows, mode="sum")  # table (N, dim) -> (M, dim)
        if gate is None:
            readout = bag(self.values, per_sample_weights=weights)
        else:
            # weights*gate + weights*(1-gate) = weights: the same readout, but the second bag reads
            # detached values, so only gated-in reads pass gradient to value rows (keys and query,
            # frozen in SMF where a gate is set, would still get it from every read)
            gate = gate.to(weights.dtype)
            learn = bag(self.values, per_sample_weights=weights * gate)
            fixed = bag(self.values.detach(), per_sample_weights=weights * (1 - gate))
            readout = learn + fixed                                           # (M, dim)
        out = self.w2(readout.to(xf.dtype) * F.silu(self.w1(xf)))            # Memory+
        return out.view(x.shape)

# --------------------------------------------------------------------------------------------------
# Attaching memory and LoRA to a Hugging Face model whose decoder blocks are model.model.layers[i]

class MemoryBlock(nn.Module):
    """Stands where a decoder layer's FFN stood, seeing its input (after the post-attention norm).
    Replacement: memory(x), the FFN dropped. Additive: mlp(x) + alpha * memory(x), alpha a learned
    scalar per layer from 0.01, so a new random memory barely moves the model. Value gradients
    scale with alpha; AdamW's step ignores that only while |g| >> eps = 1e-8. At alpha 0.01-0.02
    they are ~2e-9 (Qwen, SmolLM2), and eps damps steps to 0.2-0.3 lr: SMF there moves little."""

    def __init__(self, mlp, memory, mode, alpha_init=0.01):
        super().__init__()
        self.memory = memory
        self.mlp = mlp if mode == "additive" else None  # replacement: the FFN is dropped
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if mode == "additive" else None

    def forward(self, x):
        if self.mlp is None:
            return self.memory(x)
        return self.mlp(x) + self.alpha * self.memory(x)

def add_memory(model, cfg: MemoryConfig):
    """Puts a fresh fp32 ProductKeyMemory beside (or instead of) the FFN at each of cfg.layers.
    Needs: MemoryConfig, ProductKeyMemory, MemoryBlock, memory_blocks, require."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    require(layers is not None and all(hasattr(layer, "mlp") for layer in layers),
            f"{type(model).__name__} has no model.model.layers[i].mlp — use a Qwen2, Llama or "
            "Mistral-style model")
    require(all(0 <= i < len(layers) for i in cfg.layers), f"memory layers {list(cfg.layers)} are "
            f"out of range — the model has layers 0..{len(layers) - 1}")
    require(not memory_blocks(model), "the model already has memory — start from the base model, "
            "or train its memory with --method smf")
    device, dim = next(model.parameters()).device, model.config.hidden_size
    for i in cfg.layers:
        memory = ProductKeyMemory(dim, cfg.n_keys, cfg.heads, cfg.key_dim, cfg.topk)
        layers[i].mlp = MemoryBlock(layers[i].mlp, memory, cfg.mode, cfg.alpha_init).to(device)
    return memory_blocks(model)

def memory_blocks(model):
    """The model's MemoryBlocks, shallowest first (as a forward runs them). Needs: MemoryBlock."""
    return [m for m in model.modules() if isinstance(m, MemoryBlock)]

class LoRALinear(nn.Module):
    """y = base(x) + (lora_alpha/r) * B A dropout(x), as in the LoRA paper; B starts at zero."""

    def __init__(self, base: nn.Linear, r=16, alpha=32.0, dropout=0.05):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)             # (r, in), (out, r)
        return self.base(x) + (self.dropout(x) @ a.t() @ b.t()) * self.scale

def add_lora(model, r=16, alpha=32.0, dropout=0.05, targets=LORA_TARGETS):
    """Wraps each nn.Linear named in `targets` in a LoRALinear. Needs: LoRALinear, LORA_TARGETS."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))

@torch.no_grad()
def merge_lora(model):
    """Folds each LoRA update into its base weight (in fp32) and unwraps it. Needs: LoRALinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                delta = child.scale * child.lora_B.float() @ child.lora_A.float()  # (out, in)
                w.copy_((w.float() + delta).to(w.dtype))
                setattr(parent, name, child.base)
    return model

def cast_model(model, dtype, keep_fp32=()):
    """Stores parameters in dtype but keep_fp32 and each memory's query and keys, which pick the
    rows read (in bf16, ~0.5% of reads would change at N = 16,384). Needs: memory_blocks."""
    lookup = [[b.memory.keys, *b.memory.query.parameters()] for b in memory_blocks(model)]
    fp32 = {id(p) for p in itertools.chain(keep_fp32, *lookup)}
    for p in model.parameters():
        p.data = p.data.float() if id(p) in fp32 else p.data.to(dtype)
    return model

# --------------------------------------------------------------------------------------------------
# Row selection (per memory layer): which value rows a micro-batch may update
# SMF lets a micro-batch teach only the top_t rows it reads most compared with general text (rows
# every text reads hold what the model needs everywhere). The background statistics are gathered
# once, after the retrofit; per micro-batch a score ranks its reads against them, and the read
# gate of ProductKeyMemory lets only the picked rows' reads pass gradient to their value rows.
# Picks are per micro-batch (t = 512 a micro-batch of 4, as the paper); a step updates their union.
# They act inside the forward, not as a mask on the gradient after it: micro-batches that share a
# forward share one gradient, where micro-batch 2 would teach rows only micro-batch 1 picked.

@dataclasses.dataclass
class BackgroundStats:
    df: torch.Tensor      # (N,) background texts that read row i at least once
    reads: torch.Tensor   # (N,) total background reads of row i
    texts: int            # D, the background texts counted (the papers' B)

def tfidf_scores(counts, background: BackgroundStats):  # counts (N,) or (G, N) -> the same shape
    """(c_i / sum c) * ln((D+1) / (df_i+1)): read often now, by few texts. Needs: BackgroundStats"""
    tf = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    return tf * torch.log((background.texts + 1) / (background.df.double() + 1))

def kl_scores(counts, background: BackgroundStats):  # counts (N,) or (G, N) -> the same shape
    """p_i ln(p_i / q_i): row i's term of KL(batch reads || add-one-smoothed background reads);
    add-one keeps a row the background never read finite. A row read less here than there scores
    below zero, picked last if fewer than top_t score above. Needs: BackgroundStats."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    smoothed = background.reads.double() + 1
    q = smoothed / smoothed.sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))

SELECTORS = {"kl": kl_scores, "tfidf": tfidf_scores}  # Needs: kl_scores, tfidf_scores

def select_rows(scores, counts, top_t):  # (N,) or (G, N) -> bool of the same shape
    """The top_t read rows by score; ties go to the lower row (a stable sort), unread rows never."""
    scores = torch.where(counts > 0, scores, torch.full_like(scores, -math.inf))
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top_t]
    # mark the best rows True, except those never read (when fewer than top_t rows were read,
    # unread ones with score -inf fill the rest of `best`): gather asks, scatter writes
    chosen = torch.zeros_like(counts, dtype=torch.bool)
    return chosen.scatter_(-1, best, (counts > 0).gather(-1, best))

def token_groups(mask, group_size):  # mask (B, T) -> (M,)
    """Each token's group (its sequence // group_size: a micro-batch, or a text); -1 for pads."""
    group = torch.arange(mask.shape[0], device=mask.device)[:, None] // group_size  # (B, 1)
    return group.expand_as(mask).masked_fill(mask == 0, -1).flatten()

def count_reads(rows, group, n_groups, n_rows):  # rows (M, S), group (M,) -> (G, N)
    """How often each group's tokens read each row, 1 a read whatever its weight (the published
    logger's choice, not derived); pads (group -1) never count. No host sync, unlike bincount."""
    real = (group >= 0)[:, None].expand_as(rows).long()                         # (M, S)
    # one flat counter for all groups: group g's row r is cell g * N + r (pads add 0 to group 0)
    cell = group.clamp(min=0)[:, None] * n_rows + rows                          # (M, S)
    counts = torch.zeros(n_groups * n_rows, dtype=torch.long, device=rows.device)
    return counts.scatter_add_(0, cell.flatten(), real.flatten()).view(n_groups, n_rows)

class ReadGate:
    """SMF's read gate of one memory layer in a forward of G micro-batches: each picks the top_t
    rows it read by score_fn, and a read teaches its row only if its own micro-batch picked it;
    `chosen` (G, N) holds the picks. Needs: BackgroundStats, count_reads, select_rows."""

    def __init__(self, group, n_groups, background: BackgroundStats, score_fn, top_t):
        self.group, self.n_groups = group, n_groups  # group (M,): a token's micro-batch, -1: pad
        self.background, self.score_fn, self.top_t = background, score_fn, top_t
        self.chosen = None

    @torch.no_grad()
    def __call__(self, rows):  # rows (M, S) -> bool (M, S); no host sync: it runs mid-forward
        counts = count_reads(rows, self.group, self.n_groups, self.background.df.shape[0])  # (G, N)
        self.chosen = select_rows(self.score_fn(counts, self.background), counts, self.top_t)
        # chosen (G, N) indexed by group (M, 1) and rows (M, S) -> (M, S): was row r picked by
        # token m's own micro-batch? Pads (group -1) are never gated in.
        return self.chosen[self.group.clamp(min=0)[:, None], rows] & (self.group >= 0)[:, None]

class StopForward(Exception):
    """Raised by the last memory layer's count_background_reads to end a forward early."""

@torch.no_grad()
def count_background_reads(rows, group, n_texts, stats, last):  # rows (M, S) -> None
    """background_stats' read gate: adds each text's reads to `stats` and gates nothing (None); the
    last memory layer's raises StopForward, as later layers and the head change no read. Needs:
    count_reads, StopForward."""
    counts = count_reads(rows, group, n_texts, stats.df.shape[0])                # (G, N)
    stats.reads += counts.sum(0).cpu()
    stats.df += (counts > 0).sum(0).cpu()
    if last:
        raise StopForward

@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_tokens=16384, device="cpu"):
    """df, reads and D per memory layer, each text its own group, in eval mode, once: right after
    the retrofit, on its first background_examples texts, for every SMF run from it (SMF trains
    values only; earlier values shift later reads). Length-sorted texts share a batch (pads < 20%,
    batch_tokens at most); a forward stops after the last memory layer. Batching moves a read only
    by float rounding (tested): rarely in fp32, a few under bf16. Needs: StopForward, autocast,
    BackgroundStats, count_background_reads, memory_blocks, token_groups, pad_batch, progress."""
    blocks = memory_blocks(model)
    zeros = functools.partial(torch.zeros, blocks[0].memory.values.shape[0], dtype=torch.long)
    stats = [BackgroundStats(zeros(), zeros(), len(texts)) for _ in blocks]
    seqs = sorted((tokenizer(t)["input_ids"][:max_len] for t in texts), key=len)
    batches = [[]]
    for seq in filter(None, seqs):  # sorted, so seq is the longest of its batch; empty: no reads
        full = (len(batches[-1]) + 1) * len(seq) > batch_tokens
        if batches[-1] and (full or len(seq) > 1.25 * len(batches[-1][0])):  # pads < 20%
            batches.append([])
        batches[-1].append(seq)
    model.eval()
    for batch in progress(batches if batches[0] else [], "background stats"):
        ids, mask = pad_batch(batch, tokenizer.pad_token_id, device=device)  # (B, T)
        for i, (block, s) in enumerate(zip(blocks, stats)):
            block.memory.read_gate = functools.partial(count_background_reads, group=token_groups(
                mask, 1), n_texts=len(batch), stats=s, last=i == len(blocks) - 1)
        with autocast(device), contextlib.suppress(StopForward):
            model(input_ids=ids, attention_mask=mask)
    for block in blocks:
        block.memory.read_gate = None
    return stats

# --------------------------------------------------------------------------------------------------
# Sparse optimizer and training loop: one plain loop for every method

def get_lr(step, total, peak, warmup):
    """Linear warm-up (1/w, 2/w, .. 1: HF's starts at 0), then cosine decay to zero at total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

class RowSparseAdamW:
    """AdamW (or SGD) stepping only given rows of 2-D parameters, and only their moments and step
    counts: an unpicked row never drifts (masked dense AdamW's stale moments move it). Lazy as
    torch's SparseAdam (a row picked after a gap resumes undecayed moments), but SparseAdam
    bias-corrects by global steps; here each row counts its own (its first step: dense AdamW's)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sgd=False):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.wd, self.sgd = weight_decay, sgd
        self.state = [None] * len(self.params)  # per parameter: m, v (N, dim) and t (N,)

    @torch.no_grad()
    def step(self, rows_per_param, grads_per_param, lr):
        """rows: (R,) distinct rows of each parameter; grads: (R, dim), those rows' gradients."""
        b1, b2 = self.betas
        for i, (p, rows, g) in enumerate(zip(self.params, rows_per_param, grads_per_param)):
            g = g.float()                                                 # (R, dim)
            w = p.index_select(0, rows).float()                           # (R, dim)
            if self.sgd:  # weight decay as torch.optim.SGD applies it: added to the gradient
                p.index_copy_(0, rows, (w - lr * (g + self.wd * w)).to(p.dtype))
                continue
            if self.state[i] is None:
                zeros = torch.zeros_like(p, dtype=torch.float)
                self.state[i] = (zeros, zeros.clone(), torch.zeros(p.shape[0], device=p.device))
            m, v, t = self.state[i]
            t_r = t[rows] + 1                                             # (R,) own step counts
            m_r = b1 * m.index_select(0, rows) + (1 - b1) * g             # (R, dim)
            v_r = b2 * v.index_select(0, rows) + (1 - b2) * g * g         # (R, dim)
            m.index_copy_(0, rows, m_r)
            v.index_copy_(0, rows, v_r)
            t.index_copy_(0, rows, t_r)
            m_hat = m_r / (1 - b1 ** t_r)[:, None]
            v_hat = v_r / (1 - b2 ** t_r)[:, None]
            w = w * (1 - lr * self.wd) - lr * m_hat / (v_hat.sqrt() + self.eps)
            p.index_copy_(0, rows, w.to(p.dtype))

def prepare_model(model, method, mem_cfg=None, lora_cfg=None, train_scale=False, device="cpu"):
    """Adds what the method trains (retrofit: all memory; smf: values, alpha with train_scale; lora:
    A, B; full: all), freezes the rest, stores it in model_dtype (trainables fp32). Needs:
    add_memory, add_lora, memory_blocks, cast_model, model_dtype, require."""
    if method == "retrofit":
        add_memory(model, mem_cfg)
    blocks = memory_blocks(model)
    require(blocks or method not in ("retrofit", "smf"), "the model has no memory layers — smf "
            "trains from a retrofit checkpoint (--method retrofit)")
    model.requires_grad_(method == "full")
    if method == "lora":
        add_lora(model, *lora_cfg)  # A and B are created trainable
    for b in blocks if method in ("retrofit", "smf") else []:
        b.memory.requires_grad_(method == "retrofit")
        b.memory.values.requires_grad_(True)
        if b.alpha is not None:
            b.alpha.requires_grad_(method == "retrofit" or train_scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return cast_model(model.to(device), model_dtype(device), keep_fp32=trainable)

def tokenize(tokenizer, texts, max_len):
    """Token ids of each text cut at max_len, without the texts of one token (no target). No EOS is
    appended (see medmcqa_text)."""
    examples = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    return [e for e in examples if len(e) > 1]

def step_batches(lengths, seqs_per_step, seed):
    """Endless example indices, a step at a time: each epoch a new seeded shuffle, sorted by length
    within chunks of 64 steps, the steps shuffled again. Unlike the published Trainer's random
    micro-batches, texts of similar length (not content) share one and compete for its top_t rows:
    1% pads, not 28%, on MedMCQA; 64-step chunks keep the epoch's order random at schedule scale."""
    rng, chunk = random.Random(seed), 64 * seqs_per_step
    while True:
        order, steps = rng.sample(range(len(lengths)), len(lengths)), []
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lengths.__getitem__)
            steps += [part[i:i + seqs_per_step] for i in range(0, len(part), seqs_per_step)]
        rng.shuffle(steps)
        yield from steps

def total_steps(n_examples, cfg):
    """Optimizer steps: cfg.epochs passes over the examples, cfg.max_steps at most."""
    steps_per_epoch = math.ceil(n_examples / (cfg.micro_batch * cfg.grad_accum))
    return min(math.ceil(cfg.epochs * steps_per_epoch), cfg.max_steps or math.inf)

def split_step(lengths, micro_batch, forward_tokens):  # lengths of a step's texts -> [(i, j)]
    """A step's forwards as ranges of its texts: as many whole micro-batches as keep the padded
    tokens (texts x the longest) within forward_tokens; one over the budget runs alone."""
    spans = []
    for i in range(0, len(lengths), micro_batch):
        j = min(i + micro_batch, len(lengths))
        if spans and (j - spans[-1][0]) * max(lengths[spans[-1][0]:j]) <= forward_tokens:
            spans[-1] = (spans[-1][0], j)  # this micro-batch joins the forward before it
        else:
            spans.append((i, j))
    return spans

def forward_backward(model, seqs, smf_layers, cfg, n_targets, pad_id, device):
    """A forward and backward of micro-batches, each gating its own reads; the loss (summed over
    targets / the step's n_targets) gives one gradient however a step is split. The head runs
    loss_chunk targets at a time, each backward stopping at detached hidden states: (C, V) logits,
    not (Y, V) (16 bytes a logit: bf16, fp32, log-softmax, 2 grads; 2.3 MiB a token at V 151,936).
    Needs: pad_batch, ReadGate, SELECTORS, token_groups, autocast."""
    ids, mask = pad_batch(seqs, pad_id, device=device)                              # (B, T)
    n_groups = math.ceil(len(seqs) / cfg.micro_batch)
    for block, stats in smf_layers:  # each micro-batch its own group of reads
        block.memory.read_gate = ReadGate(token_groups(mask, cfg.micro_batch), n_groups, stats,
                                          SELECTORS[cfg.selector], cfg.top_t)
    with autocast(device):
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    is_target = mask[:, 1:].flatten() > 0  # token t predicts token t + 1, a pad nothing
    hidden = out.last_hidden_state[:, :-1].flatten(0, 1)[is_target]                 # (Y, dim)
    labels = ids[:, 1:].flatten()[is_target]                                        # (Y,)
    detached, loss = hidden.detach().requires_grad_(), 0.0
    for c in range(0, len(labels), cfg.loss_chunk):
        with autocast(device):
            logits = model.lm_head(detached[c:c + cfg.loss_chunk])                  # (C, V)
        part = F.cross_entropy(logits.float(), labels[c:c + cfg.loss_chunk], reduction="sum")
        (part / n_targets).backward()  # frees this chunk's logits; adds to detached.grad
        loss += part.item() / n_targets
    hidden.backward(detached.grad)
    return loss, [block.memory.read_gate.chosen.any(0) for block, _ in smf_layers]  # (N,) each

def train(model, examples, cfg, stats=None, pad_id=0, device="cpu", log_path=None):
    """Trains what requires grad, in place, on token id lists (SMF: stats, a BackgroundStats per
    memory layer); a JSON line per step to log_path; returns the records. Needs: BackgroundStats,
    RowSparseAdamW, make_dense_optimizer, memory_blocks, step_batches, total_steps, split_step,
    forward_backward, get_lr, progress, require."""
    blocks, smf_layers = memory_blocks(model), []  # SMF only: (memory block, its statistics)
    if cfg.method == "smf":
        smf_layers = [(b, BackgroundStats(s.df.to(device), s.reads.to(device), s.texts))
                      for b, s in zip(blocks, stats)]
    values = [b.memory.values for b, _ in smf_layers]
    alphas = [b.alpha for b in blocks if b.alpha is not None]  # logged: the memory's weight
    dense = [p for p in model.parameters() if p.requires_grad and all(p is not v for v in values)]
    dense_opt = make_dense_optimizer(dense, cfg, device)
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=cfg.optimizer == "sgd")
    total = total_steps(len(examples), cfg)
    batches = step_batches(list(map(len, examples)), cfg.micro_batch * cfg.grad_accum, cfg.seed)
    history, log = [], open(log_path or os.devnull, "w", buffering=1)  # line-buffered
    model.train()
    for step in progress(range(total), f"train {cfg.method}"):
        batch, t0, loss = next(batches), time.perf_counter(), 0.0
        lengths = [len(examples[i]) for i in batch]
        n_targets = sum(lengths) - len(batch)  # every text's tokens but its first
        picked = [torch.zeros(len(v), dtype=torch.bool, device=device) for v in values]   # (N,)
        for i, j in split_step(lengths, cfg.micro_batch, cfg.forward_tokens):
            seqs = [examples[k] for k in batch[i:j]]
            part, chosen = forward_backward(model, seqs, smf_layers, cfg, n_targets, pad_id, device)
            loss += part
            require(math.isfinite(loss), f"the loss became {loss} at step {step + 1} — lower --lr "
                    "or check the data; no checkpoint was written by this run")
            picked = [p | c for p, c in zip(picked, chosen)]
        # Only picked rows got gradient (the gate detached every other read), so clipping the
        # full (N, dim) gradients with the dense ones clips exactly what is stepped.
        max_norm = cfg.clip or math.inf  # clip 0: no clipping
        grad_norm = float(torch.nn.utils.clip_grad_norm_(dense + values, max_norm))
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        if dense_opt is not None:
            dense_opt.param_groups[0]["lr"] = lr
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
        rows = [p.nonzero()[:, 0] for p in picked]                                  # (R,)
        sparse_opt.step(rows, [v.grad[r] for v, r in zip(values, rows)], lr)        # (R, dim)
        for v in values:
            v.grad = None
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()  # so that the step's time is true
        tokens, seconds = sum(lengths), time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "step_time": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                  "alpha": [round(a.item(), 6) for a in alphas],
                  "rows_updated": [len(r) for r in rows]}
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}  # JSON has no NaN or Infinity
        log.write(json.dumps(finite) + "\n")
        history.append(record)
    for block in blocks:
        block.memory.read_gate = None
    log.close()
    return history

def make_dense_optimizer(params, cfg, device):
    """torch's AdamW or SGD for `params`, or None: every trainable tensor but SMF's value tables
    (RowSparseAdamW's; a retrofit's value tables are dense and come here)."""
    if not params:
        return None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=str(device).startswith("cuda"))

# --------------------------------------------------------------------------------------------------
# Evaluation: zero-shot, no chat template, greedy; batched so that the batch size changes no answer

def medmcqa_prompt(row):
    """The training text up to `Answer:`, which the model continues with ` {L}. {option}`."""
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\n"
            f"B. {row['opb']}\nC. {row['opc']}\nD. {row['opd']}\nAnswer:")

def medmcqa_answer(row, option, letter_only=False):
    """` {L}. {option text}` for option 0..3, or ` {L}` alone."""
    letter = " " + "ABCD"[option]
    return letter if letter_only else f"{letter}. {row['op' + 'abcd'[option]]}"

def medmcqa_text(row):
    """Prompt, gold answer, explanation line if any; no EOS, as published: an EOS would teach
    stopping early (moving TriviaQA, but no forgetting). Needs: medmcqa_prompt, medmcqa_answer."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    if (row.get("exp") or "").strip():
        text += f"\nExplanation: {row['exp']}"
    return text

def positions(mask):
    """Position ids from each row's first real token: a left-padded row scores as it would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)

def token_logprobs(logits, ids):  # (B, T, V), (B, T) -> (B, T)
    """log p(ids[b, t]) under logits[b, t], in fp32."""
    logits = logits.float()
    return logits.gather(-1, ids[..., None])[..., 0] - logits.logsumexp(-1)

def tail_logprobs(model, seqs, n_scored, pad_id):
    """[(n,) log-probabilities of the last n tokens of each sequence] from one left-padded forward,
    with logits only where a scored token is. Needs: pad_batch, positions, token_logprobs."""
    ids, mask = pad_batch(seqs, pad_id, left=True, device=next(model.parameters()).device)
    tail = max(n_scored)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                logits_to_keep=tail + 1)
    lp = token_logprobs(out.logits[:, -tail - 1:-1], ids[:, -tail:])               # (B, tail)
    return [lp[i, tail - n:] for i, n in enumerate(n_scored)]

def option_logprobs(model, prompts, options, pad_id):
    """[(O,) log-probabilities of each option's tokens after its prompt], prompt by prompt. A prompt
    (most of the tokens) runs once, left-padded, and its KV cache serves its options, one right-
    padded batch after it. Needs: pad_batch, positions, token_logprobs."""
    from transformers import DynamicCache
    A = len(options) // len(prompts)                                                # per prompt
    ids, mask = pad_batch(prompts, pad_id, left=True, device=next(model.parameters()).device)
    cache = DynamicCache(config=model.config)  # filled with the prompts' keys and values
    # transformers >= 5.2x takes the cache as `cache`; earlier 5.x as `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1, **{name: cache})                              # logits (B, 1, V)
    cache.batch_repeat_interleave(A)                                                # B -> B*A
    opt_ids, opt_mask = pad_batch(options, pad_id, device=ids.device)              # (B*A, O)
    past_mask = mask.repeat_interleave(A, 0)                                        # (B*A, P)
    opt_pos = past_mask.sum(-1, keepdim=True) + torch.arange(opt_ids.shape[1], device=ids.device)
    logits = model(input_ids=opt_ids, attention_mask=torch.cat([past_mask, opt_mask], -1),
                   position_ids=opt_pos, **{name: cache}).logits                   # (B*A, O, V)
    # option token j is predicted by the logits before it: for j = 0 the prompt's last
    first = token_logprobs(out.logits[:, -1:].repeat_interleave(A, 0), opt_ids[:, :1])  # (B*A, 1)
    lp = torch.cat([first, token_logprobs(logits[:, :-1], opt_ids[:, 1:])], 1)     # (B*A, O)
    return [lp[i, :len(o)] for i, o in enumerate(options)]

@torch.no_grad()
def eval_medmcqa(model, tokenizer, rows, letter_only=False, batch_size=16):
    """Accuracy of the argmax over 4 options of the mean token log-likelihood of ` {L}. {option}`
    (a mean, or long options lose for their length; letter mode: ` A`.. ` D`). The gold NLL moves
    long before an argmax flips: learning that accuracy on 1,000 questions cannot yet resolve.
    Needs: medmcqa_prompt, medmcqa_answer, option_logprobs, progress."""
    prompts, options = [], []  # token ids: a prompt per question, its four answers after it
    for row in rows:
        prompt = tokenizer(medmcqa_prompt(row))["input_ids"]
        prompts.append(prompt)
        for option in range(4):
            ids = tokenizer(medmcqa_prompt(row) + medmcqa_answer(row, option, letter_only))
            ids = ids["input_ids"]
            assert ids[:len(prompt)] == prompt, "the prompt must tokenize as a prefix of the whole"
            options.append(ids[len(prompt):])
    means = []
    for s in progress(range(0, len(rows), batch_size), "medmcqa"):
        lps = option_logprobs(model, prompts[s:s + batch_size], options[4 * s:4 * (s + batch_size)],
                              tokenizer.pad_token_id)
        means += [lp.mean().item() for lp in lps]
    scores = [means[i:i + 4] for i in range(0, len(means), 4)]
    preds = [max(range(4), key=s.__getitem__) for s in scores]
    correct = [int(p == row["cop"]) if all(map(math.isfinite, s)) else math.nan  # NaN: no answer
               for p, s, row in zip(preds, scores, rows)]
    gold_nlls = [-s[row["cop"]] for s, row in zip(scores, rows)]
    mode = "letter" if letter_only else "letter + option text"
    return {"acc": statistics.mean(correct), "gold_nll": statistics.mean(gold_nlls),
            "n": len(rows), "predictions": preds, "scores": scores, "correct": correct,
            "gold_nlls": gold_nlls, "protocol": f"zero-shot, mean log-likelihood of {mode}"}

@torch.no_grad()
def eval_wikitext(model, tokenizer, text, window=1024, stride=512, batch_size=8):
    """Token perplexity by sliding windows `stride` apart, each scoring only tokens no earlier one
    did: all but the first token (no context) count once. Needs: tail_logprobs, progress."""
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 2, "perplexity needs at least two tokens"
    starts = range(0, max(1, len(ids) - window + stride), stride)
    ends = [min(start + window, len(ids)) for start in starts]
    spans = list(zip(starts, ends, [1] + ends[:-1]))  # (start, end, first token not yet scored)
    nll, count = 0.0, 0
    for b in progress(range(0, len(spans), batch_size), "wikitext"):
        chunk = spans[b:b + batch_size]
        n_scored = [end - first for _, end, first in chunk]
        seqs = [ids[start:end] for start, end, _ in chunk]
        for lp in tail_logprobs(model, seqs, n_scored, tokenizer.pad_token_id):
            nll -= lp.double().sum().item()
        count += sum(n_scored)
    assert count == len(ids) - 1
    return {"ppl": math.exp(nll / count), "tokens": count,
            "protocol": f"token perplexity, window {window}, stride {stride}"}

def normalize_answer(s):
    """The published SMF code's, so that the metric means the paper's: lower case, drop articles,
    keep [a-z0-9 .-], collapse spaces. Not the official TriviaQA script's (which keeps ü, drops
    punctuation): `Zürich` -> `z rich`, `U.S.A.` -> `u.s. .` (its `a` taken for an article)."""
    s = re.sub(r"\b(a|an|the)\b", " ", s.lower())
    return " ".join(re.sub(r"[^a-z0-9 .\-]", " ", s).split())

def alias_contained(prediction, aliases):
    """The paper's metric: a normalised alias inside the normalised generation; no superset of
    exact_match, which drops thousands separators (` 1,000` != `1000`). Needs: normalize_answer."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))

def exact_match(prediction, aliases):
    """The answer equals an alias: the first non-empty line, or a start of it that ends as a
    sentence does (`Paris. It is...`: . ! ? before a space or the end). No comma ends one (`Paris,
    Texas` is not `Paris`); a period cannot tell an abbreviation (`St. Louis` also offers `St`);
    `1,000` equals `1000`. Needs: normalize_answer."""
    def norm(s):
        return normalize_answer(re.sub(r"(?<=\d),(?=\d{3}\b)", "", s))
    line = next((line.strip() for line in prediction.split("\n") if line.strip()), "")
    ends = [m.start() for m in re.finditer(r"[.!?](?=\s|$)", line)]
    answers = {norm(line)} | {norm(line[:end]) for end in ends}
    return bool((answers - {""}) & {norm(a) for a in aliases})

@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=32, repetition_penalty=1.0,
                    batch_size=32):
    """Greedy continuations by HF `generate` (KV cache) up to EOS; None after a score not finite (an
    argmax over NaN: token 0). Only prompts of equal length share a batch: no pads, so each answers
    alone, and the penalty (a row's token's logit: divided if > 0, else multiplied) is its own."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos, device, answers = tokenizer.eos_token_id, next(model.parameters()).device, {}
    for _, same_length in itertools.groupby(order, key=lambda i: len(encoded[i])):
        same_length = list(same_length)
        for b in range(0, len(same_length), batch_size):
            idx = same_length[b:b + batch_size]
            ids = torch.tensor([encoded[i] for i in idx], device=device)           # (B, P)
            finite = torch.ones(len(idx), dtype=torch.bool, device=device)          # (B,)
            def check(_, scores):  # each step's (B, V) scores, checked without a host sync
                finite.logical_and_(scores.isfinite().all(-1))
                return scores
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 repetition_penalty=repetition_penalty, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, logits_processor=[check])
            for i, row, ok in zip(idx, out[:, ids.shape[1]:].tolist(), finite.tolist()):
                row = row[:row.index(eos)] if eos in row else row
                answers[i] = tokenizer.decode(row, skip_special_tokens=True) if ok else None
    return [answers[i] for i in range(len(prompts))]

def eval_triviaqa(model, tokenizer, rows, batch_size=32, max_new_tokens=32,
                  repetition_penalty=None):
    """Alias containment (the paper's) and exact match of a greedy generation per question, with
    the repetition penalty of the model's generation_config.json unless one is given, as the
    paper's generate(do_sample=False). Needs: greedy_generate, alias_contained, exact_match."""
    penalty = repetition_penalty or model.generation_config.repetition_penalty or 1.0
    prompts = [f"Question: {question}\nAnswer:" for question, _ in rows]
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, penalty, batch_size)
    def score(metric):  # 1 or 0 a question; NaN where a score was not finite (no answer)
        return [math.nan if p is None else int(metric(p, a)) for p, (_, a) in zip(preds, rows)]
    contained, exact = score(alias_contained), score(exact_match)
    return {"alias_contains_acc": statistics.mean(contained), "exact_match": statistics.mean(exact),
            "n": len(rows), "predictions": preds, "alias_correct": contained,
            "exact_correct": exact, "protocol": f"zero-shot greedy, {max_new_tokens} new tokens, "
            f"repetition penalty {penalty:g}"}

# --------------------------------------------------------------------------------------------------
# Data files: every source is a hub id, or a local JSON Lines file in the hub's schema

def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    spelled = path.startswith((".", "/", "~")) or path.count("/") > 1
    return os.path.exists(path) or spelled or path.lower().endswith((".jsonl", ".json"))

def read_rows(source, hub_config=None, split="train"):
    """(where, row) pairs from the hub or a local JSON Lines file; `where` names a row in errors."""
    if not is_local(source):
        try:
            import datasets  # here: `eval` runs where `datasets` is not installed
            rows = datasets.load_dataset(source, hub_config, split=split)
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — download "
                            "it first, or pass a local file in the same schema") from e
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    require(os.path.isfile(source), f"data file {source} is not a file — check the path")
    rows, fix = [], "one JSON object per line (JSON Lines, what datasets' to_json writes)"
    with open(source, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows) is no text
        for i, line in enumerate(f.read().split("\n"), 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError as e:
                raise UserError(f"{source}: line {i} is not JSON ({e}) — {fix}") from e
            require(isinstance(row, dict), f"{source}: line {i} is a {type(row).__name__}, not a "
                    f"JSON object — {fix}")
            rows += [(f"line {i}", row)] if row else []
    return rows

def parse_rows(source, rows, parse):
    """Values of the rows passing every filter of parse(row) -> (value, {filter: passed}); a bad
    field is named with its line, and an empty result with what each filter removed."""
    kept, removed = [], collections.Counter()
    for where, row in rows:
        try:
            value, passed = parse(row)
        except KeyError as e:
            raise UserError(f"{source}: {where}: field {e} is missing — use the hub schema") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source}: {where}: {e} — use the hub schema") from e
        removed.update(name for name, ok in passed.items() if not ok)
        kept += [value] if all(passed.values()) else []
    counts = ", ".join(f"{name} removed {n}" for name, n in removed.items())
    require(kept, f"{source}: no rows left of {len(rows)} ({counts}) — check the file")
    return kept

def text(row, field):
    """row[field], which must be a string."""
    if not isinstance(row[field], str):
        raise TypeError(f"field '{field}' is {type(row[field]).__name__}, not text")
    return row[field]

def medmcqa_row(row):
    """The row with its texts checked and `cop` an int 0..3 (other exports write "2" or 2.0)."""
    texts = {field: text(row, field) for field in ("question", "opa", "opb", "opc", "opd")}
    if str(row["cop"]).removesuffix(".0") not in ("0", "1", "2", "3"):
        raise ValueError(f"cop={row['cop']!r}, not an integer 0..3 (0 = opa)")
    single = row.get("choice_type", "single") == "single"
    return {**row, **texts, "cop": int(float(row["cop"]))}, {"choice_type == 'single'": single}

def load_medmcqa(source="openlifescienceai/medmcqa", split="validation", limit=None, seed=None):
    """Single-answer rows (no `choice_type`: kept), shuffled with `seed`, the first `limit`."""
    rows = parse_rows(source, read_rows(source, None, split), medmcqa_row)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit]

def wikitext_row(row):
    line = text(row, "text").strip()
    return line, {"empty line": bool(line)}

def load_wikitext(source="Salesforce/wikitext", config="wikitext-103-v1", limit=1000):
    """The first `limit` stripped non-empty lines of the test split, joined by a blank line."""
    return "\n\n".join(parse_rows(source, read_rows(source, config, "test"), wikitext_row)[:limit])

def triviaqa_row(row):
    """(question, aliases and the answer's value), a list of strings (not one: a letter each)."""
    aliases, value = row["answer"]["aliases"] or [], row["answer"].get("value") or ""
    strings = isinstance(aliases, list) and all(isinstance(a, str) for a in aliases + [value])
    if not strings or not (aliases or value):
        raise ValueError("the answer has no aliases as a list of strings")
    return (text(row, "question"), aliases + [value] if value else aliases), {}

def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split."""
    return parse_rows(source, read_rows(source, "rc.nocontext", "validation")[:limit], triviaqa_row)

def background_row(row):
    """An OASST1 row's text, and its filters: English, assistant, rank 0 or 1, 50+ characters."""
    return text(row, "text"), {"lang == 'en'": row.get("lang", "en") == "en",
                               "role == 'assistant'": row.get("role", "assistant") == "assistant",
                               "rank 0 or 1": row.get("rank", 0) in (0, 1),
                               "at least 50 characters": len(row["text"]) >= 50}

def load_background(source="OpenAssistant/oasst1", limit=None):
    """The general-text corpus: OASST1's filtered assistant replies."""
    return parse_rows(source, read_rows(source, None, "train"), background_row)[:limit]

# --------------------------------------------------------------------------------------------------
# Checkpoints: small files on top of a parent model, staged and renamed into place

STATS = "background_stats.safetensors"  # a retrofit's background statistics, one per memory layer
RESULTS = "smf.py eval"  # the `written_by` of a results file: only such a file is ever replaced

def read_json(path, fix):
    """A JSON file's content, or a one-line error naming the file and how to `fix` it."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} could not be read ({type(e).__name__}: {e}) — {fix}") from e

def write_atomic(path, text):
    """Writes under a temporary name in path's folder, then renames: no reader sees half a file."""
    tmp = pathlib.Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def earlier_results(path, identity):
    """(content, None) of smf eval's results at `path` for `identity`, or (None, what it holds)."""
    try:
        content = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        return None, f"it is no JSON file ({type(e).__name__}): damaged, or not smf's results"
    if not isinstance(content, dict) or content.get("written_by") != RESULTS:
        return None, "it is not smf's results"
    if identity.items() <= content.items():
        return content, None
    return None, f"it holds the results of {content.get('model')}, whose weights are not these"

def check_output(flag, path, fix, replaceable=False):
    """The output rule: `path` must not exist, but as a file of smf's that the caller found it may
    replace (a checkpoint: never); a file is made and removed there, so no run fails at its end."""
    place = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(place):
        place = os.path.dirname(place)
    try:
        tempfile.TemporaryFile(dir=place).close()
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written ({place}: {e.strerror}) — make {place} "
                        "writable") from e
    require(not os.path.lexists(path) or replaceable, f"{flag} {path} exists — {fix}")

@contextlib.contextmanager
def staging(out):
    """A staging folder of this run's own that one rename makes `out` when the block succeeds."""
    place, name = os.path.split(os.path.abspath(out))  # on `out`'s file system: a rename moves it
    os.makedirs(place, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=place)
    try:
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        for file in [staged] + glob.glob(os.path.join(staged, "*")):  # mkdtemp makes 0700 ...
            os.chmod(file, (0o777 if file == staged else 0o666) & ~umask)  # ... safetensors 0600
        try:
            os.rename(staged, out)
        except OSError as e:  # another run wrote `out` meanwhile: that checkpoint stays
            raise UserError(f"{out} was written by another run meanwhile — train again "
                            "into another folder") from e
    finally:
        shutil.rmtree(staged, ignore_errors=True)

def save_checkpoint(folder, meta, tensors, extra=None):
    """weights.safetensors, the `extra` {file: tensors}, and `meta` as config.json's `smf`."""
    from safetensors.torch import save_file
    for name, named in ({"weights.safetensors": tensors} | (extra or {})).items():
        named = {k: v.detach().contiguous().cpu() for k, v in named.items()}
        save_file(named, os.path.join(folder, name))
    pathlib.Path(folder, "config.json").write_text(json.dumps({"smf": meta}, indent=2))

def checkpoint_meta(path):
    """The `smf` entry of a checkpoint's config.json, or None for a plain model or hub id."""
    config = os.path.join(path, "config.json")
    if not (is_local(path) and os.path.isfile(config)):
        return None
    content = read_json(config, "restore the file, or train or download that model again")
    return content.get("smf") if isinstance(content, dict) else None

def fingerprint(path):
    """{file: sha256} of a local model's weight files; None for a hub id (no files to read)."""
    files = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))
    return {os.path.basename(f): hashlib.sha256(pathlib.Path(f).read_bytes()).hexdigest()
            for f in sorted(files)} if is_local(path) else None

def find_parent(path, meta):
    """A checkpoint's parent with the weights it was trained on: the relative one, else absolute."""
    if "parent_abs" not in meta:  # a hub id
        return meta["parent"]
    places = dict.fromkeys([os.path.normpath(os.path.join(path, meta["parent"])),
                            meta["parent_abs"]])
    found = {p: fingerprint(p) for p in places if os.path.isfile(os.path.join(p, "config.json"))}
    recorded, again = meta["parent_fingerprint"], f"restore it, or train {path} again"
    for parent, now in found.items():
        if now == recorded:
            return parent
    require(found, f"the parent of {path} is missing: not at {' nor at '.join(places)} — {again}")
    raise UserError(f"the parent {next(iter(found))} of {path} has other weights than it was "
                    f"trained from — {again}")

def provenance(parent, out):
    """Its parent (relative to `out`, and absolute), the parent's fingerprint, the versions."""
    import transformers
    meta = {"parent": parent, "parent_fingerprint": fingerprint(parent),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if is_local(parent):
        meta["parent"], meta["parent_abs"] = os.path.relpath(parent, out), os.path.abspath(parent)
    return meta

def smf_patch(before, trained):
    """What an SMF checkpoint stores: of a value table only the rows that changed since `before`
    (exactly: a change of 1e-9 counts), as `<name>.index` and `<name>.rows`; alpha whole."""
    patch = {name: t for name, t in trained.items() if name not in before}
    for name in before:
        index = (before[name] != trained[name]).any(dim=1).nonzero()[:, 0]
        patch[f"{name}.index"], patch[f"{name}.rows"] = index, trained[name][index]
    return patch

def stats_tensors(stats):
    """Background statistics as tensors to save: `<layer>.df`, `<layer>.reads` and `texts`."""
    by_layer = {f"{j}.{k}": getattr(s, k) for j, s in enumerate(stats) for k in ("df", "reads")}
    return by_layer | {"texts": torch.tensor(stats[0].texts)}

def load_stats(path):
    """The background statistics a retrofit saved beside its weights, one per memory layer."""
    saved = load_weights(os.path.join(path, STATS), "retrofit again")
    texts = int(saved["texts" if "texts" in saved else "batches"])  # "batches": before 2026-12
    return [BackgroundStats(saved[f"{j}.df"], saved[f"{j}.reads"], texts)
            for j in range(sum(k.endswith(".df") for k in saved))]

def load_weights(file, fix, device="cpu"):
    """A safetensors file's tensors, or a one-line error naming it as missing or damaged."""
    from safetensors.torch import load_file
    require(os.path.isfile(file), f"{file} is missing — {fix}")
    try:
        return load_file(file, device=str(device))
    except Exception as e:
        raise UserError(f"{file} is damaged ({type(e).__name__}) — {fix}") from e

def check_model_path(path):
    """A local model is a folder (holding config.json: load_plain_model names a missing one)."""
    require(not is_local(path) or os.path.isdir(path), f"--model {path} is no folder (nor a hub "
            "id) — give the folder that holds the model")

def load_plain_model(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    files = os.listdir(path) if is_local(path) else ["tokenizer (on the hub)"]
    require(any(f.startswith(("tokenizer", "vocab.")) for f in files), f"{path} has no tokenizer "
            "(AutoTokenizer would guess one) — save the model's tokenizer into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        for file in glob.glob(os.path.join(path, "*.safetensors")):
            load_weights(file, f"restore it, or download {path} again")  # names a damaged one
        raise UserError(f"could not load model '{path}' ({type(e).__name__}: {str(e)[:150]}) — "
                        "check the path, or download the model while online") from e
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one
    return model.to(device).eval(), tokenizer  # a bad --device fails here, in torch's words

def load_model(path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes."""
    check_model_path(path)
    meta = checkpoint_meta(path)
    if meta is None:
        return load_plain_model(path, device, dtype)
    model, tokenizer = load_model(find_parent(path, meta), device, dtype)
    again = f"restore it, or train {path} again"
    tensors = load_weights(os.path.join(path, "weights.safetensors"), again, device)
    if meta["kind"] == "memory":
        add_memory(model, MemoryConfig(**meta["memory"]))
    if meta["kind"] == "lora":
        add_lora(model, meta["train"]["lora_r"], meta["train"]["lora_alpha"], 0.0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():  # whole tensors, or smf_patch's changed rows of a table
            if key.endswith(".rows"):
                name = key.removesuffix(".rows")
                params[name][tensors[f"{name}.index"]] = t
            elif not key.endswith(".index"):
                params[key].copy_(t)
    return cast_model(merge_lora(model), dtype).eval(), tokenizer

# --------------------------------------------------------------------------------------------------
# Commands: train, eval, table

PROBES = ("medmcqa", "wikitext", "triviaqa")
APPLIES = {  # rule 2: option -> the methods it applies to; given to another method, it is refused
    "medmcqa": ("smf", "lora", "full"), "selector": ("smf",), "top_t": ("smf",),
    "train_scale": ("smf",), "lora_r": ("lora",), "lora_alpha": ("lora",),
    "lora_dropout": ("lora",), "background": ("retrofit",), "background_examples": ("retrofit",),
    **{f"memory_{f.name}": ("retrofit",) for f in dataclasses.fields(MemoryConfig)}}

def run_train(args, device):
    """`train`: parent, prepare, train, save, in a staging folder; config.json has the recipe."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    mem_cfg = MemoryConfig(**{f.name: getattr(args, "memory_" + f.name)
                              for f in dataclasses.fields(MemoryConfig)})
    if cfg.method == "retrofit":
        texts = load_background(cfg.background)
    else:
        rows = load_medmcqa(cfg.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)
        texts = [medmcqa_text(row) for row in rows]
    t0 = time.time()
    with staging(args.out) as staged:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(args.model, device)
        lora = (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        prepare_model(model, cfg.method, mem_cfg, lora, cfg.train_scale, device)
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        before = {name: p.detach().clone() for name, p in trained.items() if "values" in name}
        examples = tokenize(tokenizer, texts[:cfg.limit_train], cfg.max_len)
        require(examples, "no training text has two tokens or more — check the training data")
        stats = load_stats(args.model) if cfg.method == "smf" else None
        log = os.path.join(staged, "train_log.jsonl")
        history = train(model, examples, cfg, stats, tokenizer.pad_token_id, device, log)
        recipe = {k: v for k, v in vars(cfg).items() if cfg.method in APPLIES.get(k, METHOD_LR)}
        meta = provenance(args.model, args.out) | {"kind": cfg.method, "given": args.given}
        meta["train"] = recipe | {"total_steps": len(history)}
        meta["memory"] = (checkpoint_meta(args.model) or {}).get("memory")  # every child has it
        if cfg.method == "retrofit":  # gathered once, reused by every SMF run from this retrofit
            sample = texts[:cfg.background_examples]
            stats = background_stats(model, tokenizer, sample, cfg.max_len, device=device)
            meta["kind"], meta["memory"] = "memory", vars(mem_cfg)
        if cfg.method == "smf":
            trained = smf_patch(before, trained)
        save_checkpoint(staged, meta, trained, {STATS: stats_tensors(stats)} if stats else None)
    last, tokens = history[-1], sum(h["tokens"] for h in history)
    memory = "".join(f", {k} {last[k]}" for k in ("rows_updated", "alpha") if last[k])  # per layer
    print(f"\n== {cfg.method} finished: {len(history)} steps, {tokens:,} tokens, "
          f"{time.time() - t0:.0f}s, final loss {last['loss']:.4f}{memory}, checkpoint "
          f"{args.out}\n   evaluate: python {os.path.relpath(__file__)} eval --model {args.out}")
    return model

def run_eval(args, device):
    """`eval`: all probes' data first (fails in seconds), a line per probe, then the results."""
    names = PROBES if args.probe == "all" else (args.probe,)
    loaders = {"medmcqa": load_medmcqa, "wikitext": load_wikitext, "triviaqa": load_triviaqa}
    probes = {name: loaders[name](getattr(args, name), limit=args.limit) for name in names}
    model, tok = load_model(args.model, device, model_dtype(device))
    require(len(tok(probes.get("wikitext", "two tokens"))["input_ids"]) > 1, f"{args.wikitext}: "
            "the WikiText probe has fewer than two tokens — perplexity needs two; check the file")
    bs, letter = args.batch_size, args.medmcqa_mode == "letter"
    evaluate = {"medmcqa": functools.partial(eval_medmcqa, letter_only=letter, batch_size=bs),
                "wikitext": functools.partial(eval_wikitext, batch_size=bs // 2 or 1),
                "triviaqa": functools.partial(eval_triviaqa, batch_size=2 * bs,
                                              repetition_penalty=args.repetition_penalty)}
    results = {"model": args.model_name, "weights": None, **args.identity, "written_by": RESULTS}
    for probe in names:
        t0, r = time.time(), evaluate[probe](model, tok, probes[probe])
        r["data"] = hashlib.sha256(json.dumps(probes[probe]).encode()).hexdigest()[:16]
        r["protocol"] += f"; {str(model_dtype(device)).removeprefix('torch.')}"  # a GPU's is bf16
        metrics = [f"{key} {r[key]:.4f}" for _, _, key, *_ in TABLE_COLUMNS if key in r]
        print(f"{probe:9s} {' '.join(metrics)}  n={r.get('n', r.get('tokens'))}  "
              f"({r['protocol']}; {time.time() - t0:.1f}s)")
        results[probe] = r
    if args.out:  # merged with what the file holds now, under a lock: other evals may write it too
        folder, name = os.path.split(os.path.realpath(args.out))  # a link: the file it names
        os.makedirs(folder, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError, ImportError):  # no flock (Windows, some Lustre)
                import fcntl  # here, so that `import smf` works where fcntl does not exist
                fcntl.flock(lock, fcntl.LOCK_EX)  # until closed: evals into one folder take turns
            earlier = earlier_results(args.out, args.identity)[0]
            require(earlier or not os.path.lexists(args.out), f"--out {args.out} was replaced by "
                    "other results while this eval ran — evaluate again into another file")
            write_atomic(f"{folder}/{name}", json.dumps((earlier or {}) | results, indent=2))
        finally:
            os.close(lock)
    return results

TABLE_ROWS = {  # results folder: the row's name, in the table and the figure, in their order
    "base": "Base", "retrofit_additive": "Retrofit (additive)",
    "retrofit_replacement": "Retrofit (replacement)", "smf_replacement_kl": "SMF replacement KL",
    "smf_replacement_tfidf": "SMF replacement TF-IDF", "smf_additive_kl": "SMF additive KL",
    "smf_additive_tfidf": "SMF additive TF-IDF", "smf_additive_scale_kl": "SMF additive +scale KL",
    "smf_additive_scale_tfidf": "SMF additive +scale TF-IDF", "lora": "LoRA",
    "full": "Full finetuning"}
TABLE_COLUMNS = [  # (header, probe, key of the mean, key of the per-question values or None, scale,
    ("MedMCQA acc", "medmcqa", "acc", "correct", 100, (0, 1)),  # the values the mean can take)
    ("MedMCQA gold NLL", "medmcqa", "gold_nll", "gold_nlls", 1, (0, math.inf)),
    ("WikiText ppl", "wikitext", "ppl", None, 1, (1, math.inf)),
    ("TriviaQA alias acc", "triviaqa", "alias_contains_acc", "alias_correct", 100, (0, 1)),
    ("TriviaQA EM", "triviaqa", "exact_match", "exact_correct", 100, (0, 1))]

def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def read_value(run, probe, key, bounds):
    """(number, None), or (None, why not: missing, null, NaN, inf, not a number, out of bounds)."""
    results = run.get(probe) if isinstance(run.get(probe), dict) else {}
    if key not in results:
        return None, "missing"
    value = results[key]
    if not is_number(value):  # NaN, ±inf, null, text
        why = str(value).replace("nan", "NaN") if isinstance(value, float) else "not a number"
        return None, "null" if value is None else why
    inside = bounds[0] <= value <= bounds[1]
    return (value, None) if inside else (None, f"outside [{bounds[0]:g}, {bounds[1]:g}]")

def paired_delta(runs, base, key, scale):
    """(Δ, half-width of its 95% interval) vs Base, paired: per question the row's mean over seeds
    minus Base's, then their mean ± 1.96 standard errors; None unless all hold as many numbers."""
    lists = [r.get(key) for r in runs + base]
    finite = [isinstance(x, list) and all(map(is_number, x)) for x in lists]
    if not all(finite) or len({len(x) for x in lists}) != 1 or len(lists[0]) < 2:
        return None
    row = [statistics.mean(q) for q in zip(*(r[key] for r in runs))]
    ref = [statistics.mean(q) for q in zip(*(r[key] for r in base))]
    d = [scale * (a - b) for a, b in zip(row, ref)]
    return statistics.mean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))

def scored_data(results, per_question):
    """A probe's data fingerprint, protocol and size, as JSON: whatever a file holds compares."""
    n = results.get(per_question or "tokens")  # the per-question list, or WikiText's tokens
    n = len(n) if isinstance(n, list) else n
    return json.dumps([results.get("data"), results.get("protocol"), n])

def table_cells(runs, base, column, is_base):
    """Two cells (mean ± sample std (n) over the seeds that have it; Δ vs Base [interval]) and the
    figure's (mean, half-width or None), or (None, what is wrong): a bad value costs its cell."""
    _, probe, key, per_question, scale, bounds = column
    values = [read_value(r, probe, key, bounds) for r in runs]
    problems = collections.Counter(why for _, why in values if why and why != "missing")
    if problems:
        why = ", ".join(f"{what} in {n} of {len(runs)} seeds" for what, n in problems.items())
        return [why, ""], (None, why)
    runs = [r for r, (_, why) in zip(runs, values) if why is None]  # the seeds that have it
    if not runs:
        return ["missing", ""], (None, "missing")
    xs = [scale * r[probe][key] for r in runs]
    spread = f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    cell, mean = f"{statistics.mean(xs):.2f}{spread} (n={len(xs)})", statistics.mean(xs)
    base_whys = [read_value(r, probe, key, bounds)[1] for r in base]
    base = [r for r, why in zip(base, base_whys) if why is None]
    bad_base = sorted(set(base_whys) - {None, "missing"})  # a bad Base seed must not just drop out
    if is_base or not (base or bad_base):
        return [cell, ""], (mean, None)
    if bad_base:
        return [cell, f"Base has {', '.join(bad_base)}"], (mean, None)
    if len({scored_data(r[probe], per_question) for r in runs + base}) > 1:
        return [cell, "scored on other data or protocol than Base"], (mean, None)
    paired = paired_delta([r[probe] for r in runs], [r[probe] for r in base], per_question, scale)
    if paired is None:
        delta = mean - scale * statistics.mean(r[probe][key] for r in base)
        return [cell, f"{delta:+.2f}"], (mean, None)
    d, half = paired
    return [cell, f"{d:+.2f} [{d - half:+.2f}, {d + half:+.2f}]"], (mean, half)

TABLE_HEADER = "<!-- written by `smf.py table` from the eval.json files: rewritten on every run -->"

def read_results(results_dir, folder):
    """A row's results, one per seed<integer> folder; what is not a number is named in a note."""
    runs = []
    for file in sorted(glob.glob(os.path.join(results_dir, folder, "*", "eval.json"))):
        if not re.fullmatch(r"seed[0-9]+", os.path.basename(os.path.dirname(file))):  # ASCII digits
            print(f"note: {file} is not in a seed<integer> folder: left out", file=sys.stderr)
            continue
        content = read_json(file, "delete it: run_all.sh then evaluates that stage again")
        if not isinstance(content, dict):
            print(f"note: {file} holds no results object: shown as missing", file=sys.stderr)
            content = {}
        runs.append(content)
        for _, probe, key, _, _, bounds in TABLE_COLUMNS:
            why = read_value(content, probe, key, bounds)[1]
            if why not in (None, "missing"):
                print(f"note: {file}: {probe}.{key} is {why}", file=sys.stderr)
    return runs

def run_table(args, device=None):
    """table.md, and figure.svg: the learning-versus-forgetting plot of the same numbers."""
    found = {folder: read_results(args.results_dir, folder) for folder in TABLE_ROWS}
    require(any(found.values()), f"{args.results_dir} holds no <row>/seed<S>/eval.json — run "
            "run_all.sh first, or point at its OUT folder")  # a file given for OUT is told so too
    for name in ("table.md", "figure.svg"):
        path = pathlib.Path(args.results_dir, name)
        ours = path.is_file() and path.read_text(errors="replace").split("\n")[0] == TABLE_HEADER
        check_output(name, path, "it was not written by `smf.py table` (no header line) — move it "
                     f"away: table writes {name} into {args.results_dir}", ours)
    header = " | ".join(f"{c[0]} | Δ vs Base" for c in TABLE_COLUMNS)
    lines, points = [f"| row | {header} |", "|---" * 11 + "|"], {}  # points: the figure's values
    for folder, name in TABLE_ROWS.items():
        cells, points[folder] = [], {}
        for column in TABLE_COLUMNS:
            two, points[folder][column[2]] = table_cells(found[folder], found["base"], column,
                                                         folder == "base")
            cells += two
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = sum(found.values(), [])
    counts = {p: {len(r[p].get(key) or []) for r in runs if isinstance(r.get(p), dict)}
              for p, key in (("medmcqa", "correct"), ("triviaqa", "alias_correct"))}
    counts["seeds"] = {len(seeds) for seeds in found.values() if seeds}
    table, figure = (pathlib.Path(args.results_dir, name) for name in ("table.md", "figure.svg"))
    old = table.read_text(errors="replace").split("\n") if table.is_file() else []
    notes = "\n".join(line for line in old[1:] if not line.startswith("|")).strip("\n")  # a user's
    write_atomic(table, "\n".join([TABLE_HEADER, ""] + lines + ["", notes]).strip("\n") + "\n")
    write_atomic(figure, TABLE_HEADER + "\n" + figure_svg(points, counts))
    print("\n".join(lines) + f"\n\nwrote {table} and {figure}")

# The figure: MedMCQA accuracy (y) against WikiText perplexity (left) and TriviaQA accuracy (right)
PANEL_W, PANEL_H, LEFT, TOP, LABEL_W, CAPTION_PX = 330, 300, 70, 40, 205, 11  # pixels; font

def svg(tag, content=None, **attrs):
    """One SVG element; in attribute names `_` stands for `-` (and `class_` for class)."""
    names = " ".join(f'{k.rstrip("_").replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f"<{tag} {names}/>" if content is None else f"<{tag} {names}>{content}</{tag}>"

def scale_axis(pairs, pixels, bounds=(-math.inf, math.inf)):
    """(lo, hi, to_pixel) of (value, whisker or None) pairs, padded, within bounds, to pixels."""
    lo, hi = min(v - (w or 0) for v, w in pairs), max(v + (w or 0) for v, w in pairs)
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = max(lo - pad, bounds[0]), min(hi + pad, bounds[1])
    def to_pixel(v):
        return pixels[0] + (v - lo) / (hi - lo) * (pixels[1] - pixels[0])
    return lo, hi, to_pixel

def round_ticks(lo, hi, count=5):
    """About `count` round values inside [lo, hi]: multiples of a step of 1, 2, 2.5 or 5 x 10^k."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [round(i * step, 12) for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]

def panel_svg(x0, rows, x_key, x_title, x_bounds):
    """One panel: axes, round ticks, whiskers cut at the frame, points, a column of labels."""
    bottom, right = TOP + PANEL_H, x0 + PANEL_W
    x_lo, x_hi, px = scale_axis([r[x_key] for r in rows], (x0, right), x_bounds)
    y_lo, y_hi, py = scale_axis([r["acc"] for r in rows], (bottom, TOP), (0, 100))
    out = [svg("rect", x=x0, y=TOP, width=PANEL_W, height=PANEL_H, fill="none", stroke="#888"),
           svg("text", x_title, x=x0 + PANEL_W / 2, y=bottom + 38, text_anchor="middle")]
    out += [svg("text", f"{v:.12g}", class_="tick-x", x=px(v), y=bottom + 16, text_anchor="middle")
            for v in round_ticks(x_lo, x_hi)]  # .12g: ticks 0.0001 apart still read apart
    out += [svg("text", f"{v:.12g}", class_="tick-y", x=x0 - 6, y=py(v) + 4, text_anchor="end")
            for v in round_ticks(y_lo, y_hi)]
    xy = {r["folder"]: (px(r[x_key][0]), py(r["acc"][0])) for r in rows}      # pixels
    rows = sorted(rows, key=lambda r: -r["acc"][0])  # labels top to bottom, 14 px apart
    for r, label_y in zip(rows, range(TOP + 6, bottom, 14)):
        (x, y), folder = xy[r["folder"]], r["folder"]
        w, h = (r[x_key][1] or 0) * (px(1) - px(0)), (r["acc"][1] or 0) * (py(0) - py(1))
        for axis, dx, dy in (("x", w, 0), ("y", 0, h)):  # the paired intervals' half-widths
            if dx or dy:
                ends = {"x1": max(x - dx, x0), "x2": min(x + dx, right),
                        "y1": min(y + dy, bottom), "y2": max(y - dy, TOP)}  # cut at the frame
                out.append(svg("line", class_=f"whisker-{axis}", data_row=folder, **ends,
                               stroke="#333"))
        fill = {"base": "#000", "retrofit": "#fff"}.get(folder.split("_")[0], "#4a7ab5")
        out.append(svg("circle", data_row=folder, cx=x, cy=y, r=4, fill=fill, stroke="#000"))
        out.insert(0, svg("line", x1=x, y1=y, x2=right + 12, y2=label_y, stroke="#ddd"))  # under
        out.append(svg("text", r["label"], class_="label", x=right + 15, y=label_y + 4))
    return svg("g", "\n".join(out), class_="panel", data_x=x_key, data_x_lo=x_lo, data_x_hi=x_hi,
               data_y_lo=y_lo, data_y_hi=y_hi, data_left=x0, data_right=right, data_top=TOP,
               data_bottom=bottom)

def figure_svg(points, counts):
    """A point per row with both of a panel's values; the caption names each left out, and why."""
    panels = [("ppl", "WikiText perplexity (lower is better)", "WikiText ppl", (0, math.inf)),
              ("alias_contains_acc", "TriviaQA alias accuracy, % (higher is better)",
               "TriviaQA alias acc", (0, 100))]  # (key, axis title, caption name, axis bounds)
    drawn, left_out = {key: [] for key, *_ in panels}, []
    for folder, name in TABLE_ROWS.items():
        values = {"MedMCQA acc": points[folder]["acc"]} | {
            title: points[folder][key] for key, _, title, _ in panels}
        bad = [f"{title} {why}" for title, (v, why) in values.items() if v is None]
        if len(bad) == len(values) and all("missing" in b for b in bad):
            bad = ["no results"]
        left_out += [f"{name} ({'; '.join(bad)})"] if bad else []
        for key, *_ in panels:
            if points[folder]["acc"][0] is not None and points[folder][key][0] is not None:
                drawn[key].append({"folder": folder, "label": name, **points[folder]})
    width = 2 * (LEFT + PANEL_W + LABEL_W)
    out = [svg("text", "MedMCQA accuracy, % (higher is better)", x=14, y=TOP + PANEL_H / 2,
               transform=f"rotate(-90 14 {TOP + PANEL_H / 2})", text_anchor="middle")]
    for i, (key, title, _, x_bounds) in enumerate(panels):
        x0 = LEFT + i * (LEFT + PANEL_W + LABEL_W)
        if drawn[key]:  # else the caption says why
            out.append(panel_svg(x0, drawn[key], key, title, x_bounds))
    n = {what: "–".join(map(str, sorted({min(q), max(q)}))) if q else "0"
         for what, q in counts.items()}  # seeds and questions, a range where rows differ
    caption = (f"Points: mean over {n['seeds']} seed(s) on {n['medmcqa']} MedMCQA and "
               f"{n['triviaqa']} TriviaQA questions; whiskers: paired 95% interval of Δ vs Base.")
    if left_out:
        caption += " Left out: " + "; ".join(left_out) + "."
    lines = textwrap.wrap(caption, int((width - 20) / (CAPTION_PX * 0.6)))  # 0.6 em: a wide glyph
    height = TOP + PANEL_H + 60 + (CAPTION_PX + 3) * len(lines)
    spans = "".join(svg("tspan", line, x=10, dy=0 if i == 0 else CAPTION_PX + 3)
                    for i, line in enumerate(lines))
    out.append(svg("text", spans, class_="caption", x=10, y=TOP + PANEL_H + 66,
                   font_size=CAPTION_PX))
    out.insert(0, svg("rect", width=width, height=height, fill="#fff"))
    return svg("svg", "\n".join(out), xmlns="http://www.w3.org/2000/svg", width=width,
               height=height, font_family="sans-serif", font_size=12) + "\n"

# --------------------------------------------------------------------------------------------------
# CLI

class Parser(argparse.ArgumentParser):
    def error(self, message):  # a mistyped flag gets the one-line error every mistake gets
        self.exit(2, f"error: {message} — see `python {self.prog} --help`\n")

CHOICES = {"method": tuple(METHOD_LR), "optimizer": ("adamw", "sgd"), "selector": tuple(SELECTORS),
           "mode": ("additive", "replacement"), "medmcqa_mode": ("answer", "letter")}

def add_config_flags(group, cls, prefix=""):
    """A flag per config field, its comment the help; default None: check_args sees the given."""
    comments = dict(re.findall(r"^\s+(\w+): [^#\n]*# (.*)$", inspect.getsource(cls), re.M))
    for f in dataclasses.fields(cls):
        kind = {bool: {"action": "store_true"}, tuple: {"type": int, "nargs": "+"}}.get(
            f.type, {"type": f.type, "choices": CHOICES.get(f.name)})
        shown = "" if f.default is None or f.default is False else f" (default: {f.default})"
        group.add_argument(f"--{prefix}{f.name}".replace("_", "-"), default=None,
                           help=comments[f.name] + shown, **kind)

def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], epilog="examples: see README.md")
    sub = p.add_subparsers(dest="command", required=True)
    no_abbrev = {"allow_abbrev": False}  # `eval --medmcqa` is not --medmcqa-mode
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = Parser(add_help=False, parents=[debug])
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # none where torch has no CUDA
    devices = ["cpu", "cuda", *gpus] if gpus else ["cpu"]  # a device this machine lacks is refused
    common.add_argument("--device", default="cuda" if gpus else "cpu", choices=devices,
                        help="cpu; cuda or cuda:N where torch sees a GPU (the default there)")
    e = sub.add_parser("eval", parents=[common], help="evaluate a model on the probes", **no_abbrev)
    e.add_argument("--model", default=DEFAULT_MODEL, help="folder or hub id (%(default)s)")
    e.add_argument("--probe", default="all", choices=PROBES + ("all",), help="(default: all)")
    e.add_argument("--out", help="write the results as JSON here")
    add_config_flags(e.add_argument_group("probes"), EvalConfig)
    t = sub.add_parser("train", parents=[common], help="retrofit, smf, lora or full", **no_abbrev)
    t.add_argument("--model", help="the parent: hub id, HF folder or smf checkpoint (default: "
                   f"runs/retrofit for smf, else {DEFAULT_MODEL})")
    t.add_argument("--out", help="checkpoint folder (default runs/<method>)")
    add_config_flags(t.add_argument_group("recipe (the paper's by default)"), TrainConfig)
    add_config_flags(t.add_argument_group("a new memory (retrofit)"), MemoryConfig, "memory_")
    tb = sub.add_parser("table", parents=[debug], help="OUT's table and figure", **no_abbrev)
    tb.add_argument("results_dir", help="the OUT folder of run_all.sh")
    return p

RANGES = [  # (options, what a good value is, lowest, lowest allowed, highest: values lie below it)
    ("lr epochs lora_alpha repetition_penalty", "> 0 and finite", 0, False, math.inf),
    ("micro_batch grad_accum forward_tokens loss_chunk max_steps limit_train background_examples "
     "lora_r top_t batch_size limit memory_n_keys memory_heads memory_topk memory_key_dim",
     ">= 1", 1, True, math.inf),
    ("max_len", ">= 2 (a text of one token has nothing to predict)", 2, True, math.inf),
    ("clip weight_decay warmup", ">= 0 and finite", 0, True, math.inf),
    ("lora_dropout", "in [0, 1)", 0, True, 1)]

def check_args(args):
    """Every mistake in the options before anything loads: ranges, rule 2, the output rule (table's
    in run_table, after its results). Records the options given, fills in the other defaults."""
    for names, need, lowest, lowest_ok, highest in RANGES:
        for name in names.split():
            v = getattr(args, name, None)
            ok = v is None or (lowest < v < highest or (lowest_ok and v == lowest))
            require(ok, f"--{name.replace('_', '-')} {v} is out of range — give a value {need}")
    require(getattr(args, "out", None) != "", "--out is empty — give a path, or leave the flag out")
    configs = {"train": [("", TrainConfig), ("memory_", MemoryConfig)], "eval": [("", EvalConfig)]}
    defaults = {prefix + f.name: f.default for prefix, cls in configs.get(args.command, [])
                for f in dataclasses.fields(cls)}
    args.given = sorted(name for name in defaults if getattr(args, name) is not None)
    vars(args).update({name: defaults[name] for name in defaults if name not in args.given})
    if args.command == "train":
        default_model = "runs/retrofit" if args.method == "smf" else DEFAULT_MODEL
        args.model, args.out = args.model or default_model, args.out or f"runs/{args.method}"
        check_train_args(args)
        check_output("--out", args.out, "choose a new folder (a checkpoint is never replaced: move "
                     "the old one away to train it again)")
    if args.command == "eval":  # results are a model's by its weights; the path is for a reader
        check_model_path(args.model)
        args.model_name = os.path.abspath(args.model) if is_local(args.model) else args.model
        weights = fingerprint(args.model)  # None: a hub id, whose name then tells it
        args.identity = {"weights": weights} if weights else {"model": args.model_name}
        if args.out:
            why = earlier_results(args.out, args.identity)[1]  # None: its own earlier results
            check_output("--out", args.out, f"{why} — choose another file or move it away", not why)

def check_train_args(args):
    """train's own checks, each before anything loads."""
    check_model_path(args.model)
    meta = checkpoint_meta(args.model) or {}
    memory, kind = meta.get("memory"), meta.get("kind", "plain")  # memory: its retrofit's
    mode = (memory or {}).get("mode", args.memory_mode)
    for name in args.given:
        methods = APPLIES.get(name, METHOD_LR)
        require(args.method in methods, f"--{name.replace('_', '-')} applies only to --method "
                f"{' or '.join(methods)} — drop it")
    require(not memory or args.method in ("smf", "lora"), f"{args.model} already has memory layers "
            f"— {args.method} starts from a model without memory: give --model <the base model>")
    if args.method == "smf":
        retrofit = "train --method retrofit first (it writes runs/retrofit), or give --model <a "
        require(os.path.isdir(args.model), f"--model {args.model} does not exist — {retrofit}"
                "retrofit's --out>")
        require(kind in ("memory", "smf"), f"{args.model} is a {kind} model, not a retrofit — SMF "
                f"trains the memory of a retrofit or of an SMF checkpoint: {retrofit}retrofit>")
        stats = os.path.join(args.model, STATS)
        require(os.path.isfile(stats), f"{stats} is missing: SMF ranks rows against the "
                "statistics its retrofit saved — restore it, or retrofit again")
    for name in ("train_scale", "memory_alpha_init"):
        require(name not in args.given or mode == "additive", f"--{name.replace('_', '-')} needs "
                "additive memory — replacement memory has no alpha")
    layers, key_dim, topk, n_keys = (args.memory_layers, args.memory_key_dim, args.memory_topk,
                                     args.memory_n_keys)
    require(len(set(layers)) == len(layers), "--memory-layers names a layer twice — give each once")
    require(key_dim % 2 == 0, f"--memory-key-dim {key_dim} must be even — change it")
    require(topk <= n_keys, f"--memory-topk {topk} must be at most --memory-n-keys {n_keys} — "
            "change one of them")

def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Slurm's stop cleans up as Ctrl-C
    commands = {"train": run_train, "eval": run_eval, "table": run_table}
    try:
        check_args(args)
        commands[args.command](args, getattr(args, "device", "cpu"))
    except KeyboardInterrupt:
        print("error: interrupted — nothing half-written is left; a rerun starts from the "
              "beginning (training does not resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the one-line promise holds for the unforeseen too
        if args.debug:
            raise
        message = str(e) if isinstance(e, UserError) else (
            f"unexpected {type(e).__name__}: {str(e)[:300]} — rerun with --debug for the traceback")
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)

if __name__ == "__main__":
    main()
