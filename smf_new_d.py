
# -----------------------------------------------------------------------------------------------------------
# Commands: train, eval, bench, table

PROBES = ("medmcqa", "wikitext", "triviaqa")
RETROFIT_SHARES = ("seed", "micro_batch", "grad_accum", "forward_batch", "max_len", "background",
                   "background_examples")  # the one-liner's retrofit takes these from the command line
APPLIES = {  # rule 2: option -> the runs it applies to; given to any other run it is refused
    "selector": "smf", "top_t": "smf", "train_scale": "smf",
    "lora_r": "lora", "lora_alpha": "lora", "lora_dropout": "lora",
    "background": "new memory", "background_examples": "new memory",
    **{f"memory_{f.name}": "new memory" for f in dataclasses.fields(MemoryConfig)},
    "memory_alpha_init": "new additive memory",
    "medmcqa": "finetuning",
    **{f.name: "eval_out" for f in dataclasses.fields(EvalConfig)}}
RUNS = {"smf": "--method smf", "lora": "--method lora", "finetuning": "--method smf, lora or full",
        "new memory": "a new memory (--method retrofit, or smf from a model without memory); a model's "
        "memory and background statistics are its own", "new additive memory": "a new additive memory",
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
    """One checkpoint: load the parent, prepare what the method trains, train, save; in a staging folder
    that becomes `out` only when complete."""
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
            print(f"warning: warm-up ({cfg.warmup} steps) covers all {total_steps(len(examples), cfg)} steps of "
                  f"this {cfg.method}: its lr never reaches {cfg.lr:g} and it learns little", file=sys.stderr)
        log = os.path.join(staged, "train_log.jsonl")
        history = train(model, examples, cfg, stats, tokenizer.pad_token_id, device, log)
        if cfg.method == "retrofit":  # gathered once here, reused by every SMF run from this retrofit
            texts = data["background"][:cfg.background_examples]
            stats = background_stats(model, tokenizer, texts, cfg.max_len, device=device)
        meta = provenance(cfg.method.replace("retrofit", "memory"), applied(cfg, kinds), parent, out)
        meta["given"] = args.given
        if cfg.method == "retrofit":
            meta["memory"] = vars(mem_cfg)
        tensors = smf_patch(before, trained) if cfg.method == "smf" else trained
        save_checkpoint(staged, meta, tensors, {STATS: stats_tensors(stats)} if stats else None)
    return history

def run_train(args, device):
    """`train`. SMF from a model without memory first retrofits it into <out>_retrofit, with the retrofit
    recipe and the settings both stages share (RETROFIT_SHARES)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    mem_cfg = MemoryConfig(**{f.name: getattr(args, f"memory_{f.name}") for f in dataclasses.fields(MemoryConfig)})
    stages = [(cfg, args.model, args.out)]
    if cfg.method == "smf" and not model_memory(args.model):  # the one-liner
        shared = {name: getattr(cfg, name) for name in RETROFIT_SHARES}
        retrofit_out = args.out.rstrip("/") + "_retrofit"
        stages = [(TrainConfig(method="retrofit", **shared), args.model, retrofit_out), (cfg, retrofit_out, args.out)]
        unused = sorted(set(args.given) - set(RETROFIT_SHARES) - set(APPLIES))
        print(f"{args.model} has no memory: retrofitting it first into {retrofit_out} with the retrofit recipe "
              f"(it takes {', '.join(RETROFIT_SHARES)} from this command, not {', '.join(unused) or '-'}; for "
              "other settings, train --method retrofit first, then SMF from it)")
    data = {"medmcqa": None, "background": None}
    if cfg.method != "retrofit":
        rows = load_medmcqa(cfg.medmcqa, "train", cfg.limit_train or 60000, cfg.seed)
        data["medmcqa"] = [medmcqa_text(row) for row in rows]
    if stages[0][0].method == "retrofit":
        data["background"] = load_background(cfg.background)
    probes = load_probes(args) if args.eval_out else None
    for stage_cfg, parent, out in stages:
        t0 = time.time()
        history = train_stage(stage_cfg, mem_cfg, parent, out, data, args, device)
        print_summary(stage_cfg.method, out, history, time.time() - t0, args)
    if args.eval_out:  # evaluate the checkpoint as load_model reads it, in this process
        eval_args = argparse.Namespace(**{**vars(args), "model": args.out, "out": args.eval_out, "probe": "all"})
        run_eval(eval_args, device, probes)

def print_summary(method, out, history, seconds, args):
    size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)) / 2 ** 20
    last, tokens = history[-1], sum(h["tokens"] for h in history)
    print(f"\n== {method} finished: {len(history)} steps, {tokens:,} tokens, {seconds:.0f}s, final loss "
          f"{last['loss']:.4f}, checkpoint {out} ({size:.1f} MB, log train_log.jsonl)")
    for key in ("rows_updated", "alpha"):
        if key in last:
            print(f"   {key} per layer in the last step: {last[key]}")
    data_flags = "".join(f" --{name.replace('_', '-')} {getattr(args, name)}" for name in
                         ("eval_medmcqa", "wikitext", "triviaqa") if name in args.given)
    print(f"   evaluate: python {os.path.relpath(os.path.abspath(__file__))} eval --model {out}{data_flags}")

def run_eval(args, device, probes=None):
    """`eval`: a line per probe and the results JSON (if one fails: those that finished, and `unfinished`)."""
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
    """Every method's training steps on random tokens and weights, and a memory layer's fwd+bwd against the
    FFN's."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cuda = str(device).startswith("cuda")
    B, T = args.batch_size or (16 if cuda else 4), args.seq_len or (512 if cuda else 256)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(4096, T))
    L = config.num_hidden_layers
    mem_cfg = MemoryConfig(layers=tuple(sorted({L // 4, L // 2, 3 * L // 4})))  # layers 6, 12, 18 of 24
    examples = torch.randint(config.vocab_size, (B * (args.steps + 2), T), generator=torch.Generator().manual_seed(0))
    n = mem_cfg.n_keys ** 2
    background = [BackgroundStats(torch.randint(0, 50, (n,)), torch.randint(0, 500, (n,)), 2000)] * 3
    print(f"bench: {args.shape} on {torch.cuda.get_device_name() if cuda else 'cpu'}, {B} x {T} tokens a step")
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
        with contextlib.redirect_stderr(None):  # no progress bars between the rows
            history = train(model, examples.tolist(), cfg, background, 0, device)[2:]  # after 2 warm-up steps
        step_s = statistics.mean(h["step_time"] for h in history)
        tokens_per_s[method] = B * T / step_s
        print(f"{method:9s} {tokens_per_s[method]:9.0f} tokens/s  {1000 * step_s:7.1f} ms/step")
    print(f"SMF tokens/s / full finetuning tokens/s: {tokens_per_s['smf'] / tokens_per_s['full']:.2f}")
    ffn = nn.Sequential(nn.Linear(896, 4864, bias=False), nn.SiLU(), nn.Linear(4864, 896, bias=False))
    x = torch.randn(2048, 896, device=device, requires_grad=True)
    seconds = {name: fwd_bwd_seconds(layer.to(device), x, device)
               for name, layer in (("memory", ProductKeyMemory(896)), ("ffn", ffn))}
    ratio = seconds["memory"] / seconds["ffn"]
    print(f"memory layer fwd+bwd / FFN fwd+bwd (hidden 896, N=16384, 2048 tokens; FFN 896-4864-896 with a "
          f"third matmul for SwiGLU's gate): {ratio:.2f}")

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
