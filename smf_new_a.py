"""smf.py -- Sparse Memory Finetuning (SMF) in one readable file.

Adds product-key memory layers to a Hugging Face causal LM, finetunes only the few memory value rows a batch
reads most (ranked by a KL or TF-IDF selector against background text), and compares that with LoRA and full
finetuning on three probes: MedMCQA accuracy (learning), WikiText perplexity and TriviaQA accuracy (forgetting).
The method comes first, in the order the data flows; the plumbing (data files, checkpoints, commands) after it.

What lifts out alone, with the imports below: ProductKeyMemory; LoRALinear; RowSparseAdamW; get_lr;
normalize_answer, alias_contained and exact_match. With the helpers they name: kl_scores and tfidf_scores
(BackgroundStats), select_rows, add_lora (LORA_TARGETS), eval_medmcqa, eval_wikitext and eval_triviaqa (each
docstring names its helpers). Start with `python smf.py train --method smf --selector kl`; see --help.
"""
import argparse, contextlib, dataclasses, functools, glob, hashlib, inspect, itertools, json, math, os
import random, re, shutil, signal, statistics, sys, tempfile, time
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
    mode: str = "additive"        # "additive": mlp(x) + alpha*memory(x); "replacement": memory(x) instead
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
    lr: float = None              # peak learning rate; default: retrofit/smf 5e-4, lora 2e-4, full 5e-5
    epochs: float = None          # passes over the training data; default 2 for retrofit, 3 for the others
    micro_batch: int = 4          # sequences per micro-batch (SMF picks top_t rows per micro-batch)
    grad_accum: int = 4           # micro-batches per optimizer step: effective batch 16 sequences
    forward_batch: int = None     # sequences per forward, k x micro_batch (default: a step); same update
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
    limit_train: int = None       # use N examples: MedMCQA's first N after the seeded shuffle (default
    #                               60,000), OASST1's first N (default all)
    seed: int = 0                 # shuffles the data (and the MedMCQA subset), seeds every initialisation

    def __post_init__(self):  # the two defaults that depend on the method, resolved in one place
        self.lr = self.lr or METHOD_LR[self.method]
        self.epochs = self.epochs or RETROFIT_EPOCHS.get(self.method, 3)


@dataclass
class EvalConfig:  # the probes' data and settings; the comments are their --help texts
    eval_medmcqa: str = "openlifescienceai/medmcqa"  # MedMCQA probe (validation split): hub id or file
    medmcqa_mode: str = "answer"        # score ' L. option text' (the paper's) or the letter alone
    wikitext: str = "Salesforce/wikitext"            # WikiText probe (test split): hub id or local file
    triviaqa: str = "mandarjoshi/trivia_qa"          # TriviaQA probe (rc.nocontext validation): hub id or file
    repetition_penalty: float = None    # TriviaQA: default the model's generation_config (1.0: greedy)
    limit: int = 1000                   # examples per probe (lines of WikiText)
    batch_size: int = 16                # MedMCQA questions per forward (TriviaQA: 2x, WikiText: 1/2)


METHOD_LR = {"retrofit": 5e-4, "smf": 5e-4, "lora": 2e-4, "full": 5e-5}
RETROFIT_EPOCHS = {"retrofit": 2}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UserError(Exception):
    """A problem the user caused and can fix; the CLI prints it as one line `error: what — how to fix`."""


def require(ok, message):
    """The user-facing assert: when `ok` is false the command stops with `message` as its one-line error."""
    if not ok:
        raise UserError(message)

# -----------------------------------------------------------------------------------------------------------
# Memory layer: product keys (Lample et al. 2019) with the Memory+ output (Berges et al. 2024)


class ProductKeyMemory(nn.Module):
    """N = n_keys**2 value rows, looked up without scoring all N: each head takes the top-k sub-keys of each
    half of its query, re-ranks the k*k sums and reads the best k rows (row i1 * n_keys + i2).
    `read_gate`, when set, sees the rows each token reads and may return which reads may teach their value
    row: SMF's selection enters the layer there and nowhere else."""

    def __init__(self, dim, n_keys=128, heads=4, key_dim=256, topk=16):
        super().__init__()
        assert key_dim % 2 == 0 and topk <= n_keys
        self.n_keys, self.heads, self.key_dim, self.topk = n_keys, heads, key_dim, topk
        self.query = nn.Linear(dim, heads * key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim // 2))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, dim))
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.read_gate = None  # rows (M, H*k) -> None, or bool (M, H*k): the reads whose rows may learn
        nn.init.uniform_(self.keys, -key_dim ** -0.5, key_dim ** -0.5)
        nn.init.normal_(self.values, std=dim ** -0.5)
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        for lin in (self.w1, self.w2):
            nn.init.normal_(lin.weight, std=dim ** -0.5)
            nn.init.zeros_(lin.bias)

    def lookup(self, x):  # x (M, dim) -> scores (M, heads, topk), rows (M, heads, topk)
        """In fp32 even under bf16 (it is cheap): bf16 rounding could let padding or batching change the rows."""
        k, half = self.topk, self.key_dim // 2
        with torch.autocast(x.device.type, enabled=False):
            q = F.linear(x.float(), self.query.weight.float(), self.query.bias.float())
            q = q.view(-1, self.heads, 2, half)                                   # (M, H, 2, half)
            sub = torch.einsum("mhcd,hcnd->mhcn", q, self.keys.float())           # (M, H, 2, n_keys)
        sub_scores, sub_idx = sub.topk(k, dim=-1)                                 # (M, H, 2, k)
        pair = sub_scores[:, :, 0, :, None] + sub_scores[:, :, 1, None, :]        # (M, H, k, k)
        scores, best = pair.flatten(2).topk(k, dim=-1)                            # (M, H, k)
        i1 = sub_idx[:, :, 0].gather(-1, best // k)
        i2 = sub_idx[:, :, 1].gather(-1, best % k)
        return scores, i1 * self.n_keys + i2

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        xf = x.reshape(-1, x.shape[-1])                                           # (M, dim)
        scores, rows = self.lookup(xf)
        weights = scores.float().softmax(dim=-1)                                  # (M, H, k), a head sums to 1
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
            gate = gate.to(weights.dtype)                                         # (M, H*k), 1 = may learn
            learn = F.embedding_bag(rows, self.values, per_sample_weights=weights * gate, mode="sum")
            fixed = F.embedding_bag(rows, self.values.detach(), per_sample_weights=weights * (1 - gate),
                                    mode="sum")
            read = learn + fixed                                                  # (M, dim)
        out = self.w2(read.to(xf.dtype) * F.silu(self.w1(xf)))
        return out.view(x.shape)

# -----------------------------------------------------------------------------------------------------------
# Attaching memory and LoRA to a Hugging Face model whose decoder blocks are model.model.layers[i].mlp


class MemoryBlock(nn.Module):
    """Stands where a decoder layer's FFN stood and sees the same input (after the post-attention norm)."""

    def __init__(self, mlp, memory, mode, alpha_init=0.01):
        super().__init__()
        self.memory, self.mlp, self.alpha = memory, None, None  # replacement drops the FFN's weights
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
            f"{type(model).__name__} has no model.model.layers[i].mlp — use a Qwen2/Llama/Mistral-style model")
    require(all(0 <= i < len(layers) for i in cfg.layers),
            f"memory layers {list(cfg.layers)} are out of range — the model has layers 0..{len(layers) - 1}")
    require(not memory_blocks(model),
            "the model already has memory — start from the base model, or train its memory with --method smf")
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
    """Folds each LoRA update into its base weight (in fp32) and unwraps it: same outputs in eval mode."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                delta = child.scale * child.lora_B.float() @ child.lora_A.float()     # (out, in)
                w.copy_((w.float() + delta).to(w.dtype))
                setattr(parent, name, child.base)
    return model

# -----------------------------------------------------------------------------------------------------------
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
    """Mask of the top_t read rows by score (ties: lower row first; unread rows: never). (N,) or (G, N)."""
    scores = torch.where(counts > 0, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # stable: ties in row order
    best = order[..., :top_t]
    return torch.zeros_like(counts, dtype=torch.bool).scatter_(-1, best, (counts > 0).gather(-1, best))


def token_groups(mask, group_size):
    """mask (B, T) -> (B*T,) each token's group (sequence // group_size: a micro-batch or an example);
    -1 for pads."""
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
    """SMF's read gate for one memory layer in one forward of several micro-batches: each micro-batch
    picks the top_t rows it read by the selector's score, and a read may teach its row only if its own
    micro-batch picked it. After the forward, `chosen` (G, N) holds each micro-batch's picks."""

    def __init__(self, group, n_groups, background: BackgroundStats, score_fn, top_t):
        self.group, self.n_groups = group, n_groups  # group (M,): each token's micro-batch, -1 for pads
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
    """The read hook behind background_stats: df counts the examples that read a row, not the reads."""
    counts = count_reads(rows, group, n_examples, stats.df.shape[0])                    # (examples, N)
    stats.reads += counts.sum(0).cpu()
    stats.df += (counts > 0).sum(0).cpu()


@torch.no_grad()
def background_stats(model, tokenizer, texts, max_len=1024, batch_size=16, device="cpu"):
    """df, reads and B per memory layer, in eval mode; `batch_size` examples a forward, each its own batch.
    Gathered once after the retrofit: SMF trains only values, so the queries and keys that decide which
    rows a text reads stay as they were. (Approximate in one way: value updates in an earlier memory layer
    shift the hidden states, and so the reads, of the later ones.)"""
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

# -----------------------------------------------------------------------------------------------------------
# Sparse optimizer and training loop: one plain loop for every method


def get_lr(step, total, peak, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class RowSparseAdamW:
    """AdamW (or SGD) that updates only given rows of 2-D parameters, and only those rows' moments and step
    counts: a row chosen earlier never drifts (masking the gradient of a dense AdamW would keep moving it
    through its stale moments). Each row counts its own steps, so its bias correction is the one a
    dense AdamW would give a parameter that had been stepped that many times."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, sgd=False):
        self.params, self.betas, self.eps, self.wd, self.sgd = list(params), betas, eps, weight_decay, sgd
        self.state = [None] * len(self.params)  # per parameter: m, v (N, dim) and t (N,)

    @torch.no_grad()
    def step(self, rows_per_param, grads_per_param, lr):
        """rows: (R,) distinct row indices of each parameter; grads: (R, dim), those rows' gradients."""
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
            t_r = t[rows] + 1                                               # (R,) each row's own step count
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
    """Scales the gradients in place so that their joint L2 norm is at most max_norm (0: no clipping)."""
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm:
        for g in grads:
            g.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return float(norm)


def prepare_model(model, method, mem_cfg=None, lora_cfg=None, train_scale=False, device="cpu"):
    """Adds what the method trains and freezes the rest (retrofit: all memory; smf: values, + alpha with
    train_scale; lora: A, B; full: all). On a GPU frozen weights are bf16 (run under autocast only),
    trainable ones fp32."""
    if method == "retrofit":
        add_memory(model, mem_cfg)
    blocks = memory_blocks(model)
    require(blocks or method not in ("retrofit", "smf"),
            "the model has no memory layers — smf trains from a retrofit checkpoint (--method retrofit)")
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
    """Token ids of each text, cut at max_len; texts of one token have no target and are dropped. No EOS is
    appended (see medmcqa_text)."""
    examples = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    return [e for e in examples if len(e) > 1]


def step_batches(lengths, seqs_per_step, seed):
    """Endless example indices, one optimizer step at a time: each epoch a new seeded shuffle of every
    example once, sorted by length within chunks of 64 steps (little padding), the steps shuffled again."""
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
    """One forward and backward of some sequences; the loss is a sum over the step's targets / n_targets,
    so any split of a step into forwards gives the same gradient. Pads never count."""
    ids, mask = pad_batch(seqs, pad_id, device=device)                         # (B, T)
    with autocast(device):
        logits = model(input_ids=ids, attention_mask=mask).logits               # (B, T, vocab)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                     # (B, T-1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n_targets
    loss.backward()
    return loss.item()


def train(model, examples, cfg, background=None, pad_id=0, device="cpu", log_path=None):
    """Trains the parameters that require grad, in place, on token-id lists; SMF needs one BackgroundStats
    per memory layer. Writes one JSON line per step to log_path; returns those records."""
    values = [b.memory.values for b in memory_blocks(model)] if cfg.method == "smf" else []
    alphas = [b.alpha for b in memory_blocks(model) if b.alpha is not None]  # the reach scales with alpha
    dense = [p for p in model.parameters() if p.requires_grad and not any(p is v for v in values)]
    dense_opt = make_dense_optimizer(dense, cfg, device)
    sparse_opt = RowSparseAdamW(values, weight_decay=cfg.weight_decay, sgd=cfg.optimizer == "sgd")
    background = [BackgroundStats(s.df.to(device), s.reads.to(device), s.batches) for s in background or []]
    seqs_per_step = cfg.micro_batch * cfg.grad_accum
    forward_batch = cfg.forward_batch or seqs_per_step  # several micro-batches per forward: same gradient
    total = total_steps(len(examples), cfg)
    batches = step_batches([len(e) for e in examples], seqs_per_step, cfg.seed)
    history, log = [], open(log_path or os.devnull, "w", buffering=1)  # line-buffered
    model.train()
    for step in progress(range(total), f"train {cfg.method}"):
        batch, t0, loss = next(batches), time.perf_counter(), 0.0
        n_targets = sum(len(examples[i]) - 1 for i in batch)  # the loss is normalised over the whole step
        picked = [torch.zeros(v.shape[0], dtype=torch.bool, device=device) for v in values]  # (N,) a layer
        for c in range(0, len(batch), forward_batch):
            seqs = [examples[i] for i in batch[c:c + forward_batch]]
            _, mask = pad_batch(seqs, pad_id, device=device)
            gates = [ReadGate(token_groups(mask, cfg.micro_batch), math.ceil(len(seqs) / cfg.micro_batch), bg,
                              SELECTORS[cfg.selector], cfg.top_t) for bg in background]
            for block, gate in zip(memory_blocks(model) if values else [], gates):
                block.memory.read_gate = gate
            loss += forward_backward(model, seqs, n_targets, pad_id, device)
            require(math.isfinite(loss), f"the loss became {loss} at step {step + 1} — lower --lr or check "
                    "the data; no checkpoint was written by this run")
            for p, gate in zip(picked, gates):
                p |= gate.chosen.any(0)
        # Only picked rows got gradient, but backward built each full (N, dim) gradient: keep the picked
        # rows' (R, dim), clip them with the dense gradients, and step exactly those rows.
        rows = [p.nonzero()[:, 0] for p in picked]                                 # (R,) a layer
        row_grads = [v.grad.index_select(0, r) for v, r in zip(values, rows)]      # (R, dim) a layer
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
        log.write(json.dumps(record) + "\n")
        history.append(record)
    for block in memory_blocks(model):
        block.memory.read_gate = None
    log.close()
    return history


def make_dense_optimizer(params, cfg, device):
    """torch's AdamW or SGD for every trainable parameter but the value tables; None when there is none."""
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
    """A progress bar on a terminal, none in a log file (its carriage returns would make one endless line)."""
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
