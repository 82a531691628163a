
# -----------------------------------------------------------------------------------------------------------
# Evaluation: zero-shot, no chat template, greedy; batched so that the batch size never changes an answer


def medmcqa_prompt(row):
    """The training text up to and including `Answer:`; the model must continue it with ` {L}. {option}`."""
    return (f"Medical exam question:\nQuestion: {row['question']}\nA. {row['opa']}\nB. {row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")


def medmcqa_answer(row, option, letter_only=False):
    if letter_only:
        return f" {'ABCD'[option]}"
    return f" {'ABCD'[option]}. {row['op' + 'abcd'[option]]}"


def medmcqa_text(row):
    """The training text: prompt, gold answer, and the explanation line if any. No EOS (the published code
    appends none): it would teach the model to stop early, which moves TriviaQA for a reason that is not
    forgetting."""
    text = medmcqa_prompt(row) + medmcqa_answer(row, row["cop"])
    if (row.get("exp") or "").strip():
        text += f"\nExplanation: {row['exp']}"
    return text


def positions(mask):
    """Position ids counted from each row's first real token, so a left-padded row scores as it would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def tail_logprobs(model, seqs, n_scored, pad_id):
    """[(n,) log-probabilities of the last n tokens of each sequence] from one left-padded forward, logits
    only where a scored token is."""
    ids, mask = pad_batch(seqs, pad_id, left=True, device=next(model.parameters()).device)
    k = max(n_scored)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=k + 1)
    logits = out.logits[:, -k - 1:-1].float()                                       # (B, k, vocab)
    token_lp = logits.gather(-1, ids[:, -k:, None])[..., 0] - logits.logsumexp(-1)   # (B, k)
    return [token_lp[i, k - n:] for i, n in enumerate(n_scored)]


def option_logprobs(model, prompts, options, pad_id):
    """[(n,) log-probabilities of each option's tokens after its prompt], options listed prompt by prompt.
    Each prompt runs once (left-padded) and its KV cache is shared by its options, which run after it as one
    right-padded batch: the prompt, most of the tokens, is not recomputed per option."""
    k = len(options) // len(prompts)                                                # options per prompt
    ids, mask = pad_batch(prompts, pad_id, left=True, device=next(model.parameters()).device)  # (B, P)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)                                                # B -> B*k rows
    opt_ids, opt_mask = pad_batch(options, pad_id, device=ids.device)              # (B*k, O)
    past_mask = mask.repeat_interleave(k, 0)                                        # (B*k, P)
    start = past_mask.sum(-1, keepdim=True)                                         # (B*k, 1)
    opt_pos = start + torch.arange(opt_ids.shape[1], device=ids.device)             # (B*k, O)
    opt_logits = model(input_ids=opt_ids, attention_mask=torch.cat([past_mask, opt_mask], -1),
                       position_ids=opt_pos, past_key_values=cache).logits           # (B*k, O, vocab)
    # option token j is predicted by the logits before it: the prompt's last for j = 0
    first = out.logits[:, -1:].repeat_interleave(k, 0)                              # (B*k, 1, vocab)
    logits = torch.cat([first, opt_logits[:, :-1]], 1).float()                      # (B*k, O, vocab)
    token_lp = logits.gather(-1, opt_ids[..., None])[..., 0] - logits.logsumexp(-1)  # (B*k, O)
    return [token_lp[i, :len(o)] for i, o in enumerate(options)]


@torch.no_grad()
def eval_medmcqa(model, tokenizer, rows, letter_only=False, batch_size=16):
    """Accuracy of the argmax over the 4 options of the mean per-token log-likelihood of ` {L}. {option}`
    (the mean keeps long options from losing for their length; letter mode: ` A`..` D`). The gold answer's
    NLL moves long before the argmax flips: it shows learning that accuracy on 1,000 questions cannot yet
    resolve. Helpers: medmcqa_prompt, medmcqa_answer, option_logprobs, pad_batch, positions, progress."""
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
    """Token perplexity with a sliding window: each window starts `stride` after the last and scores only the
    tokens no earlier window scored, so every token but the first (which has no context) counts once.
    Helpers: tail_logprobs, pad_batch, positions, progress."""
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
    """The paper's metric: some normalised alias occurs inside the normalised generation (lenient by design)."""
    pred = normalize_answer(prediction)
    return any(a and a in pred for a in map(normalize_answer, aliases))


def exact_match(prediction, aliases):
    """The answer equals an alias: the first non-empty line, or a start of it ending where a sentence or clause
    does (`Paris. It is...`), at . , : ; ! ? before a space or the end, so `St. Louis`, `3.14`,
    `Washington, D.C.` stay whole. Thousands separators are dropped (`1,000` equals `1000`)."""
    def norm(s):
        return normalize_answer(re.sub(r"(?<=\d),(?=\d{3}\b)", "", s))
    line = next((line.strip() for line in prediction.split("\n") if line.strip()), "")
    answers = {norm(line)} | {norm(line[:m.start()]) for m in re.finditer(r"[.,;:!?](?=\s|$)", line)}
    return bool((answers - {""}) & {norm(a) for a in aliases})


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=32, repetition_penalty=1.0, batch_size=32):
    """Greedy continuations by HF `generate` (KV cache), stopping on the tokenizer's EOS only. Prompts of
    equal token length run together: no pads at all, so a batch gives each prompt the answer it gets alone,
    and the repetition penalty (the logit of a token already in the row divided by it if positive,
    multiplied if negative) counts exactly the row's own tokens."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos, answers = tokenizer.eos_token_id, {}
    for _, same_length in itertools.groupby(order, key=lambda i: len(encoded[i])):
        same_length = list(same_length)
        for b in range(0, len(same_length), batch_size):
            idx = same_length[b:b + batch_size]
            ids = torch.tensor([encoded[i] for i in idx], device=next(model.parameters()).device)  # (B, P)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
                answers[i] = tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
    return [answers[i] for i in range(len(prompts))]


def eval_triviaqa(model, tokenizer, rows, batch_size=32, max_new_tokens=32, repetition_penalty=None):
    """Alias containment (the paper's) and exact match of one greedy generation per question. The paper's
    generate(do_sample=False) applies the repetition penalty of the model's own generation_config.json
    (Qwen2.5-0.5B-Instruct sets one): so does this, unless `repetition_penalty` is given.
    Helpers: greedy_generate, alias_contained, exact_match, normalize_answer."""
    penalty = repetition_penalty or getattr(model.generation_config, "repetition_penalty", None) or 1.0
    prompts = [f"Question: {question}\nAnswer:" for question, _ in rows]
    preds = greedy_generate(model, tokenizer, prompts, max_new_tokens, penalty, batch_size)
    contained = [int(alias_contained(p, aliases)) for p, (_, aliases) in zip(preds, rows)]
    exact = [int(exact_match(p, aliases)) for p, (_, aliases) in zip(preds, rows)]
    return {"alias_contains_acc": statistics.mean(contained), "exact_match": statistics.mean(exact),
            "n": len(rows), "predictions": preds, "alias_correct": contained, "exact_correct": exact,
            "protocol": f"zero-shot greedy, {max_new_tokens} new tokens, repetition penalty {penalty:g}"}
