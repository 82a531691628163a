"""Tests for smf.py: a tiny Qwen2 and synthetic data in the hub schemas, all built here, nothing downloaded."""
import errno, functools, glob, hashlib, json, math, os, random, re, statistics, subprocess, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that would download fails at once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import pytest
import torch
import torch.nn.functional as F

import smf

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the patient nerve blood acute cell drug cause common treatment heart liver kidney fever which most "
         "city river king war film song capital france paris london music").split()
MEM = ["--memory-layers", "0", "1", "--memory-n-keys", "8", "--memory-heads", "2", "--memory-key-dim", "16",
       "--memory-topk", "4"]
TINY_MEM = smf.MemoryConfig(layers=(0, 1), n_keys=8, heads=2, key_dim=16, topk=4)


def toy_tokenizer(texts, vocab_size=512):
    """A byte-level BPE trained on `texts` with Qwen's special tokens: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>",
                            "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 2-layer Qwen2 with a byte-level BPE tokenizer, saved as an HF folder, and data files in hub schemas."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    tokenizer = toy_tokenizer([sentence(rng, 40) for _ in range(300)] + ["Question: Answer: Explanation: "
                                  "Medical exam question: A. B. C. D."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    med = [{"id": f"q{i}", "question": sentence(rng, 8) + "?", "opa": sentence(rng, 2), "opb": sentence(rng, 3),
            "opc": sentence(rng, 1), "opd": sentence(rng, 2), "cop": i % 4, "choice_type": "single" if i % 7 else "multi",
            "exp": sentence(rng, 6) if i % 2 else None, "subject_name": "x", "topic_name": None} for i in range(48)]
    trivia = [{"question": sentence(rng, 6) + "?", "question_id": f"t{i}",
               "answer": {"aliases": [sentence(rng, 1), sentence(rng, 2)], "normalized_aliases": [], "value": sentence(rng, 1)}}
              for i in range(12)]
    wiki = [{"text": ""}, {"text": " = Title = \n"}] + [{"text": " " + sentence(rng, 30) + " \n"} for _ in range(20)]
    oasst = [{"message_id": str(i), "text": sentence(rng, 25), "role": "assistant" if i % 3 else "prompter",
              "lang": "en" if i % 5 else "de", "rank": i % 3} for i in range(60)]
    return {"root": root, "model": str(root / "model"),
            "medmcqa": write_jsonl(root / "medmcqa.jsonl", med), "triviaqa": write_jsonl(root / "triviaqa.jsonl", trivia),
            "wikitext": write_jsonl(root / "wikitext.jsonl", wiki), "background": write_jsonl(root / "oasst1.jsonl", oasst)}


def load(tiny):
    return smf.load_model(tiny["model"])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def cli(*args, check=True):
    """Runs `python smf.py ARGS` offline and returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": HERE}
    warnings = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]   # a deprecated call fails the run
    p = subprocess.run([sys.executable, *warnings, os.path.join(HERE, "smf.py"), *map(str, args)], capture_output=True,
                       text=True, env=env)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def run(*argv):
    """smf's CLI in this process (fast: no new interpreter); returns what the command returned."""
    args = smf.build_parser().parse_args([str(a) for a in argv])
    smf.check_args(args)
    return {"train": smf.run_train, "eval": smf.run_eval, "table": smf.run_table}[args.command](args, "cpu")


def train_args(tiny, out, method, *extra):
    """A train command on the tiny model and data, giving only the options that apply to `method` (rule 2)."""
    args = ["train", "--method", method, "--out", out, "--model", tiny["model"], "--warmup", "0"]
    args += ["--medmcqa", tiny["medmcqa"]] if method != "retrofit" else []
    args += ["--background", tiny["background"], "--background-examples", "20", *MEM] if method == "retrofit" else []
    return args + list(extra)


def train_texts(model, tok, texts, cfg, background=None, record_selected=False):
    """smf.train on texts; with record_selected, each step's record also holds the rows the sparse optimizer
    stepped per layer (read off RowSparseAdamW.step's arguments, not from the training loop)."""
    stepped, original = [], smf.RowSparseAdamW.step

    def recording_step(self, rows, grads, lr):
        stepped.append([r.cpu() for r in rows])
        return original(self, rows, grads, lr)
    smf.RowSparseAdamW.step = recording_step
    try:
        hist = smf.train(model, smf.tokenize(tok, texts[:cfg.limit_train], cfg.max_len), cfg, background,
                         tok.pad_token_id)
    finally:
        smf.RowSparseAdamW.step = original
    if record_selected:
        for record, rows in zip(hist, stepped):
            record["selected"] = rows
    return hist


def memory_tensors(model):
    return {n: p for n, p in model.named_parameters() if ".memory." in n or n.endswith(".alpha")}


def save_memory(out, model, parent):
    """A memory checkpoint of `model`, written as `train` writes one: built in a staging folder, then swapped in."""
    with smf.staging(str(out)) as folder:
        meta = smf.provenance(parent, str(out)) | {"kind": "memory", "memory": vars(TINY_MEM)}
        smf.save_checkpoint(folder, meta, tensors=memory_tensors(model))


def with_memory(tiny, mode="additive", seed=0):
    model, tok = load(tiny)
    torch.manual_seed(seed)
    smf.add_memory(model, smf.MemoryConfig(**{**vars(TINY_MEM), "mode": mode}))
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------- memory layer

def test_memory_lookup_equals_brute_force():
    torch.manual_seed(0)
    mem = smf.ProductKeyMemory(dim=24, n_keys=8, heads=3, key_dim=12, topk=4)
    x = torch.randn(5, 7, 24)
    q = mem.query(x.reshape(-1, 24)).view(-1, 3, 2, 6)
    s1 = torch.einsum("mhd,hnd->mhn", q[:, :, 0], mem.keys[:, 0])
    s2 = torch.einsum("mhd,hnd->mhn", q[:, :, 1], mem.keys[:, 1])
    every_row = (s1[..., :, None] + s2[..., None, :]).flatten(2)      # all N = 64 rows, row = i1 * 8 + i2
    ref_scores, ref_rows = every_row.topk(4, dim=-1)
    scores, rows = mem.lookup(x.reshape(-1, 24))
    assert torch.equal(rows, ref_rows)
    assert torch.allclose(scores, ref_scores, atol=1e-6)
    w = ref_scores.softmax(-1)                                         # (M, H, k)
    read = (w[..., None] * mem.values[ref_rows]).sum(dim=(1, 2))       # weights of a token sum to H
    ref = mem.w2(read * F.silu(mem.w1(x.reshape(-1, 24)))).view(5, 7, 24)
    assert torch.allclose(mem(x), ref, atol=1e-5)


def test_memory_init_follows_spec():
    torch.manual_seed(0)
    mem = smf.ProductKeyMemory(dim=64, n_keys=16, heads=4, key_dim=32, topk=4)
    assert mem.values.shape == (256, 64) and mem.keys.shape == (4, 2, 16, 16)
    assert mem.keys.abs().max() <= 32 ** -0.5
    assert abs(mem.values.std().item() - 64 ** -0.5) < 0.01
    assert abs(mem.w1.weight.std().item() - 64 ** -0.5) < 0.01
    for lin in (mem.query, mem.w1, mem.w2):   # biases: nn.Linear's default, as the published code leaves them
        assert lin.bias.abs().max() <= 64 ** -0.5 and lin.bias.abs().max() > 0.8 * 64 ** -0.5


def test_padded_positions_are_not_recorded(tiny):
    model, tok = with_memory(tiny)
    a, b = [5, 9, 12, 7, 30, 41], [8, 3, 17]
    blocks = smf.memory_blocks(model)
    seen = {j: [] for j in range(len(blocks))}
    for j, blk in enumerate(blocks):
        blk.memory.read_gate = lambda rows, j=j: seen[j].append(rows)
    ids, mask = smf.pad_batch([a, b], tok.pad_token_id)
    model(input_ids=ids, attention_mask=mask)
    model(input_ids=torch.tensor([b]))
    n = 8 * 8
    for j in seen:
        padded, alone = seen[j]                                          # (2 * 6, 8) and (3, 8) reads
        counts = smf.count_reads(padded, smf.token_groups(mask, 1), 2, n)
        assert counts.sum(1).tolist() == [len(a) * 8, len(b) * 8]        # real tokens only, heads * topk each
        assert torch.equal(counts[1], torch.bincount(alone.flatten(), minlength=n))  # b's reads without its pads


def test_additive_alpha_zero_is_base_and_replacement_is_not(tiny):
    base, _ = load(tiny)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    model, _ = with_memory(tiny)
    for blk in smf.memory_blocks(model):
        blk.alpha.data.zero_()
    assert torch.equal(logits(model, ids), logits(base, ids))
    replaced, _ = with_memory(tiny, "replacement")
    assert not torch.allclose(logits(replaced, ids), logits(base, ids))
    assert all(blk.mlp is None and blk.alpha is None for blk in smf.memory_blocks(replaced))


def test_memory_errors_are_clear(tiny):
    model, _ = load(tiny)
    with pytest.raises(smf.UserError, match="out of range"):
        smf.add_memory(model, smf.MemoryConfig(layers=(0, 6)))
    with pytest.raises(smf.UserError, match="model.model.layers"):
        smf.add_memory(torch.nn.Linear(2, 2), smf.MemoryConfig(layers=(0,)))


def test_memory_checkpoint_round_trips_and_is_small(tiny, tmp_path):
    model, _ = with_memory(tiny)
    save_memory(tmp_path / "mem", model, tiny["model"])
    loaded, _ = smf.load_model(str(tmp_path / "mem"))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9]])
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert sorted(os.listdir(tmp_path / "mem")) == ["config.json", "weights.safetensors"]
    n_memory = sum(t.numel() for t in memory_tensors(model).values())
    assert os.path.getsize(tmp_path / "mem" / "weights.safetensors") < 4 * n_memory + 4096  # memory only, no base


# ----------------------------------------------------------------------------------------------- evaluation

def test_perplexity_equals_hand_computation(tiny):
    model, tok = load(tiny)
    rng = random.Random(1)
    short = sentence(rng, 6)
    ids = tok(short)["input_ids"]
    lp = logits(model, torch.tensor([ids]))[0].log_softmax(-1)
    nll = -sum(lp[t - 1, ids[t]].item() for t in range(1, len(ids)))
    r = smf.eval_wikitext(model, tok, short)
    assert r["tokens"] == len(ids) - 1 and r["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)

    long = sentence(rng, 40)  # many windows of 16 tokens with stride 8
    ids = tok(long)["input_ids"]
    assert len(ids) > 40
    nll = 0.0
    for t in range(1, len(ids)):  # token t is scored by the first window that reaches it, from that window's start
        start = 0 if t < 16 else 8 * math.ceil((t - 15) / 8)
        lp = logits(model, torch.tensor([ids[start:t + 1]]))[0].log_softmax(-1)
        nll -= lp[-2, ids[t]].item()
    for bs in (1, 3):
        r = smf.eval_wikitext(model, tok, long, window=16, stride=8, batch_size=bs)
        assert r["tokens"] == len(ids) - 1
        assert r["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_medmcqa_and_triviaqa_do_not_depend_on_batch_size(tiny):
    model, tok = load(tiny)
    rows = smf.load_medmcqa(tiny["medmcqa"], limit=11)
    one, five = smf.eval_medmcqa(model, tok, rows, batch_size=1), smf.eval_medmcqa(model, tok, rows, batch_size=5)
    assert one["predictions"] == five["predictions"] and one["acc"] == five["acc"]
    qa = smf.load_triviaqa(tiny["triviaqa"], limit=11)
    one, five = smf.eval_triviaqa(model, tok, qa, batch_size=1), smf.eval_triviaqa(model, tok, qa, batch_size=5)
    assert one["predictions"] == five["predictions"] and len(set(one["predictions"])) > 1


def test_triviaqa_normalisation_and_metrics():
    assert smf.normalize_answer("The  Beatles!") == "beatles"
    assert smf.normalize_answer("An Apple, a day (U.S.)") == "apple day u.s."
    assert smf.normalize_answer("Jean-Paul   Sartre's") == "jean-paul sartre s"
    assert smf.alias_contained(" I think it is the Eiffel Tower, in Paris", ["Eiffel tower"])
    assert not smf.alias_contained(" London", ["Paris", "City of Light"])
    assert smf.exact_match(" The Beatles.\nQuestion: next", ["beatles", "Fab Four"])
    assert not smf.exact_match(" Beatles and more", ["beatles"])
    assert not smf.exact_match(" Paris, France", ["France"])
    assert not smf.exact_match(" ", ["a"])  # an alias that normalises to nothing never matches
    assert smf.exact_match(" 1,000", ["1000"]) and not smf.alias_contained(" 1,000", ["1000"])  # no superset
    assert smf.normalize_answer("Zürich") == "z rich" and smf.normalize_answer("U.S.A.") == "u.s. ."  # the paper's


def fixed_logits_model(tiny, logits):
    """The tiny model with an untied output layer of zero weight and bias `logits`: every next-token
    distribution is `logits`, whatever the context, and it still has generate and a KV cache."""
    model, _ = load(tiny)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, len(logits), bias=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    model.lm_head.bias.data = logits.clone()
    return model.eval()


def test_medmcqa_model_preferring_one_option(tiny):
    _, tok = load(tiny)
    rows = smf.load_medmcqa(tiny["medmcqa"], limit=20)
    prompt = tok(smf.medmcqa_prompt(rows[0]))["input_ids"]
    favoured = tok(smf.medmcqa_prompt(rows[0]) + " C")["input_ids"][len(prompt):]
    bias = torch.zeros(len(tok))
    bias[favoured] = 20.0
    r = smf.eval_medmcqa(fixed_logits_model(tiny, bias), tok, rows, letter_only=True)
    assert r["predictions"] == [2] * 20
    assert r["acc"] == sum(row["cop"] == 2 for row in rows) / 20
    lp = bias.log_softmax(-1)                  # whatever the context: the gold option's NLL, by hand
    for row, nll in zip(rows, r["gold_nlls"]):  # (the predicted option's differs where cop != 2)
        start = len(tok(smf.medmcqa_prompt(row))["input_ids"])
        ids = tok(smf.medmcqa_prompt(row) + smf.medmcqa_answer(row, row["cop"], True))["input_ids"]
        assert nll == pytest.approx(-lp[ids[start:]].mean().item(), abs=1e-5)
    assert r["gold_nll"] == pytest.approx(statistics.mean(r["gold_nlls"]))
    assert len({round(n, 4) for n in r["gold_nlls"]}) == 2                     # gold C and gold not C


def test_medmcqa_prompt_and_filters(tiny):
    rows = smf.load_medmcqa(tiny["medmcqa"])
    assert len(rows) == 48 - 7 and all(r["choice_type"] == "single" for r in rows)
    r = {"question": "Q?", "opa": "a1", "opb": "b1", "opc": "c1", "opd": "d1", "cop": 1, "exp": "because"}
    assert smf.medmcqa_text(r) == ("Medical exam question:\nQuestion: Q?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B. b1\n"
                                   "Explanation: because")
    assert smf.medmcqa_text({**r, "exp": ""}).endswith("Answer: B. b1")
    assert smf.load_wikitext(tiny["wikitext"]).startswith("= Title =\n\n")


def test_eval_cli_end_to_end(tiny, tmp_path):
    out = tmp_path / "r" / "results.json"
    p = cli("eval", "--model", tiny["model"], "--probe", "all", "--medmcqa", tiny["medmcqa"], "--wikitext",
            tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "8", "--batch-size", "3", "--out", out)
    r = json.load(open(out))
    assert r["medmcqa"]["n"] == 8 and 0 <= r["medmcqa"]["acc"] <= 1 and len(r["medmcqa"]["correct"]) == 8
    assert r["medmcqa"]["gold_nll"] == pytest.approx(sum(r["medmcqa"]["gold_nlls"]) / 8) and r["medmcqa"]["gold_nll"] > 0
    assert "gold_nll" in p.stdout and r["triviaqa"]["alias_correct"] and len(r["triviaqa"]["exact_correct"]) == 8
    assert r["wikitext"]["ppl"] > 1 and r["wikitext"]["tokens"] > 0
    assert r["triviaqa"]["n"] == 8 and 0 <= r["triviaqa"]["exact_match"] <= r["triviaqa"]["alias_contains_acc"] <= 1
    assert "medmcqa" in p.stdout and "wikitext" in p.stdout and "triviaqa" in p.stdout and "Warning" not in p.stderr
    subcommands = smf.build_parser()._subparsers._group_actions[0].choices
    help_text = subcommands["eval"].format_help()
    assert "--probe" in help_text and "{medmcqa,wikitext,triviaqa,all}" in help_text
    help_text = subcommands["train"].format_help()
    assert "{retrofit,smf,lora,full}" in help_text and "{kl,tfidf}" in help_text


# ----------------------------------------------------------------------------------------------- selectors

def test_selector_scores_by_hand():
    counts = torch.tensor([3, 0, 1, 2, 0, 2])
    bg = smf.BackgroundStats(df=torch.tensor([1, 2, 0, 4, 1, 0]), reads=torch.tensor([5, 2, 0, 9, 1, 0]), texts=4)
    tfidf = [3 / 8 * math.log(5 / 2), 0.0, 1 / 8 * math.log(5 / 1), 2 / 8 * math.log(5 / 5), 0.0, 2 / 8 * math.log(5 / 1)]
    assert smf.tfidf_scores(counts, bg).tolist() == pytest.approx(tfidf, abs=1e-12)
    q = [6 / 23, 3 / 23, 1 / 23, 10 / 23, 2 / 23, 1 / 23]  # (a + 1) / (17 + 6)
    kl = [3 / 8 * math.log(3 / 8 / q[0]), 0.0, 1 / 8 * math.log(1 / 8 / q[2]), 2 / 8 * math.log(2 / 8 / q[3]), 0.0,
          2 / 8 * math.log(2 / 8 / q[5])]
    assert smf.kl_scores(counts, bg).tolist() == pytest.approx(kl, abs=1e-12)
    rows = lambda mask: mask.nonzero()[:, -1].tolist()
    assert rows(smf.select_rows(smf.tfidf_scores(counts, bg), counts, 3)) == [0, 2, 5]   # 0.40, 0.34, 0.20
    assert rows(smf.select_rows(smf.tfidf_scores(counts, bg), counts, 1)) == [5]
    assert rows(smf.select_rows(smf.kl_scores(counts, bg), counts, 2)) == [0, 5]
    assert rows(smf.select_rows(torch.ones(6), counts, 3)) == [0, 2, 3]          # ties: lower row first
    assert rows(smf.select_rows(torch.ones(6), counts, 10)) == [0, 2, 3, 5]      # never an unread row
    two = torch.stack([counts, counts.flip(0)])                                  # two micro-batches at once
    assert smf.select_rows(smf.tfidf_scores(two, bg)[1], two[1], 2).tolist() == smf.select_rows(
        smf.tfidf_scores(two, bg), two, 2)[1].tolist()


def test_select_reads_per_micro_batch_ignores_padding():
    rows = torch.tensor([[0, 1], [1, 2], [3, 3], [4, 5], [5, 5]])     # (tokens, reads)
    group = torch.tensor([0, 0, -1, 1, 1])                             # token 2 is a pad
    flat = smf.BackgroundStats(df=torch.zeros(6, dtype=torch.long), reads=torch.zeros(6, dtype=torch.long), texts=4)
    gate = smf.ReadGate(group, 2, flat, smf.tfidf_scores, top_t=1)
    keep = gate(rows)
    assert [c.nonzero()[:, 0].tolist() for c in gate.chosen] == [[1], [5]]  # row 3 is read 2x, but only by a pad
    assert keep.tolist() == [[False, True], [True, False], [False, False], [False, True], [True, True]]


# ----------------------------------------------------------------------------------------------- training

def smf_run(tiny, steps, optimizer, train_scale=False, top_t=6, forward_tokens=4096):
    model, tok = with_memory(tiny)
    smf.prepare_model(model, "smf", train_scale=train_scale)
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")]
    bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 20))
    cfg = smf.TrainConfig(method="smf", max_steps=steps, warmup=0, top_t=top_t, optimizer=optimizer,
                          lr=0.05 if optimizer == "sgd" else 5e-3, micro_batch=2, grad_accum=2, train_scale=train_scale,
                          forward_tokens=forward_tokens)
    hist = train_texts(model, tok, texts, cfg, bg, record_selected=True)
    return model, hist


def changed_rows(before, after):
    return (before != after).any(dim=1).nonzero()[:, 0]

@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_smf_updates_exactly_the_selected_rows(tiny, optimizer):
    init, _ = with_memory(tiny)
    after1, _ = smf_run(tiny, 1, optimizer)
    after2, hist = smf_run(tiny, 2, optimizer)
    v0, v1, v2 = ([b.memory.values.detach() for b in smf.memory_blocks(m)] for m in (init, after1, after2))
    for name, p in init.named_parameters():
        if not name.endswith("memory.values"):
            assert torch.equal(p, dict(after2.named_parameters())[name]), name  # keys, query, W1, W2, alpha, base
    for j in range(2):
        sel1, sel2 = hist[0]["selected"][j], hist[1]["selected"][j]
        assert 0 < len(sel1) < 64 and 0 < len(sel2) < 64                          # a real subset of the rows
        assert torch.equal(changed_rows(v0[j], v1[j]), sel1)
        assert torch.equal(changed_rows(v1[j], v2[j]), sel2)
        assert torch.equal(changed_rows(v0[j], v2[j]), torch.unique(torch.cat([sel1, sel2])))
        only1 = sel1[~torch.isin(sel1, sel2)]
        assert len(only1) > 0 and torch.equal(v1[j][only1], v2[j][only1])         # no drift through stale moments
        assert hist[1]["rows_updated"][j] == len(sel2)


def test_split_step_keeps_micro_batches_whole_within_the_token_budget():
    lengths = [3, 3, 5, 5, 9, 9, 9]                      # a step's texts, sorted by length; micro-batches of 2
    assert smf.split_step(lengths, 2, 12) == [(0, 2), (2, 4), (4, 6), (6, 7)]   # 4 x 9 > 12: (4, 6) alone, over it
    assert smf.split_step(lengths, 2, 20) == [(0, 4), (4, 6), (6, 7)]           # 4 x 5 = 20 fits
    assert smf.split_step(lengths, 2, 63) == [(0, 7)] and smf.split_step(lengths, 2, 62) == [(0, 6), (6, 7)]
    assert smf.split_step(lengths, 2, 1) == [(0, 2), (2, 4), (4, 6), (6, 7)]    # every micro-batch alone


def test_smf_forward_tokens_changes_speed_not_the_selection_or_the_update(tiny, monkeypatch):
    """Micro-batches that share a forward each gate their own reads: any budget picks the same rows and makes the
    same update as one forward per micro-batch."""
    forwards, original = [], smf.forward_backward

    def counting(model, seqs, *args):
        forwards.append(len(seqs))
        return original(model, seqs, *args)
    monkeypatch.setattr(smf, "forward_backward", counting)
    runs = {}
    for budget in (1, 430, 10 ** 6):
        forwards.clear()
        runs[budget] = smf_run(tiny, 3, "adamw", forward_tokens=budget)
        runs[budget] += (list(forwards),)
    assert runs[1][2] == [2] * 6 and runs[10 ** 6][2] == [4] * 3                 # apart, and all in one forward
    assert {2, 4} <= set(runs[430][2])                                            # some steps shared, some not
    apart, hist_apart, _ = runs[1]
    for budget in (430, 10 ** 6):
        model, hist, _ = runs[budget]
        for a, b in zip(hist, hist_apart):
            assert all(torch.equal(x, y) for x, y in zip(a["selected"], b["selected"]))
        for x, y in zip(smf.memory_blocks(model), smf.memory_blocks(apart)):
            assert torch.allclose(x.memory.values, y.memory.values, atol=1e-6)


def full_logit_backward(model, seqs, gates, cfg, n_targets, pad_id):
    """The plain loss, as a reference: the whole vocabulary's logits of every token, each text's own targets."""
    ids, mask = smf.pad_batch(seqs, pad_id)
    for block, stats in gates:
        block.memory.read_gate = smf.ReadGate(smf.token_groups(mask, cfg.micro_batch), math.ceil(len(seqs) / cfg.micro_batch),
                                              stats, smf.SELECTORS[cfg.selector], cfg.top_t)
    out = model(input_ids=ids, attention_mask=mask).logits
    loss = sum(F.cross_entropy(out[b, :len(s) - 1], torch.tensor(s[1:]), reduction="sum") for b, s in enumerate(seqs))
    (loss / n_targets).backward()
    return loss.item() / n_targets


@pytest.mark.parametrize("method", ["full", "lora", "smf", "retrofit"])
def test_chunked_loss_gives_the_full_logit_loss_and_gradient(tiny, method):
    """Every trainable gradient (full finetuning's tied embeddings included) on a padded batch, for chunks of one
    target, of 7, and of all of them."""
    model, tok = with_memory(tiny) if method == "smf" else load(tiny)
    smf.prepare_model(model, method, TINY_MEM, (4, 8.0, 0.0))
    gates = []
    if method == "smf":
        bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 20))
        gates = list(zip(smf.memory_blocks(model), bg))
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")][:4]
    seqs = smf.tokenize(tok, texts, 1024)
    assert len({len(s) for s in seqs}) > 1                                      # padded
    n_targets = sum(len(s) - 1 for s in seqs) + 5                              # as if the step had more texts
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert method != "full" or model.lm_head.weight is model.model.embed_tokens.weight
    want = full_logit_backward(model, seqs, gates, smf.TrainConfig(method=method, top_t=6, micro_batch=2), n_targets,
                               tok.pad_token_id)
    want_grads = {n: p.grad.clone() for n, p in trainable.items()}
    assert all(g.abs().sum() > 0 for n, g in want_grads.items() if "lora_A" not in n)   # B = 0 gives A none
    for chunk in (1, 7, 10 ** 6):
        model.zero_grad(set_to_none=True)
        cfg = smf.TrainConfig(method=method, top_t=6, micro_batch=2, loss_chunk=chunk)
        loss, _ = smf.forward_backward(model, seqs, gates, cfg, n_targets, tok.pad_token_id, "cpu")
        assert loss == pytest.approx(want, rel=1e-5)
        for name, p in trainable.items():
            assert torch.allclose(p.grad, want_grads[name], rtol=1e-4, atol=1e-7), (chunk, name)


def test_each_step_uses_only_its_own_gradient(tiny):
    """SGD keeps no state, so two steps in one run equal two runs of one step (the second at the schedule's second
    lr), if and only if no step's gradient is carried into the next: every step here trains on the same batch."""
    text = smf.medmcqa_text(smf.load_medmcqa(tiny["medmcqa"], "train")[0])
    values = []
    for runs in ([(2, 0.5)], [(1, 0.5), (1, 0.25)]):              # 2 steps, cosine: lr 0.5, then 0.25
        model, tok = with_memory(tiny, "replacement")
        smf.prepare_model(model, "smf")
        bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 20))
        for steps, lr in runs:
            cfg = smf.TrainConfig(method="smf", optimizer="sgd", lr=lr, clip=0, warmup=0, max_steps=steps, top_t=6)
            train_texts(model, tok, [text] * 16, cfg, bg)              # 16 copies: one step a pass, the same batch
            assert all(p.grad is None for p in model.parameters())     # no gradient left for a later step
            model.zero_grad(set_to_none=True)
        values.append(torch.cat([b.memory.values.detach() for b in smf.memory_blocks(model)]))
    init = torch.cat([b.memory.values.detach() for b in smf.memory_blocks(with_memory(tiny, "replacement")[0])])
    assert (values[0] - init).abs().max() > 1e-3                      # the steps moved the values
    assert torch.allclose(values[0], values[1], rtol=0, atol=1e-7)


def test_smf_train_scale_moves_alpha(tiny):  # without the flag alpha stays bit-identical (test above)
    model, hist = smf_run(tiny, 2, "adamw", train_scale=True)
    assert all(b.alpha.item() != 0.01 for b in smf.memory_blocks(model))
    assert hist[-1]["alpha"] == [round(b.alpha.item(), 6) for b in smf.memory_blocks(model)]   # logged after the step


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_alpha_scales_a_value_steps_effect_and_under_sgd_the_step_too(tiny, optimizer):
    """One SMF step from alpha 0.01 and from alpha 1: under AdamW the value update is about as large either way and
    its effect on the blocks' output (alpha * memory(x), in fp64) about 100x; under SGD the update itself is about
    100x, and its effect about 10,000x."""
    import copy
    text = smf.medmcqa_text(smf.load_medmcqa(tiny["medmcqa"], "train")[0])
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    def outputs(model):
        with torch.no_grad():
            return torch.cat([(b.alpha.double() * copy.deepcopy(b.memory).double()(x)).flatten()
                              for b in smf.memory_blocks(model)])
    sizes = {}
    for alpha in (0.01, 1.0):
        model, tok = with_memory(tiny)
        for block in smf.memory_blocks(model):
            block.alpha.data.fill_(alpha)
        smf.prepare_model(model, "smf")
        bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 20))
        values, out = [torch.cat([b.memory.values.detach().clone() for b in smf.memory_blocks(model)])], [outputs(model)]
        cfg = smf.TrainConfig(method="smf", optimizer=optimizer, lr=1e-3, clip=0, warmup=0, max_steps=1, top_t=64)
        train_texts(model, tok, [text] * 16, cfg, bg)
        values.append(torch.cat([b.memory.values.detach() for b in smf.memory_blocks(model)]))
        out.append(outputs(model))
        sizes[alpha] = ((values[1] - values[0]).norm().item(), (out[1] - out[0]).norm().item())
    step_ratio, effect_ratio = (sizes[1.0][i] / sizes[0.01][i] for i in (0, 1))
    if optimizer == "adamw":
        assert 0.8 < step_ratio < 1.25 and 50 < effect_ratio < 200
    else:
        assert 50 < step_ratio < 200 and 5e3 < effect_ratio < 2e4


def test_gradient_accumulation_gives_the_same_update(tiny):
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")][:8]
    models = []
    for micro, accum in ((8, 1), (2, 4)):
        model, tok = load(tiny)
        smf.prepare_model(model, "full")
        train_texts(model, tok, texts, smf.TrainConfig(method="full", optimizer="sgd", lr=0.5, warmup=0, max_steps=1,
                                                      micro_batch=micro, grad_accum=accum, forward_tokens=1))
        models.append(model)
    base, _ = load(tiny)
    moved = max((p - q).abs().max().item() for p, q in zip(models[0].parameters(), base.parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert moved > 1e-3 and diff < 1e-6


def test_lora_init_merge_and_trainable_set(tiny):
    base, tok = load(tiny)
    model, _ = load(tiny)
    smf.prepare_model(model, "lora", lora_cfg=(4, 8.0, 0.0))
    lora = [m for m in model.modules() if isinstance(m, smf.LoRALinear)]
    assert len(lora) == 7 * 2                                       # q k v o gate up down in each of 2 layers
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(logits(model.eval(), ids), logits(base, ids))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n.split(".")[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"lora_A", "lora_B"}
    model.zero_grad(set_to_none=True)
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")]
    train_texts(model, tok, texts, smf.TrainConfig(method="lora", lr=1e-2, warmup=0, max_steps=3, lora_dropout=0.0))
    unmerged = logits(model.eval(), ids)
    assert not torch.allclose(unmerged, logits(base, ids), atol=1e-4)
    smf.merge_lora(model)
    assert not any(isinstance(m, smf.LoRALinear) for m in model.modules())
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)  # fp32: merged equals unmerged to 1e-5


def test_full_finetuning_memorises(tiny):
    model, tok = load(tiny)
    smf.prepare_model(model, "full")
    texts = ["the patient has fever", "the river runs to paris", "music of the king", "blood cell drug"]
    hist = train_texts(model, tok, texts, smf.TrainConfig(method="full", lr=3e-3, warmup=0, epochs=40, micro_batch=4,
                                                         grad_accum=1))
    assert hist[-1]["loss"] < 0.3 * hist[0]["loss"]


def test_smf_learns_a_small_task(tiny):
    model, tok = with_memory(tiny, "replacement")
    smf.prepare_model(model, "smf")
    texts = ["the patient has fever", "the river runs to paris", "music of the king", "blood cell drug"]
    bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 20))
    hist = train_texts(model, tok, texts, smf.TrainConfig(method="smf", lr=0.2, warmup=0, epochs=40, micro_batch=4,
                                                         grad_accum=1, top_t=32), bg)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]


# ----------------------------------------------------------------------------------------------- checkpoints

def test_every_checkpoint_kind_round_trips(tiny, tmp_path):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9, 7]])
    short = ["--max-steps", "2", "--limit-train", "16", "--lr", "1e-2"]
    retrofit = run(*train_args(tiny, tmp_path / "retrofit", "retrofit", "--memory-mode", "additive", *short))
    smf_model = run(*train_args(tiny, tmp_path / "smf", "smf", "--model", tmp_path / "retrofit", "--top-t", "4", *short))
    lora = run(*train_args(tiny, tmp_path / "lora", "lora", "--model", tiny["model"], *short))
    full = run(*train_args(tiny, tmp_path / "full", "full", "--model", tiny["model"], *short))
    smf.merge_lora(lora)
    for name, model in (("retrofit", retrofit), ("smf", smf_model), ("lora", lora), ("full", full)):
        loaded, _ = smf.load_model(str(tmp_path / name))
        assert torch.equal(logits(loaded, ids), logits(model.eval(), ids)), name
        assert json.load(open(tmp_path / name / "config.json"))["smf"]["kind"] == {"retrofit": "memory"}.get(name, name)
    size = lambda name: os.path.getsize(tmp_path / name / "weights.safetensors")
    assert size("smf") < size("retrofit") / 4     # a patch of a few changed rows, not the memory
    patch = smf.checkpoint_meta(str(tmp_path / "smf"))
    assert patch["parent"] == "../retrofit" and patch["train"]["selector"] == "kl" and patch["train"]["seed"] == 0


def test_smf_starts_from_the_retrofit_that_train_writes_by_default(tiny, tmp_path, capsys, monkeypatch):
    err = error_of(capsys, *train_args(tiny, tmp_path / "run", "smf"))          # --model: the plain tiny model
    assert f"{tiny['model']} is a plain model, not a retrofit — SMF trains the memory of a retrofit" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.chdir(tmp_path)                                                  # no --model, no --out: runs/...
    retrofit = [a for a in train_args(tiny, "-", "retrofit", "--max-steps", "1") if a not in ("--out", "-")]
    assert "--model runs/retrofit does not exist — train --method retrofit first (it writes runs/retrofit)" \
        in error_of(capsys, "train", "--method", "smf")
    assert "--model a/b does not exist" in error_of(capsys, "train", "--method", "smf", "--model", "a/b")  # a typo
    run(*retrofit)
    lora = [a for a in train_args(tiny, "runs/lora", "lora", *SHORT) if a != tiny["model"]]
    run(*[a if a != "--model" else "--model=runs/retrofit" for a in lora])           # LoRA of a retrofit
    assert "runs/lora is a lora model, not a retrofit" in error_of(capsys, "train", "--method", "smf", "--model",
                                                                   "runs/lora")
    assert smf.checkpoint_meta("runs/retrofit")["kind"] == "memory"
    smf_args = [a for a in train_args(tiny, "-", "smf", "--max-steps", "1", "--top-t", "4") if a not in ("--out", "-")]
    del smf_args[smf_args.index("--model"):smf_args.index("--model") + 2]
    run(*smf_args)
    meta = smf.checkpoint_meta("runs/smf")
    assert meta["parent"] == "../retrofit" and meta["kind"] == "smf" and meta["memory"]["layers"] == [0, 1]
    assert "runs/smf exists — choose a new folder" in error_of(capsys, *smf_args)   # never replaced


def test_same_seed_same_checkpoint_and_eval(tiny, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        run(*train_args(tiny, out, "lora", "--max-steps", "2", "--limit-train", "12", "--seed", "3"))
        run("eval", "--model", out, "--out", tmp_path / f"eval{k}.json", "--medmcqa", tiny["medmcqa"], "--wikitext",
            tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "6")
        outs.append(out)
    assert open(outs[0] / "weights.safetensors", "rb").read() == open(outs[1] / "weights.safetensors", "rb").read()
    results = [json.load(open(tmp_path / f"eval{k}.json")) for k in range(2)]
    assert results[0].pop("model") != results[1].pop("model") and results[0] == results[1]


# ----------------------------------------------------------------------------------------------- bad input

def error_of(capsys, *argv):
    """Runs the CLI in-process and returns its one-line error; fails if it succeeded or printed a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        smf.main([str(a) for a in argv])
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # progress bars may come before it
    assert exit_info.value.code != 0 and last.startswith("error: ") and " — " in last and "Traceback" not in err
    return last


def test_bad_models_give_one_line_errors(tiny, tmp_path, capsys):
    ev = lambda model: error_of(capsys, "eval", "--model", model, "--probe", "wikitext", "--wikitext", tiny["wikitext"])
    assert "nope is no folder (nor a hub id) — give the folder that holds the model" in ev(tmp_path / "nope")
    assert "config.json is no folder (nor a hub id)" in ev(os.path.join(tiny["model"], "config.json"))
    (tmp_path / "empty").mkdir()
    assert "empty has no tokenizer" in ev(tmp_path / "empty")
    run(*train_args(tiny, tmp_path / "mem", "retrofit", "--model", tiny["model"], "--max-steps", "1", "--limit-train", "8"))
    run(*train_args(tiny, tmp_path / "smf", "smf", "--model", tmp_path / "mem", "--max-steps", "1",
                    "--limit-train", "8", "--top-t", "4"))
    weights = tmp_path / "mem" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert f"{weights} is damaged" in ev(tmp_path / "mem")
    weights.unlink()
    assert f"{weights} is missing" in ev(tmp_path / "mem")
    cfg = json.load(open(tmp_path / "mem" / "config.json"))
    assert "out of range" in error_of(capsys, *train_args(tiny, tmp_path / "x", "retrofit"),
                                      "--memory-layers", "0", "7")
    assert "names a layer twice" in error_of(capsys, *train_args(tiny, tmp_path / "x", "retrofit"),
                                            "--memory-layers", "1", "1")
    assert "--memory-topk 9 must be at most --memory-n-keys 8 — change one of them" in error_of(
        capsys, *train_args(tiny, tmp_path / "x", "retrofit"), "--memory-topk", "9", "--memory-n-keys", "8")
    assert cfg["smf"]["kind"] == "memory"
    os.rename(tmp_path / "mem", tmp_path / "moved")                     # neither beside it nor where it was
    err = ev(tmp_path / "smf")                                           # both places named, normalised
    assert f"the parent of {tmp_path / 'smf'} is missing: not at {tmp_path / 'mem'} — restore it" in err


def test_model_without_decoder_blocks(tiny, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    toy_tokenizer(["a b c"] * 5, 40).save_pretrained(tmp_path / "gpt2")
    err = error_of(capsys, *train_args(tiny, tmp_path / "r", "retrofit", "--model", tmp_path / "gpt2"))
    assert "model.model.layers" in err


@pytest.mark.parametrize("flags, message", [
    (["--method", "lora", "--selector", "kl"], "--selector applies only to --method smf — drop it"),
    (["--method", "full", "--top-t", "8"], "--top-t applies only to --method smf"),
    (["--method", "lora", "--train-scale"], "--train-scale applies only to --method smf"),
    (["--method", "full", "--lora-r", "8"], "--lora-r applies only to --method lora"),
    (["--method", "lora", "--background", "x.jsonl"], "--background applies only to --method retrofit"),
    (["--method", "retrofit", "--medmcqa", "x.jsonl"], "--medmcqa applies only to --method smf or lora or full"),
    (["--method", "lora", "--memory-n-keys", "8"], "--memory-n-keys applies only to --method retrofit"),
    (["--method", "retrofit", "--memory-mode", "replacement", "--memory-alpha-init", "0.1"],
     "--memory-alpha-init needs additive memory — replacement memory has no alpha"),
    (["--method", "lora", "--wikitext", "w.jsonl"], "unrecognized arguments: --wikitext"),
    (["--method", "smf", "--top-t", "0"], "--top-t 0 is out of range — give a value >= 1"),
    (["--method", "smf", "--selectr", "kl"], "unrecognized arguments"),
    (["--method", "dpo"], "invalid choice"),
    (["--method", "lora", "--lr=-1e-3"], "--lr -0.001 is out of range"),
    (["--method", "lora", "--micro-batch", "0"], "--micro-batch 0 is out of range"),
    (["--clip", "-1"], "--clip -1.0 is out of range — give a value >= 0"),
    (["--lora-dropout", "1"], "--lora-dropout 1.0 is out of range — give a value in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1 is out of range"),
    (["--epochs", "inf"], "--epochs inf is out of range — give a value > 0 and finite"),
    (["--epochs", "nan"], "--epochs nan is out of range"),
    (["--method", "retrofit", "--memory-key-dim", "31"], "error: --memory-key-dim 31 must be even — change it"),
    (["--method", "retrofit", "--memory-n-keys", "2", "--memory-topk", "4"],      # the key width is not blamed
     "error: --memory-topk 4 must be at most --memory-n-keys 2 — change one of them"),
])
def test_bad_train_flags(flags, message, capsys):
    assert message in error_of(capsys, "train", *flags)


@pytest.mark.parametrize("flags, message", [(["--limit", "0"], "--limit 0 is out of range"),
                                            (["--batch-size", "0"], "--batch-size 0 is out of range"),
                                            (["--selector", "kl"], "unrecognized arguments: --selector"),
                                            (["--out", ""], "--out is empty")])
def test_bad_eval_flags(flags, message, capsys):
    assert message in error_of(capsys, "eval", *flags)


def test_train_help_shows_defaults_of_zero(capsys):
    with pytest.raises(SystemExit):
        smf.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag in ("--seed SEED", "--weight-decay WEIGHT_DECAY"):                # help text, then its default
        assert re.search(re.escape(flag) + r" (?:(?! --).)*?\(default: 0(\.0)?\)", shown), flag


def test_a_device_this_machine_lacks_and_an_empty_out_get_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)           # as on a CPU-only build of torch
    for command, device in (("train", "cuda"), ("eval", "cuda:0")):
        assert f"argument --device: invalid choice: '{device}' (choose from 'cpu')" in error_of(capsys, command, "--device", device)
    assert smf.build_parser().parse_args(["eval"]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)           # two GPUs: cuda, cuda:0 and cuda:1, not cuda:2
    assert smf.build_parser().parse_args(["eval"]).device == "cuda"
    assert smf.build_parser().parse_args(["train", "--device", "cuda:1"]).device == "cuda:1"
    assert "invalid choice: 'cuda:2' (choose from 'cpu', 'cuda', 'cuda:0', 'cuda:1')" in error_of(capsys, "eval", "--device", "cuda:2")
    assert "--out is empty — give a path" in error_of(capsys, "train", "--out", "")


def test_bad_data_gives_one_line_errors(tiny, tmp_path, capsys):
    def probe(kind, path):
        return error_of(capsys, "eval", "--model", tiny["model"], "--probe", kind, f"--{kind}", path)
    assert f"data file {tmp_path / 'missing.jsonl'} is not a file — check the path" in probe("medmcqa", tmp_path / "missing.jsonl")
    assert f"data file {tmp_path} is not a file" in probe("medmcqa", tmp_path)
    (tmp_path / "data.xml").write_text("<x/>")
    assert "line 1 is not JSON" in probe("medmcqa", tmp_path / "data.xml")
    good = smf.load_medmcqa(tiny["medmcqa"])[0]
    cases = {"question": {k: v for k, v in good.items() if k != "question"}, "cop": {k: v for k, v in good.items() if k != "cop"}}
    for field, row in cases.items():
        assert f"line 1: field '{field}' is missing" in probe("medmcqa", write_jsonl(tmp_path / f"no_{field}.jsonl", [row]))
    path = tmp_path / "null.jsonl"                                     # the file's own line, every line counted
    path.write_text("\n".join([json.dumps({**good, "choice_type": "multi"}), "", json.dumps({**good, "cop": None})]))
    assert f"{path}: line 3: cop=None, not an integer 0..3" in probe("medmcqa", path)
    for cop in (4, 2.5, "two", True):
        assert "not an integer 0..3 (0 = opa)" in probe("medmcqa", write_jsonl(tmp_path / "cop.jsonl", [{**good, "cop": cop}]))
    as_int = smf.load_medmcqa(write_jsonl(tmp_path / "int.jsonl", [{**good, "cop": 2}]))
    assert smf.load_medmcqa(write_jsonl(tmp_path / "s.jsonl", [{**good, "cop": "2"}])) == as_int
    assert smf.load_medmcqa(write_jsonl(tmp_path / "f.jsonl", [{**good, "cop": 2.0}])) == as_int
    assert as_int[0]["cop"] == 2 and type(as_int[0]["cop"]) is int
    assert "line 1: field 'question' is int, not text" in probe("medmcqa", write_jsonl(tmp_path / "q.jsonl", [{**good, "question": 7}]))
    multi = [{**good, "choice_type": "multi"}] * 3                     # the filter that emptied it, and how much
    assert "no rows left of 3 (choice_type == 'single' removed 3)" in probe("medmcqa", write_jsonl(tmp_path / "m.jsonl", multi))
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + '\n{"question": "x", "opa"')
    assert "line 2 is not JSON" in probe("medmcqa", tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text(json.dumps([good]))                # one JSON array, not JSON Lines
    assert "line 1 is a list, not a JSON object — one JSON object per line" in probe("medmcqa", tmp_path / "list.jsonl")
    text = "".join(json.dumps({**good, "cop": i % 4}) + "\n" for i in range(3))
    (tmp_path / "bom.jsonl").write_text("\ufeff" + text, encoding="utf-8")   # Windows' byte-order mark
    (tmp_path / "to_json.json").write_text(text)                             # what datasets' to_json writes
    (tmp_path / "UP.JSONL").write_text(text)                                 # extensions are case-blind
    plain = smf.load_medmcqa(write_jsonl(tmp_path / "plain.jsonl", [{**good, "cop": i % 4} for i in range(3)]))
    for name in ("bom.jsonl", "to_json.json", "UP.JSONL"):
        assert smf.load_medmcqa(str(tmp_path / name)) == plain, name
    no_alias = [{"question": "q?", "answer": {"aliases": [], "value": ""}}]
    assert "line 1: the answer has no aliases as a list of strings" in probe("triviaqa", write_jsonl(tmp_path / "tqa.jsonl", no_alias))
    one_string = [{"question": "q?", "answer": {"aliases": "Paris", "value": "Paris"}}]  # not per-character aliases
    assert "has no aliases as a list of strings" in probe("triviaqa", write_jsonl(tmp_path / "tqa2.jsonl", one_string))
    assert "'text'" in probe("wikitext", write_jsonl(tmp_path / "wiki.jsonl", [{"body": "x"}]))
    assert "field 'text' is list, not text" in probe("wikitext", write_jsonl(tmp_path / "wiki2.jsonl", [{"text": ["x"]}]))
    assert "'text'" in error_of(capsys, *train_args(tiny, tmp_path / "r", "retrofit"),
                                "--background", write_jsonl(tmp_path / "bg.jsonl", [{"role": "assistant"}]))


def test_unwritable_out(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = error_of(capsys, "eval", "--model", tiny["model"], "--probe", "wikitext", "--wikitext", tiny["wikitext"],
                   "--out", tmp_path / "file" / "r.json")
    assert "cannot be written" in err and "Not a directory" in err and not (tmp_path / "file" / "r.json").exists()
    err = error_of(capsys, *train_args(tiny, tmp_path / "file" / "ckpt", "lora", "--model", tiny["model"], "--max-steps", "1"))
    assert "cannot be written" in err


def test_nan_loss_stops_and_leaves_nothing(tiny, tmp_path, capsys):
    args = train_args(tiny, tmp_path / "ckpt", "full", "--max-steps", "3", "--limit-train", "8")
    err = error_of(capsys, *args, "--lr", "1e30", "--clip", "0")
    assert "at step" in err and ("nan" in err or "inf" in err) and "no checkpoint was written" in err
    assert os.listdir(tmp_path) == []                                           # no staging folder left


@pytest.mark.parametrize("where", ["chmod", "rename"])
def test_an_interrupted_save_leaves_no_checkpoint_and_nothing_beside_it(tiny, tmp_path, monkeypatch, where):
    model, _ = with_memory(tiny, seed=1)
    out = str(tmp_path / "mem")
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_memory(out, model, tiny["model"])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []                                       # no half-written folder left
    save_memory(out, model, tiny["model"])
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert torch.equal(logits(smf.load_model(out)[0], ids), logits(model, ids))


# ----------------------------------------------------------------------------------------------- run_all.sh, bench

def smoke_env(tiny, out):
    """Smoke overrides: a tiny local model and data, a few steps, small probes."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHON": sys.executable, "MODEL": tiny["model"],
            "OUT": str(out), "SEEDS": "1", "MEDMCQA": tiny["medmcqa"], "MEDMCQA_EVAL": tiny["medmcqa"],
            "WIKITEXT": tiny["wikitext"], "TRIVIAQA": tiny["triviaqa"], "BACKGROUND": tiny["background"], "MAX_STEPS": "2",
            "LIMIT_TRAIN": "16", "EVAL_LIMIT": "8", "BACKGROUND_EXAMPLES": "8", "DEVICE": "cpu",
            "TRAIN_ARGS": "--warmup 0", "MEMORY_ARGS": " ".join(MEM), "SMF_ARGS": "--top-t 8"}


def run_all(env, *args, cwd=None):
    return subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), *args], env=env, capture_output=True, text=True,
                          cwd=cwd)


def started_at_once(stdout):
    """The most stages that run_all.sh's output shows running at the same time."""
    running, most = 0, 0
    for line in stdout.splitlines():
        running += line.startswith("start ") - line.startswith("done ")
        most = max(most, running)
    return most


def test_run_all_smoke(tiny, tmp_path):
    """A row of each kind of command (eval only; retrofit; smf from it; a method from the base model), for real, on
    two parallel slots (every row's command: the next test); a rerun skips them all, and a rerun with other
    settings is refused (a stage whose eval.json lacks a probe runs again: see below)."""
    out = tmp_path / "résultats 1"                                        # a path bash quotes as $'...' in C
    env = {**smoke_env(tiny, out), "GPUS": "cpu cpu", "LC_ALL": "C"}
    rows = ["base", "retrofit_additive", "smf_additive_scale_tfidf", "lora"]
    env |= {"ROWS": " ".join(rows), "LORA_ARGS": "--lora-r 4", "FULL_ARGS": "--lr 3e-4", "SMF_ARGS": "--top-t 8 --lr 4e-4"}
    first = run_all(env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert started_at_once(first.stdout) == 2 and first.stdout.count("done ") == 4
    table = open(out / "table.md").read().splitlines()[2:]                   # after the header line and a blank
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == list(smf.TABLE_ROWS.values())                     # rows not run are shown, not dropped
    for row, line in zip(smf.TABLE_ROWS, table[2:]):
        cells = [c.strip() for c in line.split("|")[2:-1:2]]                  # the five metric columns
        if row not in rows:
            assert cells == ["missing"] * 5, line
            continue
        assert len(cells) == 5 and all(math.isfinite(float(c.split()[0])) for c in cells), line
        assert all(c.endswith("(n=1)") and "±" not in c for c in cells), line  # one seed: no ± 0.00
        deltas = [c.strip() for c in line.split("|")[3:-1:2]]                 # Δ with a paired interval, but ppl
        assert row == "base" or [("[" in d) for d in deltas] == [True, True, False, True, True], line
    log = open(out / "logs" / "lora_seed1.log").read()
    assert "\r" not in log and "== lora finished: 2 steps" in log and "tokens/s" not in log   # no bars
    assert re.search(r"final loss \d+\.\d{4}, checkpoint ", log)             # LoRA has no memory to report
    smf_log = open(out / "logs" / "smf_additive_scale_tfidf_seed1.log").read()
    assert re.search(r"final loss \d+\.\d{4}, rows_updated \[\d+(, \d+)*\], alpha \[[-0-9., ]+\], checkpoint ", smf_log)
    meta = smf.checkpoint_meta(str(out / "smf_additive_scale_tfidf" / "seed1" / "model"))
    assert meta["kind"] == "smf" and meta["parent"] == "../../../retrofit_additive/seed1/model"
    assert meta["train"]["selector"] == "tfidf" and meta["train"]["train_scale"]
    size = lambda row: os.path.getsize(out / row / "seed1" / "model" / "weights.safetensors")
    assert size("smf_additive_scale_tfidf") < size("retrofit_additive") / 4
    recipes = {row: smf.checkpoint_meta(str(out / row / "seed1" / "model"))["train"] for row in rows[1:]}
    assert all(r["seed"] == 1 and r["warmup"] == 0 and r["total_steps"] == 2 for r in recipes.values())   # SEEDS=1
    assert recipes["lora"]["lora_r"] == 4 and recipes["lora"]["lr"] == smf.METHOD_LR["lora"]
    assert recipes["retrofit_additive"]["lr"] == smf.METHOD_LR["retrofit"]        # FULL_ARGS is full's only
    assert recipes["smf_additive_scale_tfidf"]["lr"] == 4e-4 and recipes["smf_additive_scale_tfidf"]["top_t"] == 8
    other = run_all({**env, "EVAL_LIMIT": "6", "MAX_STEPS": "3"})              # other settings: refused, in one line
    assert other.returncode == 2 and "start " not in other.stdout, other.stdout
    assert (f"error: stage base/seed1 in {out} was made with EVAL_LIMIT=8; this run has EVAL_LIMIT=6 — choose another "
            f"OUT, or delete {out}/base/seed1/eval.json to evaluate its model again with these settings"
            ) in other.stderr.splitlines()                                     # only evaluation settings changed
    assert (f"error: stage lora/seed1 in {out} was made with MAX_STEPS=2 EVAL_LIMIT=8; this run has MAX_STEPS=3 "
            f"EVAL_LIMIT=6 — choose another OUT, or move {out}/lora/seed1 away to redo it"
            ) in other.stderr.splitlines()                                     # a training setting changed too


FAKE_PYTHON = '''#!{python}
"""Stands in for `python` under run_all.sh: records each smf.py command as a JSON line in $FAKE_CALLS and writes
the files that command would write (a checkpoint's config.json, an eval.json of every probe), in milliseconds."""
import json, os, sys, time
if sys.argv[1] == "-" and sys.argv[2].endswith("smf.py"):             # the commands' check (its own test), skipped:
    sys.exit(0)                                                      # it would import torch for every run
if sys.argv[1] in ("-c", "-"):                                       # run_all's own checks: the real interpreter
    os.execv({python!r}, [{python!r}] + sys.argv[1:])
command, args = sys.argv[2], sys.argv[3:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps([command] + args) + "\\n")
with open(os.environ["FAKE_CALLS"] + ".threads", "a") as f:                # the threads a stage was given
    f.write(os.environ.get("OMP_NUM_THREADS", "-") + "\\n")
out = args[args.index("--out") + 1] if "--out" in args else None
if command == "train":
    os.makedirs(out)
    open(os.path.join(out, "train_log.jsonl"), "w").write("{{}}\\n")
    time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", 0)))
    method = args[args.index("--method") + 1]
    meta = {{"kind": "memory" if method == "retrofit" else method}}       # as smf.py's checkpoints say
    if method == "retrofit":
        meta["memory"] = {{"mode": args[args.index("--memory-mode") + 1]}}
        open(os.path.join(out, "background_stats.safetensors"), "w").close()
    open(os.path.join(out, "config.json"), "w").write(json.dumps({{"smf": meta}}))
    print("== " + args[args.index("--method") + 1] + " finished")
if command == "eval" and os.environ.get("FAKE_EVAL_FAILS"):
    sys.exit("error: the evaluation failed")
if command == "eval":
    results = {{"written_by": "smf.py eval", "medmcqa": {{}}, "wikitext": {{}}, "triviaqa": {{}}}}
    open(out, "w").write(json.dumps(results, indent=2))
'''


@pytest.fixture
def fake_python(tmp_path):
    """(PYTHON for run_all.sh that fakes smf.py, a function that reads the commands it was given)."""
    script, calls = tmp_path / "fake_python", tmp_path / "calls.jsonl"
    script.write_text(FAKE_PYTHON.format(python=sys.executable))
    script.chmod(0o755)
    read = lambda: [json.loads(line) for line in open(calls)] if calls.exists() else []
    return {"PYTHON": str(script), "FAKE_CALLS": str(calls)}, read


def holds(args, flags):
    """Whether the command's arguments hold `flags` (a string of them) in a row."""
    flags = flags.split()
    return any(args[i:i + len(flags)] == flags for i in range(len(args)))


def test_run_all_gives_each_row_its_parent_its_own_args_and_the_seed(tiny, tmp_path, fake_python):
    """Every row of a seed on two slots, smf.py faked: each train command gets its row's method and parent (an SMF
    row its own retrofit, after that retrofit finished), +scale rows --train-scale, only its own *_ARGS and the
    seed; every stage is evaluated, and then the table is made."""
    python, calls = fake_python
    out = tmp_path / "res"
    own = {"retrofit": "--memory-topk 2", "smf": "--top-t 8 --lr 4e-4", "lora": "--lora-r 4", "full": "--lr 3e-4"}
    env = {**smoke_env(tiny, out), **python, "GPUS": "cpu cpu", "SEEDS": "07", "MEMORY_ARGS": own["retrofit"],
           "SMF_ARGS": own["smf"], "LORA_ARGS": own["lora"], "FULL_ARGS": own["full"]}
    p = run_all(env)
    assert p.returncode == 0 and p.stdout.count("done ") == 11 and started_at_once(p.stdout) == 2, p.stderr
    commands = calls()
    assert commands[-1] == ["table", str(out)]
    evaluated = {c[c.index("--out") + 1] for c in commands if c[0] == "eval"}
    assert evaluated == {str(out / row / "seed7" / "eval.json") for row in smf.TABLE_ROWS}
    trains = {c[c.index("--out") + 1].split("/")[-3]: (i, c) for i, c in enumerate(commands) if c[0] == "train"}
    assert sorted(trains) == sorted(list(smf.TABLE_ROWS)[1:])
    for row, (i, args) in trains.items():
        method = row.split("_")[0]
        assert holds(args, f"--method {method}") and holds(args, "--seed 7"), row
        assert [kind for kind, flags in own.items() if holds(args, flags)] == [method], row
        assert holds(args, "--train-scale") == ("_scale_" in row), row
        if method == "retrofit":
            assert holds(args, f"--model {tiny['model']} --memory-mode {row.split('_')[1]}")
        if method == "smf":
            retrofit = "retrofit_replacement" if "replacement" in row else "retrofit_additive"
            assert holds(args, f"--model {out / retrofit / 'seed7' / 'model'}"), row
            assert holds(args, f"--selector {row.rsplit('_', 1)[1]}"), row
            retrofit_eval = f"--out {out / retrofit / 'seed7' / 'eval.json'}"
            evaluated_at = [j for j, c in enumerate(commands) if holds(c, retrofit_eval)]
            assert evaluated_at and evaluated_at[0] < i, row                # after its retrofit finished
        if method in ("lora", "full"):
            assert holds(args, f"--model {tiny['model']}"), row


def test_run_all_finishes_a_stage_only_when_its_eval_json_holds_every_probe(tmp_path):
    """run_all.sh's own `finished`, run by bash on eval.json files as smf eval writes them (indent 2) and as a
    user may re-indent them (4, or one line)."""
    source = open(os.path.join(HERE, "run_all.sh")).read()
    finished = source[source.index("finished() {"):source.index("\n}\n", source.index("finished() {")) + 3]
    probes = {"written_by": "smf.py eval", "medmcqa": {"acc": 0.5}, "wikitext": {"ppl": 9.0}, "triviaqa": {"n": 1}}
    for indent in (2, 4, None):
        for missing in (None, "medmcqa", "wikitext", "triviaqa"):
            stage = tmp_path / f"without_{missing}_{indent}" / "seed1"
            stage.mkdir(parents=True)
            (stage / "eval.json").write_text(json.dumps({k: v for k, v in probes.items() if k != missing}, indent=indent))
            p = subprocess.run(["bash", "-c", f"{finished}\nOUT={tmp_path}; finished without_{missing}_{indent}/seed1"])
            assert p.returncode == (0 if missing is None else 1), (missing, indent)


def test_run_all_lists_stages_in_dependency_order_and_runs_one(tiny, tmp_path):
    env = {**smoke_env(tiny, tmp_path / "res"), "SEEDS": "0 1"}
    listed = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "--list"], env=env, capture_output=True,
                            text=True).stdout.splitlines()
    assert len(listed) == 22 and listed[0] == "base/seed0"
    for i, line in enumerate(listed):
        if "  after " in line:
            assert line.split("  after ")[1] in [l.split()[0] for l in listed[:i]]
    assert "smf_additive_scale_tfidf/seed1  after retrofit_additive/seed1" in listed
    one = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                         env={**env, "STAGE": "smf_additive_kl/seed1"})
    assert one.returncode != 0 and one.stderr.strip().splitlines() == [
        "error: stage smf_additive_kl/seed1 needs retrofit_additive/seed1, which has not finished — run "
        "STAGE=retrofit_additive/seed1 first"]                          # a STAGE that runs: the next test


def test_run_all_stops_at_a_failing_stage_and_resumes_from_any_folder(tiny, tmp_path, fake_python):
    """Relative paths (data, OUT) are the caller's, as for any command; a missing data file is refused before any
    stage runs, and so is a broken one; a failed stage stops new starts; a stage whose evaluation failed reruns
    only that (smf.py faked)."""
    work = tmp_path / "mydata"
    work.mkdir()
    for name in ("medmcqa", "wikitext", "background"):
        os.symlink(tiny[name], work / os.path.basename(tiny[name]))
    env = {**smoke_env(tiny, "myresults"), **fake_python[0], "ROWS": "lora base", "TRIVIAQA": "missing.jsonl",
           "MEDMCQA": "medmcqa.jsonl",
           "MEDMCQA_EVAL": "medmcqa.jsonl", "WIKITEXT": "wikitext.jsonl", "BACKGROUND": "oasst1.jsonl"}
    missing = run_all(env, cwd=work)
    assert missing.returncode == 2 and "start" not in missing.stdout and not (work / "myresults").exists()
    assert "error: TRIVIAQA=missing.jsonl does not exist — give the local file" in missing.stderr
    (work / "missing.jsonl").write_text("not json\n")                    # exists, but is no JSON Lines
    broken = run_all(env, cwd=work)
    assert broken.returncode == 2 and "start" not in broken.stdout and broken.stderr == (
        f"error: TRIVIAQA={work / 'missing.jsonl'}: line 1 is not a JSON object — give a JSON Lines file in the hub's "
        "schema (docs/running.md: Local data, offline)\n")
    (work / "missing.jsonl").write_text('{"question": "q?"}\n')           # a row without its answer
    broken = run_all(env, cwd=work)
    assert broken.returncode == 2 and "line 1 lacks field 'answer'" in broken.stderr
    os.remove(work / "missing.jsonl")
    os.symlink(tiny["triviaqa"], work / "missing.jsonl")
    failed = run_all({**env, "ROWS": "full lora", "FAKE_EVAL_FAILS": "1"}, cwd=work)   # lora runs first, fails at eval
    assert failed.returncode != 0 and "FAILED stage lora seed 1" in failed.stderr and "logs/lora_seed1.log" in failed.stderr
    assert "full" not in failed.stdout and (work / "myresults" / "lora" / "seed1" / "model" / "config.json").exists()
    stage = work / "myresults" / "lora" / "seed1"                        # an eval.json one probe short: not finished
    partial = {"written_by": "smf.py eval", "model": str(stage / "model"), "medmcqa": {}, "wikitext": {}}
    (stage / "eval.json").write_text(json.dumps(partial, indent=2))
    ok = run_all({**env, "GPUS": "cpu cpu", "ROWS": "lora"}, cwd=work)
    assert ok.returncode == 0 and "done  lora" in ok.stdout and "base" not in ok.stdout, ok.stderr
    log = open(work / "myresults" / "logs" / "lora_seed1.log").read().split("== run_all.sh: stage lora/seed1 on ")
    assert len(log) == 3 and "finished" in log[1] and "finished" not in log[2]   # kept, and not trained again
    trained = [c for c in fake_python[1]() if c[0] == "train"]
    assert len(trained) == 1 and holds(trained[0], f"--medmcqa {tiny['medmcqa']}")   # the link, resolved
    assert fake_python[1]()[-1] == ["table", str(work / "myresults")]
    assert sorted(os.listdir(work)) == ["medmcqa.jsonl", "missing.jsonl", "myresults", "oasst1.jsonl", "wikitext.jsonl"]


def test_run_all_holds_a_lock_and_stops_its_stages_on_sigterm(tiny, tmp_path, fake_python):
    """smf.py faked by a training that never ends (smf.py's own cleanup on SIGTERM: test_sigterm_cleans_up...)."""
    import signal, time
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0], "ROWS": "full", "FAKE_TRAIN_SECONDS": "1000"}
    first = subprocess.Popen(["bash", os.path.join(HERE, "run_all.sh")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not list(out.rglob("train_log.jsonl")):
        assert first.poll() is None
        time.sleep(0.1)                                                  # the stage is training
    second = run_all(env)
    assert second.returncode == 2 and f"another run_all.sh is running into {out}" in second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143 and "stopped" in first.stderr.read()
    alive = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert alive == ""                                                   # no orphan
    out = tmp_path / "stage"                                             # SIGTERM to a STAGE run stops its training
    stage = subprocess.Popen(["bash", os.path.join(HERE, "run_all.sh")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**env, "OUT": str(out), "STAGE": "full/seed1"}, text=True)
    while not list(out.rglob("train_log.jsonl")):
        assert stage.poll() is None, stage.stderr.read()
        time.sleep(0.1)
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=60) == 143 and "stopped: stage full/seed1" in stage.stderr.read()
    alive = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert alive == ""


def test_run_all_on_a_file_system_without_locks_warns_and_runs(tiny, tmp_path, fake_python):
    """flock exits 1 when another run holds the lock (refused) and otherwise on an error: only a warning."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flock").write_text("#!/bin/sh\nexit ${FAKE_FLOCK_EXIT}\n")
    (bin_dir / "flock").chmod(0o755)
    env = {**smoke_env(tiny, tmp_path / "res"), **fake_python[0], "ROWS": "base lora",
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_FLOCK_EXIT": "65"}   # EX_DATAERR: e.g. ENOSYS
    for extra in ({}, {"STAGE": "full/seed1"}):
        done = run_all({**env, **extra})
        assert done.returncode == 0, done.stderr
        assert f"warning: the file system of {tmp_path / 'res'} takes no locks (flock exit 65)" in done.stderr
    held = run_all({**env, "FAKE_FLOCK_EXIT": "1", "ROWS": "full"})
    assert held.returncode == 2 and "error: another run_all.sh is running into" in held.stderr
    assert [call[0] for call in fake_python[1]()] == ["eval", "train", "eval", "table", "train", "eval"]  # none held


# ----------------------------------------------------------------------------------------------- properties against
# independent, naive references (each was checked by making its bug by hand and watching it fail)

def test_get_lr_at_named_steps():
    warmup = [smf.get_lr(step, total=100, peak=1.0, warmup=4) for step in range(5)]
    assert warmup == [0.25, 0.5, 0.75, 1.0, 1.0]      # one step ahead of HF's 0, .25, .5, .75, 1 (the documented departure)
    lr = lambda step: smf.get_lr(step, total=1000, peak=1e-3, warmup=100)
    assert lr(0) == pytest.approx(1e-5) and lr(49) == pytest.approx(5e-4)              # linear warm-up
    assert lr(99) == pytest.approx(1e-3) and lr(100) == pytest.approx(1e-3)             # peak
    assert lr(550) == pytest.approx(5e-4)                                               # half-way down the cosine
    assert lr(325) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr(1000) == pytest.approx(0.0, abs=1e-12) and 0 < lr(999) < 1e-8                 # the end


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_row_sparse_optimizer_equals_torch_per_row(optimizer):
    """Each row moves as torch's optimizer would move it alone, over only the steps it was chosen."""
    torch.manual_seed(0)
    weight = torch.randn(6, 3)
    sparse = smf.RowSparseAdamW([weight], weight_decay=0.1, sgd=optimizer == "sgd")
    reference = [torch.nn.Parameter(weight[r].clone()) for r in range(6)]
    make = (lambda p: torch.optim.AdamW([p], lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)) \
        if optimizer == "adamw" else (lambda p: torch.optim.SGD([p], lr=1.0, weight_decay=0.1))
    per_row = [make(p) for p in reference]
    chosen = [[0, 2], [2, 3, 5], [0], [1, 2, 5], [2]]                  # row 4 is never chosen
    for step, rows in enumerate(chosen):
        lr = 0.01 * (step + 1)                                          # a changing learning rate
        grads = torch.randn(len(rows), 3)
        sparse.step([torch.tensor(rows)], [grads], lr)
        for g, r in zip(grads, rows):
            reference[r].grad = g.clone()
            per_row[r].param_groups[0]["lr"] = lr
            per_row[r].step()
    for r in range(6):
        assert torch.allclose(weight[r], reference[r].detach(), atol=1e-6), r


def test_adamw_step_ignores_the_gradients_scale_only_while_it_is_far_above_eps():
    """A row's first AdamW step is lr * g / (|g| + eps): ~lr whatever g while |g| >> eps = 1e-8, but lr / 11 at
    g = 1e-9 (the size of Qwen's value gradients at alpha 0.01), where halving g about halves the step, as SGD's."""
    def first_step(g):
        weight = torch.zeros(3, 2)
        smf.RowSparseAdamW([weight]).step([torch.tensor([1])], [torch.full((1, 2), g)], 1.0)
        assert not weight[[0, 2]].any()
        return -weight[1, 0].item()
    assert first_step(1e-3) == pytest.approx(1.0, rel=1e-4) and first_step(5e-4) == pytest.approx(1.0, rel=1e-4)
    assert first_step(1e-9) == pytest.approx(1 / 11, rel=1e-4) and first_step(5e-10) == pytest.approx(1 / 21, rel=1e-4)


def test_read_gate_blocks_value_gradients_of_reads_it_drops():
    torch.manual_seed(0)
    mem = smf.ProductKeyMemory(dim=16, n_keys=8, heads=2, key_dim=8, topk=3)
    x = torch.randn(1, 10, 16)
    plain = mem(x)
    (plain * torch.arange(16.0)).sum().backward()
    plain_grad, mem.values.grad = mem.values.grad.clone(), None
    rows = mem.lookup(x[0])[1].flatten(1)                               # (10 tokens, 6 reads)
    mem.read_gate = lambda r: torch.arange(10)[:, None].expand_as(r) < 4  # only the first 4 tokens' reads learn
    gated = mem(x)
    assert torch.allclose(gated, plain, atol=1e-6)                      # the output does not change
    (gated * torch.arange(16.0)).sum().backward()
    kept, dropped = set(rows[:4].flatten().tolist()), set(rows[4:].flatten().tolist())
    only_dropped = sorted(dropped - kept)
    assert only_dropped and mem.values.grad[only_dropped].abs().max() == 0
    only_kept = sorted(kept - dropped)
    assert only_kept and torch.allclose(mem.values.grad[only_kept], plain_grad[only_kept], atol=1e-6)
    assert mem.values.grad[[r for r in range(64) if r not in kept]].abs().max() == 0


def test_lookup_chooses_rows_in_fp32_even_in_bf16():
    """A bf16 memory reads the rows an fp32 computation on the same (bf16-rounded) weights and input picks."""
    torch.manual_seed(0)
    mem32 = smf.ProductKeyMemory(dim=64, n_keys=32, heads=4, key_dim=32, topk=8)
    mem16 = smf.ProductKeyMemory(dim=64, n_keys=32, heads=4, key_dim=32, topk=8).to(torch.bfloat16)
    mem16.load_state_dict(mem32.state_dict())
    mem32.load_state_dict({k: v.float() for k, v in mem16.state_dict().items()})
    x = torch.randn(2000, 64).to(torch.bfloat16)
    assert torch.equal(mem16.lookup(x)[1], mem32.lookup(x.float())[1])
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(mem32.lookup(x.float())[1], mem32.lookup(x.float())[1].clone())
        assert torch.equal(mem32.lookup(x.float())[1], mem16.lookup(x)[1])


def test_lora_forward_is_the_formula_and_dropout_sees_the_input():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    lora = smf.LoRALinear(base, r=2, alpha=5.0, dropout=0.0)
    torch.nn.init.normal_(lora.lora_A), torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 6)
    assert torch.allclose(lora(x), base(x) + (5.0 / 2) * x @ lora.lora_A.T @ lora.lora_B.T, atol=1e-6)
    seen = []
    lora.dropout = type("Recorder", (torch.nn.Module,), {"forward": lambda self, t: seen.append(t.shape) or t})()
    lora(x)
    assert seen == [x.shape]                                          # on the input (6 wide), not the output (4)
    wrapped = torch.nn.Sequential(lora)
    expected = lora(x)
    smf.merge_lora(wrapped)
    assert wrapped[0] is base and torch.allclose(base(x), expected, atol=1e-6)


def test_retrofit_trains_every_memory_tensor_and_alpha(tiny):
    model, tok = load(tiny)
    smf.prepare_model(model, "retrofit", TINY_MEM)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = smf.load_background(tiny["background"])
    train_texts(model, tok, texts, smf.TrainConfig(method="retrofit", lr=1e-2, warmup=0, max_steps=1))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    memory = {n for n in before if ".memory." in n or n.endswith(".alpha")}
    assert moved == memory and len(memory) == 2 * 9    # keys, query w/b, values, w1 w/b, w2 w/b, alpha; per layer


def naive_background_counts(model, tok, texts, max_len):
    """df and reads per memory layer from one full forward per text, no padding, in the order given."""
    blocks = smf.memory_blocks(model)
    df, reads = [torch.zeros(64, dtype=torch.long) for _ in blocks], [torch.zeros(64, dtype=torch.long) for _ in blocks]
    for text in texts:
        seen = {}
        for j, b in enumerate(blocks):
            b.memory.read_gate = lambda rows, j=j: seen.setdefault(j, rows)
        model(input_ids=torch.tensor([tok(text)["input_ids"][:max_len]]))
        for j in range(len(blocks)):
            reads[j] += torch.bincount(seen[j].flatten(), minlength=64)
            df[j][seen[j].unique()] += 1
    for b in blocks:
        b.memory.read_gate = None
    return df, reads


def background_texts():
    """Texts of 1 to 300 words: runs of equal and of near-equal lengths (many to a batch), and long ones alone."""
    rng = random.Random(1)
    same = sentence(rng, 6)                                             # equal lengths: the same text, thrice
    return [sentence(rng, n) for n in (300, 2, 40, 1, 120, 7, 250, 15, 3, 90, 60, 5, 6, 6, 7, 7, 8, 12, 12, 13)] + [same] * 3


def test_background_stats_equal_a_brute_force_count(tiny, monkeypatch):
    """Sorted, token-budgeted batches of several texts and a forward stopped after the last memory layer count what
    one full forward per text, in file order, counts: df counts texts, not batches."""
    model, tok = with_memory(tiny)
    texts, batches, original = background_texts(), [], smf.pad_batch
    monkeypatch.setattr(smf, "pad_batch", lambda seqs, *a, **kw: batches.append(list(map(len, seqs))) or original(seqs, *a, **kw))
    stats = smf.background_stats(model, tok, texts, max_len=200, batch_tokens=256)
    assert len(batches) < len(texts) and max(map(len, batches)) >= 4         # several texts share a batch ...
    assert all(len(b) == 1 or len(b) * max(b) <= 256 for b in batches)       # ... within batch_tokens
    assert any(len(set(b)) > 1 for b in batches) and any(len(set(b)) < len(b) for b in batches)
    df, reads = naive_background_counts(model, tok, texts, 200)               # ... of equal and of different lengths
    for j, s in enumerate(stats):
        assert s.texts == len(texts) and torch.equal(s.reads, reads[j]) and torch.equal(s.df, df[j])
        assert (s.df < s.reads).any()                                   # df and reads really differ here


def test_background_counts_depend_on_batching_only_through_float_rounding(tiny, monkeypatch):
    """In fp32 any order of the texts and any batch_tokens, from one text a batch to all in one, give the same
    counts. Under bf16 autocast (the GPU's path) the batch shape changes the rounding of the hidden states
    entering a memory: a few reads move, well under 1% of them."""
    model, tok = with_memory(tiny)
    texts = background_texts()
    want = smf.background_stats(model, tok, texts, max_len=200, batch_tokens=1)
    longest, total = 200, sum(len(tok(t)["input_ids"][:200]) for t in texts)
    rng = random.Random(0)
    for budget in (longest, 400, 1000, 20 * total):
        shuffled = rng.sample(texts, len(texts))
        got = smf.background_stats(model, tok, shuffled, max_len=200, batch_tokens=budget)
        assert all(torch.equal(a.df, b.df) and torch.equal(a.reads, b.reads) for a, b in zip(got, want)), budget
    monkeypatch.setattr(smf, "model_dtype", lambda device: torch.bfloat16)
    alone = smf.background_stats(model, tok, texts, max_len=200, batch_tokens=1)
    together = smf.background_stats(model, tok, texts, max_len=200, batch_tokens=20 * total)
    for a, b in zip(alone, together):
        moved = (a.reads - b.reads).abs().sum().item() / 2
        assert moved <= 0.01 * a.reads.sum().item()


def test_background_stats_skip_the_head_and_the_layers_after_the_last_memory(tiny, monkeypatch):
    model, tok = load(tiny)
    smf.add_memory(model, smf.MemoryConfig(**{**vars(TINY_MEM), "layers": (0,)}))
    ran = []
    model.model.layers[1].register_forward_hook(lambda *a: ran.append("layer 1"))
    model.lm_head.register_forward_hook(lambda *a: ran.append("head"))
    smf.background_stats(model, tok, ["a b c", "the patient nerve blood"])
    assert ran == [] and all(b.memory.read_gate is None for b in smf.memory_blocks(model))


def test_training_sequences_are_the_texts_cut_at_max_len(tiny):
    """The first step's loss equals a naive one: each text tokenized alone, cut at max_len, no EOS, no pads."""
    model, tok = load(tiny)
    reference, _ = load(tiny)
    smf.prepare_model(model, "full")
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")][:16]
    inputs = []
    model.model.register_forward_pre_hook(lambda m, a, kw: inputs.append((kw["input_ids"], kw["attention_mask"])),
                                          with_kwargs=True)
    hist = train_texts(model, tok, texts, smf.TrainConfig(method="full", max_len=20, warmup=0, max_steps=1,
                                                        micro_batch=4, grad_accum=4, forward_tokens=1))
    assert len(inputs) == 4                                                  # one forward per micro-batch
    seqs = [tok(t)["input_ids"][:20] for t in texts]
    assert sorted(ids[m.bool()].tolist() for batch, mask in inputs for ids, m in zip(batch, mask)) == sorted(seqs)
    nll = sum(F.cross_entropy(logits(reference, torch.tensor([s]))[0, :-1], torch.tensor(s[1:]), reduction="sum")
              for s in seqs)
    assert hist[0]["loss"] == pytest.approx(nll.item() / sum(len(s) - 1 for s in seqs), rel=1e-5)
    assert all(s[-1] != tok.eos_token_id for s in seqs) and max(map(len, seqs)) == 20
    assert sum(len(tok(t)["input_ids"]) > 20 for t in texts) >= 8                 # most texts really were cut


@pytest.mark.parametrize("method", ["full", "smf"])
def test_clipping_moves_the_weights_by_exactly_the_clip(tiny, method):
    model, tok = with_memory(tiny, "replacement") if method == "smf" else load(tiny)
    smf.prepare_model(model, method)
    before = [p.detach().clone() for p in model.parameters()]
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")]
    bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 8)) if method == "smf" else None
    cfg = smf.TrainConfig(method=method, optimizer="sgd", lr=1.0, clip=1e-3, warmup=0, max_steps=1, top_t=8)
    hist = train_texts(model, tok, texts, cfg, bg)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert step == pytest.approx(1e-3, rel=1e-3) and hist[0]["grad_norm"] > 1e-2      # the norm before clipping


def test_a_different_seed_gives_a_different_batch_order(tiny, tmp_path):
    first_loss = {}
    for k, seed in enumerate((1, 1, 2)):   # full finetuning of a dropout-free model: only the batch order depends on the seed
        out = tmp_path / f"run{k}"
        run(*train_args(tiny, out, "full", "--model", tiny["model"], "--max-steps", "1", "--seed", seed,
                        "--micro-batch", "2", "--grad-accum", "1"))
        loss = json.loads(open(out / "train_log.jsonl").readline())["loss"]
        assert first_loss.setdefault(seed, loss) == loss
    assert first_loss[1] != first_loss[2]


class Recorder(torch.nn.Module):
    """Wraps a model and records the position_ids and attention_mask of every call."""
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.config = model, [], model.config

        def forward(**kw):
            self.calls.append((kw.get("input_ids"), kw.get("position_ids"), kw.get("attention_mask")))
            return model(**kw)
        self.forward = functools.wraps(model.forward)(forward)          # keeps the signature (the cache's name)

    def check_positions(self):
        """Every real token sits at its position in its own unpadded sequence; no call lacks a mask."""
        for ids, pos, mask in self.calls:
            assert mask is not None and pos is not None
            expected = (mask.cumsum(-1) - 1)[:, -ids.shape[1]:]           # the inputs are the last tokens of mask
            real = mask[:, -ids.shape[1]:].bool()
            assert torch.equal(pos[real], expected[real])


@pytest.mark.parametrize("letter_only", [False, True])
def test_medmcqa_scores_equal_a_naive_computation(tiny, letter_only):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    rng = random.Random(1)                   # a tokenizer with " A".." D" as single tokens: the options'
    tok = toy_tokenizer([sentence(rng, 40) for _ in range(300)] + ["Answer: A. B. C. D."] * 50, 400)
    torch.manual_seed(0)                     # first tokens differ, as with Qwen's tokenizer
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         initializer_range=0.2)).eval()
    rows = smf.load_medmcqa(tiny["medmcqa"], limit=7)
    recorder = Recorder(model)
    r = smf.eval_medmcqa(recorder, tok, rows, letter_only=letter_only, batch_size=3)
    recorder.check_positions()
    lengths = set()
    for row, scores in zip(rows, r["scores"]):
        prompt = tok(smf.medmcqa_prompt(row))["input_ids"]
        for option in range(4):   # unbatched, uncached, unpadded: one forward of prompt + answer
            ids = tok(smf.medmcqa_prompt(row) + smf.medmcqa_answer(row, option, letter_only))["input_ids"]
            lp = logits(model, torch.tensor([ids]))[0].log_softmax(-1)
            mean = sum(lp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))) / (len(ids) - len(prompt))
            assert scores[option] == pytest.approx(mean, abs=1e-4)
            lengths.add(len(ids) - len(prompt))
    assert len(lengths) > (0 if letter_only else 2)                  # options of different lengths
    firsts = {tok(smf.medmcqa_answer(rows[0], option, letter_only))["input_ids"][0] for option in range(4)}
    assert len(firsts) == 4                                          # their first tokens differ too
    assert r["predictions"] == [max(range(4), key=s.__getitem__) for s in r["scores"]]


def naive_greedy(model, tok, prompt, max_new_tokens, penalty, eos):
    """The reference: a full forward of prompt + answer so far per new token, no cache, no batch; HF's
    repetition penalty over the tokens of the row written out here."""
    ids, new = tok(prompt)["input_ids"], []
    for _ in range(max_new_tokens):
        lg = logits(model, torch.tensor([ids + new]))[0, -1]
        seen = torch.tensor(sorted(set(ids + new)))
        lg[seen] = torch.where(lg[seen] > 0, lg[seen] / penalty, lg[seen] * penalty)
        nxt = lg.argmax().item()
        if nxt == eos:
            break
        new.append(nxt)
    return new


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_equals_an_uncached_loop(tiny, penalty):
    model, tok = load(tiny)
    qa = smf.load_triviaqa(tiny["triviaqa"], limit=12)
    prompts = [f"Question: {q}\nAnswer:" for q, _ in qa] + ["Question: a?\nAnswer:", "Question: b c d?\nAnswer:"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 3                # mixed prompt lengths
    free = [naive_greedy(model, tok, p, 10, penalty, eos=None) for p in prompts]
    # an EOS that some rows reach mid-generation and others never: a token some generations hold after their start
    counts = {t: sum(t in g[1:] for g in free) for g in free for t in g[1:]}
    stop = next(t for t, n in sorted(counts.items()) if 0 < n < len(prompts) and t != tok.pad_token_id)

    class StopsAt:                                                             # the tokenizer, with `stop` as EOS
        pad_token_id, eos_token_id = tok.pad_token_id, stop
        __call__, decode = staticmethod(tok.__call__), staticmethod(tok.decode)
    expected = [tok.decode(naive_greedy(model, tok, p, 10, penalty, stop)) for p in prompts]
    assert sum(len(e) < len(tok.decode(f)) for e, f in zip(expected, free)) > 0  # EOS cut some rows short
    for batch_size in (1, 3, 8):
        assert smf.greedy_generate(model, StopsAt(), prompts, 10, penalty, batch_size) == expected


# ----------------------------------------------------------------------------------------------- runs a researcher
# can trust: every run right or refused, no checkpoint lost

SHORT = ["--max-steps", "2", "--limit-train", "16", "--lr", "1e-2"]


def test_smf_continues_from_an_smf_checkpoint_and_memory_is_never_nested(tiny, tmp_path, capsys):
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT))
    first = run(*train_args(tiny, tmp_path / "s1", "smf", "--model", tmp_path / "r", "--top-t", "4", *SHORT))
    second = run(*train_args(tiny, tmp_path / "s2", "smf", "--model", tmp_path / "s1", "--top-t", "4", *SHORT,
                             "--seed", "5"))
    assert len(smf.memory_blocks(second)) == 2 and all(not smf.memory_blocks(b.memory) for b in smf.memory_blocks(second))
    meta = smf.checkpoint_meta(str(tmp_path / "s2"))
    assert meta["kind"] == "smf" and meta["parent"] == "../s1"
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9, 7]])
    loaded, _ = smf.load_model(str(tmp_path / "s2"))
    assert torch.equal(logits(loaded, ids), logits(second.eval(), ids))
    assert not torch.equal(logits(loaded, ids), logits(first.eval(), ids))
    assert "already has memory" in error_of(capsys, *train_args(tiny, tmp_path / "x", "retrofit", "--model", tmp_path / "s1"))
    assert "already has memory" in error_of(capsys, *train_args(tiny, tmp_path / "x", "full", "--model", tmp_path / "r"))


def test_config_records_what_was_run_and_a_changed_parent_is_refused(tiny, tmp_path, capsys):
    run(*train_args(tiny, tmp_path / "r", "retrofit", "--limit-train", "16"))
    run(*train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--top-t", "4", "--limit-train", "16"))
    run(*train_args(tiny, tmp_path / "l", "lora", "--model", tiny["model"], "--limit-train", "16", "--epochs", "1"))
    retrofit, smf_meta, lora = (smf.checkpoint_meta(str(tmp_path / n)) for n in "rsl")
    assert (retrofit["train"]["lr"], retrofit["train"]["epochs"], retrofit["train"]["total_steps"]) == (5e-4, 2, 2)
    assert (smf_meta["train"]["lr"], smf_meta["train"]["epochs"], smf_meta["train"]["total_steps"]) == (5e-4, 3, 3)
    assert (lora["train"]["lr"], lora["train"]["epochs"], lora["train"]["total_steps"]) == (2e-4, 1, 1)
    assert lora["train"]["warmup"] == 0 and "selector" not in lora["train"] and "top_t" not in lora["train"]
    assert "lora_r" not in smf_meta["train"] and smf_meta["train"]["selector"] == "kl"
    stats = str(tmp_path / "r" / "background_stats.safetensors")     # made by the retrofit, shared by its SMF runs
    assert smf_meta["train"]["medmcqa"] == tiny["medmcqa"] and smf_meta["memory"] == retrofit["memory"]
    assert "background" not in smf_meta["train"] and "background_examples" not in smf_meta["train"]
    assert open(stats, "rb").read() == open(tmp_path / "s" / "background_stats.safetensors", "rb").read()
    assert retrofit["train"]["background"] == tiny["background"] and "medmcqa" not in retrofit["train"]
    assert set(lora["versions"]) == {"torch", "transformers"} and "background" not in lora["train"]
    files = sorted(glob.glob(str(tmp_path / "r" / "*.safetensors")))
    assert smf_meta["parent_fingerprint"] == {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
                                              for f in files}                  # the retrofit's own bytes, per file
    smf.load_model(str(tmp_path / "s"))
    import shutil
    shutil.copytree(tmp_path / "s", tmp_path / "other" / "s")           # a copy beside an unrelated folder that has
    shutil.copytree(tiny["model"], tmp_path / "other" / "r")            # its parent's relative name: the absolute
    smf.load_model(str(tmp_path / "other" / "s"))                       # parent, intact, is the one it loads onto
    os.rename(tmp_path / "r", tmp_path / "r_first")
    run(*train_args(tiny, tmp_path / "r", "retrofit", "--max-steps", "1", "--limit-train", "16", "--seed", "9"))
    err = error_of(capsys, "eval", "--model", tmp_path / "s", "--probe", "wikitext", "--wikitext", tiny["wikitext"])
    changed = f"error: the parent {tmp_path / 'r'} of {tmp_path / 's'} has other weights than it was trained from — restore it"
    assert err.startswith(changed)
    os.remove(tmp_path / "r_first" / "background_stats.safetensors")    # a file removed from the parent is a change
    os.rename(tmp_path / "r", tmp_path / "r_second")
    os.rename(tmp_path / "r_first", tmp_path / "r")
    err = error_of(capsys, "eval", "--model", tmp_path / "s", "--probe", "wikitext", "--wikitext", tiny["wikitext"])
    assert err.startswith(changed)


def test_every_output_is_checked_before_anything_loads_and_nothing_is_replaced(tiny, tmp_path, capsys, monkeypatch):
    """The output rule: each case is refused in one line, before any model loads, and nothing changes."""
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT))
    run(*train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--top-t", "4", *SHORT))
    (tmp_path / "mydata.jsonl").write_text(open(tiny["medmcqa"]).read())
    (tmp_path / "empty").mkdir()
    os.symlink(tiny["model"], tmp_path / "base")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")                 # a link to nothing is not a free name
    snapshot = lambda: {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    before = snapshot()
    monkeypatch.setattr(smf, "load_model", lambda *a, **kw: pytest.fail("a model loaded before the outputs were checked"))
    monkeypatch.setenv("HOME", str(tmp_path))
    t = lambda p: str(tmp_path / p)
    cases = [  # (command, what the one-line error says)
        (train_args(tiny, t("r"), "smf", "--model", t("r"), "--top-t", "4"), f"--out {t('r')} exists — choose a new folder"),
        (train_args(tiny, t("base"), "lora", "--model", t("base")), f"--out {t('base')} exists"),
        (train_args(tiny, t("s"), "lora"), "exists — choose a new folder (a checkpoint is never replaced"),
        (train_args(tiny, str(tmp_path), "retrofit"), "exists — choose a new folder"),
        (train_args(tiny, t("mydata.jsonl"), "lora", "--medmcqa", t("mydata.jsonl")), "mydata.jsonl exists"),
        (["eval", "--model", t("s"), "--out", t("r/weights.safetensors")],
         "exists — it is no JSON file (UnicodeDecodeError): damaged, or not smf's results — choose another file"),
        (["eval", "--model", t("s"), "--out", t("mydata.jsonl")], "exists — it is no JSON file (JSONDecodeError)"),
        (["eval", "--model", t("s"), "--out", t("empty")], f"--out {t('empty')} exists — it is no JSON file (IsADirectory"),
        (["eval", "--model", t("s"), "--out", t("mydata.jsonl/e.json")], "cannot be written"),
        (["eval", "--model", t("s"), "--out", "/proc/e.json"], "--out /proc/e.json cannot be written"),   # a root
        (train_args(tiny, t("dangling"), "lora"), f"--out {t('dangling')} exists — choose a new folder"),  # can't
        (["table", t("empty/x")], "holds no <row>/seed<S>/eval.json"),
        (["table", t("mydata.jsonl")], f"{t('mydata.jsonl')} holds no <row>/seed<S>/eval.json — run run_all.sh"),
    ]
    for argv, message in cases:
        assert message in error_of(capsys, *argv), argv
    monkeypatch.chdir(tmp_path / "empty")
    assert "--out . exists" in error_of(capsys, *train_args(tiny, ".", "lora"))
    assert snapshot() == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_run_that_another_run_overtakes_never_replaces_its_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """Two runs into one --out: the one that finishes second fails at its swap and leaves
    the first one's checkpoint as it was, and no staging folder behind (no lock file is needed for that)."""
    out, real_train = tmp_path / "ckpt", smf.train
    def overtaken(*a, **kw):                                           # another run finishes while this one trains
        monkeypatch.setattr(smf, "train", real_train)
        run(*train_args(tiny, out, "lora", *SHORT))
        return real_train(*a, **kw)
    monkeypatch.setattr(smf, "train", overtaken)
    err = error_of(capsys, *train_args(tiny, out, "full", *SHORT))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert f"{out} was written by another run meanwhile" in err and smf.checkpoint_meta(str(out))["kind"] == "lora"
    assert os.listdir(tmp_path) == ["ckpt"] and sorted(first) == sorted(os.listdir(out))


def test_saved_files_have_normal_permissions_and_the_log_is_json(tiny, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a: clip(*a) * math.inf)  # an infinite norm
    run(*train_args(tiny, out, "retrofit", *SHORT))
    (tmp_path / "plain").write_text("")
    (tmp_path / "folder").mkdir()
    mode = os.stat(tmp_path / "plain").st_mode & 0o777
    for name in os.listdir(out):
        assert os.stat(out / name).st_mode & 0o777 == mode, name
    assert os.stat(out).st_mode & 0o777 == os.stat(tmp_path / "folder").st_mode & 0o777
    for line in open(out / "train_log.jsonl"):
        assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the log"))["grad_norm"] is None


def test_sources_are_checked_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(smf, "load_model", lambda *a, **kw: pytest.fail("a model loaded before the data was read"))
    err = error_of(capsys, *train_args(tiny, tmp_path / "l", "lora", "--medmcqa", tmp_path / "missing.jsonl"))
    assert f"{tmp_path / 'missing.jsonl'} is not a file" in err and not os.listdir(tmp_path)
    err = error_of(capsys, "eval", "--model", tiny["model"], "--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"],
                   "--triviaqa", tmp_path / "missing.jsonl")
    assert f"{tmp_path / 'missing.jsonl'} is not a file" in err


def test_an_eval_that_fails_writes_nothing_and_keeps_the_old_results(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e.json"
    flags = ["eval", "--model", tiny["model"], "--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"],
             "--triviaqa", tiny["triviaqa"], "--limit", "4", "--out", out]
    def broken(*a, **kw):
        raise RuntimeError("CUDA out of memory\nsecond line")
    monkeypatch.setattr(smf, "eval_triviaqa", broken)
    err = error_of(capsys, *flags)
    assert err == ("error: unexpected RuntimeError: CUDA out of memory second line — rerun with --debug for the "
                   "traceback")
    assert not out.exists()                                              # no half-written results
    monkeypatch.undo()
    run(*flags)
    before = out.read_bytes()
    monkeypatch.setattr(smf, "eval_triviaqa", broken)
    error_of(capsys, *flags)
    assert out.read_bytes() == before                                    # the old results stay whole


def test_table_and_run_all_refuse_what_they_cannot_use(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no <row>/seed<S>/eval.json" in error_of(capsys, "table", tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []
    for env, message in (({"ROWS": "base lora_typo"}, "unknown row 'lora_typo'"), ({"SEEDS": " "}, "SEEDS is empty"),
                         ({"GPUS": "banana"}, "error: GPUS=\"banana\": 'banana' is not a slot — give"),
                         ({"GPUS": "3"}, "'3' is not a slot")):
        p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                           env={**smoke_env(tiny, tmp_path / "res"), **env})
        assert p.returncode != 0 and message in p.stderr and not (tmp_path / "res").exists()


# ----------------------------------------------------------------------------------------------- the probes as the
# paper ran them, and a table whose deltas a reader can trust

EXACT_MATCH_CASES = [  # (generation, aliases, exact match)
    (" St. Louis", ["St. Louis"], True), (" Washington, D.C.", ["Washington, D.C."], True), (" 3.14", ["3.14"], True),
    (" 1,000", ["1000"], True), ("\nParis", ["Paris"], True), (" Paris. It is the capital of France.", ["Paris"], True),
    (" The Beatles.\nQuestion: next", ["beatles"], True), (" I do not know", ["no"], False),
    (" Beatles and more", ["beatles"], False), (" Paris, France", ["France"], False), (" ", ["a"], False),
    ("\n\n", ["x"], False), (" London", ["Paris"], False),
    (" Paris, Texas", ["Paris"], False), (" Paris, the capital", ["Paris"], False),   # a comma ends no answer
    (" St. Louis", ["St"], True), (" Paris! Yes", ["Paris"], True), (" Rome? or Paris", ["Rome"], True)]  # . ! ? do


@pytest.mark.parametrize("generation, aliases, expected", EXACT_MATCH_CASES)
def test_exact_match_gets_common_answers_right(generation, aliases, expected):
    assert smf.exact_match(generation, aliases) is expected


def test_generation_applies_the_models_repetition_penalty_as_generate_does(tiny):
    model, tok = load(tiny)
    qa = smf.load_triviaqa(tiny["triviaqa"], limit=8)
    prompts = [f"Question: {q}\nAnswer:" for q, _ in qa]
    model.generation_config.repetition_penalty = 1.3                    # as a generation_config.json would set it
    r = smf.eval_triviaqa(model, tok, qa, batch_size=3, max_new_tokens=32)
    assert r["protocol"].endswith("repetition penalty 1.3")
    for prompt, pred in zip(prompts, r["predictions"]):                   # HF generate, one question at a time
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert pred == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    plain = smf.eval_triviaqa(model, tok, qa, batch_size=3, repetition_penalty=1.0)   # the override: pure greedy
    assert plain["protocol"].endswith("repetition penalty 1") and plain["predictions"] != r["predictions"]


def write_eval(path, medmcqa=None, triviaqa=None, ppl=None):
    """An eval.json as `eval` writes it, from per-question correctness lists."""
    r = {"model": "m"}
    if medmcqa is not None:
        r["medmcqa"] = {"acc": sum(medmcqa[0]) / len(medmcqa[0]), "correct": medmcqa[0], "gold_nlls": medmcqa[1],
                        "gold_nll": sum(medmcqa[1]) / len(medmcqa[1])}
    if triviaqa is not None:
        r["triviaqa"] = {"alias_contains_acc": sum(triviaqa) / len(triviaqa), "alias_correct": triviaqa,
                         "exact_match": sum(triviaqa) / len(triviaqa), "exact_correct": triviaqa}
    if ppl is not None:
        r["wikitext"] = {"ppl": ppl}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump(r, open(path, "w"))


def test_table_shows_sample_std_paired_intervals_and_n_per_column(tmp_path, capsys):
    base = ([1, 0, 0, 1, 0], [1.0, 2.0, 2.0, 1.0, 3.0])
    write_eval(tmp_path / "base" / "seed0" / "eval.json", base, [1, 0, 1, 0], ppl=10.0)
    write_eval(tmp_path / "lora" / "seed0" / "eval.json", ([1, 1, 0, 1, 0], [0.5, 1.0, 2.0, 1.0, 2.5]), [1, 0, 0, 0],
               ppl=11.0)
    write_eval(tmp_path / "lora" / "seed1" / "eval.json", ([1, 1, 1, 1, 0], [0.5, 1.0, 1.0, 1.0, 2.5]), ppl=12.0)
    run("table", tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in open(tmp_path / "table.md").read().splitlines()[2:]}
    lora = rows["LoRA"]
    # MedMCQA acc: seeds 60 and 80 -> mean 70, sample std 14.14 (n - 1); per question d = mean(seeds) - base
    assert lora[0] == "70.00 ± 14.14 (n=2)"
    d = [100 * x for x in (0.0, 1.0, 0.5, 0.0, 0.0)]
    half = 1.96 * statistics.stdev(d) / math.sqrt(5)
    assert lora[1] == f"+30.00 [{30 - half:+.2f}, {30 + half:+.2f}]"
    assert lora[2] == "1.30 ± 0.14 (n=2)" and lora[3].startswith("-0.50 [")    # gold NLL: 1.4 and 1.2
    assert lora[4] == "11.50 ± 0.71 (n=2)" and lora[5] == "+1.50"       # WikiText: no interval
    assert lora[6] == "25.00 (n=1)"                                     # TriviaQA counted apart: one seed, no ±
    assert rows["Base"][0] == "40.00 (n=1)" and rows["Base"][1] == ""
    assert rows["SMF additive KL"][0] == "missing"


def test_smf_checkpoint_stores_every_changed_row_and_scale_checkpoints_their_alpha(tiny, tmp_path):
    before = {"v": torch.zeros(6, 3)}
    trained = {"v": torch.zeros(6, 3), "alpha": torch.tensor(0.5)}
    trained["v"][4, 1] = 5e-7                                          # a tiny move is still a change
    patch = smf.smf_patch(before, trained)
    assert patch["v.index"].tolist() == [4] and torch.equal(patch["v.rows"], trained["v"][[4]])
    assert torch.equal(patch["alpha"], trained["alpha"])
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 8, 9, 7]])
    trained = run(*train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--top-t", "4", "--train-scale",
                              "--lr", "1e-9", "--max-steps", "1", "--limit-train", "8"))
    loaded, retrofit = smf.load_model(str(tmp_path / "s"))[0], smf.load_model(str(tmp_path / "r"))[0]
    for a, b, c in zip(smf.memory_blocks(loaded), smf.memory_blocks(trained), smf.memory_blocks(retrofit)):
        assert torch.equal(a.memory.values, b.memory.values) and not torch.equal(b.memory.values, c.memory.values)
        assert a.alpha.item() == b.alpha.item() != c.alpha.item()       # the trained alpha, not the retrofit's
    assert torch.equal(logits(loaded, ids), logits(trained.eval(), ids))


def test_a_fresh_memory_has_the_documented_defaults(tiny):
    cfg = smf.MemoryConfig()
    assert (cfg.layers, cfg.mode, cfg.n_keys, cfg.heads, cfg.key_dim, cfg.topk, cfg.alpha_init) == \
        ((6, 12, 18), "additive", 128, 4, 256, 16, 0.01)
    mem = smf.ProductKeyMemory(896)
    assert mem.values.shape == (16384, 896) and mem.keys.shape == (4, 2, 128, 128) and mem.topk == 16
    assert mem.query.out_features == 4 * 256
    args = smf.build_parser().parse_args(["train", "--method", "retrofit", "--model", tiny["model"], "--out", "x"])
    smf.check_args(args)                                                # the CLI's defaults are the same
    assert (tuple(args.memory_layers), args.memory_n_keys, args.memory_alpha_init, args.top_t) == ((6, 12, 18), 128, 0.01, 512)
    model, _ = load(tiny)
    block = smf.add_memory(model, smf.MemoryConfig(layers=(1,), n_keys=8, heads=2, key_dim=16, topk=4))[0]
    assert block.alpha.item() == pytest.approx(0.01) and block.mlp is not None


def test_full_finetuning_trains_every_parameter_the_tied_embeddings_included(tiny):
    model, tok = load(tiny)
    assert model.lm_head.weight is model.model.embed_tokens.weight     # tied, as in Qwen2.5-0.5B
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    smf.prepare_model(model, "full")
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")]
    train_texts(model, tok, texts, smf.TrainConfig(method="full", lr=1e-3, warmup=0, max_steps=1))
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved and len(before) == len(list(model.parameters()))


def test_each_epoch_is_a_new_seeded_shuffle_of_every_example_once(tiny):
    """Each epoch covers every example once, in a new order and, over several chunks of steps, in new micro-batches
    (texts that compete for top_t rows together); the same seed gives the same epochs."""
    model, tok = load(tiny)
    texts = [f"text number {i} " + sentence(random.Random(i), i % 7 + 1) for i in range(21)]   # 21: a partial batch
    def epochs(seed):
        seen = []
        hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()),
                                                     with_kwargs=True)
        smf.prepare_model(model, "full")
        train_texts(model, tok, texts, smf.TrainConfig(method="full", lr=0.0, warmup=0, epochs=2, micro_batch=2,
                                                     grad_accum=2, seed=seed))
        hook.remove()
        assert len(seen) == 12                                          # a step a forward: its micro-batches in order
        steps = [[tok.decode([t for t in row if t != tok.pad_token_id]) for row in batch] for batch in seen]
        return steps[:6], steps[6:]                                     # ceil(21 / 4) = 6 steps an epoch
    def micro_batches(epoch):
        return {frozenset(step[i:i + 2]) for step in epoch for i in range(0, len(step), 2)}
    first, second = epochs(3)
    for epoch in (first, second):
        assert sorted(t for step in epoch for t in step) == sorted(texts)   # each example exactly once
    assert first != second and epochs(3) == (first, second) and epochs(4) != (first, second)
    # 21 texts make one chunk of 64 steps, sorted by length: the same micro-batches every epoch. A data set of
    # several chunks gets new micro-batches each epoch, as MedMCQA's 60,000 texts (59 chunks) do.
    lengths = [random.Random(i).randint(5, 400) for i in range(700)]
    batches = smf.step_batches(lengths, 4, seed=0)
    first, second = ([next(batches) for _ in range(175)] for _ in range(2))      # two epochs of 700 / 4 steps
    assert len(lengths) > 2 * 64 * 4 and sorted(sum(second, [])) == list(range(700))
    assert len(micro_batches(first) & micro_batches(second)) < 50                # of 350 micro-batches of 2


def test_wikitext_default_window_is_1024_with_stride_512(tiny):
    model, tok = load(tiny)
    text = " ".join(sentence(random.Random(5), 40) for _ in range(12))
    ids = tok(text)["input_ids"]
    assert 1600 < len(ids) < 2048
    starts = {}                                                         # token t is scored from its window's start
    for t in range(1, len(ids)):
        starts.setdefault(0 if t < 1024 else 512 * math.ceil((t - 1023) / 512), []).append(t)
    nll = 0.0
    for start, tokens in starts.items():
        lp = logits(model, torch.tensor([ids[start:max(tokens) + 1]]))[0].log_softmax(-1)
        nll -= sum(lp[t - 1 - start, ids[t]].item() for t in tokens)
    r = smf.eval_wikitext(model, tok, text)
    assert r["protocol"] == "token perplexity, window 1024, stride 512" and r["tokens"] == len(ids) - 1
    assert r["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


RANGE_CASES = {  # every option of the range table, by hand: (command, a value to refuse)
    "lr": "inf", "epochs": "nan", "lora_alpha": "-1", "repetition_penalty": "inf", "micro_batch": "0", "grad_accum": "0",
    "forward_tokens": "0", "loss_chunk": "0", "max_steps": "0", "limit_train": "0", "background_examples": "0", "lora_r": "0", "top_t": "0",
    "batch_size": "0", "limit": "0", "memory_n_keys": "0", "memory_heads": "0", "memory_topk": "0",
    "clip": "inf", "weight_decay": "inf", "warmup": "-1", "lora_dropout": "1", "max_len": "1", "memory_key_dim": "0"}


@pytest.mark.parametrize("name", sorted(RANGE_CASES))
def test_every_range_refuses_its_bad_value(name, capsys):
    command = "eval" if name in ("limit", "repetition_penalty", "batch_size") else "train"
    flag = "--" + name.replace("_", "-")
    err = error_of(capsys, command, f"{flag}={RANGE_CASES[name]}")
    assert err.startswith(f"error: {flag} ") and "is out of range — give a value" in err


def test_the_range_table_is_tested_whole():
    assert sorted(n for names, *_ in smf.RANGES for n in names.split()) == sorted(RANGE_CASES)


def test_a_flag_that_does_not_apply_is_refused_and_config_records_what_applied(tiny, tmp_path, capsys):
    """Rule 2 where it depends on the model: an SMF run from a retrofit takes its memory and statistics from it."""
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT))
    smf_args = train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--top-t", "4", *SHORT)
    for flags, message in ((["--background-examples", "3"], "--background-examples applies only to --method retrofit"),
                           (["--background", tiny["background"]], "--background applies only to --method retrofit"),
                           (["--memory-n-keys", "16"], "--memory-n-keys applies only to --method retrofit"),
                           (["--memory-mode", "replacement"], "--memory-mode applies only to --method retrofit"),
                           (["--limit", "3"], "unrecognized arguments: --limit")):
        assert message in error_of(capsys, *smf_args, *flags)
    assert not (tmp_path / "s").exists()
    run(*smf_args)
    recipe = smf.checkpoint_meta(str(tmp_path / "s"))["train"]
    assert "background_examples" not in recipe and "lora_r" not in recipe and recipe["top_t"] == 4


def test_checkpoints_find_their_parents_wherever_they_are_copied(tiny, tmp_path, monkeypatch):
    run(*train_args(tiny, tmp_path / "runs" / "r", "retrofit", *SHORT))
    run(*train_args(tiny, tmp_path / "runs" / "s", "smf", "--model", tmp_path / "runs" / "r", "--top-t", "4", *SHORT))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    expected = logits(smf.load_model(str(tmp_path / "runs" / "s"))[0], ids)
    import shutil
    shutil.copytree(tmp_path / "runs" / "s", tmp_path / "elsewhere" / "deep" / "s")      # copied alone
    assert torch.equal(logits(smf.load_model(str(tmp_path / "elsewhere" / "deep" / "s"))[0], ids), expected)
    monkeypatch.chdir(tmp_path / "runs")                                                  # from another folder
    assert torch.equal(logits(smf.load_model("s")[0], ids), expected)
    shutil.move(tmp_path / "runs", tmp_path / "moved")       # the chain moved together: the recorded
    monkeypatch.chdir(tmp_path / "elsewhere")                # absolute paths point nowhere now
    assert torch.equal(logits(smf.load_model(str(tmp_path / "moved" / "s"))[0], ids), expected)


def test_damaged_files_and_a_missing_tokenizer_are_named(tiny, tmp_path, capsys):
    ev = lambda model: error_of(capsys, "eval", "--model", model, "--probe", "wikitext", "--wikitext", tiny["wikitext"])
    import shutil
    shutil.copytree(tiny["model"], tmp_path / "notok")
    for name in os.listdir(tmp_path / "notok"):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(tmp_path / "notok" / name)
    assert f"{tmp_path / 'notok'} has no tokenizer (AutoTokenizer would guess one) — save" in ev(tmp_path / "notok")
    shutil.copytree(tiny["model"], tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights} is damaged" in ev(tmp_path / "cut")
    run(*train_args(tiny, tmp_path / "l", "lora", *SHORT))
    (tmp_path / "l" / "config.json").write_text('{"smf": {"kind": "lo')
    assert f"{tmp_path / 'l' / 'config.json'} could not be read (JSONDecodeError" in ev(tmp_path / "l")
    (tmp_path / "res" / "lora" / "seed0").mkdir(parents=True)
    (tmp_path / "res" / "lora" / "seed0" / "eval.json").write_text("{")
    err = error_of(capsys, "table", tmp_path / "res")
    assert f"{tmp_path / 'res' / 'lora' / 'seed0' / 'eval.json'} could not be read" in err
    assert not (tmp_path / "res" / "table.md").exists()


def test_pads_never_count_for_the_repetition_penalty(tiny):
    _, tok = load(tiny)
    prompts = ["Question: a?\nAnswer:", "Question: a much longer question than the first one?\nAnswer:"]
    used = {i for p in prompts for i in tok(p)["input_ids"]}
    pad, other = [i for i in range(3, len(tok)) if i not in used][:2]   # a plain token that pads, one beside it

    class PadsWith:                                                     # the tokenizer, padding with `pad`
        pad_token_id, eos_token_id = pad, tok.eos_token_id
        __call__, decode = staticmethod(tok.__call__), staticmethod(tok.decode)
    favoured = torch.zeros(len(tok))
    favoured[pad], favoured[other] = 5.0, 4.8                          # `pad` wins unless it is penalised
    model = fixed_logits_model(tiny, favoured)
    batched = smf.greedy_generate(model, PadsWith(), prompts, max_new_tokens=3, repetition_penalty=1.1)
    alone = [smf.greedy_generate(model, PadsWith(), [p], max_new_tokens=3, repetition_penalty=1.1)[0] for p in prompts]
    assert batched == alone and alone[0].startswith(tok.decode([pad]))


def test_figure_points_whiskers_labels_and_caption_map_back_to_the_results(tmp_path):
    import xml.etree.ElementTree as ET
    results = {  # folder: [(MedMCQA correct per question, TriviaQA correct per question, WikiText ppl) per seed]
        "base": [([1, 0, 0, 1, 0], [1, 0, 1, 0], 10.0)],
        "retrofit_additive": [([1, 0, 0, 1, 1], [1, 0, 1, 1], 10.5)],
        "smf_additive_kl": [([1, 1, 0, 1, 1], [1, 0, 0, 0], 10.2), ([1, 1, 1, 1, 1], [1, 1, 0, 0], 10.4)],
        "lora": [([1, 1, 1, 1, 0], [0, 0, 1, 0], 12.0)],
        "full": [([1, 1, 1, 1, 1], [1, 1, 1, 1], float("nan"))]}       # a diverged run's perplexity
    for folder, seeds in results.items():
        for s, (med, tqa, ppl) in enumerate(seeds):
            write_eval(tmp_path / folder / f"seed{s}" / "eval.json", (med, [1.0] * len(med)), tqa, ppl=ppl)
    run("table", tmp_path)
    svg = ET.parse(tmp_path / "figure.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    mean = lambda xs: sum(xs) / len(xs)
    def half_width(folder, i):  # paired 95% interval of the Δ vs Base, computed here from the questions
        row = [mean(q) for q in zip(*(seed[i] for seed in results[folder]))]
        d = [100 * (a - b) for a, b in zip(row, results["base"][0][i])]
        return 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    panels = svg.findall(f"{ns}g[@class='panel']")
    assert [p.get("data-x") for p in panels] == ["ppl", "alias_contains_acc"]
    for panel, i in zip(panels, (2, 1)):
        shown = ["base", "retrofit_additive", "smf_additive_kl", "lora"] + (["full"] if i == 1 else [])  # NaN: one panel
        a = {k: float(panel.get(f"data-{k}")) for k in ("x-lo", "x-hi", "y-lo", "y-hi", "left", "right", "top", "bottom")}
        px = lambda v: a["left"] + (v - a["x-lo"]) / (a["x-hi"] - a["x-lo"]) * (a["right"] - a["left"])
        py = lambda v: a["bottom"] - (v - a["y-lo"]) / (a["y-hi"] - a["y-lo"]) * (a["bottom"] - a["top"])
        points = {c.get("data-row"): (float(c.get("cx")), float(c.get("cy"))) for c in panel.iter(f"{ns}circle")}
        assert sorted(points) == sorted(shown)                           # the missing rows left out
        value = {}
        for folder in shown:
            x = mean([seed[i] if i == 2 else 100 * mean(seed[i]) for seed in results[folder]])
            y = mean([100 * mean(seed[0]) for seed in results[folder]])
            value[folder] = (x, y)
            assert abs(points[folder][0] - px(x)) < 1 and abs(points[folder][1] - py(y)) < 1, folder
        whiskers = {(l.get("class"), l.get("data-row")): l for l in panel.iter(f"{ns}line") if l.get("data-row")}
        for folder in shown[1:]:
            y_line, (x, y) = whiskers[("whisker-y", folder)], points[folder]
            h = half_width(folder, 0) * (py(0) - py(1))                  # cut at the frame
            assert abs(float(y_line.get("y1")) - min(y + h, a["bottom"])) < 1
            assert abs(float(y_line.get("y2")) - max(y - h, a["top"])) < 1
            if i == 1:   # TriviaQA has an interval; WikiText has none
                x_line, w = whiskers[("whisker-x", folder)], half_width(folder, 1) * (px(1) - px(0))
                assert abs(float(x_line.get("x1")) - max(x - w, a["left"])) < 1
                assert abs(float(x_line.get("x2")) - min(x + w, a["right"])) < 1
            else:
                assert ("whisker-x", folder) not in whiskers
        assert ("whisker-y", "base") not in whiskers                   # Base has no Δ against itself
        labels = {t.text: float(t.get("y")) for t in panel.iter(f"{ns}text") if t.get("class") == "label"}
        order = sorted(shown, key=lambda f: -value[f][1])               # labels top to bottom by accuracy
        names = smf.TABLE_ROWS
        assert [names[f] for f in order] == sorted(labels, key=labels.get)
    caption = " ".join(svg.find(f"{ns}text[@class='caption']").itertext())
    assert "Full finetuning (WikiText ppl NaN in 1 of 1 seeds)" in caption and "SMF replacement KL (no results)" in caption
    assert "2 seed(s)" in caption and "5 MedMCQA and 4 TriviaQA questions" in caption
    same = tmp_path / "same"                                             # points on top of each other
    for folder in ("base", "lora", "full", "smf_additive_kl"):
        write_eval(same / folder / "seed0" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 0], ppl=10.0)
    run("table", same)
    for panel in ET.parse(same / "figure.svg").getroot().findall(f"{ns}g[@class='panel']"):
        ys = sorted(float(t.get("y")) for t in panel.iter(f"{ns}text") if t.get("class") == "label")
        assert len(ys) == 4 and all(b - a >= 14 - 1e-6 for a, b in zip(ys, ys[1:]))  # never overlap
        assert ys[-1] <= float(panel.get("data-bottom")) + 4                  # and stay beside the panel
    low = tmp_path / "low"                                               # three points at the panel's bottom
    write_eval(low / "base" / "seed0" / "eval.json", ([1, 1], [1.0, 1.0]), [1, 0], ppl=10.0)
    for folder in ("lora", "full", "smf_additive_kl"):
        write_eval(low / folder / "seed0" / "eval.json", ([0, 0], [1.0, 1.0]), [1, 0], ppl=10.0)
    run("table", low)
    for panel in ET.parse(low / "figure.svg").getroot().findall(f"{ns}g[@class='panel']"):
        ys = sorted(float(t.get("y")) for t in panel.iter(f"{ns}text") if t.get("class") == "label")
        assert all(b - a >= 14 - 1e-6 for a, b in zip(ys, ys[1:])) and ys[-1] <= float(panel.get("data-bottom")) + 4
    only = tmp_path / "only"
    write_eval(only / "base" / "seed0" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 0], ppl=10.0)
    run("table", only)
    only_svg = ET.parse(only / "figure.svg").getroot()
    assert [len(list(p.iter(f"{ns}circle"))) for p in only_svg.findall(f"{ns}g[@class='panel']")] == [1, 1]


BAD_VALUES = [  # (row folder, seeds changed, probe, key, value, the cell's text, column index in table.md)
    ("full", [1], "wikitext", "ppl", float("nan"), "NaN in 1 of 2 seeds", 4),
    ("full", [0, 1], "wikitext", "ppl", float("nan"), "NaN in 2 of 2 seeds", 4),
    ("lora", [0], "wikitext", "ppl", float("inf"), "inf in 1 of 2 seeds", 4),
    ("lora", [0], "medmcqa", "acc", None, "null in 1 of 2 seeds", 0),
    ("lora", [1], "medmcqa", "acc", "0.3", "not a number in 1 of 2 seeds", 0),
    ("full", [0], "triviaqa", None, None, None, 6),                    # the probe missing in one seed
    ("lora", [0], "medmcqa", "acc", 55, "outside [0, 1] in 1 of 2 seeds", 0),     # a percentage, not a fraction
    ("full", [1], "wikitext", "ppl", -3.0, "outside [1, inf] in 1 of 2 seeds", 4),
    ("lora", [1], "medmcqa", "gold_nll", -0.5, "outside [0, inf] in 1 of 2 seeds", 2)]


@pytest.mark.parametrize("case", range(len(BAD_VALUES)))
def test_a_bad_value_costs_only_its_cell(tmp_path, case, capsys):
    import xml.etree.ElementTree as ET
    def write_all(root):
        for folder, shift in (("base", 0), ("lora", 1), ("full", 2)):
            for s in range(2):
                med = [(q + s + shift) % 3 == 0 for q in range(6)]
                write_eval(root / folder / f"seed{s}" / "eval.json", ([int(x) for x in med], [1.0 + q for q in range(6)]),
                           [int((q + shift) % 2 == 0) for q in range(6)], ppl=10.0 + shift + s)
    def cells(root):
        lines = open(root / "table.md").read().splitlines()
        return {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines if l.startswith("| ") and "---" not in l}
    write_all(tmp_path / "good")
    smf.main(["table", str(tmp_path / "good")])
    folder, seeds, probe, key, value, shown, column = BAD_VALUES[case]
    bad = tmp_path / "bad"
    write_all(bad)
    for s in seeds:
        path = bad / folder / f"seed{s}" / "eval.json"
        r = json.load(open(path))
        if key is None:
            del r[probe]
        else:
            r[probe][key] = value
        json.dump(r, open(path, "w"))
    smf.main(["table", str(bad)])                                        # exits 0: no SystemExit
    good, got = cells(tmp_path / "good"), cells(bad)
    name = {"lora": "LoRA", "full": "Full finetuning"}[folder]
    changed = {(name, column), (name, column + 1)} | ({(name, 7), (name, 8), (name, 9)} if key is None else set())
    for row in good:
        for i, cell in enumerate(good[row]):
            if (row, i) not in changed:
                assert got[row][i] == cell, (row, i)
    if shown:
        assert got[name][column] == shown and got[name][column + 1] == ""
        caption = " ".join(ET.parse(bad / "figure.svg").getroot().find("{http://www.w3.org/2000/svg}text[@class='caption']").itertext())
        assert key == "gold_nll" or (f"{name} (" in caption and shown in caption)     # the figure has no gold NLL
        assert f"{bad / folder / f'seed{seeds[-1]}' / 'eval.json'}: {probe}.{key} is" in capsys.readouterr().err  # named
    else:                                                                # counted over the seed that has it
        assert got[name][column].endswith("(n=1)") and got[name][column + 2].endswith("(n=1)")


def test_a_bad_base_value_leaves_no_delta_and_a_list_for_data_is_other_data(tmp_path, capsys):
    """A Base seed that cannot count leaves no Δ (not a Δ over the other seeds); a list where the data's
    fingerprint belongs is other data, not a crash; folders that are no seeds stay out; the caption gives the
    range of seeds behind the points."""
    import xml.etree.ElementTree as ET
    for s in range(2):
        write_eval(tmp_path / "base" / f"seed{s}" / "eval.json", ([1, 0, 0, 1], [1.0] * 4), [1, 0, 1, 0], ppl=10.0 + s)
    write_eval(tmp_path / "lora" / "seed0" / "eval.json", ([1, 1, 0, 1], [1.0] * 4), [1, 0, 0, 0], ppl=12.0)
    for folder in ("seed_3", "Seed4", "seed 5"):
        write_eval(tmp_path / "lora" / folder / "eval.json", ([0] * 4, [1.0] * 4), [0] * 4, ppl=99.0)
    r = json.load(open(tmp_path / "base" / "seed1" / "eval.json"))
    r["wikitext"]["ppl"] = float("nan")
    json.dump(r, open(tmp_path / "base" / "seed1" / "eval.json", "w"))
    r = json.load(open(tmp_path / "lora" / "seed0" / "eval.json"))
    r["medmcqa"]["data"] = ["not", "a", "fingerprint"]
    json.dump(r, open(tmp_path / "lora" / "seed0" / "eval.json", "w"))
    run("table", tmp_path)
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "table.md") if l.startswith("| ")}
    assert rows["Base"][4] == "NaN in 1 of 2 seeds" and rows["LoRA"][4] == "12.00 (n=1)" and rows["LoRA"][5] == "Base has NaN"
    assert rows["LoRA"][1] == rows["LoRA"][3] == "scored on other data or protocol than Base"
    assert rows["LoRA"][7].startswith("-25.00 [")                         # TriviaQA is the same data
    err = capsys.readouterr().err
    assert all(f"{tmp_path / 'lora' / folder / 'eval.json'} is not in a seed<integer> folder" in err
               for folder in ("seed_3", "Seed4", "seed 5"))
    caption = " ".join(ET.parse(tmp_path / "figure.svg").getroot().find("{http://www.w3.org/2000/svg}text[@class='caption']").itertext())
    assert "mean over 1–2 seed(s)" in caption


def test_ticks_of_values_closer_than_a_hundredth_read_apart(tmp_path):
    import xml.etree.ElementTree as ET
    for folder, ppl in (("base", 396.73001), ("lora", 396.73005)):
        write_eval(tmp_path / folder / "seed0" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 0], ppl=ppl)
    run("table", tmp_path)
    panel = ET.parse(tmp_path / "figure.svg").getroot().find("{http://www.w3.org/2000/svg}g[@data-x='ppl']")
    ticks = [t.text for t in panel.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "tick-x"]
    assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
    assert all(abs(float(t) - 396.73) < 0.01 for t in ticks)


def figure_layouts(root):
    """Results folders for the figure's hard layouts: {name: folder}."""
    rng = random.Random(0)
    def seeds(folder, n_seeds, acc, tqa, ppl, n=50):
        for s in range(n_seeds):
            med = [int(rng.random() < acc) for _ in range(n)]
            write_eval(root / name / folder / f"seed{s}" / "eval.json", (med, [1.0] * n),
                       [int(rng.random() < tqa) for _ in range(n)], ppl=ppl + rng.random())
    name = "eleven"   # every row, 3 seeds, one row's whiskers reaching past 0 and 100 %
    for k, folder in enumerate(smf.TABLE_ROWS):
        seeds(folder, 3, 0.25 + 0.04 * k if folder != "full" else 0.98, 0.3 - 0.02 * k if folder != "lora" else 0.02, 15 + k)
    name = "two"
    seeds("base", 1, 0.3, 0.4, 15.2)
    seeds("lora", 1, 0.35, 0.35, 16.9)
    name = "one_value"  # every point shares one value
    for folder in ("base", "lora", "full"):
        for s in range(2):
            write_eval(root / name / folder / f"seed{s}" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 1], ppl=12.0)
    return {n: root / n for n in ("eleven", "two", "one_value")}


def test_figure_ticks_are_round_accuracy_stays_in_0_to_100_and_text_stays_in_the_image(tmp_path):
    import xml.etree.ElementTree as ET
    ns = "{http://www.w3.org/2000/svg}"
    for name, folder in figure_layouts(tmp_path).items():
        run("table", folder)
        svg = ET.parse(folder / "figure.svg").getroot()
        width, height = float(svg.get("width")), float(svg.get("height"))
        for panel in svg.findall(f"{ns}g[@class='panel']"):
            for axis in ("x", "y"):
                lo, hi = float(panel.get(f"data-{axis}-lo")), float(panel.get(f"data-{axis}-hi"))
                ticks = [float(t.text) for t in panel.iter(f"{ns}text") if t.get("class") == f"tick-{axis}"]
                assert len(ticks) >= 2, (name, axis)
                step = ticks[1] - ticks[0]
                mantissa = step / 10 ** math.floor(math.log10(step))
                assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5)), (name, axis, ticks)
                assert all(abs(t / step - round(t / step)) < 1e-6 for t in ticks), (name, axis, ticks)  # round values
                assert all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks), (name, axis, ticks, lo, hi)
                if axis == "y" or panel.get("data-x") != "ppl":          # accuracies
                    assert 0 <= lo and hi <= 100
        for text in svg.iter(f"{ns}text"):                              # every label and caption line in the image
            size = float(text.get("font-size", 12))
            for span in list(text.iter(f"{ns}tspan")) or [text]:
                content = "".join(span.itertext()) if span is not text or not list(text) else ""
                if not content or text.get("transform"):
                    continue
                w, x = len(content) * size * 0.6, float(span.get("x", text.get("x")))
                x0 = {"middle": x - w / 2, "end": x - w}.get(text.get("text-anchor"), x)
                assert 0 <= x0 and x0 + w <= width, (name, content)
            y = float(text.get("y")) + sum(float(t.get("dy", 0)) for t in text.iter(f"{ns}tspan"))
            assert 0 < y <= height, (name, "".join(text.itertext()))


def test_a_changed_plain_parent_is_refused_and_an_identical_copy_loads(tiny, tmp_path, capsys):
    import shutil
    shutil.copytree(tiny["model"], tmp_path / "a" / "base")
    run(*train_args(tiny, tmp_path / "a" / "lora", "lora", "--model", tmp_path / "a" / "base", *SHORT))
    ids = torch.tensor([[3, 14, 15, 92]])
    before = logits(smf.load_model(str(tmp_path / "a" / "lora"))[0], ids)
    shutil.copytree(tmp_path / "a", tmp_path / "b")                      # both moved together, byte-identical
    shutil.rmtree(tmp_path / "a")
    assert torch.equal(logits(smf.load_model(str(tmp_path / "b" / "lora"))[0], ids), before)
    model, tok = smf.load_model(str(tmp_path / "b" / "base"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "b" / "base")                       # the base saved again, other weights
    err = error_of(capsys, "eval", "--model", tmp_path / "b" / "lora", "--probe", "wikitext", "--wikitext", tiny["wikitext"])
    assert f"the parent {tmp_path / 'b' / 'base'} of" in err and "has other weights" in err    # normalised


def test_train_refuses_up_front_what_training_would_refuse(tiny, tmp_path, capsys):
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT, "--memory-mode", "replacement"))
    err = error_of(capsys, *train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--train-scale"))
    assert "--train-scale needs additive memory" in err and not os.path.exists(tmp_path / "s")
    os.remove(tmp_path / "r" / "background_stats.safetensors")
    err = error_of(capsys, *train_args(tiny, tmp_path / "s", "smf", "--model", tmp_path / "r", "--top-t", "4"))
    assert f"{tmp_path / 'r' / 'background_stats.safetensors'} is missing" in err


def test_sigterm_cleans_up_as_ctrl_c_does(tiny, tmp_path):
    import signal, time
    args = train_args(tiny, tmp_path / "ck", "lora", "--limit-train", "16", "--lr", "1e-2", "--epochs", "100000")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    warnings = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]   # a deprecated call fails the run
    p = subprocess.Popen([sys.executable, *warnings, os.path.join(HERE, "smf.py"), *map(str, args), "--max-steps",
                          "100000"], env=env, stderr=subprocess.PIPE, text=True)
    while not [f for f in tmp_path.rglob("train_log.jsonl") if ".tmp" in str(f) and f.stat().st_size]:
        assert p.poll() is None
        time.sleep(0.2)                                                  # waits for training to be under way
    p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    assert p.wait() == 130 and "interrupted" in err and "Warning" not in err
    assert os.listdir(tmp_path) == []                                    # no staging folder left


def test_run_all_takes_no_unknown_argument_and_explains_its_settings(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}   # whichever python is on PATH
    for args in (["--lst"], ["-x"], ["--list", "extra"]):
        p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), *args], capture_output=True, text=True, env=env)
        assert p.returncode == 2 and "error: unknown argument" in p.stderr and not (tmp_path / "out").exists()
    for flag in ("--help", "-h"):
        p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), flag], capture_output=True, text=True, env=env)
        assert p.returncode == 0 and "MODEL=" in p.stdout and "GPUS=" in p.stdout and not (tmp_path / "out").exists()
    assert "BASH_VERSION" not in p.stdout and "CPU_THREADS" not in p.stdout                 # settings only
    for bad, message in (({"SEEDS": "0,1"}, "SEEDS=\"0,1\": '0,1' is not a seed"), ({"SEEDS": "a"}, "'a' is not a seed"),
                         ({"SEEDS": "01 1"}, 'SEEDS="01 1" names seed 1 twice'), ({"SEEDS": "1 ٣"}, "'٣' is not a seed"),
                         ({"MAX_STEPS": "abc"}, "MAX_STEPS=abc is not a positive integer"),
                         ({"FORWARD_TOKENS": "0"}, "FORWARD_TOKENS=0 is not a positive integer"),
                         ({"PYTHON": "false"}, "PYTHON=false cannot import torch"),
                         ({"OUT": str(tmp_path / "f")}, f"OUT={tmp_path / 'f'} is a file")):
        (tmp_path / "f").write_text("")
        p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True, env={**env, **bad})
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    p = subprocess.run(["sh", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr == "error: run_all.sh needs bash — run it with: bash run_all.sh\n"
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env={**env, "SEEDS": "1", "STAGE": "smf_additive_kl/seed0"})   # any stage, whatever SEEDS says
    assert p.returncode == 2 and "needs retrofit_additive/seed0, which has not finished" in p.stderr
    listed = subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "--list"], capture_output=True, text=True,
                            env={**env, "SEEDS": "01 2", "ROWS": "base"}).stdout.split()
    assert listed == ["base/seed1", "base/seed2"]                                           # 01 is seed 1
    if not torch.cuda.is_available():                                   # an example that fits this machine
        p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                           env={**env, "GPUS": "0"})
        assert p.returncode == 2 and 'GPUS="cpu" (this torch sees no GPU)' in p.stderr


def test_run_all_records_every_setting_a_stage_gets(tiny, tmp_path, fake_python):
    """Every variable run_stage passes to smf.py is in the stage's recorded settings (the device as its
    PRECISION), but the folder and the interpreter; a rerun with only MODEL changed is refused."""
    source = open(os.path.join(HERE, "run_all.sh")).read()
    stage = source[source.index("run_stage() {"):source.index("# start STAGE SLOT")]
    passed = set(re.findall(r"\$\{?([A-Z_]+)", stage)) - {"OUT", "SMF", "PYTHON", "DEVICE"}
    recorded = source[source.index("settings() {"):source.index("# check_settings STAGE")]
    assert passed and all(name in recorded for name in passed), passed
    questions = tmp_path / "triviaqa.jsonl"
    questions.write_text(open(tiny["triviaqa"]).read())
    import fcntl, shutil
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    env = {**smoke_env(tiny, tmp_path / "res"), **fake_python[0], "STAGE": "base/seed01", "TRIVIAQA": str(questions),
           "MODEL": str(model)}
    assert run_all(env).returncode == 0 and fake_python[1]()[0][0] == "eval"                 # base/seed1 finished
    moved = run_all({**env, "MODEL": tiny["model"]})                       # the same weights elsewhere: the same model
    assert moved.returncode == 0 and "skip  base seed 1 (finished)" in moved.stdout, moved.stderr
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                          # the base model changed in place
    weights.write_bytes(bytes(data))
    changed = run_all({**env, "STAGE": "base/seed1"})
    assert changed.returncode == 2 and "start" not in changed.stdout and "was made with MODEL=weights sha256" in changed.stderr
    with open(tmp_path / "res" / ".run_all.lock", "a") as held:            # a run of every stage into the same OUT
        fcntl.flock(held, fcntl.LOCK_EX)
        beside = run_all({**env, "STAGE": "lora/seed1"})
    assert beside.returncode == 2 and "another run_all.sh is running every stage into" in beside.stderr
    shutil.copy(os.path.join(tiny["model"], "model.safetensors"), weights)     # restored: only the data change below
    before = hashlib.sha256(questions.read_bytes()).hexdigest()[:16]
    questions.write_text("".join(open(tiny["triviaqa"]).readlines()[::-1]))   # other questions, in place
    changed = run_all(env)
    assert changed.returncode == 2 and "start" not in changed.stdout
    assert f"was made with TRIVIAQA=sha256 {before}, {questions.stat().st_size} bytes" in changed.stderr
    (tmp_path / "res" / "base" / "seed1" / "eval.json").write_text('{"medmcqa": ')   # damaged, as by a full disk
    damaged = run_all({**env, "TRIVIAQA": tiny["triviaqa"]})
    assert damaged.returncode == 2 and "start" not in damaged.stdout and damaged.stderr == (
        f"error: {tmp_path / 'res' / 'base' / 'seed1' / 'eval.json'} is damaged (not JSON) — delete it: run_all.sh "
        "then evaluates that stage again\n")


def test_run_all_compares_the_precision_and_only_records_the_budgets(tiny, tmp_path, fake_python):
    """settings.txt names the precision (fp32 on a CPU, bf16 on a GPU), FORWARD_TOKENS and EVAL_BATCH; a rerun
    on a GPU is refused, one with other budgets (speed and memory) is not; GPUS mixing cpu and GPUs is refused."""
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0], "ROWS": "lora", "FORWARD_TOKENS": "512", "EVAL_BATCH": "4"}
    assert run_all(env).returncode == 0
    settings = (out / "lora" / "seed1" / "settings.txt").read_text().splitlines()
    assert settings[1] == "PRECISION=fp32 (cpu)"
    assert settings[-4:] == ["# recorded, not compared", "FORWARD_TOKENS=512", "LOSS_CHUNK=1024", "EVAL_BATCH=4"]
    budgets = run_all({**env, "FORWARD_TOKENS": "4096", "LOSS_CHUNK": "64", "EVAL_BATCH": "16"})
    assert budgets.returncode == 0 and "skip  lora seed 1 (finished)" in budgets.stdout, budgets.stderr
    gpu = run_all({**env, "DEVICE": "cuda"})
    assert gpu.returncode == 2 and "start" not in gpu.stdout
    assert "was made with PRECISION=fp32 (cpu); this run has PRECISION=bf16 autocast (cuda)" in gpu.stderr
    for gpus in ("0 cpu", "cpu 1"):
        mixed = run_all({**env, "GPUS": gpus})
        assert mixed.returncode == 2 and "mixes cpu and GPU slots" in mixed.stderr, mixed.stderr


def test_smf_imports_where_fcntl_does_not_exist():
    """fcntl (POSIX only) is imported where eval takes its lock, so `import smf` works on Windows too."""
    code = "import sys; sys.modules['fcntl'] = None; import smf; print(smf.ProductKeyMemory.__name__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "ProductKeyMemory\n", p.stderr


def test_triviaqa_per_question_results_belong_to_their_questions(tiny):
    """Aliases made from each question's own generation: the per-question lists must say contained for
    every question and exact only where the alias is the whole answer, in the questions' order."""
    model, tok = load(tiny)
    qa = smf.load_triviaqa(tiny["triviaqa"], limit=8)
    alone = [smf.eval_triviaqa(model, tok, [row], max_new_tokens=6)["predictions"][0] for row in qa]
    words = [p.split() for p in alone]
    assert all(words) and len({w[0] for w in words}) > 1
    rows = [(q, [w[0]] if i % 2 else [" ".join(w)]) for i, ((q, _), w) in enumerate(zip(qa, words))]
    r = smf.eval_triviaqa(model, tok, rows, batch_size=3, max_new_tokens=6)
    assert r["predictions"] == alone and r["alias_correct"] == [1] * 8
    assert r["exact_correct"] == [int(i % 2 == 0 or len(w) == 1) for i, w in enumerate(words)]
    assert r["alias_contains_acc"] == 1 and r["exact_match"] == statistics.mean(r["exact_correct"])


# ----------------------------------------------------------------------------------------------- the file as a teaching
# reference: every method-block definition lifts out with the imports and what its docs name

def method_block():
    """(imports source, {name: (source, used module-level names, named in its docs)}) for each top-level definition
    above the Data files banner. Used names come from the source itself: symtable for what a body reads (a local
    that shadows a module name is not a use), ast for what runs at definition (decorators, defaults, annotations)."""
    import ast, builtins, symtable
    source = open(smf.__file__).read()
    lines = source.splitlines()
    end = source[:source.index("\n# Data files")].count("\n") + 1
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    imported = {(a.asname or a.name).split(".")[0] for n in imports for a in n.names}
    top_names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    top_names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    tables = {t.get_name(): t for t in symtable.symtable(source, "smf.py", "exec").get_children()}

    def body_reads(table):
        names = {s.get_name() for s in table.get_symbols() if s.is_referenced() and s.is_global()}
        if table.get_type() == "class":                        # a class body reads unassigned names from the module
            names |= {s.get_name() for s in table.get_symbols() if s.is_referenced() and not s.is_assigned()}
        return names.union(*map(body_reads, table.get_children()))

    pieces = {}
    for node in tree.body:
        if node.lineno > end or not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[first - 1:node.end_lineno])
        if isinstance(node, ast.Assign):
            name, used = node.targets[0].id, {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            docs = lines[node.lineno - 1]                       # a constant names its needs in its comment
        else:
            at_definition = [*getattr(node, "decorator_list", []), *getattr(node, "bases", [])]
            if isinstance(node, ast.FunctionDef):
                a = node.args
                at_definition += [*a.defaults, *a.kw_defaults, *[x.annotation for x in a.args if x.annotation]]
            name = node.name
            used = body_reads(tables[name]) | {n.id for x in at_definition for n in ast.walk(x) if isinstance(n, ast.Name)}
            docs = ast.get_docstring(node) or ""
        named = set(re.findall(r"\w+", m.group(1))) if (m := re.search(r"Needs:\s*([\w,\s]+)", docs)) else set()
        used = (used & top_names) - imported - {name} - set(dir(builtins))
        pieces[name] = (text, used, named)
    return "\n".join(ast.get_source_segment(source, n) for n in imports), pieces


def test_every_method_definition_lifts_out_with_what_its_docs_name():
    """Each definition of the method block, pasted into a fresh namespace with the file's imports and the
    definitions its `Needs:` names (followed through their own `Needs:`), defines without error and finds every
    module-level name it reads. The module docstring and the README list exactly those that need nothing."""
    imports, pieces = method_block()
    assert len(pieces) > 40
    for name, (_, used, named) in pieces.items():
        assert used <= named, f"{name} uses {sorted(used - named)}, which its docs do not name after Needs:"
        assert named <= set(pieces), f"{name} names {sorted(named - set(pieces))}: not in the method block"
    for name in pieces:
        closure, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in closure:
                closure.add(n)
                todo += pieces[n][2]
        namespace = {}
        exec(imports, namespace)
        for n in pieces:                                         # in file order, as a reader pastes them
            if n in closure:
                exec(pieces[n][0], namespace)
        missing = set().union(*(pieces[n][1] for n in closure)) - set(namespace)
        assert not missing, f"{name} pasted with what its docs name lacks {sorted(missing)}"
    alone = sorted(n for n, (_, used, _) in pieces.items() if not used)
    assert "without `Needs:` needs nothing more" in " ".join(smf.__doc__.split())   # the module docstring's rule holds:
    assert alone == sorted(n for n, (_, _, named) in pieces.items() if not named)
    readme = open(os.path.join(HERE, "README.md")).read()
    listed = re.search(r"lift out with the\s+file's imports alone:\s*(.*?)\.\n", readme, re.S).group(1)
    assert sorted(re.findall(r"`(\w+)`", listed)) == alone


def test_the_papers_to_code_table_names_definitions_that_exist():
    readme = open(os.path.join(HERE, "README.md")).read()
    table = readme.split("## From the papers to the code")[1].split("\n## ")[0]
    rows = [line.split("|")[3] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [n for cell in rows for n in re.findall(r"`([\w.]+)`", cell)]
    assert len(rows) >= 14 and len(names) >= 20
    for name in names:
        obj = smf
        for part in name.split("."):
            obj = getattr(obj, part)                                     # AttributeError names what is missing


@pytest.mark.parametrize("method", ["retrofit", "smf", "lora", "full"])
def test_the_gpus_bf16_path_trains_every_method_on_a_cpu(tiny, method, monkeypatch):
    """The dtype policy a GPU gets, switched on on the CPU: frozen weights stored in bf16 except each memory's query
    and keys, trainable ones fp32, the forward under bf16 autocast; one step's loss is finite."""
    monkeypatch.setattr(smf, "model_dtype", lambda device: torch.bfloat16)
    model, tok = with_memory(tiny) if method == "smf" else load(tiny)
    bg = smf.background_stats(model, tok, smf.load_background(tiny["background"], 8)) if method == "smf" else None
    smf.prepare_model(model, method, TINY_MEM, (4, 8.0, 0.05))
    lookup = {n for n, _ in model.named_parameters() if n.endswith(("memory.keys", "memory.query.weight", "query.bias"))}
    assert len(lookup) == (6 if method in ("smf", "retrofit") else 0)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad or name in lookup else torch.bfloat16), name
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    texts = [smf.medmcqa_text(r) for r in smf.load_medmcqa(tiny["medmcqa"], "train")]
    hist = train_texts(model, tok, texts, smf.TrainConfig(method=method, max_steps=1, warmup=0, top_t=6), bg)
    assert math.isfinite(hist[0]["loss"]) and hist[0]["grad_norm"] > 0 and seen and set(seen) == {torch.bfloat16}


def test_the_gpus_bf16_path_runs_every_probe_on_a_cpu(tiny, tmp_path, monkeypatch):
    """eval loads the model in bf16 where model_dtype is bf16 (the memory's query and keys kept fp32) and every probe runs."""
    run(*train_args(tiny, tmp_path / "r", "retrofit", *SHORT))
    monkeypatch.setattr(smf, "model_dtype", lambda device: torch.bfloat16)
    loads, original = [], smf.load_model

    def recording(*args):
        loads.append(original(*args))
        return loads[-1]
    monkeypatch.setattr(smf, "load_model", recording)
    data = ["--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "4"]
    results = run("eval", "--model", tmp_path / "r", *data)
    dtypes = {n: p.dtype for n, p in loads[0][0].named_parameters()}
    lookup = {n for n in dtypes if n.endswith(("memory.keys", "memory.query.weight", "memory.query.bias"))}
    assert len(lookup) == 6 and all(dtypes[n] == torch.float32 for n in lookup)
    assert {dtypes[n] for n in dtypes if n not in lookup} == {torch.bfloat16}
    assert all(math.isfinite(results[p][k]) for p, k in (("medmcqa", "gold_nll"), ("wikitext", "ppl"),
                                                         ("triviaqa", "exact_match")))


# ----------------------------------------------------------------------------------------------- never lose a file,
# never a silent wrong table

def test_eval_replaces_only_its_own_results_of_the_same_model_and_keeps_their_other_probes(tiny, tmp_path, capsys):
    data = ["--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "4"]
    mine = tmp_path / "sweep.json"
    mine.write_text(json.dumps({"model": tiny["model"], "lr": [1, 2]}))   # the user's own JSON, naming a model
    assert "--out " + str(mine) + " exists — it is not smf's results" in error_of(capsys, "eval", "--model", tiny["model"], *data, "--out", mine)
    assert json.loads(mine.read_text()) == {"model": tiny["model"], "lr": [1, 2]}
    mine.write_text("[1, 2]")                                             # a JSON list: refused, not a crash
    assert "exists — it is not smf's results" in error_of(capsys, "eval", "--model", tiny["model"], *data, "--out", mine)
    out = tmp_path / "base.eval.json"
    run("eval", "--model", tiny["model"], *data, "--out", out)
    full = json.loads(out.read_text())
    run(*train_args(tiny, tmp_path / "lora", "lora", *SHORT))
    err = error_of(capsys, "eval", "--model", tmp_path / "lora", *data, "--out", out)   # another model's results
    assert f"it holds the results of {tiny['model']}, whose weights are not these" in err and json.loads(out.read_text()) == full
    run("eval", "--model", tiny["model"], *data, "--probe", "wikitext", "--out", out)   # one probe again: the others stay
    again = json.loads(out.read_text())
    assert again["medmcqa"] == full["medmcqa"] and again["triviaqa"] == full["triviaqa"] and again["wikitext"]["ppl"] > 0


def test_eval_results_name_the_models_weights_and_another_model_at_the_same_path_is_refused(tiny, tmp_path, capsys):
    """Results belong to the weights: other weights saved at the same path are refused, the same weights at another
    path (a copy, a moved OUT) are the same model, and a damaged file is named as such."""
    import shutil
    data = ["--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "4"]
    model, out = tmp_path / "model", tmp_path / "model.json"
    shutil.copytree(tiny["model"], model)
    run("eval", "--model", model, *data, "--probe", "wikitext", "--out", out)
    written = json.loads(out.read_text())
    assert written["weights"] == {"model.safetensors": hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()}
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-1] ^= 1                                                      # other weights, same path
    (model / "model.safetensors").write_bytes(bytes(weights))
    err = error_of(capsys, "eval", "--model", model, *data, "--probe", "medmcqa", "--out", out)
    assert f"--out {out} exists — it holds the results of {model}, whose weights are not these" in err
    assert json.loads(out.read_text()) == written
    shutil.copytree(tiny["model"], tmp_path / "copy")                    # the first weights, at another path: the
    run("eval", "--model", tmp_path / "copy", *data, "--probe", "medmcqa", "--out", out)   # same model (a moved OUT)
    merged = json.loads(out.read_text())
    assert merged["model"] == str(tmp_path / "copy") and merged["wikitext"] == written["wikitext"] and "medmcqa" in merged
    out.write_text(out.read_text()[:100])                                 # cut short: named as damaged
    err = error_of(capsys, "eval", "--model", tmp_path / "copy", *data, "--probe", "medmcqa", "--out", out)
    assert f"--out {out} exists — it is no JSON file (JSONDecodeError): damaged, or not smf's results" in err


def test_two_evals_into_one_file_both_land_and_write_under_a_lock(tiny, tmp_path, monkeypatch):
    """An eval that another eval overtakes merges with what that one wrote (not with the file as it was at its
    start), and every write happens while the folder is locked."""
    import fcntl
    data = ["--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"], "--triviaqa", tiny["triviaqa"], "--limit", "4"]
    out = tmp_path / "r.json"
    run("eval", "--model", tiny["model"], *data, "--probe", "medmcqa", "--out", out)
    evaluate_triviaqa, write_atomic = smf.eval_triviaqa, smf.write_atomic

    def overtaken(*args, **kwargs):                                       # meanwhile another eval writes the file
        run("eval", "--model", tiny["model"], *data, "--probe", "wikitext", "--out", out)
        return evaluate_triviaqa(*args, **kwargs)

    def locked_write(path, text):
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        with pytest.raises(BlockingIOError):                             # someone holds the folder's lock
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(folder)
        write_atomic(path, text)

    monkeypatch.setattr(smf, "eval_triviaqa", overtaken)
    monkeypatch.setattr(smf, "write_atomic", locked_write)
    run("eval", "--model", tiny["model"], *data, "--probe", "triviaqa", "--out", out)
    assert {"medmcqa", "wikitext", "triviaqa"} <= json.loads(out.read_text()).keys()

    def no_flock(fd, operation):                                          # as on a file system without flock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.undo()
    monkeypatch.setattr(fcntl, "flock", no_flock)
    run("eval", "--model", tiny["model"], *data, "--probe", "triviaqa", "--limit", "2", "--out", out)
    assert json.loads(out.read_text())["triviaqa"]["n"] == 2 and "medmcqa" in json.loads(out.read_text())


def test_table_replaces_only_files_with_its_header_and_counts_only_seed_integer_folders(tmp_path, capsys):
    write_eval(tmp_path / "base" / "seed0" / "eval.json", ([1, 0, 0, 1], [1.0] * 4), [1, 0, 1, 0], ppl=10.0)
    write_eval(tmp_path / "lora" / "seed1" / "eval.json", ([1, 1, 0, 1], [1.0] * 4), [1, 0, 0, 0], ppl=12.0)
    write_eval(tmp_path / "lora" / "seed1.old" / "eval.json", ([0, 0, 0, 0], [1.0] * 4), [0, 0, 0, 0], ppl=99.0)
    note = tmp_path / "table.md"
    note.write_text("| row | my own notes |\n")
    err = error_of(capsys, "table", tmp_path)
    assert "table.md exists — it was not written by `smf.py table` (no header line) — move it away" in err
    assert note.read_text() == "| row | my own notes |\n" and not (tmp_path / "figure.svg").exists()
    note.unlink()
    run("table", tmp_path)
    assert open(note).readline().startswith("<!-- written by `smf.py table`") and "wrote " in capsys.readouterr().out
    lora = [l for l in note.read_text().splitlines() if l.startswith("| LoRA |")][0]
    assert "| 12.00 (n=1) |" in lora and "99" not in lora                   # seed1.old is no seed
    table = note.read_text()
    note.write_text(table.replace("\n\n", "\n\nmy note above\n\n", 1).replace("| 12.00", "| 13.00") + "\nmy note\n")
    run("table", tmp_path)                                                 # smf's own file, header kept: rewritten,
    assert note.read_text() == table + "\nmy note above\n\n\nmy note\n"        # its rows anew, a user's lines kept


def test_rows_scored_on_other_questions_than_base_get_no_delta(tmp_path):
    write_eval(tmp_path / "base" / "seed0" / "eval.json", ([1, 0, 0, 1, 0, 1, 0, 0], [1.0] * 8), [1, 0, 1, 0], ppl=10.0)
    write_eval(tmp_path / "lora" / "seed0" / "eval.json", ([1, 1, 0, 1], [1.0] * 4), [1, 0, 0, 0], ppl=12.0)
    write_eval(tmp_path / "full" / "seed0" / "eval.json", ([1, 1, 1, 1, 0, 0, 0, 0], [1.0] * 8), [1, 0, 0, 0], ppl=12.0)
    r = json.load(open(tmp_path / "full" / "seed0" / "eval.json"))
    r["triviaqa"]["data"] = "other"                                        # same count, other questions
    json.dump(r, open(tmp_path / "full" / "seed0" / "eval.json", "w"))
    run("table", tmp_path)
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "table.md") if l.startswith("| ")}
    assert rows["LoRA"][1] == "scored on other data or protocol than Base" and rows["LoRA"][6] == "25.00 (n=1)"
    assert rows["LoRA"][7].startswith("-25.00 [")                          # TriviaQA: the same 4 questions
    assert rows["Full finetuning"][1].startswith("+12.50 [") and rows["Full finetuning"][7] == "scored on other data or protocol than Base"
    for folder in ("base", "full"):                                        # the same data, scored two ways
        r = json.load(open(tmp_path / folder / "seed0" / "eval.json"))
        r["medmcqa"]["protocol"] = "letter" if folder == "full" else "answer"
        r["medmcqa"]["data"] = r["triviaqa"]["data"] = "same"
        json.dump(r, open(tmp_path / folder / "seed0" / "eval.json", "w"))
    run("table", tmp_path)
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "table.md") if l.startswith("| ")}
    assert rows["Full finetuning"][1] == rows["Full finetuning"][3] == "scored on other data or protocol than Base"
    assert rows["Full finetuning"][7].startswith("-25.00 [")               # TriviaQA: same data and protocol


# ----------------------------------------------------------------------------------------------- each stated rule
# fails its test when its line is removed, inverted or loosened (each bug below was made by hand and watched fail)

def test_every_device_string_maps_to_its_dtype():
    for device in ("cuda", "cuda:0", "cuda:1", "cuda:7", torch.device("cuda:1")):
        assert smf.model_dtype(device) == torch.bfloat16, device
    for device in ("cpu", torch.device("cpu")):
        assert smf.model_dtype(device) == torch.float32, device


def test_the_gpus_bf16_path_runs_the_head_under_autocast_and_the_loss_in_fp32(tiny, monkeypatch):
    """Full finetuning keeps an fp32 head, yet under the bf16 rule its logits are bf16 (autocast), and the chunked
    loss is fp32 cross-entropy of exactly those logits."""
    monkeypatch.setattr(smf, "model_dtype", lambda device: torch.bfloat16)
    model, tok = load(tiny)
    smf.prepare_model(model, "full")
    heads = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: heads.append(output.detach()))
    seqs = [tok(t)["input_ids"] for t in ("alpha beta gamma delta", "one two three four five six seven")]
    n_targets = sum(len(s) - 1 for s in seqs)
    loss, _ = smf.forward_backward(model, seqs, [], smf.TrainConfig(method="full", loss_chunk=5), n_targets,
                                   tok.pad_token_id, "cpu")
    assert model.lm_head.weight.dtype == torch.float32 and heads and all(h.dtype == torch.bfloat16 for h in heads)
    ids, mask = smf.pad_batch(seqs, tok.pad_token_id)
    labels = ids[:, 1:].flatten()[mask[:, 1:].flatten() > 0]
    want = sum(F.cross_entropy(h.float(), labels[5 * i:5 * i + 5], reduction="sum").item()
               for i, h in enumerate(heads)) / n_targets
    assert loss == pytest.approx(want, rel=1e-6)


def test_eval_waits_for_an_exclusive_lock_on_the_results_folder(tiny, tmp_path, monkeypatch):
    """While another process holds even a shared lock on the folder, eval neither writes nor gives up: it waits."""
    import fcntl, threading, time
    out = tmp_path / "r.json"
    args = smf.build_parser().parse_args(["eval", "--model", tiny["model"], "--probe", "medmcqa", "--medmcqa",
                                          tiny["medmcqa"], "--limit", "2", "--out", str(out)])
    smf.check_args(args)
    asking, flock = threading.Event(), fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: asking.set() or flock(fd, operation))
    held = os.open(tmp_path, os.O_RDONLY)
    flock(held, fcntl.LOCK_SH)                                           # a reader holds the folder
    worker = threading.Thread(target=smf.run_eval, args=(args, "cpu"))
    worker.start()
    assert asking.wait(timeout=300)
    time.sleep(0.5)
    assert worker.is_alive() and not out.exists()                        # waiting, not writing unguarded
    os.close(held)
    worker.join(timeout=300)
    assert json.loads(out.read_text())["medmcqa"]["n"] == 2


def test_eval_never_writes_over_results_another_model_wrote_meanwhile(tiny, tmp_path, monkeypatch, capsys):
    out, evaluate = tmp_path / "r.json", smf.eval_medmcqa
    theirs = {"written_by": "smf.py eval", "model": "/another/model", "weights": None, "wikitext": {"ppl": 3.0}}
    def overtaken(*args, **kwargs):
        out.write_text(json.dumps(theirs))
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(smf, "eval_medmcqa", overtaken)
    err = error_of(capsys, "eval", "--model", tiny["model"], "--probe", "medmcqa", "--medmcqa", tiny["medmcqa"],
                   "--limit", "2", "--out", out)
    assert "was replaced by other results while this eval ran" in err and json.loads(out.read_text()) == theirs


def test_results_name_a_local_model_by_its_absolute_path_and_every_weight_file(tiny, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(tiny["model"], tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    run("eval", "--model", "m", "--probe", "medmcqa", "--medmcqa", tiny["medmcqa"], "--limit", "2", "--out", "r.json")
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["model"] == str(tmp_path / "m") and list(results["weights"]) == ["model.safetensors"]
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"weights, pickled")
    before = smf.fingerprint("m")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"weights, changed")
    assert set(before) == {"model.safetensors", "pytorch_model.bin"} and smf.fingerprint("m") != before


def test_table_values_at_their_bounds_base_seeds_lacking_a_probe_and_token_counts(tmp_path, capsys):
    """A value exactly at its range's bound is a value; a Base seed that lacks a probe is not a bad Base; a sole
    bad Base seed leaves a Δ that says so; WikiText scored over other tokens than Base's gets no Δ."""
    write_eval(tmp_path / "base" / "seed0" / "eval.json", ([0, 0], [0.0, 0.0]), [1, 1], ppl=1.0)
    write_eval(tmp_path / "base" / "seed1" / "eval.json", ([0, 0], [0.0, 0.0]), ppl=1.0)       # no TriviaQA
    write_eval(tmp_path / "lora" / "seed0" / "eval.json", ([1, 0], [0.5, 0.5]), [1, 0], ppl=2.0)
    for path, tokens in ((tmp_path / "base" / "seed0" / "eval.json", 100), (tmp_path / "base" / "seed1" / "eval.json", 100),
                         (tmp_path / "lora" / "seed0" / "eval.json", 90)):
        r = json.load(open(path))
        r["wikitext"]["tokens"] = tokens
        json.dump(r, open(path, "w"))
    write_eval(tmp_path / "full" / "seed0" / "eval.json", ([1, 0], [0.5, 0.5]), [1, 0], ppl=float("nan"))
    run("table", tmp_path)
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "table.md") if l.startswith("| ")}
    assert rows["Base"][0:9:2] == ["0.00 ± 0.00 (n=2)", "0.00 ± 0.00 (n=2)", "1.00 ± 0.00 (n=2)", "100.00 (n=1)", "100.00 (n=1)"]
    assert rows["LoRA"][7].startswith("-50.00 [")                        # over the Base seed that has TriviaQA
    assert rows["LoRA"][5] == "scored on other data or protocol than Base"
    write_eval(tmp_path / "nanbase" / "base" / "seed0" / "eval.json", ([0, 1], [1.0, 1.0]), [1, 1], ppl=float("nan"))
    write_eval(tmp_path / "nanbase" / "lora" / "seed0" / "eval.json", ([1, 0], [0.5, 0.5]), [1, 0], ppl=2.0)
    run("table", tmp_path / "nanbase")
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "nanbase" / "table.md") if l.startswith("| ")}
    assert rows["LoRA"][5] == "Base has NaN"                             # every Base seed bad: the Δ says why


def test_table_never_replaces_a_users_figure(tmp_path, capsys):
    write_eval(tmp_path / "base" / "seed0" / "eval.json", ([0, 1], [1.0, 1.0]), [1, 1], ppl=3.0)
    (tmp_path / "figure.svg").write_text("<svg>my own</svg>\n")
    assert "figure.svg exists — it was not written by `smf.py table`" in error_of(capsys, "table", tmp_path)
    assert (tmp_path / "figure.svg").read_text() == "<svg>my own</svg>\n" and not (tmp_path / "table.md").exists()


def test_memory_topk_may_equal_the_sub_keys(tiny):
    args = smf.build_parser().parse_args(["train", "--method", "retrofit", "--model", tiny["model"], "--out", "x",
                                          "--memory-n-keys", "8", "--memory-topk", "8"])
    smf.check_args(args)                                                # no error: 8 of 8 sub-keys is allowed
    assert smf.ProductKeyMemory(16, n_keys=8, heads=1, key_dim=4, topk=8).topk == 8


def test_background_statistics_saved_under_the_old_batches_key_still_load(tmp_path):
    from safetensors.torch import save_file
    df, reads = torch.tensor([1, 0, 2]), torch.tensor([3, 0, 5])
    save_file({"0.df": df, "0.reads": reads, "batches": torch.tensor(7)}, str(tmp_path / smf.STATS))
    (stats,) = smf.load_stats(str(tmp_path))
    assert stats.texts == 7 and torch.equal(stats.df, df) and torch.equal(stats.reads, reads)


def test_run_all_stage_locks_shared_between_stages_exclusive_within_one(tiny, tmp_path, fake_python):
    """A STAGE run shares OUT's lock with other STAGE runs (another stage runs beside it) and holds its own stage's
    lock alone (the same stage is refused while another run holds it)."""
    import fcntl
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0]}
    (out / "lora" / "seed1").mkdir(parents=True)
    with open(out / ".run_all.lock", "a") as other_stage:               # as another STAGE run holds it
        fcntl.flock(other_stage, fcntl.LOCK_SH)
        beside = run_all({**env, "STAGE": "full/seed1"})
        assert beside.returncode == 0, beside.stderr
        with open(out / "lora" / "seed1" / ".lock", "a") as same_stage:
            fcntl.flock(same_stage, fcntl.LOCK_SH)
            twice = run_all({**env, "STAGE": "lora/seed1"})
    assert twice.returncode == 2 and "another run_all.sh is running stage lora/seed1" in twice.stderr
    assert not (out / "lora" / "seed1" / "eval.json").exists()


def test_run_all_checks_up_front_what_would_fail_or_mislead_later(tiny, tmp_path, fake_python):
    """Refused before any stage starts: a STAGE whose retrofit was made otherwise, a figure.svg table did not write,
    a bad field on any line of a data file, a seed named twice in any spelling, results without settings.txt."""
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0]}
    assert run_all({**env, "ROWS": "retrofit_additive"}).returncode == 0
    other = run_all({**env, "STAGE": "smf_additive_kl/seed1", "MEMORY_ARGS": " ".join(MEM[:-1] + ["2"])})
    assert other.returncode == 2 and f"stage retrofit_additive/seed1 in {out} was made with MEMORY_ARGS=" in other.stderr
    for name in ("table.md", "figure.svg"):
        header = '<!-- written by `smf.py table`' if name == "table.md" else "<svg/>"   # a prefix is not the header
        (out / name).write_text(header + "\nmy notes\n")
        mine = run_all({**env, "ROWS": "base"})
        assert mine.returncode == 2 and "start" not in mine.stdout and f"{name} was not written by smf.py table" in mine.stderr
        os.remove(out / name)
    lines = open(tiny["triviaqa"]).read().splitlines()
    broken = tmp_path / "triviaqa.jsonl"
    broken.write_text("\n".join(lines[:2] + [json.dumps({"question": "Why?"})] + lines[2:]) + "\n")
    bad = run_all({**env, "ROWS": "base", "TRIVIAQA": str(broken)})
    assert bad.returncode == 2 and f"TRIVIAQA={broken}: line 3 lacks field 'answer'" in bad.stderr
    for seeds in ("1 01", "01 1", "2 002"):
        twice = run_all({**env, "SEEDS": seeds})
        assert twice.returncode == 2 and "twice" in twice.stderr, seeds
    write_eval(out / "base" / "seed1" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 0], ppl=3.0)
    unknown = run_all({**env, "ROWS": "base"})
    assert unknown.returncode == 2 and f"{out}/base/seed1 holds results with no record of their settings" in unknown.stderr


def test_run_all_refuses_a_seed_the_table_would_pool_with_other_settings(tiny, tmp_path, fake_python):
    """The table pools every seed of a row, so a run of a row is checked against all its seeds in OUT, those
    outside SEEDS too: the issue's case (another step count and learning rate for a third LoRA seed) and Base
    re-evaluated on fewer questions are refused up front, naming what differs."""
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0]}
    assert run_all({**env, "ROWS": "base lora", "SEEDS": "1 2"}).returncode == 0
    other = run_all({**env, "ROWS": "lora", "SEEDS": "3", "MAX_STEPS": "1", "LORA_ARGS": "--lr 0.05"})
    assert other.returncode == 2 and "start" not in other.stdout and not (out / "lora" / "seed3").exists()
    assert f"stage lora/seed1 in {out} was made with MAX_STEPS=2 LORA_ARGS=; this run has MAX_STEPS=1 " \
           "LORA_ARGS=--lr 0.05" in other.stderr
    fewer = run_all({**env, "ROWS": "base", "SEEDS": "3", "EVAL_LIMIT": "6"})
    assert fewer.returncode == 2 and "stage base/seed1" in fewer.stderr and "EVAL_LIMIT=8" in fewer.stderr
    write_eval(out / "lora" / "seed1.old" / "eval.json", ([1, 0], [1.0, 1.0]), [1, 0], ppl=3.0)  # no seed: the
    assert run_all({**env, "ROWS": "lora", "SEEDS": "3"}).returncode == 0       # table leaves it out, so may run_all


def test_run_all_checks_only_what_a_stage_still_depends_on(tiny, tmp_path, fake_python):
    """A finished retrofit is checked on its training settings alone when an SMF stage starts from it, and a stage
    whose evaluation did not finish likewise: other evaluation settings evaluate it again, training nothing."""
    python, calls = fake_python
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **python}
    assert run_all({**env, "ROWS": "retrofit_additive"}).returncode == 0
    memory = run_all({**env, "ROWS": "smf_additive_kl", "MEMORY_ARGS": " ".join(MEM[:-1] + ["2"])})
    assert memory.returncode == 2 and "start " not in memory.stdout                 # the retrofit's training settings
    assert f"stage retrofit_additive/seed1 in {out} was made with MEMORY_ARGS={' '.join(MEM)};" in memory.stderr
    smf_only = run_all({**env, "ROWS": "smf_additive_kl", "EVAL_LIMIT": "6"})
    assert smf_only.returncode == 0 and "done  smf_additive_kl seed 1" in smf_only.stdout, smf_only.stderr
    failed = run_all({**env, "ROWS": "lora", "FAKE_EVAL_FAILS": "1"})
    assert failed.returncode == 1 and (out / "lora" / "seed1" / "model").is_dir()
    n = len(calls())
    again = run_all({**env, "ROWS": "lora", "EVAL_LIMIT": "6"})
    assert again.returncode == 0, again.stderr
    assert [c[0] for c in calls()[n:]] == ["eval", "table"]             # evaluated again, not trained again


def test_run_all_names_a_model_by_every_weight_file_a_hub_ids_in_its_cache(tiny, tmp_path, fake_python):
    import shutil
    model, out = tmp_path / "model", tmp_path / "res"
    shutil.copytree(tiny["model"], model)
    (model / "pytorch_model.bin").write_bytes(b"pickled weights")
    env = {**smoke_env(tiny, out), **fake_python[0], "ROWS": "base", "MODEL": str(model)}
    assert run_all(env).returncode == 0
    (model / "pytorch_model.bin").write_bytes(b"pickled weights, changed")
    changed = run_all(env)
    assert changed.returncode == 2 and "was made with MODEL=weights sha256" in changed.stderr
    (model / "pytorch_model.bin").write_bytes(b"pickled weights")
    hub = hub_cache(tmp_path / "hub", "a" * 40, model)                   # the same weights by hub id: the same model
    assert run_all({**env, **hub, "MODEL": "org/tiny"}).returncode == 0
    (model / "pytorch_model.bin").write_bytes(b"pickled weights, the next revision")
    hub_cache(tmp_path / "hub", "b" * 40, model)                         # refs/main moves to it
    changed = run_all({**env, **hub, "MODEL": "org/tiny"})
    assert changed.returncode == 2 and "was made with MODEL=weights sha256" in changed.stderr


def hub_cache(root, commit, model):
    """A hub cache (HF_HUB_CACHE) whose org/tiny is at revision `commit`, holding the files of folder `model`."""
    import shutil
    repo = root / "models--org--tiny"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(root)}


def test_run_all_checks_every_stages_command_before_the_first_stage(tiny, tmp_path):
    """smf.py's own option checks run on every stage's commands before any stage starts: a typo, a flag of another
    method or a device this machine lacks is named with its variable; a flag that run_all.sh sets for each row is
    refused in any *_ARGS; an SMF stage whose retrofit is neither finished nor in ROWS is named up front."""
    env = {**smoke_env(tiny, tmp_path / "res"), "ROWS": "base retrofit_additive smf_additive_kl lora"}
    for bad, message in (
            ({"LORA_ARGS": "--lora-rank 8"}, "error: stage lora/seed1: smf.py train would refuse its options (from "
                                             "LORA_ARGS): unrecognized arguments: --lora-rank 8"),
            ({"TRAIN_ARGS": "--top-t 8"}, "retrofit_additive/seed1: smf.py train would refuse its options (from "
                                          "TRAIN_ARGS): --top-t applies only to --method smf"),
            ({"DEVICE": "gpu"}, "stage base/seed1: smf.py eval would refuse its options (from DEVICE): argument "
                                "--device: invalid choice: 'gpu'"),
            ({"MEMORY_ARGS": "--memory-mode replacement"}, "error: MEMORY_ARGS has --memory-mode, which run_all.sh "
                                                           "sets for each row — drop it, and set ROWS (the row's name)"),
            ({"SMF_ARGS": "--selector=kl"}, "SMF_ARGS has --selector, which run_all.sh sets"),
            ({"TRAIN_ARGS": "--warmup 0 --loss-chunk 256"}, "set LOSS_CHUNK instead"),
            ({"LORA_ARGS": "--seed 3"}, "set SEEDS instead"),
            ({"ROWS": "smf_additive_kl lora"}, "error: stage smf_additive_kl/seed1 needs retrofit_additive/seed1, "
                                               "which has not finished and is not in ROWS/SEEDS — add retrofit_additive")):
        p = run_all({**env, **bad})
        assert p.returncode == 2 and "start" not in p.stdout and message in p.stderr, (bad, p.stderr)


def test_run_all_names_a_lost_model_damaged_answers_bad_threads_an_unwritable_out_and_stale_staging(tiny, tmp_path,
                                                                                                     fake_python):
    out = tmp_path / "res"
    env = {**smoke_env(tiny, out), **fake_python[0]}
    assert run_all({**env, "ROWS": "retrofit_additive"}).returncode == 0
    import shutil
    shutil.rmtree(out / "retrofit_additive" / "seed1" / "model")
    lost = run_all({**env, "ROWS": "smf_additive_kl"})
    assert lost.returncode == 2 and "start" not in lost.stdout and (
        f"stage retrofit_additive/seed1 has finished, but its model {out}/retrofit_additive/seed1/model is missing — "
        f"move {out}/retrofit_additive/seed1 away to redo that stage") in lost.stderr
    questions = tmp_path / "triviaqa.jsonl"
    questions.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    shape = run_all({**env, "ROWS": "base", "TRIVIAQA": str(questions)})
    assert shape.returncode == 2 and "line 1 has an 'answer' that is not {\"aliases\": [...]" in shape.stderr
    threads = run_all({**env, "ROWS": "lora", "GPUS": "cpu", "OMP_NUM_THREADS": "abc"})
    assert threads.returncode == 2 and threads.stderr.startswith("error: OMP_NUM_THREADS=abc is not a number")
    (out / "lora" / "seed1" / ".model.tmpx1y2").mkdir(parents=True)          # as a SIGKILLed train leaves it
    stale = run_all({**env, "ROWS": "lora"})
    assert stale.returncode == 0 and f"note: {out}/lora/seed1/.model.tmpx1y2 is the staging folder" in stale.stderr
    os.remove(out / ".run_all.lock")
    (out / ".run_all.lock").mkdir()                                          # a lock file that cannot be written
    locked = run_all({**env, "ROWS": "full"})
    assert locked.returncode == 2 and f"error: cannot write {out}/.run_all.lock — give an OUT you can write to" in locked.stderr


def test_eval_writes_through_a_link_and_an_unwritable_place_is_named(tiny, tmp_path, capsys, monkeypatch):
    """`--out` a link: the file it names gets the merged results and the link stays; a folder that takes no file is
    named with the fix that fits every command (table has no option for another place)."""
    target, link = tmp_path / "G.json", tmp_path / "link.json"
    run("eval", "--model", tiny["model"], "--probe", "medmcqa", "--medmcqa", tiny["medmcqa"], "--limit", "2", "--out", target)
    link.symlink_to(target)
    run("eval", "--model", tiny["model"], "--probe", "wikitext", "--wikitext", tiny["wikitext"], "--limit", "2",
        "--out", link)
    assert link.is_symlink() and {"medmcqa", "wikitext"} <= json.loads(target.read_text()).keys()
    write_eval(tmp_path / "res" / "base" / "seed0" / "eval.json", ([0, 1], [1.0, 1.0]), [1, 1], ppl=3.0)
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(smf.tempfile, "TemporaryFile", refused)
    assert error_of(capsys, "table", tmp_path / "res").endswith(
        f"table.md {tmp_path / 'res' / 'table.md'} cannot be written ({tmp_path / 'res'}: Permission denied) — make "
        f"{tmp_path / 'res'} writable")


def test_non_finite_scores_give_no_accuracy_and_the_precision_is_part_of_the_protocol(tiny, tmp_path, monkeypatch):
    """A model whose scores are NaN gets accuracy NaN (argmax over NaN would pick A), which the table shows as
    such; a question with one NaN option has no answer either. Each probe's protocol names the precision, so a
    row scored in bf16 (a GPU) gets no Δ against a Base scored in fp32, for MedMCQA and WikiText alike."""
    model, tok = load(tiny)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    data = ["--medmcqa", tiny["medmcqa"], "--wikitext", tiny["wikitext"], "--limit", "4"]
    run("eval", "--model", tiny["model"], "--probe", "medmcqa", *data, "--out", tmp_path / "res" / "base" / "seed0" / "eval.json")
    run("eval", "--model", tiny["model"], "--probe", "wikitext", *data, "--out", tmp_path / "res" / "base" / "seed0" / "eval.json")
    nan = run("eval", "--model", tmp_path / "nan", "--probe", "all", *data, "--triviaqa", tiny["triviaqa"],
              "--out", tmp_path / "res" / "full" / "seed0" / "eval.json")
    assert math.isnan(nan["medmcqa"]["acc"]) and all(math.isnan(c) for c in nan["medmcqa"]["correct"])
    assert math.isnan(nan["wikitext"]["ppl"])                           # the same rule, a probe not named in it
    for key in ("alias_contains_acc", "exact_match"):                   # greedy over NaN would answer token 0
        assert math.isnan(nan["triviaqa"][key]) and nan["triviaqa"]["predictions"] == [None] * 4
    one_step = functools.partial(smf.greedy_generate, max_new_tokens=1)
    assert one_step(model.__class__.from_pretrained(tiny["model"]).eval(), tok, ["Question: a\nAnswer:"]) != [None]
    assert nan["medmcqa"]["protocol"].endswith("; float32")
    rows = [smf.load_medmcqa(tiny["medmcqa"])[0]] * 2
    option_logprobs = smf.option_logprobs
    def one_nan(*args):
        lps = option_logprobs(*args)
        lps[2][0] = float("nan")                                       # the first question's third option
        return lps
    monkeypatch.setattr(smf, "option_logprobs", one_nan)
    one = smf.eval_medmcqa(model.__class__.from_pretrained(tiny["model"]).eval(), tok, rows)
    assert math.isnan(one["correct"][0]) and not math.isnan(one["correct"][1]) and math.isnan(one["acc"])
    monkeypatch.undo()
    monkeypatch.setattr(smf, "model_dtype", lambda device: torch.bfloat16)
    bf16 = run("eval", "--model", tiny["model"], "--probe", "all", *data, "--triviaqa", tiny["triviaqa"],
               "--out", tmp_path / "res" / "lora" / "seed0" / "eval.json")
    assert all(bf16[p]["protocol"].endswith("; bfloat16") for p in smf.PROBES)
    monkeypatch.undo()
    run("table", tmp_path / "res")
    cells = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in open(tmp_path / "res" / "table.md") if l.startswith("| ")}
    assert cells["Full finetuning"][0] == cells["Full finetuning"][4] == cells["Full finetuning"][6] == "NaN in 1 of 1 seeds"
    assert cells["LoRA"][1] == cells["LoRA"][5] == "scored on other data or protocol than Base"


def test_run_all_cpu_slots_share_the_cores(tiny, tmp_path, fake_python):
    """Each `cpu` slot's stage gets OMP_NUM_THREADS = cores / cpu slots (at least 1), unless the caller set it."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nproc").write_text("#!/bin/sh\necho 8\n")               # a machine of 8 cores
    (tmp_path / "bin" / "nproc").chmod(0o755)
    threads = tmp_path / "calls.jsonl.threads"
    for gpus, given, want in (("cpu", None, 8), ("cpu cpu", None, 4), ("cpu cpu", "3", 3)):
        env = {k: v for k, v in {**smoke_env(tiny, tmp_path / f"res{gpus}{given}"), **fake_python[0]}.items()
               if k != "OMP_NUM_THREADS"}
        env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
        p = run_all({**env, "ROWS": "base", "GPUS": gpus, **({"OMP_NUM_THREADS": given} if given else {})})
        assert p.returncode == 0, p.stderr
        assert threads.read_text().splitlines()[-2:] == [str(want), given or "-"], (gpus, given)  # stage, table
