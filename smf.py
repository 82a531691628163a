"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory layers to a Hugging Face causal LM, finetunes only the few memory value rows
a batch reads most (ranked by a KL or TF-IDF selector against background text), and compares that
with LoRA and full finetuning on three probes: MedMCQA accuracy (learning), WikiText perplexity and
TriviaQA accuracy (forgetting). The method comes first, in the order the data flows; the plumbing
(data files, checkpoints, commands) after it.

What lifts out alone, with the imports below: ProductKeyMemory; LoRALinear; RowSparseAdamW; get_lr;
normalize_answer, alias_contained and exact_match. With the helpers they name: kl_scores and
tfidf_scores (BackgroundStats), select_rows, add_lora (LORA_TARGETS), eval_medmcqa, eval_wikitext
and eval_triviaqa (each docstring names its helpers). Start with `python smf.py train --method smf
--selector kl`; see --help."""
import argparse, contextlib, dataclasses, functools, glob, hashlib, inspect, io, itertools, json, math, os
import random, re, shutil, signal, statistics, sys, tempfile, time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

# --------------------------------------------------------------------------------------------------
# Config

@dataclass
class MemoryConfig:
    layers: tuple = (6, 12, 18)   # 0-based decoder layers that get their own memory
    mode: str = "additive"  # "additive": mlp(x) + alpha*memory(x); "replacement": memory(x) instead
    n_keys: int = 128             # sub-keys per half; the memory holds n_keys**2 value rows
    heads: int = 4                # each head has its own two sub-key sets
    key_dim: int = 256            # query/key width, split into two halves of key_dim // 2
    topk: int = 16                # candidates per half, and rows read per head after re-ranking
    alpha_init: float = 0.01      # additive mode only: the learned per-layer scale starts here

@dataclass
class TrainConfig:  # the comments are the `train --help` texts
    method: str = "smf"  # retrofit (new memory, trained on background text) | smf | lora | full
    medmcqa: str = "openlifescienceai/medmcqa"  # training data (train split): hub id or local file
    # general text: the retrofit's data, the selectors' reference
    background: str = "OpenAssistant/oasst1"
    lr: float = None  # peak learning rate; default: retrofit/smf 5e-4, lora 2e-4, full 5e-5
    epochs: float = None  # passes over the training data; default 2 for retrofit, 3 for the others
    micro_batch: int = 4          # sequences per micro-batch (SMF picks top_t rows per micro-batch)
    grad_accum: int = 4           # micro-batches per optimizer step: effective batch 16 sequences
    # sequences per forward, k x micro_batch (default: a step); same update
    forward_batch: int = None
    max_len: int = 1024           # tokens per training sequence; longer texts are cut there
    warmup: int = 100             # optimizer steps of linear warm-up, then cosine decay to zero
    clip: float = 1.0             # largest gradient L2 norm per step (0: no clipping)
    weight_decay: float = 0.0  # per lr unit: decoupled under AdamW, added to the gradient under SGD
    optimizer: str = "adamw"      # adamw | sgd (Lin et al. use SGD with lr ~2 for SMF)
    selector: str = "kl"  # smf: how a micro-batch ranks the rows it read, against background text
    top_t: int = 512              # smf: rows updated per memory layer per micro-batch
    train_scale: bool = False  # smf: also train each layer's alpha (the "+scale" rows of the table)
    # background texts (one batch each) behind the selectors' statistics
    background_examples: int = 2000
    lora_r: int = 16              # lora: rank of the update
    lora_alpha: float = 32.0      # lora: the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05    # lora: dropout probability on the LoRA input only
    max_steps: int = None  # stop after this many optimizer steps (the schedule is laid over them)
    # use N examples: MedMCQA's first N after the seeded shuffle (default 60,000), OASST1's first N (all)
    limit_train: int = None
    seed: int = 0  # shuffles the data (and the MedMCQA subset), seeds every initialisation

    def __post_init__(self):  # the two defaults that depend on the method, resolved in one place
        self.lr = self.lr or METHOD_LR[self.method]
        self.epochs = self.epochs or RETROFIT_EPOCHS.get(self.method, 3)

@dataclass
class EvalConfig:  # the probes' data and settings; the comments are their --help texts
    # MedMCQA probe (validation split): hub id or file
    eval_medmcqa: str = "openlifescienceai/medmcqa"
    medmcqa_mode: str = "answer"        # score ' L. option text' (the paper's) or the letter alone
    wikitext: str = "Salesforce/wikitext"  # WikiText probe (test split): hub id or local file
    # TriviaQA probe (rc.nocontext validation): hub id or file
    triviaqa: str = "mandarjoshi/trivia_qa"
    # TriviaQA: default the model's generation_config (1.0: greedy)
    repetition_penalty: float = None
    limit: int = 1000                   # examples per probe (lines of WikiText)
    batch_size: int = 16  # MedMCQA questions per forward (TriviaQA: 2x, WikiText: 1/2)

METHOD_LR = {"retrofit": 5e-4, "smf": 5e-4, "lora": 2e-4, "full": 5e-5}
RETROFIT_EPOCHS = {"retrofit": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line `error: what — how to
    fix`."""

def require(ok, message):
    """The user-facing assert: when `ok` is false the command stops with `message` as its one-line
    error."""
    if not ok:
        raise UserError(message)

# --------------------------------------------------------------------------------------------------
# Memory layer: product keys (Lample et al. 2019) with the Memory+ output (Berges et al. 2024)

class ProductKeyMemory(nn.Module):
    """N = n_keys**2 value rows, looked up without scoring all N: each head takes the top-k sub-keys
    of each half of its query, re-ranks the k*k sums and reads the best k rows (row i1 * n_keys +
    i2). `read_gate`, when set, sees the rows each token reads and may return which reads may teach
    their value row: SMF's selection enters the layer there and nowhere else."""

    def __init__(self, dim, n_keys=128, heads=4, key_dim=256, topk=16):
        super().__init__()
        assert key_dim % 2 == 0 and topk <= n_keys
        self.n_keys, self.heads, self.key_dim, self.topk = n_keys, heads, key_dim, topk
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        # rows (M, H*k) -> None, or bool (M, H*k): the reads whose rows may learn
        self.read_gate = None
        nn.init.uniform_(self.keys, -key_dim ** -0.5, key_dim ** -0.5)
        nn.init.normal_(self.values, std=dim ** -0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=dim ** -0.5)
            nn.init.zeros_(lin.bias)

    def lookup(self, x):  # x (M, dim) -> scores (M, heads, topk), rows (M, heads, topk)
        """In fp32 even under bf16 (it is cheap): bf16 rounding could let padding or batching change
        the rows."""
        k, half = self.topk, self.key_dim // 2
        with torch.autocast(x.device.type, enabled=False):
            q = F.linear(x.float(), self.query.weight.float(), self.query.bias.float())
            q = q.view(-1, self.heads, 2, half)                                   # (M, H, 2, half)
            sub = torch.einsum("mhcd,hcnd->mhcn", q, self.keys.float())  # (M, H, 2, n_keys)
        sub_scores, sub_idx = sub.topk(k, dim=-1)                                 # (M, H, 2, k)
        pair = sub_scores[:, :, 0, :, None] + sub_scores[:, :, 1, None, :]        # (M, H, k, k)
        scores, best = pair.flatten(2).topk(k, dim=-1)                            # (M, H, k)
        i1 = sub_idx[:, :, 0].gather(-1, best // k)
        i2 = sub_idx[:, :, 1].gather(-1, best % k)
        return scores, i1 * self.n_keys + i2

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        xf = x.reshape(-1, x.shape[-1])                                           # (M, dim)
        scores, rows = self.lookup(xf)
        weights = scores.float().softmax(dim=-1)  # (M, H, k), a head sums to 1
        rows = rows.flatten(1)                                                    # (M, H*k)
        weights = weights.flatten(1).to(self.values.dtype)                        # (M, H*k)
        gate = None
        if self.read_gate is not None:
            gate = self.read_gate(rows.detach())
        if gate is None:
            read = F.embedding_bag(rows, self.values, per_sample_weights=weights, mode="sum")
        else:
            # weights*gate + weights*(1-gate) = weights: the same read. The second bag reads detached values,
            # so only gated-in reads pass gradient to value rows (every read still passes it to keys, query)
            gate = gate.to(weights.dtype)  # (M, H*k), 1 = may learn
            learn = F.embedding_bag(rows, self.values, per_sample_weights=weights * gate, mode="sum")
            fixed = F.embedding_bag(rows, self.values.detach(), per_sample_weights=weights * (1 - gate),
                                    mode="sum")
            read = learn + fixed                                                  # (M, dim)
        out = self.w2(read.to(xf.dtype) * F.silu(self.w1(xf)))
        return out.view(x.shape)

# --------------------------------------------------------------------------------------------------
# Attaching memory and LoRA to a Hugging Face model whose decoder blocks are model.model.layers[i].mlp

class MemoryBlock(nn.Module):
    """Stands where a decoder layer's FFN stood and sees the same input (after the post-attention
    norm)."""

    def __init__(self, mlp, memory, mode, alpha_init=0.01):
        super().__init__()
        # replacement drops the FFN's weights
        self.memory, self.mlp, self.alpha = memory, None, None
        if mode == "additive":
            self.mlp = mlp
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def forward(self, x):
        if self.mlp is None:
            return self.memory(x)
        return self.mlp(x) + self.alpha * self.memory(x)

def add_memory(model, cfg: MemoryConfig):
    """Puts a fresh fp32 ProductKeyMemory beside (or instead of) the FFN at each of cfg.layers."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    require(layers is not None and all(hasattr(layer, "mlp") for layer in layers),
            f"{type(model).__name__} has no model.model.layers[i].mlp — use a "
            "Qwen2/Llama/Mistral-style model")
    require(all(0 <= i < len(layers) for i in cfg.layers),
            f"memory layers {list(cfg.layers)} are out of range — the model has layers "
            f"0..{len(layers) - 1}")
    require(not memory_blocks(model),
            "the model already has memory — start from the base model, or train its memory with "
            "--method smf")
    device = next(model.parameters()).device
    for i in cfg.layers:
        memory = ProductKeyMemory(model.config.hidden_size, cfg.n_keys, cfg.heads, cfg.key_dim, cfg.topk)
        layers[i].mlp = MemoryBlock(layers[i].mlp, memory, cfg.mode, cfg.alpha_init).to(device)
    return memory_blocks(model)

def memory_blocks(model):
    return [m for m in model.modules() if isinstance(m, MemoryBlock)]

class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A dropout(x), with A kaiming-uniform and B zero, so at init y =
    base(x)."""

    def __init__(self, base: nn.Linear, r=16, alpha=32.0, dropout=0.05):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)                 # (r, in), (out, r)
        return self.base(x) + (self.dropout(x) @ a.t() @ b.t()) * self.scale

def add_lora(model, r=16, alpha=32.0, dropout=0.05, targets=LORA_TARGETS):
    """Wraps every nn.Linear whose attribute name is in `targets` in a LoRALinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))

@torch.no_grad()
def merge_lora(model):
    """Folds each LoRA update into its base weight (in fp32) and unwraps it: same outputs in eval
    mode."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                delta = child.scale * child.lora_B.float() @ child.lora_A.float()     # (out, in)
                w.copy_((w.float() + delta).to(w.dtype))
                setattr(parent, name, child.base)
    return model

# --------------------------------------------------------------------------------------------------
# Row selection (per memory layer): which value rows a micro-batch may update

@dataclass
class BackgroundStats:
    df: torch.Tensor      # (N,) background batches that read row i at least once
    reads: torch.Tensor   # (N,) total background reads of row i
    batches: int          # B, the number of background batches

def tfidf_scores(counts, background: BackgroundStats):
    """(c_i / sum c) * ln((B + 1) / (df_i + 1)): read often now, by few background batches.
    counts (N,) or (G, N) -> scores of the same shape."""
    tf = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    return tf * torch.log((background.batches + 1) / (background.df.double() + 1))

def kl_scores(counts, background: BackgroundStats):
    """p_i ln(p_i / q_i): row i's term of KL(batch reads || add-one-smoothed background reads).
    counts (N,) or (G, N) -> scores of the same shape."""
    p = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    smoothed = background.reads.double() + 1
    q = smoothed / smoothed.sum()
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))

SELECTORS = {"kl": kl_scores, "tfidf": tfidf_scores}

def select_rows(scores, counts, top_t):
    """Mask of the top_t read rows by score (ties: lower row first; unread rows: never). (N,) or (G,
    N)."""
    scores = torch.where(counts > 0, scores, torch.full_like(scores, -math.inf))
    # stable: ties in row order
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    best = order[..., :top_t]
    return torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, best, (counts > 0).gather(-1, best))

def token_groups(mask, group_size):
    """mask (B, T) -> (B*T,) each token's group (sequence // group_size: a micro-batch or an
    example); -1 for pads."""
    group = torch.arange(mask.shape[0], device=mask.device)[:, None] // group_size      # (B, 1)
    return group.expand_as(mask).masked_fill(mask == 0, -1).flatten()

def count_reads(rows, group, n_groups, n_rows):
    """rows (M, S), group (M,) -> (n_groups, n_rows): how often each group's tokens read each row.
    Pads (group -1) never count, so they never spend the selection budget."""
    real = (group >= 0)[:, None].expand_as(rows)                                        # (M, S)
    key = group.clamp(min=0)[:, None] * n_rows + rows                                   # (M, S)
    counts = torch.bincount(key.flatten(), weights=real.flatten().float(), minlength=n_groups * n_rows)
    return counts.view(n_groups, n_rows).long()

class ReadGate:
    """SMF's read gate for one memory layer in one forward of several micro-batches: each
    micro-batch picks the top_t rows it read by the selector's score, and a read may teach its row
    only if its own micro-batch picked it. After the forward, `chosen` (G, N) holds each
    micro-batch's picks."""

    def __init__(self, group, n_groups, background: BackgroundStats, score_fn, top_t):
        # group (M,): each token's micro-batch, -1 for pads
        self.group, self.n_groups = group, n_groups
        self.background, self.score_fn, self.top_t = background, score_fn, top_t
        self.chosen = None

    @torch.no_grad()
    def __call__(self, rows):  # rows (M, S) -> bool (M, S); no host sync: it runs mid-forward
        n_rows = self.background.df.shape[0]
        counts = count_reads(rows, self.group, self.n_groups, n_rows)                   # (G, N)
        self.chosen = select_rows(self.score_fn(counts, self.background), counts, self.top_t)
        real = (self.group >= 0)[:, None]                                               # (M, 1)
        # (G, N) indexed by (M, 1) and (M, S) -> (M, S): row r as picked by token m's own micro-batch
        return self.chosen[self.group.clamp(min=0)[:, None], rows] & real

def add_background_reads(rows, group, n_examples, stats):
    """The read hook behind background_stats: df counts the examples that read a row, not the reads.
    """
    counts = count_reads(rows, group, n_examples, stats.df.shape[0])  # (examples, N)
    stats.reads += counts.sum(0).cpu()
    stats.df += (counts > 0).sum(0).cpu()

@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_size=16, device="cpu"):
    """df, reads and B per memory layer, in eval mode; `batch_size` examples a forward, each its own
    batch. Gathered once after the retrofit: SMF trains only values, so the queries and keys that
    decide which rows a text reads stay as they were. (Approximate in one way: value updates in an
    earlier memory layer shift the hidden states, and so the reads, of the later ones.)"""
    blocks = memory_blocks(model)
    n = blocks[0].memory.values.shape[0]
    stats = []
    for _ in blocks:
        stats.append(BackgroundStats(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                                     len(texts)))
    model.eval()
    for start in progress(range(0, len(texts), batch_size), "background stats"):
        seqs = [tokenizer(t)["input_ids"][:max_len] for t in texts[start:start + batch_size]]
        ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device=device)
        for b, s in zip(blocks, stats):
            b.memory.read_gate = functools.partial(add_background_reads, group=token_groups(mask, 1),
                                                   n_examples=len(ids), stats=s)
        with autocast(device):
            model(input_ids=ids, attention_mask=mask)
    for b in blocks:
        b.memory.read_gate = None
    return stats

# --------------------------------------------------------------------------------------------------
# Sparse optimizer and training loop: one plain loop for every method

def get_lr(step, total, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

class RowSparseAdamW:
    """AdamW (or SGD) that updates only given rows of 2-D parameters, and only those rows' moments
    and step counts: a row chosen earlier never drifts (masking the gradient of a dense AdamW would
    keep moving it through its stale moments). Each row counts its own steps, so its bias correction
    is the one a dense AdamW would give a parameter that had been stepped that many times."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sgd=False):
        self.params, self.betas, self.eps, self.wd, self.sgd = list(params), betas, eps, weight_decay, sgd
        self.state = [None] * len(self.params)  # per parameter: m, v (N, dim) and t (N,)

    @torch.no_grad()
    def step(self, rows_per_param, grads_per_param, lr):
        """rows: (R,) distinct row indices of each parameter; grads: (R, dim), those rows'
        gradients."""
        b1, b2 = self.betas
        for i, (p, rows, g) in enumerate(zip(self.params, rows_per_param, grads_per_param)):
            g = g.float()                                                   # (R, dim)
            w = p.index_select(0, rows).float()                             # (R, dim)
            if self.sgd:  # weight decay as torch.optim.SGD applies it: added to the gradient
                p.index_copy_(0, rows, (w - lr * (g + self.wd * w)).to(p.dtype))
                continue
            if self.state[i] is None:
                m = torch.zeros_like(p, dtype=torch.float)
                v = torch.zeros_like(p, dtype=torch.float)
                self.state[i] = (m, v, torch.zeros(p.shape[0], device=p.device))
            m, v, t = self.state[i]
            t_r = t[rows] + 1  # (R,) each row's own step count
            m_r = b1 * m.index_select(0, rows) + (1 - b1) * g               # (R, dim)
            v_r = b2 * v.index_select(0, rows) + (1 - b2) * g * g           # (R, dim)
            m.index_copy_(0, rows, m_r)
            v.index_copy_(0, rows, v_r)
            t.index_copy_(0, rows, t_r)
            m_hat = m_r / (1 - b1 ** t_r)[:, None]
            v_hat = v_r / (1 - b2 ** t_r)[:, None]
            w = w * (1 - lr * self.wd) - lr * m_hat / (v_hat.sqrt() + self.eps)
            p.index_copy_(0, rows, w.to(p.dtype))

def clip_grads(grads, max_norm):
    """Scales the gradients in place so that their joint L2 norm is at most max_norm (0: no
    clipping)."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm:
        for g in grads:
            g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return float(norm)

def prepare_model(model, method, mem_cfg=None, lora_cfg=None, train_scale=False, device="cpu"):
    """Adds what the method trains and freezes the rest (retrofit: all memory; smf: values, + alpha
    with train_scale; lora: A, B; full: all). On a GPU frozen weights are bf16 (run under autocast
    only), trainable ones fp32."""
    if method == "retrofit":
        add_memory(model, mem_cfg)
    blocks = memory_blocks(model)
    require(blocks or method not in ("retrofit", "smf"),
            "the model has no memory layers — smf trains from a retrofit checkpoint (--method "
            "retrofit)")
    model.requires_grad_(method == "full")
    if method == "lora":
        add_lora(model, *lora_cfg)  # A and B are created trainable
    for b in blocks:
        if method in ("retrofit", "smf"):
            b.memory.requires_grad_(method == "retrofit")
            b.memory.values.requires_grad_(True)
        if b.alpha is not None and method in ("retrofit", "smf"):
            b.alpha.requires_grad_(method == "retrofit" or train_scale)
    model.to(device)
    on_gpu = str(device).startswith("cuda")
    for p in model.parameters():
        p.data = p.data.bfloat16() if on_gpu and not p.requires_grad else p.data.float()
    return model

def tokenize(tokenizer, texts, max_len):
    """Token ids of each text, cut at max_len; texts of one token have no target and are dropped. No
    EOS is appended (see medmcqa_text)."""
    examples = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    return [e for e in examples if len(e) > 1]

def step_batches(lengths, seqs_per_step, seed):
    """Endless example indices, one optimizer step at a time: each epoch a new seeded shuffle of
    every example once, sorted by length within chunks of 64 steps (little padding), the steps
    shuffled again."""
    rng, chunk = random.Random(seed), 64 * seqs_per_step
    while True:
        order = rng.sample(range(len(lengths)), len(lengths))
        steps = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lengths.__getitem__)
            steps += [part[i:i + seqs_per_step] for i in range(0, len(part), seqs_per_step)]
        rng.shuffle(steps)
        yield from steps

def total_steps(n_examples, cfg):
    steps_per_epoch = math.ceil(n_examples / (cfg.micro_batch * cfg.grad_accum))
    return min(math.ceil(cfg.epochs * steps_per_epoch), cfg.max_steps or math.inf)

def forward_backward(model, seqs, n_targets, pad_id, device):
    """One forward and backward of some sequences; the loss is a sum over the step's targets /
    n_targets, so any split of a step into forwards gives the same gradient. Pads never count."""
    ids, mask = pad_batch(seqs, pad_id, device=device)                         # (B, T)
    with autocast(device):
        logits = model(input_ids=ids, attention_mask=mask).logits               # (B, T, vocab)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                     # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n_targets
    loss.backward()
    return loss.item()

def train(model, examples, cfg, background=None, pad_id=0, device="cpu", log_path=None):
    """Trains the parameters that require grad, in place, on token-id lists; SMF needs one
    BackgroundStats per memory layer. Writes one JSON line per step to log_path; returns those
    records."""
    values = [b.memory.values for b in memory_blocks(model)] if cfg.method == "smf" else []
    # the reach scales with alpha
    alphas = [b.alpha for b in memory_blocks(model) if b.alpha is not None]
    dense = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in values)]
    dense_opt = make_dense_optimizer(dense, cfg, device)
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=cfg.optimizer == "sgd")
    background = [BackgroundStats(s.df.to(device), s.reads.to(device), s.batches) for s in background or []]
    seqs_per_step = cfg.micro_batch * cfg.grad_accum
    # several micro-batches per forward: same gradient
    forward_batch = cfg.forward_batch or seqs_per_step
    total = total_steps(len(examples), cfg)
    batches = step_batches([len(e) for e in examples], seqs_per_step, cfg.seed)
    history, log = [], open(log_path or os.devnull, "w", buffering=1)  # line-buffered
    model.train()
    for step in progress(range(total), f"train {cfg.method}"):
        batch, t0, loss = next(batches), time.perf_counter(), 0.0
        # the loss is normalised over the whole step
        n_targets = sum(len(examples[i]) - 1 for i in batch)
        # (N,) a layer
        picked = [torch.zeros(v.shape[0], dtype=torch.bool, device=device) for v in values]
        for c in range(0, len(batch), forward_batch):
            seqs = [examples[i] for i in batch[c:c + forward_batch]]
            _, mask = pad_batch(seqs, pad_id, device=device)
            gates = [ReadGate(token_groups(mask, cfg.micro_batch), math.ceil(len(seqs) / cfg.micro_batch), bg,
                              SELECTORS[cfg.selector], cfg.top_t) for bg in background]
            for block, gate in zip(memory_blocks(model) if values else [], gates):
                block.memory.read_gate = gate
            loss += forward_backward(model, seqs, n_targets, pad_id, device)
            require(math.isfinite(loss), f"the loss became {loss} at step {step + 1} — lower --lr "
                    "or check the data; no checkpoint was written by this run")
            for p, gate in zip(picked, gates):
                p |= gate.chosen.any(0)
        # Only picked rows got gradient, but backward built each full (N, dim) gradient: keep the picked
        # rows' (R, dim), clip them with the dense gradients, and step exactly those rows.
        rows = [p.nonzero()[:, 0] for p in picked]                                 # (R,) a layer
        row_grads = [v.grad.index_select(0, r) for v, r in zip(values, rows)]  # (R, dim) a layer
        for v in values:
            v.grad = None
        grad_norm = clip_grads([p.grad for p in dense if p.grad is not None] + row_grads, cfg.clip)
        lr = get_lr(step, total, cfg.lr, cfg.warmup)
        if dense_opt is not None:
            dense_opt.param_groups[0]["lr"] = lr
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
        sparse_opt.step(rows, row_grads, lr)
        sync(device)
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "step_time": time.perf_counter() - t0, "tokens": sum(len(examples[i]) for i in batch)}
        record["tokens_per_s"] = record["tokens"] / record["step_time"]
        if alphas:
            record["alpha"] = [round(a.item(), 6) for a in alphas]
        if values:
            record["rows_updated"] = [len(r) for r in rows]
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        log.write(json.dumps(finite) + "\n")  # JSON has no NaN or Infinity
        history.append(record)
    for block in memory_blocks(model):
        block.memory.read_gate = None
    log.close()
    return history

def make_dense_optimizer(params, cfg, device):
    """torch's AdamW or SGD for every trainable parameter but the value tables; None when there is
    none."""
    if not params:
        return None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = str(device).startswith("cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

def autocast(device):
    """bf16 autocast on a GPU (trainable weights stay fp32); plain fp32 on a CPU."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()

def sync(device):
    """Waits for the GPU, so that wall-clock timings are true."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()

def progress(iterable, desc):
    """A progress bar on a terminal, none in a log file (its carriage returns would make one endless
    line)."""
    return tqdm(iterable, desc=desc, disable=None)

def pad_batch(seqs, pad_id, left=False, device="cpu"):
    """(ids, mask), both (B, T): right padding for scoring, left padding for generation."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)

# --------------------------------------------------------------------------------------------------
# Evaluation: zero-shot, no chat template, greedy; batched so that the batch size never changes an answer

def medmcqa_prompt(row):
    """The training text up to and including `Answer:`; the model must continue it with ` {L}.
    {option}`."""
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\nB. "
            f"{row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")

def medmcqa_answer(row, option, letter_only=False):
    if letter_only:
        return f" {'ABCD'[option]}"
    return f" {'ABCD'[option]}. {row['op' + 'abcd'[option]]}"

def medmcqa_text(row):
    """The training text: prompt, gold answer, and the explanation line if any. No EOS (the
    published code appends none): it would teach the model to stop early, which moves TriviaQA for a
    reason that is not forgetting."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    if (row.get("exp") or "").strip():
        text += f"\nExplanation: {row['exp']}"
    return text

def positions(mask):
    """Position ids counted from each row's first real token, so a left-padded row scores as it
    would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)

def tail_logprobs(model, seqs, n_scored, pad_id):
    """[(n,) log-probabilities of the last n tokens of each sequence] from one left-padded forward,
    logits only where a scored token is."""
    ids, mask = pad_batch(seqs, pad_id, left=True, device=next(model.parameters()).device)
    k = max(n_scored)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=k + 1)
    logits = out.logits[:, -k - 1:-1].float()                                       # (B, k, vocab)
    token_lp = logits.gather(-1, ids[:, -k:, None])[..., 0] - logits.logsumexp(-1)   # (B, k)
    return [token_lp[i, k - n:] for i, n in enumerate(n_scored)]

def option_logprobs(model, prompts, options, pad_id):
    """[(n,) log-probabilities of each option's tokens after its prompt], options listed prompt by
    prompt. Each prompt runs once (left-padded) and its KV cache is shared by its options, which run
    after it as one right-padded batch: the prompt, most of the tokens, is not recomputed per
    option."""
    k = len(options) // len(prompts)  # options per prompt
    # (B, P)
    ids, mask = pad_batch(prompts, pad_id, left=True, device=next(model.parameters()).device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)                                                # B -> B*k rows
    opt_ids, opt_mask = pad_batch(options, pad_id, device=ids.device)              # (B*k, O)
    past_mask = mask.repeat_interleave(k, 0)                                        # (B*k, P)
    start = past_mask.sum(-1, keepdim=True)                                         # (B*k, 1)
    opt_pos = start + torch.arange(opt_ids.shape[1], device=ids.device)             # (B*k, O)
    opt_logits = model(input_ids=opt_ids, attention_mask=torch.cat([past_mask, opt_mask], -1),
                       position_ids=opt_pos, past_key_values=cache).logits  # (B*k, O, vocab)
    # option token j is predicted by the logits before it: the prompt's last for j = 0
    first = out.logits[:, -1:].repeat_interleave(k, 0)  # (B*k, 1, vocab)
    logits = torch.cat([first, opt_logits[:, :-1]], 1).float()  # (B*k, O, vocab)
    token_lp = logits.gather(-1, opt_ids[..., None])[..., 0] - logits.logsumexp(-1)  # (B*k, O)
    return [token_lp[i, :len(o)] for i, o in enumerate(options)]

@torch.no_grad()
def eval_medmcqa(model, tokenizer, rows, letter_only=False, batch_size=16):
    """Accuracy of the argmax over the 4 options of the mean per-token log-likelihood of ` {L}.
    {option}` (the mean keeps long options from losing for their length; letter mode: ` A`..` D`).
    The gold answer's NLL moves long before the argmax flips: it shows learning that accuracy on
    1,000 questions cannot yet resolve. Helpers: medmcqa_prompt, medmcqa_answer, option_logprobs,
    pad_batch, positions, progress."""
    prompts, options = [], []  # token ids: a prompt per question, its four answers after it
    for row in rows:
        prompt = tokenizer(medmcqa_prompt(row))["input_ids"]
        prompts.append(prompt)
        for option in range(4):
            ids = tokenizer(medmcqa_prompt(row) + medmcqa_answer(row, option, letter_only))["input_ids"]
            assert ids[:len(prompt)] == prompt, "the prompt must tokenize as a prefix of prompt + answer"
            options.append(ids[len(prompt):])
    means, pad = [], tokenizer.pad_token_id
    for s in progress(range(0, len(rows), batch_size), "medmcqa"):
        batch_options = options[4 * s:4 * (s + batch_size)]
        means += [lp.mean().item() for lp in option_logprobs(model, prompts[s:s + batch_size], batch_options, pad)]
    scores = [means[i:i + 4] for i in range(0, len(means), 4)]
    preds = [max(range(4), key=s.__getitem__) for s in scores]
    correct = [int(p == row["cop"]) for p, row in zip(preds, rows)]
    gold_nlls = [-s[row["cop"]] for s, row in zip(scores, rows)]
    mode = "letter" if letter_only else "letter + option text"
    return {"acc": statistics.mean(correct), "gold_nll": statistics.mean(gold_nlls), "n": len(rows),
            "predictions": preds, "scores": scores, "correct": correct, "gold_nlls": gold_nlls,
            "protocol": f"zero-shot, mean log-likelihood of {mode}"}

@torch.no_grad()
def eval_wikitext(model, tokenizer, text, window=1024, stride=512, batch_size=8):
    """Token perplexity with a sliding window: each window starts `stride` after the last and scores
    only the tokens no earlier window scored, so every token but the first (which has no context)
    counts once. Helpers: tail_logprobs, pad_batch, positions, progress."""
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 2, "perplexity needs at least two tokens"
    starts = range(0, max(1, len(ids) - window + stride), stride)
    ends = [min(start + window, len(ids)) for start in starts]
    first_scored = [1] + ends[:-1]  # a window scores the tokens after the previous window's end
    spans = list(zip(starts, ends, first_scored))
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
    """TriviaQA normalisation: lower case, drop articles, keep [a-z0-9 .-], collapse spaces."""
    s = re.sub(r"\b(a|an|the)\b", " ", s.lower())
    return " ".join(re.sub(r"[^a-z0-9 .\-]", " ", s).split())

def alias_contained(prediction, aliases):
    """The paper's metric: some normalised alias occurs inside the normalised generation (lenient by
    design)."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))

def exact_match(prediction, aliases):
    """The answer equals an alias: the first non-empty line, or a start of it ending where a
    sentence or clause does (`Paris. It is...`), at . , : ; ! ? before a space or the end, so `St.
    Louis`, `3.14`, `Washington, D.C.` stay whole. Thousands separators are dropped (`1,000` equals
    `1000`)."""
    def norm(s):
        return normalize_answer(re.sub(r"(?<=\d),(?=\d{3}\b)", "", s))
    line = next((line.strip() for line in prediction.split("\n") if line.strip()), "")
    answers = {norm(line)} | {norm(line[:m.start()]) for m in re.finditer(r"[.,;:!?](?=\s|$)", line)}
    return bool((answers - {""}) & {norm(a) for a in aliases})

@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=32, repetition_penalty=1.0, batch_size=32):
    """Greedy continuations by HF `generate` (KV cache), stopping on the tokenizer's EOS only.
    Prompts of equal token length run together: no pads at all, so a batch gives each prompt the
    answer it gets alone, and the repetition penalty (the logit of a token already in the row
    divided by it if positive, multiplied if negative) counts exactly the row's own tokens."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos, answers = tokenizer.eos_token_id, {}
    for _, same_length in itertools.groupby(order, key=lambda i: len(encoded[i])):
        same_length = list(same_length)
        for b in range(0, len(same_length), batch_size):
            idx = same_length[b:b + batch_size]
            # (B, P)
            ids = torch.tensor([encoded[i] for i in idx], device=next(model.parameters()).device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
                answers[i] = tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
    return [answers[i] for i in range(len(prompts))]

def eval_triviaqa(model, tokenizer, rows, batch_size=32, max_new_tokens=32, repetition_penalty=None):
    """Alias containment (the paper's) and exact match of one greedy generation per question. The
    paper's generate(do_sample=False) applies the repetition penalty of the model's own
    generation_config.json (Qwen2.5-0.5B-Instruct sets one): so does this, unless
    `repetition_penalty` is given. Helpers: greedy_generate, alias_contained, exact_match,
    normalize_answer."""
    penalty = repetition_penalty or getattr(model.generation_config, "repetition_penalty", None) or 1.0
    prompts = [f"Question: {question}\nAnswer:" for question, _ in rows]
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, penalty, batch_size)
    contained = [int(alias_contained(p, aliases)) for p, (_, aliases) in zip(preds, rows)]
    exact = [int(exact_match(p, aliases)) for p, (_, aliases) in zip(preds, rows)]
    return {"alias_contains_acc": statistics.mean(contained), "exact_match": statistics.mean(exact),
            "n": len(rows), "predictions": preds, "alias_correct": contained, "exact_correct": exact,
            "protocol": f"zero-shot greedy, {max_new_tokens} new tokens, repetition penalty "
            f"{penalty:g}"}

# --------------------------------------------------------------------------------------------------
# Data files: every source is a hub id by default, or a local JSON Lines (or .txt) file in the hub's schema

def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    spelled = path.startswith((".", "/", "~")) or path.count("/") > 1
    return os.path.exists(path) or spelled or path.lower().endswith((".jsonl", ".json", ".txt"))

def read_rows(source, hub_config=None, split="train"):
    """(where, row) pairs, `where` a row's place for errors: its line in a file (every line
    counted)."""
    if not is_local(source):
        try:
            # imported here: `eval` and `bench` run where `datasets` is not installed
            import datasets
            rows = datasets.load_dataset(source, hub_config, split=split)
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — download "
                            "it first, or pass a local file in the same schema") from e
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    kind = source.lower().rsplit(".", 1)[-1]
    require(os.path.exists(source), f"data file {source} does not exist — check the path")
    require(not os.path.isdir(source), f"data file {source} is a folder — give the file in it")
    require(os.path.isfile(source) and kind in ("jsonl", "json", "txt"), f"data file {source} is "
            "not a "
            ".jsonl, .json (JSON Lines, what datasets' to_json writes) or .txt file — give one")
    with open(source, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows) is not text
        lines = f.read().split("\n")
    if kind == "txt":
        return [(f"line {i}", {"text": line}) for i, line in enumerate(lines, 1)]
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{source}: line {i} is not JSON ({e}) — is the file complete?") from e
            require(isinstance(row, dict), f"{source}: line {i} is a {type(row).__name__}, not a "
                    "JSON object — one object per line (JSON Lines, what datasets' to_json writes)")
            rows.append((f"line {i}", row))
    return rows

def parse_rows(source, rows, parse):
    """parse(row) of every row; a missing or mistyped field is named with the row's line."""
    out = []
    for where, row in rows:
        try:
            out.append(parse(row))
        except KeyError as e:
            raise UserError(f"{source}: {where}: field {e} is missing — the file must use the hub "
                            "schema") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source}: {where}: {e} — the file must use the hub schema") from e
    return out

def keep_rows(source, rows, filters):
    """The rows that pass every filter ({description: [passes, one per row]}); when none is left,
    the error says how many rows each filter removed."""
    kept = [row for row, *passes in zip(rows, *filters.values()) if all(passes)]
    removed = ", ".join(f"{name} removed {passes.count(False)}" for name, passes in filters.items())
    require(kept, f"{source}: no rows left of {len(rows)} ({removed}) — check the file")
    return kept

def medmcqa_row(row):
    """A MedMCQA row with `cop` as an int 0..3 (0 = opa): other tools' exports write "2" or 2.0."""
    for field in ("question", "opa", "opb", "opc", "opd"):
        if not isinstance(row[field], str):
            raise TypeError(f"field '{field}' is {type(row[field]).__name__}, not text")
    if str(row["cop"]).removesuffix(".0") not in ("0", "1", "2", "3"):
        raise ValueError(f"cop={row['cop']!r}, not an integer 0..3 (0 = opa)")
    return {**row, "cop": int(float(row["cop"]))}

def load_medmcqa(source="openlifescienceai/medmcqa", split="validation", limit=None, seed=None):
    """Single-answer rows (`choice_type == "single"`, kept when absent), shuffled with `seed`, the
    first `limit`."""
    rows = parse_rows(source, read_rows(source, None, split), medmcqa_row)
    single = [row.get("choice_type", "single") == "single" for row in rows]
    rows = keep_rows(source, rows, {"choice_type == 'single'": single})
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit]

def text_field(row):
    if not isinstance(row["text"], str):
        raise TypeError(f"field 'text' is {type(row['text']).__name__}, not text")
    return row

def load_wikitext(source="Salesforce/wikitext", config="wikitext-103-v1", limit=1000):
    """The first `limit` stripped non-empty lines of the test split, joined by a blank line."""
    rows = parse_rows(source, read_rows(source, config, "test"), text_field)
    lines = keep_rows(source, [r["text"].strip() for r in rows], {"non-empty": [bool(r["text"].strip())
                                                                                for r in rows]})
    return "\n\n".join(lines[:limit])

def triviaqa_row(row):
    """(question, aliases): the aliases and the answer value, as a list of strings (aliases given as
    one string would be an alias per character)."""
    aliases, value = row["answer"]["aliases"] or [], row["answer"].get("value") or ""
    if not isinstance(row["question"], str):
        raise TypeError(f"field 'question' is {type(row['question']).__name__}, not text")
    strings = isinstance(aliases, list) and all(isinstance(a, str) for a in aliases + [value])
    if not strings or not (aliases or value):
        raise ValueError("the answer has no aliases as a list of strings")
    return row["question"], aliases + [value] if value else aliases

def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split."""
    return parse_rows(source, read_rows(source, "rc.nocontext", "validation")[:limit], triviaqa_row)

def load_background(source="OpenAssistant/oasst1", limit=None):
    """OASST1 English assistant replies ranked 0 or 1, at least 50 characters: the general-text
    corpus."""
    rows = parse_rows(source, read_rows(source, None, "train"), text_field)
    filters = {"lang == 'en'": [r.get("lang", "en") == "en" for r in rows],
               "role == 'assistant'": [r.get("role", "assistant") == "assistant" for r in rows],
               "rank 0 or 1": [r.get("rank", 0) in (0, 1) for r in rows],
               "at least 50 characters": [len(r["text"]) >= 50 for r in rows]}
    return [r["text"] for r in keep_rows(source, rows, filters)][:limit]

# --------------------------------------------------------------------------------------------------
# Checkpoints: small files on top of a parent model, staged and renamed into place, read back by load_model

# a retrofit's background statistics; its SMF runs carry a copy
STATS = "background_stats.safetensors"

def read_json(path, fix):
    """A JSON file's content, or a one-line error naming the file and how to `fix` it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} could not be read ({type(e).__name__}: {e}) — {fix}") from e

def write_atomic(path, text):
    """Writes under a temporary name, then renames: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)

def written_by_smf(path):
    """A results JSON (it names its model), table.md or figure.svg that this tool wrote: rerunning
    into one is normal."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        first = f.readline()
        if first.startswith(("| row |", "<svg ")):
            return True
        content = json.loads(first + f.read())
        return isinstance(content, dict) and "model" in content
    return False

def check_output(flag, path, reads, folder=False, overwrite=False):
    """The output rule: a path a command writes must not exist, except a checkpoint folder replaced
    with --overwrite that holds only the files its config.json lists, and a results file this tool
    wrote. It is never, nor lies inside, anything the run reads (its model and that model's
    parents)."""
    real = os.path.realpath(path)
    for read in map(os.path.realpath, reads):
        require(real != read and not real.startswith(read + os.sep),
                f"{flag} {path} is or lies inside {read}, which this run reads — choose another "
                "path")
    place = os.path.dirname(real)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    what = "a file" if os.path.isfile(place) else "not writable"
    require(os.path.isdir(place) and os.access(place, os.W_OK),
            f"{flag} {path} cannot be written ({place} is {what}) — choose a writable place")
    if not os.path.exists(path):
        return
    if not folder:
        require(os.path.isfile(path) and written_by_smf(path),
                f"{flag} {path} exists and is not a results file of smf — choose a new file name")
        return
    meta = checkpoint_meta(path) if os.path.isdir(path) else None
    require(meta is not None, f"{flag} {path} exists and is not an smf checkpoint — choose a new "
            "folder")
    extra = sorted(set(os.listdir(path)) - set(meta.get("files", ())))
    require(not extra, f"{flag} {path} also holds {', '.join(extra)}, which replacing the "
            "checkpoint would delete — move them out, or choose another folder")
    require(overwrite, f"{flag} {path} already holds a checkpoint — pass --overwrite to replace it "
            "(once the new one is complete), or choose a new folder")

@contextlib.contextmanager
def replacing(out, overwrite=False):
    """Yields a staging folder, this run's own, that becomes `out` if the block ends without error:
    one rename, which fails if another run wrote `out` meanwhile; with `overwrite` the old
    checkpoint is renamed aside first, and back if the second rename fails or is interrupted. Before
    the swap `out` is untouched."""
    # beside `out`, on its file system: a rename moves it
    place, name = os.path.split(os.path.abspath(out))
    os.makedirs(place, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=place)
    old = staged + ".old"
    try:
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes 0700 and safetensors 0600: the usual permissions
        os.chmod(staged, 0o777 & ~umask)
        for file in os.listdir(staged):
            os.chmod(os.path.join(staged, file), 0o666 & ~umask)
        try:
            if overwrite and os.path.exists(out):
                os.rename(out, old)
            os.rename(staged, out)
        except OSError as e:
            raise UserError(f"{out} was written by another run meanwhile ({e.strerror}) — that "
                            "checkpoint stays; train again into another folder") from e
        finally:
            if os.path.exists(old) and not os.path.exists(out):
                os.rename(old, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

def save_checkpoint(folder, meta, tensors, extra=None):
    """weights.safetensors, the `extra` {file: tensors}, and config.json's `smf`: `meta` and the
    files."""
    from safetensors.torch import save_file
    for name, named in ({"weights.safetensors": tensors} | (extra or {})).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, os.path.join(folder, name))
    files = sorted(set(os.listdir(folder)) | {"config.json"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"smf": {**meta, "files": files}}, f, indent=2)

def checkpoint_meta(path):
    """The `smf` entry of a checkpoint's config.json, or None for a plain model or hub id."""
    config = os.path.join(path, "config.json")
    if not (is_local(path) and os.path.isfile(config)):
        return None
    content = read_json(config, "restore the file, or train or download that model again")
    return content.get("smf") if isinstance(content, dict) else None

def parent_of(path, meta):
    """A checkpoint's parent: beside it as recorded (moved together), else where it was (copied
    alone)."""
    for parent in (os.path.join(path, meta["parent"]), meta.get("parent_abs", "")):
        if os.path.isfile(os.path.join(parent, "config.json")):
            return parent
    return meta["parent"]

def checkpoint_chain(path):
    """The local folders a model is built from: `path`, its parent, grandparent, ... (a hub id ends
    it)."""
    chain = []
    while is_local(path) and os.path.isfile(os.path.join(path, "config.json")) and path not in chain:
        chain.append(path)
        meta = checkpoint_meta(path)
        if meta is None:
            break
        path = parent_of(path, meta)
    return chain

def model_memory(path):
    """The memory settings of the retrofit a model is built on, or None for a model without memory.
    """
    metas = [checkpoint_meta(p) for p in checkpoint_chain(path)]
    return next((m["memory"] for m in metas if m and m["kind"] == "memory"), None)

def fingerprint(path):
    """Of a plain parent model: the sha256 of its weight files (a local folder), or None (a hub id:
    its files are content-addressed by the hub's cache). A changed parent under the same path is
    then caught."""
    if not is_local(path):
        return None
    digest = hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))):
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()

def provenance(kind, cfg_record, parent, out):
    """config.json's record of where a checkpoint comes from: its parent (relative to the
    checkpoint, and absolute), the parent's id or fingerprint, a fresh id of its own, and the
    versions it was made with."""
    import transformers
    parent_meta = checkpoint_meta(parent)
    meta = {"kind": kind, "id": os.urandom(8).hex(), "train": cfg_record, "parent": parent,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if is_local(parent):
        meta["parent"] = os.path.relpath(parent, out)
        meta["parent_abs"] = os.path.abspath(parent)
    if parent_meta is None:
        meta["parent_fingerprint"] = fingerprint(parent)
    else:
        meta["parent_id"] = parent_meta["id"]
    return meta

def smf_patch(before, trained):
    """What an SMF checkpoint stores of its `trained` tensors: of a value table only the rows that
    changed since `before` (as `<name>.index` and `<name>.rows`), anything else (alpha, with
    --train-scale) whole."""
    patch = {name: t for name, t in trained.items() if name not in before}
    for name in before:
        # exact: a change of 1e-9 counts
        index = (before[name] != trained[name]).any(dim=1).nonzero()[:, 0]
        patch[f"{name}.index"] = index
        patch[f"{name}.rows"] = trained[name][index]
    return patch

def load_stats(path):
    """The background statistics a retrofit saved beside its weights (its SMF runs carry a copy)."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(path, STATS))
    n_layers = len([k for k in saved if k.endswith(".df")])
    return [BackgroundStats(saved[f"{j}.df"], saved[f"{j}.reads"], int(saved["batches"]))
            for j in range(n_layers)]

def stats_tensors(stats):
    tensors = {"batches": torch.tensor(stats[0].batches)}
    for j, s in enumerate(stats):
        tensors[f"{j}.df"], tensors[f"{j}.reads"] = s.df, s.reads
    return tensors

def check_model_path(path):
    """A local model folder holds config.json; a missing one is named as what it is."""
    if not is_local(path):
        return
    require(not os.path.isfile(path), f"--model {path} is a file — give the folder that holds it")
    require(os.path.isdir(path), f"--model {path}: there is no such folder, and as a hub id it "
            "could not be loaded — check the path")
    require(os.path.isfile(os.path.join(path, "config.json")), f"{path} is neither a Hugging Face "
            "model nor "
            "an smf checkpoint (no config.json) — point --model at the folder holding config.json")

def load_plain_model(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer_files = glob.glob(os.path.join(path, "tokenizer*")) + glob.glob(os.path.join(path, "vocab.*"))
    require(not is_local(path) or tokenizer_files,
            f"{path} has no tokenizer — save the model's tokenizer into it (save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except Exception as e:
        damaged = [f for f in glob.glob(os.path.join(path, "*.safetensors")) if not readable_weights(f)]
        require(not damaged, f"{damaged[0] if damaged else ''} is damaged — restore it, or "
                f"download {path} again")
        detail = " ".join(str(e).split())[:150]
        where = "no such local folder, and as a hub id it" if not is_local(path) else "it"
        raise UserError(f"could not load model '{path}': {where} could not be loaded "
                        f"({type(e).__name__}: "
                        f"{detail}) — check the path, or download the model while online") from e
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # batching needs one
    return model.eval(), tokenizer

def readable_weights(file):
    from safetensors import safe_open
    try:
        with safe_open(file, "pt"):
            return True
    except Exception:
        return False

def load_model(path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes (parents
    first)."""
    check_model_path(path)
    meta = checkpoint_meta(path)
    if meta is None:
        return load_plain_model(path, device, dtype)
    parent = parent_of(path, meta)
    require(not is_local(parent) or os.path.isfile(os.path.join(parent, "config.json")),
            f"the parent {meta['parent']} of {path} is missing — restore it, or train {path} again")
    parent_meta = checkpoint_meta(parent) or {}
    changed = meta.get("parent_id") != parent_meta.get("id")
    if "parent_fingerprint" in meta:
        changed = meta["parent_fingerprint"] != fingerprint(parent)
    require(not changed, f"the parent {parent} of {path} has other weights than it was trained "
            f"from — restore that parent, or train {path} again")
    model, tokenizer = load_model(parent, device, dtype)
    weights = os.path.join(path, "weights.safetensors")
    require(os.path.isfile(weights), f"{weights} is missing — restore it, or train {path} again")
    require(readable_weights(weights), f"{weights} is damaged — restore it, or train {path} again")
    from safetensors.torch import load_file
    tensors = load_file(weights, device=str(device))
    if meta["kind"] == "memory":
        add_memory(model, MemoryConfig(**meta["memory"]))
    if meta["kind"] == "lora":
        add_lora(model, meta["train"]["lora_r"], meta["train"]["lora_alpha"], 0.0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        # whole tensors, or smf_patch's changed rows of a value table
        for key, t in tensors.items():
            if key.endswith(".rows"):
                name = key.removesuffix(".rows")
                params[name][tensors[f"{name}.index"]] = t.to(dtype)
            elif not key.endswith(".index"):
                params[key].copy_(t)
    return merge_lora(model).to(dtype).eval(), tokenizer

# --------------------------------------------------------------------------------------------------
# Commands: train, eval, bench, table

PROBES = ("medmcqa", "wikitext", "triviaqa")
RETROFIT_SHARES = ("seed", "micro_batch", "grad_accum", "forward_batch", "max_len", "background",
                   # the one-liner's retrofit takes these from the command line
                   "background_examples")
APPLIES = {  # rule 2: option -> the runs it applies to; given to any other run it is refused
    "selector": "smf", "top_t": "smf", "train_scale": "smf",
    "lora_r": "lora", "lora_alpha": "lora", "lora_dropout": "lora",
    "background": "new memory", "background_examples": "new memory",
    **{f"memory_{f.name}": "new memory" for f in dataclasses.fields(MemoryConfig)},
    "memory_alpha_init": "new additive memory",
    "medmcqa": "finetuning",
    **{f.name: "eval_out" for f in dataclasses.fields(EvalConfig)}}
RUNS = {"smf": "--method smf", "lora": "--method lora", "finetuning": "--method smf, lora or full",
        "new memory": "a new memory (--method retrofit, or smf from a model without memory); a "
        "model's "
        "memory and background statistics are its own", "new additive memory": "a new additive "
        "memory",
        "eval_out": "--eval-out"}

def run_kinds(method, has_memory, memory_mode="additive", eval_out=None):
    """{kind of run in RUNS: whether this run is one}: what decides which options apply."""
    new_memory = method == "retrofit" or (method == "smf" and not has_memory)
    return {"smf": method == "smf", "lora": method == "lora", "finetuning": method != "retrofit",
            "new memory": new_memory, "new additive memory": new_memory and memory_mode != "replacement",
            "eval_out": bool(eval_out)}

def applied(cfg, kinds):
    """The recipe as config.json records it: every setting that applies to this run."""
    return {k: v for k, v in vars(cfg).items() if k not in APPLIES or kinds[APPLIES[k]]}

def load_probes(args, names=PROBES):
    """Every probe's data, read before any model loads, so that a wrong source fails in seconds."""
    flags = {"medmcqa": "--eval-medmcqa", "wikitext": "--wikitext", "triviaqa": "--triviaqa"}
    data = {}
    for name in names:
        try:
            if name == "medmcqa":
                data[name] = load_medmcqa(args.eval_medmcqa, "validation", args.limit)
            if name == "wikitext":
                data[name] = load_wikitext(args.wikitext, limit=args.limit)
            if name == "triviaqa":
                data[name] = load_triviaqa(args.triviaqa, args.limit)
        except UserError as e:  # name the flag to change
            raise UserError(f"{flags[name]}: {e}") from e
    return data

def train_stage(cfg, mem_cfg, parent, out, data, args, device):
    """One checkpoint: load the parent, prepare what the method trains, train, save; in a staging
    folder that becomes `out` only when complete."""
    kinds = run_kinds(cfg.method, bool(model_memory(parent)), mem_cfg.mode)
    examples_text = data["background"] if cfg.method == "retrofit" else data["medmcqa"]
    with replacing(out, args.overwrite) as staged:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(parent, device)
        lora = (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        prepare_model(model, cfg.method, mem_cfg, lora, cfg.train_scale, device)
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        stats = load_stats(parent) if cfg.method == "smf" else None
        before = {name: p.detach().clone() for name, p in trained.items() if name.endswith(".values")}
        examples = tokenize(tokenizer, examples_text[:cfg.limit_train], cfg.max_len)
        require(examples, "no training text has two tokens or more — check the training data")
        if cfg.warmup >= total_steps(len(examples), cfg):
            print(f"warning: warm-up ({cfg.warmup} steps) covers all "
                  f"{total_steps(len(examples), cfg)} steps of "
                  f"this {cfg.method}: its lr never reaches {cfg.lr:g} and it learns little", file=sys.stderr)
        log = os.path.join(staged, "train_log.jsonl")
        history = train(model, examples, cfg, stats, tokenizer.pad_token_id, device, log)
        # gathered once here, reused by every SMF run from this retrofit
        if cfg.method == "retrofit":
            texts = data["background"][:cfg.background_examples]
            stats = background_stats(model, tokenizer, texts, cfg.max_len, device=device)
        meta = provenance(cfg.method.replace("retrofit", "memory"), applied(cfg, kinds), parent, out)
        meta["given"] = args.given
        meta["train"]["total_steps"] = len(history)
        if cfg.method == "retrofit":
            meta["memory"] = vars(mem_cfg)
        if cfg.method == "smf":
            meta["background_stats"] = os.path.abspath(os.path.join(parent, STATS))
        tensors = smf_patch(before, trained) if cfg.method == "smf" else trained
        save_checkpoint(staged, meta, tensors, {STATS: stats_tensors(stats)} if stats else None)
    return model, history

def run_train(args, device):
    """`train`. SMF from a model without memory first retrofits it into <out>_retrofit, with the
    retrofit recipe and the settings both stages share (RETROFIT_SHARES)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    mem_cfg = MemoryConfig(**{f.name: getattr(args, f"memory_{f.name}") for f in dataclasses.fields(MemoryConfig)})
    stages = [(cfg, args.model, args.out)]
    if cfg.method == "smf" and not model_memory(args.model):  # the one-liner
        shared = {name: getattr(cfg, name) for name in RETROFIT_SHARES}
        retrofit_out = args.out.rstrip("/") + "_retrofit"
        stages = [(TrainConfig(method="retrofit", **shared), args.model, retrofit_out), (cfg, retrofit_out, args.out)]
    data = {"medmcqa": None, "background": None}
    if cfg.method != "retrofit":
        rows = load_medmcqa(cfg.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)
        data["medmcqa"] = [medmcqa_text(row) for row in rows]
    if stages[0][0].method == "retrofit":
        data["background"] = load_background(cfg.background)
    if len(stages) == 2:
        retrofit, n = stages[0][0], len(data["background"])
        unused = sorted(set(args.given) - set(RETROFIT_SHARES) - set(APPLIES) - {"method"}) or ["-"]
        print(f"{args.model} has no memory: retrofitting it first into {stages[0][2]} with the "
              "retrofit recipe: "
              f"{n:,} background texts x {retrofit.epochs:g} epochs = {total_steps(n, retrofit):,} "
              "steps. It "
              f"takes {', '.join(RETROFIT_SHARES)} from this command, not {', '.join(unused)} (to "
              "set those, train --method retrofit first, then SMF from it)")
    probes = load_probes(args) if args.eval_out else None
    for stage_cfg, parent, out in stages:
        t0 = time.time()
        model, history = train_stage(stage_cfg, mem_cfg, parent, out, data, args, device)
        print_summary(stage_cfg.method, out, history, time.time() - t0, args)
    if args.eval_out:  # evaluate the checkpoint as load_model reads it, in this process
        eval_args = argparse.Namespace(**{**vars(args), "model": args.out, "out": args.eval_out, "probe": "all"})
        run_eval(eval_args, device, probes)
    return model

def print_summary(method, out, history, seconds, args):
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)) / 2 ** 20
    last, tokens = history[-1], sum(h["tokens"] for h in history)
    print(f"\n== {method} finished: {len(history)} steps, {tokens:,} tokens, {seconds:.0f}s, final "
          f"loss {last['loss']:.4f}, checkpoint {out} ({size:.1f} MB, log train_log.jsonl)")
    for key in ("rows_updated", "alpha"):
        if key in last:
            print(f"   {key} per layer in the last step: {last[key]}")
    data_flags = "".join(f" --{name.replace('_', '-')} {getattr(args, name)}" for name in
                         ("eval_medmcqa", "wikitext", "triviaqa") if name in args.given)
    print(f"   evaluate: python {os.path.relpath(os.path.abspath(__file__))} eval --model "
          f"{out}{data_flags}")

def run_eval(args, device, probes=None):
    """`eval`: a line per probe and the results JSON (if one fails: those that finished, and
    `unfinished`)."""
    names = PROBES if args.probe == "all" else (args.probe,)
    probes = probes or load_probes(args, names)
    model, tokenizer = load_model(args.model, device, torch.bfloat16 if "cuda" in str(device) else torch.float32)
    bs, letter, penalty = args.batch_size, args.medmcqa_mode == "letter", args.repetition_penalty
    results = {"model": args.model}
    try:
        for probe in names:
            t0 = time.time()
            if probe == "medmcqa":
                r = eval_medmcqa(model, tokenizer, probes[probe], letter, bs)
            if probe == "wikitext":
                r = eval_wikitext(model, tokenizer, probes[probe], batch_size=max(1, bs // 2))
            if probe == "triviaqa":
                r = eval_triviaqa(model, tokenizer, probes[probe], 2 * bs, repetition_penalty=penalty)
            keys = [k for k in ("acc", "gold_nll", "ppl", "alias_contains_acc", "exact_match") if k in r]
            metrics = " ".join(f"{k} {r[k]:.4f}" for k in keys)
            print(f"{probe:9s} {metrics}  n={r.get('n', r.get('tokens'))}  ({r['protocol']}; "
                  f"{time.time() - t0:.1f}s)")
            results[probe] = r
    finally:
        unfinished = [n for n in names if n not in results]
        if unfinished:
            results["unfinished"] = unfinished
        if args.out and len(results) > 1 + bool(unfinished):
            write_atomic(args.out, json.dumps(results, indent=2))
            print(f"wrote {args.out}" + (f" without {', '.join(unfinished)}" if unfinished else ""))
    return results

SHAPES = {  # random-weight models for `bench`: the real Qwen2.5-0.5B dimensions, and a small one
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}

def run_bench(args, device):
    """Every method's training steps on random tokens and weights, and a memory layer's fwd+bwd
    against the FFN's."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    cuda = str(device).startswith("cuda")
    B, T = args.batch_size or (16 if cuda else 4), args.seq_len or (512 if cuda else 256)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(4096, T))
    L = config.num_hidden_layers
    # layers 6, 12, 18 of 24
    mem_cfg = MemoryConfig(layers=tuple(sorted({L // 4, L // 2, 3 * L // 4})))
    examples = torch.randint(config.vocab_size, (B * (args.steps + 2), T), generator=torch.Generator().manual_seed(0))
    n = mem_cfg.n_keys ** 2
    background = [BackgroundStats(torch.randint(0, 50, (n,)), torch.randint(0, 500, (n,)), 2000)] * 3
    print(f"bench: {args.shape} on {torch.cuda.get_device_name() if cuda else 'cpu'}, {B} x {T} "
          "tokens a step")
    tokens_per_s = {}
    for method in ("full", "lora", "smf", "retrofit"):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
        if method == "smf":
            add_memory(model, mem_cfg)
        prepare_model(model, method, mem_cfg, (16, 32.0, 0.05), False, device)
        cfg = TrainConfig(method=method, micro_batch=math.gcd(4, B), grad_accum=B // math.gcd(4, B),
                          max_len=T, max_steps=args.steps + 2, warmup=1)
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bars between the rows
            # after 2 warm-up steps
            history = train(model, examples.tolist(), cfg, background, 0, device)[2:]
        step_s = statistics.mean(h["step_time"] for h in history)
        tokens_per_s[method] = B * T / step_s
        print(f"{method:9s} {tokens_per_s[method]:9.0f} tokens/s  {1000 * step_s:7.1f} ms/step")
    print(f"SMF tokens/s / full finetuning tokens/s: "
          f"{tokens_per_s['smf'] / tokens_per_s['full']:.2f}")
    # SwiGLU, as in Qwen2.5-0.5B
    ffn = Qwen2MLP(Qwen2Config(hidden_size=896, intermediate_size=4864))
    x = torch.randn(2048, 896, device=device, requires_grad=True)
    seconds = {name: fwd_bwd_seconds(layer.to(device), x, device)
               for name, layer in (("memory", ProductKeyMemory(896)), ("ffn", ffn))}
    ratio = seconds["memory"] / seconds["ffn"]
    print(f"memory layer fwd+bwd / SwiGLU FFN fwd+bwd (hidden 896, N=16384, 2048 tokens): "
          f"{ratio:.2f} ({1000 * seconds['memory']:.1f} ms vs {1000 * seconds['ffn']:.1f} ms)")

def fwd_bwd_seconds(layer, x, device, repeats=3):
    """Mean seconds of a forward and backward, after one warm-up."""
    for i in range(repeats + 1):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        with autocast(device):
            layer(x).float().sum().backward()
    sync(device)
    return (time.perf_counter() - t0) / repeats

TABLE_ROWS = [  # (row name, results folder, the short label of the figure)
    ("Base", "base", "Base"), ("Retrofit (additive)", "retrofit_additive", "Retro add"),
    ("Retrofit (replacement)", "retrofit_replacement", "Retro repl"),
    ("SMF replacement KL", "smf_replacement_kl", "SMF repl KL"),
    ("SMF replacement TF-IDF", "smf_replacement_tfidf", "SMF repl TF-IDF"),
    ("SMF additive KL", "smf_additive_kl", "SMF add KL"),
    ("SMF additive TF-IDF", "smf_additive_tfidf", "SMF add TF-IDF"),
    ("SMF additive +scale KL", "smf_additive_scale_kl", "SMF +scale KL"),
    ("SMF additive +scale TF-IDF", "smf_additive_scale_tfidf", "SMF +scale TF-IDF"),
    ("LoRA", "lora", "LoRA"), ("Full finetuning", "full", "Full FT")]
TABLE_COLUMNS = [  # (header, probe, key of the mean, key of the per-question values or None, scale)
    ("MedMCQA acc", "medmcqa", "acc", "correct", 100), ("MedMCQA gold NLL", "medmcqa", "gold_nll", "gold_nlls", 1),
    ("WikiText ppl", "wikitext", "ppl", None, 1),
    ("TriviaQA alias acc", "triviaqa", "alias_contains_acc", "alias_correct", 100),
    ("TriviaQA EM", "triviaqa", "exact_match", "exact_correct", 100)]

def paired_delta(runs, base, key, scale):
    """(Δ, half-width of its 95% interval) against Base, paired over questions: per question the
    row's mean over seeds minus Base's, then the mean and 1.96 standard errors. None unless all
    scored the same questions."""
    if len({len(r[key]) for r in runs + base}) != 1 or len(runs[0][key]) < 2:
        return None
    row = [statistics.mean(q) for q in zip(*(r[key] for r in runs))]
    ref = [statistics.mean(q) for q in zip(*(r[key] for r in base))]
    d = [scale * (a - b) for a, b in zip(row, ref)]
    return statistics.mean(d), 1.96 * statistics.stdev(d) / math.sqrt(len(d))

def table_cells(runs, base, column, is_base):
    """The two cells of one column: mean ± sample std (n) over seeds, and Δ vs Base with its
    interval."""
    _, _, key, per_question, scale = column
    xs = [scale * r[key] for r in runs]
    if not xs:
        return ["missing", ""], None, None
    cell = f"{statistics.mean(xs):.2f}"
    if len(xs) > 1:
        cell += f" ± {statistics.stdev(xs):.2f}"
    paired = None
    if per_question and base:
        paired = paired_delta(runs, base, per_question, scale)
    if is_base or not base:
        return [f"{cell} (n={len(xs)})", ""], statistics.mean(xs), paired
    delta = f"{statistics.mean(xs) - scale * statistics.mean(r[key] for r in base):+.2f}"
    if paired:
        delta = f"{paired[0]:+.2f} [{paired[0] - paired[1]:+.2f}, {paired[0] + paired[1]:+.2f}]"
    return [f"{cell} (n={len(xs)})", delta], statistics.mean(xs), paired

def run_table(args, device=None):
    """table.md (mean ± sample std over seeds, n per column; unfinished runs reported, not averaged;
    Δ vs Base) and figure.svg, the learning-versus-forgetting plot of the same numbers."""
    found = {}
    for _, folder, _ in TABLE_ROWS:
        files = sorted(glob.glob(os.path.join(args.results_dir, folder, "seed*", "eval.json")))
        found[folder] = [read_json(f, "rerun that stage's evaluation") for f in files]
    require(any(found.values()), f"{args.results_dir} holds no <row>/seed<S>/eval.json — run "
            "run_all.sh first, or point at its OUT folder")
    done = {folder: [r for r in runs if "unfinished" not in r] for folder, runs in found.items()}
    lines = ["| row | " + " | ".join(f"{c[0]} | Δ vs Base" for c in TABLE_COLUMNS) + " |", "|---" * 11 + "|"]
    # folder -> {key: (mean, half-width of the paired interval or None)}, for the figure
    points = {}
    for name, folder, _ in TABLE_ROWS:
        cells, points[folder] = [], {}
        for column in TABLE_COLUMNS:
            probe, key = column[1], column[2]
            runs = [r[probe] for r in done[folder] if probe in r]
            base = [r[probe] for r in done["base"] if probe in r]
            two, mean, paired = table_cells(runs, base, column, folder == "base")
            cells += two
            points[folder][key] = (mean, paired[1] if paired else None)
        unfinished = len(found[folder]) - len(done[folder])
        label = f"{name} ({unfinished} unfinished)" if unfinished else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n_seeds = max(len(runs) for runs in done.values())
    questions = {p: len(r[p].get("correct", r[p].get("alias_correct", []))) for runs in done.values()
                 for r in runs for p in ("medmcqa", "triviaqa") if p in r}
    svg = figure_svg(points, n_seeds, questions)
    write_atomic(os.path.join(args.results_dir, "table.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(args.results_dir, "figure.svg"), svg)
    print("\n".join(lines))

# The figure: two panels, y = MedMCQA accuracy; x = WikiText ppl (left), TriviaQA alias accuracy (right).
# pixels: plot box, margins, label column
PANEL_W, PANEL_H, LEFT, TOP, LABEL_W = 330, 300, 70, 40, 130
SMF_START = {"replacement": "retrofit_replacement", "additive": "retrofit_additive"}

def frontier(points, higher_x_is_better):
    """The points no other point beats on both axes at once (y is always higher-better), sorted by
    x."""
    def beaten(p):
        return any(q != p and q[1] >= p[1] and (q[0] >= p[0] if higher_x_is_better else q[0] <= p[0])
                   for q in points)
    return sorted(p for p in points if not beaten(p))

def scale_axis(values, whiskers, pixels):
    """(lo, hi, to_pixel): a padded data range mapped onto `pixels` (start, end)."""
    lo = min(v - w for v, w in zip(values, whiskers))
    hi = max(v + w for v, w in zip(values, whiskers))
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = lo - pad, hi + pad
    return lo, hi, lambda v: pixels[0] + (v - lo) / (hi - lo) * (pixels[1] - pixels[0])

def panel_svg(x0, rows, x_key, x_title, higher_x_is_better):
    """One panel: axes with ticks, whiskers, the dashed frontier, lines from each retrofit to its
    SMF rows, and labels in a column beside the plot (spaced so they never overlap), each joined to
    its point."""
    xs = [r[x_key][0] for r in rows]
    ys = [r["acc"][0] for r in rows]
    x_lo, x_hi, px = scale_axis(xs, [r[x_key][1] or 0 for r in rows], (x0, x0 + PANEL_W))
    y_lo, y_hi, py = scale_axis(ys, [r["acc"][1] or 0 for r in rows], (TOP + PANEL_H, TOP))
    out = [f'<g class="panel" data-x="{x_key}" data-x-lo="{x_lo}" data-x-hi="{x_hi}" '
           f'data-y-lo="{y_lo}" '
           f'data-y-hi="{y_hi}" data-left="{x0}" data-right="{x0 + PANEL_W}" data-top="{TOP}" '
           f'data-bottom="{TOP + PANEL_H}">',
           f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
           'stroke="#888"/>',
           f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 38}" '
           f'text-anchor="middle">{x_title}</text>']
    for i in range(5):
        xv, yv = x_lo + (x_hi - x_lo) * (i + 0.5) / 5, y_lo + (y_hi - y_lo) * (i + 0.5) / 5
        out.append(f'<text x="{px(xv):.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle" '
                   f'font-size="11">{xv:.3g}</text>')
        out.append(f'<text x="{x0 - 6}" y="{py(yv) + 4:.1f}" text-anchor="end" '
                   f'font-size="11">{yv:.3g}</text>')
    by_folder = {r["folder"]: r for r in rows}
    for r in rows:  # each SMF row against its own starting point
        start = by_folder.get(SMF_START.get(r["folder"].split("_")[1] if r["folder"].startswith("smf") else ""))
        if start:
            out.append(f'<line class="from-retrofit" x1="{px(start[x_key][0]):.2f}" '
                       f'y1="{py(start["acc"][0]):.2f}" '
                       f'x2="{px(r[x_key][0]):.2f}" y2="{py(r["acc"][0]):.2f}" stroke="#bbb" '
                       'stroke-dasharray="2 2"/>')
    best = frontier(list(zip(xs, ys)), higher_x_is_better)
    path = " ".join(f"{px(x):.2f},{py(y):.2f}" for x, y in best)
    out.append(f'<polyline class="frontier" points="{path}" fill="none" stroke="#555" '
               'stroke-dasharray="6 4"/>')
    label_y = TOP
    for r in sorted(rows, key=lambda r: -r["acc"][0]):
        x, y = px(r[x_key][0]), py(r["acc"][0])
        if r[x_key][1]:
            w = r[x_key][1] * (px(1) - px(0))
            out.append(f'<line class="whisker-x" data-row="{r["folder"]}" x1="{x - w:.2f}" '
                       f'y1="{y:.2f}" '
                       f'x2="{x + w:.2f}" y2="{y:.2f}" stroke="#333"/>')
        if r["acc"][1]:
            h = r["acc"][1] * (py(0) - py(1))
            out.append(f'<line class="whisker-y" data-row="{r["folder"]}" x1="{x:.2f}" '
                       f'y1="{y - h:.2f}" '
                       f'x2="{x:.2f}" y2="{y + h:.2f}" stroke="#333"/>')
        kind = r["folder"].split("_")[0]  # base, retrofit, smf, lora or full
        out.append(f'<circle class="point {kind}" data-row="{r["folder"]}" cx="{x:.2f}" cy="{y:.2f}" '
                   f'r="4" fill="{MARKER_FILL.get(kind, "#4a7ab5")}" stroke="#000"/>')
        label_y = max(label_y, y)
        lx = x0 + PANEL_W + 12
        out.append(f'<line x1="{x:.2f}" y1="{y:.2f}" x2="{lx}" y2="{label_y:.2f}" stroke="#ddd"/>')
        out.append(f'<text class="label" x="{lx + 3}" y="{label_y + 4:.2f}" '
                   f'font-size="11">{r["label"]}</text>')
        label_y += 14  # the next label sits at least a line lower
    out.append("</g>")
    return out

# Base black, the retrofits hollow, the rest blue
MARKER_FILL = {"base": "#000", "retrofit": "#fff"}

def figure_svg(points, n_seeds, questions):
    """The SVG text: one point per row with results, the mean over its seeds; rows without results,
    or with a non-finite value, are left out and named in the caption."""
    rows, left_out = [], []
    for name, folder, label in TABLE_ROWS:
        values = points[folder]
        keys = ("acc", "ppl", "alias_contains_acc")
        if any(values[k][0] is None for k in keys):
            left_out.append(f"{name} (no results)")
        elif not all(math.isfinite(values[k][0]) for k in keys):
            left_out.append(f"{name} (a value is not finite)")
        else:
            rows.append({"folder": folder, "label": label, **values})
    width, height = 2 * (LEFT + PANEL_W + LABEL_W), TOP + PANEL_H + 90
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    if len(rows) < 2:
        out.append(f'<text x="20" y="{TOP + 20}">Only {rows[0]["label"] if rows else "no row"} has '
                   'results: '
                   'nothing to compare yet.</text>')
    else:
        out.append(f'<text x="14" y="{TOP + PANEL_H / 2}" transform="rotate(-90 14 '
                   f'{TOP + PANEL_H / 2})" '
                   'text-anchor="middle">MedMCQA accuracy, % (higher is better)</text>')
        out += panel_svg(LEFT, rows, "ppl", "WikiText perplexity (lower is better)", False)
        out += panel_svg(2 * LEFT + PANEL_W + LABEL_W, rows, "alias_contains_acc",
                         "TriviaQA alias accuracy, % (higher is better)", True)
    caption = (f"Points: mean over {n_seeds} seed(s) on {questions.get('medmcqa', 0)} MedMCQA and "
               f"{questions.get('triviaqa', 0)} TriviaQA questions; whiskers: paired 95% interval "
               "of the Δ vs Base; dashed: the frontier; dotted: each SMF row from its retrofit.")
    if left_out:
        caption += " Left out: " + "; ".join(left_out) + "."
    out.append(f'<text class="caption" x="10" y="{height - 14}" font-size="11">{caption}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"

# --------------------------------------------------------------------------------------------------
# CLI

class Parser(argparse.ArgumentParser):
    # no abbreviations: `eval --medmcqa` must not silently mean --medmcqa-mode
    def __init__(self, **kwargs):
        super().__init__(**{"allow_abbrev": False, **kwargs})

    def error(self, message):  # a mistyped flag gets the same one-line error as every other mistake
        print(f"error: {message} — see `python {self.prog} --help`", file=sys.stderr)
        sys.exit(2)

def config_comments(cls):
    """{field: its comment in the source, beside it or on the line above}: a config class is the one place
    a setting is explained."""
    source = inspect.getsource(cls)
    above = {name: text for text, name in re.findall(r"^\s+# (.*)\n\s+(\w+): ", source, re.M)}
    return above | dict(re.findall(r"^\s+(\w+): [^#\n]*# (.*)$", source, re.M))

CHOICES = {"method": tuple(METHOD_LR), "optimizer": ("adamw", "sgd"), "selector": tuple(SELECTORS),
           "mode": ("additive", "replacement"), "medmcqa_mode": ("answer", "letter")}

def add_config_flags(group, cls, prefix=""):
    """A flag per field of a config dataclass, its comment as the help. Every flag defaults to None,
    so that check_args can tell what was given (rule 2) before it fills in the dataclass's default.
    """
    comments = config_comments(cls)
    for f in dataclasses.fields(cls):
        kind = {"type": f.type, "choices": CHOICES.get(f.name)}
        if f.type is bool:
            kind = {"action": "store_true"}
        if f.type is tuple:
            kind = {"type": int, "nargs": "+"}
        shown = "" if f.default in (None, False) else f" (default: {f.default})"
        group.add_argument(f"--{prefix}{f.name}".replace("_", "-"), default=None, help=comments[f.name] + shown,
                           **kind)

def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], epilog="examples: see README.md")
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model = Parser(add_help=False)
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub id, HF folder or smf "
                       "checkpoint; train "
                       "starts from a base model, a retrofit (smf) or an smf checkpoint (smf) "
                       f"(default: {DEFAULT_MODEL})")
    e = sub.add_parser("eval", parents=[common, model], help="evaluate a model on the probes")
    e.add_argument("--probe", default="all", choices=list(PROBES) + ["all"], help="(default: all)")
    e.add_argument("--out", help="write the results as JSON here")
    add_config_flags(e.add_argument_group("probes"), EvalConfig)
    t = sub.add_parser("train", parents=[common, model], help="retrofit, smf, lora or full "
                       "finetuning")
    t.add_argument("--out", help="checkpoint folder (default runs/<method>)")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out, once "
                   "the new one is complete")
    add_config_flags(t.add_argument_group("recipe (the paper's by default)"), TrainConfig)
    add_config_flags(t.add_argument_group("memory layers (a new memory: retrofit, or smf from a "
                                          "model without)"), MemoryConfig, "memory_")
    probes = t.add_argument_group("evaluation after training (only with --eval-out)")
    probes.add_argument("--eval-out", help="after training, evaluate the checkpoint on all probes "
                        "into this JSON")
    add_config_flags(probes, EvalConfig)
    b = sub.add_parser("bench", parents=[common], help="training speed of every method on random "
                       "weights")
    b.add_argument("--shape", default="tiny", choices=list(SHAPES), help="(default: tiny)")
    b.add_argument("--batch-size", type=int, help="sequences per step; default 16 on a GPU, 4 on a "
                   "CPU")
    b.add_argument("--seq-len", type=int, help="tokens per sequence; default 512 on a GPU, 256 on "
                   "a CPU")
    b.add_argument("--steps", type=int, default=5, help="timed optimizer steps per method "
                   "(default: 5)")
    tb = sub.add_parser("table", help="the results table and figure of a run_all.sh folder")
    tb.add_argument("results_dir", help="the OUT folder of run_all.sh")
    tb.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p

# (options, what a good value is, lowest, highest, lowest allowed): values lie below `highest`
RANGES = [
    ("lr epochs lora_alpha repetition_penalty", "> 0 and finite", 0, math.inf, False),
    ("micro_batch grad_accum forward_batch max_steps limit_train background_examples lora_r top_t "
     "batch_size "
     "limit memory_n_keys memory_heads memory_topk steps seq_len", ">= 1", 1, math.inf, True),
    ("clip weight_decay warmup", ">= 0 and finite", 0, math.inf, True),
    ("lora_dropout", "in [0, 1)", 0, 1, True),
    ("max_len", ">= 2 (a text needs two tokens to have a target)", 2, math.inf, True),
    ("memory_key_dim", ">= 2", 2, math.inf, True),
    ("seed", "in [0, 2**63)", 0, 2 ** 63, True)]
PATH_OPTIONS = ("model", "out", "eval_out", "results_dir", "medmcqa", "background", "eval_medmcqa", "wikitext",
                "triviaqa")

def check_args(args):
    """Every mistake in the options, before any model or data loads: a value out of range, the
    device, an option that does not apply to this run (rule 2), a path it must not write (the output
    rule). Records which options were given and fills in the defaults of the others."""
    for names, need, lowest, highest, lowest_allowed in RANGES:
        for name in names.split():
            value = getattr(args, name, None)
            ok = value is None or lowest < value < highest or (lowest_allowed and value == lowest)
            require(ok, f"--{name.replace('_', '-')} {value} is out of range — give a value {need}")
    for name in PATH_OPTIONS:  # ~/x
        if getattr(args, name, None):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    if args.command in ("train", "eval"):
        n_gpus = torch.cuda.device_count()
        device_ok = re.fullmatch(r"cpu|cuda(:\d+)?", args.device) is not None
        require(device_ok and (args.device == "cpu" or int(args.device[5:] or 0) < n_gpus),
                f"--device {args.device}: this torch sees {n_gpus} CUDA GPU(s) — use cpu, cuda or "
                "cuda:N")
        check_model_path(args.model)
    configs = {"train": [(TrainConfig, ""), (MemoryConfig, "memory_"), (EvalConfig, "")], "eval": [(EvalConfig, "")]}
    fields = [(cls, prefix + f.name) for cls, prefix in configs.get(args.command, []) for f in dataclasses.fields(cls)]
    args.given = sorted(name for _, name in fields if getattr(args, name) is not None)
    for cls, name in fields:  # the defaults of the options not given
        if getattr(args, name) is None:
            setattr(args, name, {f.name: f.default for f in dataclasses.fields(cls)}[name.removeprefix("memory_")])
    if args.command == "train":
        check_train_args(args)
    outputs = []  # (flag, path, is a checkpoint folder)
    if args.command == "train":
        outputs = [("--out", args.out, True), ("--eval-out", args.eval_out, False)]
    if args.command == "eval":
        outputs = [("--out", args.out, False)]
    if args.command == "table":
        outputs = [(name, os.path.join(args.results_dir, name), False) for name in ("table.md", "figure.svg")]
    reads = []
    if args.command in ("train", "eval"):
        reads = checkpoint_chain(args.model)
    for flag, path, folder in outputs:
        if path:
            check_output(flag, path, reads, folder, getattr(args, "overwrite", False))

def check_train_args(args):
    """train's own checks, every one before anything runs (for the one-liner: before its retrofit).
    """
    memory = model_memory(args.model)
    mode = (memory or {}).get("mode", args.memory_mode)
    kinds = run_kinds(args.method, bool(memory), mode, args.eval_out)
    for name in args.given:
        if name in APPLIES:
            require(kinds[APPLIES[name]], f"--{name.replace('_', '-')} applies only to "
                    f"{RUNS[APPLIES[name]]} — drop it from this run")
    require(not memory or args.method not in ("retrofit", "full"), f"{args.model} already has "
            "memory layers — "
            f"{args.method} starts from a model without memory; train this one with --method smf")
    require(not (args.train_scale and mode == "replacement"), "--train-scale needs additive memory "
            "— replacement memory has no alpha")
    stats = os.path.join(args.model, STATS)
    require(not memory or args.method != "smf" or os.path.isfile(stats), f"{stats} is missing: SMF "
            "ranks rows "
            "against the background statistics its retrofit saved — restore it, or retrofit again "
            "(train --method retrofit)")
    forward, micro = args.forward_batch, args.micro_batch
    require(not forward or forward % micro == 0, f"--forward-batch {forward} is not a multiple of "
            f"--micro-batch {micro} — make it one")
    if kinds["new memory"]:
        check_new_memory(args)
    args.out = args.out or os.path.join("runs", args.method)
    out = os.path.realpath(args.out)
    require(not args.eval_out or not os.path.realpath(args.eval_out).startswith(out + os.sep), f"--eval-out "
            f"{args.eval_out} lies inside {out}, which this run writes — choose another path")
    retrofit_out = args.out.rstrip("/") + "_retrofit"
    require(memory or args.method != "smf" or not os.path.exists(retrofit_out), f"{retrofit_out} "
            "exists — "
            f"train SMF from it (--model {retrofit_out}), or move it away to retrofit again")
    if args.method == "smf" and not memory:
        check_output("--out", retrofit_out, checkpoint_chain(args.model), True)

def check_new_memory(args):
    """A new memory's settings, and that its value tables fit, with their gradient and two AdamW
    moments, where they train."""
    layers, n_keys, topk = args.memory_layers, args.memory_n_keys, args.memory_topk
    require(len(set(layers)) == len(layers), f"--memory-layers {' '.join(map(str, layers))} name a "
            "layer twice — give each layer once")
    require(topk <= n_keys, f"--memory-topk {topk} exceeds --memory-n-keys {n_keys} — lower it")
    require(args.memory_key_dim % 2 == 0, f"--memory-key-dim {args.memory_key_dim} is out of range "
            "— give a value even (it is split in two halves)")
    config = os.path.join(args.model, "config.json")
    hidden = 896
    if os.path.isfile(config):
        hidden = read_json(config, "restore it").get("hidden_size", hidden)
    need = 16 * len(layers) * n_keys ** 2 * hidden  # bytes: fp32 values, gradient and two moments
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if args.device.startswith("cuda"):
        have = torch.cuda.get_device_properties(args.device).total_memory
    require(need < have, f"--memory-n-keys {n_keys}: its value tables would need "
            f"{need / 2 ** 30:,.1f} GiB to "
            f"train, more than the {have / 2 ** 30:,.1f} GiB of {args.device} — lower "
            "--memory-n-keys")

def interrupt(signum, frame):
    # SIGTERM (Slurm's time limit, scancel) cleans up exactly as Ctrl-C does
    raise KeyboardInterrupt

def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    commands = {"train": run_train, "eval": run_eval, "bench": run_bench, "table": run_table}
    try:
        check_args(args)
        commands[args.command](args, getattr(args, "device", "cpu"))
    except KeyboardInterrupt:
        print("error: interrupted — finished checkpoints and results are intact; rerun to continue",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the one-line promise holds for the unforeseen too
        if args.debug:
            raise
        message = str(e)
        if not isinstance(e, UserError):
            message = f"unexpected {type(e).__name__}: {message.strip()[:300]} — rerun with --debug for the traceback"
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)

if __name__ == "__main__":
    main()
