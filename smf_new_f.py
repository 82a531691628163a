
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
    source = re.sub(r"\n\s+#\s+", " ", inspect.getsource(cls))  # a comment's continuation lines
    return dict(re.findall(r"^\s+(\w+): [^#\n]*# (.*)$", source, re.M))

CHOICES = {"method": tuple(METHOD_LR), "optimizer": ("adamw", "sgd"), "selector": tuple(SELECTORS),
           "mode": ("additive", "replacement"), "medmcqa_mode": ("answer", "letter")}

def add_config_flags(group, cls, prefix=""):
    """A flag per field of a config dataclass, its comment as the help. Every flag defaults to None, so that
    check_args can tell what was given (rule 2) before it fills in the dataclass's default."""
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
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub id, HF folder or smf checkpoint; train "
                       "starts from a base model, a retrofit (smf) or an smf checkpoint (smf) "
                       f"(default: {DEFAULT_MODEL})")
    e = sub.add_parser("eval", parents=[common, model], help="evaluate a model on the probes")
    e.add_argument("--probe", default="all", choices=list(PROBES) + ["all"], help="(default: all)")
    e.add_argument("--out", help="write the results as JSON here")
    add_config_flags(e.add_argument_group("probes"), EvalConfig)
    t = sub.add_parser("train", parents=[common, model], help="retrofit, smf, lora or full finetuning")
    t.add_argument("--out", help="checkpoint folder (default runs/<method>)")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out, once the new "
                   "one is complete")
    add_config_flags(t.add_argument_group("recipe (the paper's by default)"), TrainConfig)
    add_config_flags(t.add_argument_group("memory layers (a new memory: retrofit, or smf from a model "
                                          "without)"), MemoryConfig, "memory_")
    probes = t.add_argument_group("evaluation after training (only with --eval-out)")
    probes.add_argument("--eval-out", help="after training, evaluate the checkpoint on all probes into this JSON")
    add_config_flags(probes, EvalConfig)
    b = sub.add_parser("bench", parents=[common], help="training speed of every method on random weights")
    b.add_argument("--shape", default="tiny", choices=list(SHAPES), help="(default: tiny)")
    b.add_argument("--batch-size", type=int, help="sequences per step; default 16 on a GPU, 4 on a CPU")
    b.add_argument("--seq-len", type=int, help="tokens per sequence; default 512 on a GPU, 256 on a CPU")
    b.add_argument("--steps", type=int, default=5, help="timed optimizer steps per method (default: 5)")
    tb = sub.add_parser("table", help="the results table and figure of a run_all.sh folder")
    tb.add_argument("results_dir", help="the OUT folder of run_all.sh")
    tb.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p

RANGES = [  # (options, what a good value is, lowest, highest, lowest allowed): values lie below `highest`
    ("lr epochs lora_alpha repetition_penalty", "> 0 and finite", 0, math.inf, False),
    ("micro_batch grad_accum forward_batch max_steps limit_train background_examples lora_r top_t batch_size "
     "limit memory_n_keys memory_heads memory_topk steps seq_len", ">= 1", 1, math.inf, True),
    ("clip weight_decay warmup", ">= 0 and finite", 0, math.inf, True),
    ("lora_dropout", "in [0, 1)", 0, 1, True),
    ("max_len", ">= 2 (a text needs two tokens to have a target)", 2, math.inf, True),
    ("memory_key_dim", ">= 2 (it is split in two halves)", 2, math.inf, True),
    ("seed", "in [0, 2**63)", 0, 2 ** 63, True)]
PATH_OPTIONS = ("model", "out", "eval_out", "results_dir", "medmcqa", "background", "eval_medmcqa", "wikitext",
                "triviaqa")

def check_args(args):
    """Every mistake in the options, before any model or data loads: a value out of range, the device, an
    option that does not apply to this run (rule 2), a path it must not write (the output rule). Records
    which options were given and fills in the defaults of the others."""
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
                f"--device {args.device}: this torch sees {n_gpus} CUDA GPU(s) — use cpu, cuda or cuda:N")
        check_model_path(args.model)
    configs = {"train": [(TrainConfig, ""), (MemoryConfig, "memory_"), (EvalConfig, "")], "eval": [(EvalConfig, "")]}
    fields = [(cls, prefix + f.name) for cls, prefix in configs.get(args.command, []) for f in dataclasses.fields(cls)]
    args.given = sorted(name for _, name in fields if getattr(args, name) is not None)
    if args.command == "train":
        check_train_args(args)
    for cls, name in fields:  # the defaults of the options not given
        if getattr(args, name) is None:
            setattr(args, name, {f.name: f.default for f in dataclasses.fields(cls)}[name.removeprefix("memory_")])
    outputs = {"train": [("--out", args.out if args.command == "train" else None, True), ("--eval-out",
               getattr(args, "eval_out", None), False)], "eval": [("--out", args.out, False)],
               "table": [("the table", os.path.join(args.results_dir, "table.md"), False), ("the figure",
               os.path.join(args.results_dir, "figure.svg"), False)]}
    reads = checkpoint_chain(args.model) if args.command in ("train", "eval") else []
    for flag, path, folder in outputs.get(args.command, []):
        if path:
            check_output(flag, path, reads, folder, getattr(args, "overwrite", False))

def check_train_args(args):
    """train's own checks, every one before anything runs (for the one-liner: before its retrofit)."""
    args.method = args.method or "smf"
    memory = model_memory(args.model)
    mode = (memory or {}).get("mode", args.memory_mode or "additive")
    kinds = run_kinds(args.method, bool(memory), mode, args.eval_out)
    for name in args.given:
        require(kinds[APPLIES[name]] if name in APPLIES else True, f"--{name.replace('_', '-')} applies only "
                f"to {RUNS[APPLIES.get(name, 'smf')]} — drop it from this run")
    require(not memory or args.method not in ("retrofit", "full"), f"{args.model} already has memory layers — "
            f"{args.method} starts from a model without memory; train this one with --method smf")
    require(not (args.train_scale and mode == "replacement"), "--train-scale needs additive memory — "
            "replacement memory has no alpha")
    stats = os.path.join(args.model, STATS)
    require(not memory or args.method != "smf" or os.path.isfile(stats), f"{stats} is missing: SMF ranks rows "
            "against the background statistics its retrofit saved — restore it, or retrofit again "
            "(train --method retrofit)")
    micro, forward = args.micro_batch or 4, args.forward_batch
    require(not forward or forward % micro == 0, f"--forward-batch {forward} is not a multiple of "
            f"--micro-batch {micro} — make it one")
    if kinds["new memory"]:
        check_memory_fits(args)
    args.out = args.out or os.path.join("runs", args.method)
    retrofit_out = args.out.rstrip("/") + "_retrofit"
    require(memory or args.method != "smf" or not os.path.exists(retrofit_out), f"{retrofit_out} exists — "
            f"train SMF from it (--model {retrofit_out}), or move it away to retrofit again")
    if args.method == "smf" and not memory:
        check_output("--out", retrofit_out, checkpoint_chain(args.model), True)

def check_memory_fits(args):
    """A new memory's value tables must fit, with their gradient and two AdamW moments, where they train."""
    n_keys, layers = args.memory_n_keys or MemoryConfig.n_keys, args.memory_layers or MemoryConfig.layers
    config = os.path.join(args.model, "config.json")
    hidden = read_json(config, "restore it").get("hidden_size", 0) if os.path.isfile(config) else 896
    need = 16 * len(layers) * n_keys ** 2 * hidden  # bytes: fp32 values, gradient and two moments
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if args.device.startswith("cuda"):
        have = torch.cuda.get_device_properties(args.device).total_memory
    require(need < have, f"--memory-n-keys {n_keys}: its value tables would need {need / 2 ** 30:,.1f} GiB to "
            f"train, more than the {have / 2 ** 30:,.1f} GiB of {args.device} — lower --memory-n-keys")

def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (Slurm's time limit, scancel) cleans up exactly as Ctrl-C does

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
