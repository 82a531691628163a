
# -----------------------------------------------------------------------------------------------------------
# Data files: every source is a hub id by default, or a local JSON Lines (or .txt) file in the hub's schema


def is_local(path):
    """A path on this machine (it exists, or is spelled like one) rather than a hub id."""
    spelled = path.startswith((".", "/", "~")) or path.count("/") > 1
    return os.path.exists(path) or spelled or path.lower().endswith((".jsonl", ".json", ".txt"))


def read_rows(source, hub_config=None, split="train"):
    """(where, row) pairs, `where` a row's place for errors: its line in a file (every line counted)."""
    if not is_local(source):
        try:
            import datasets  # imported here: `eval` and `bench` run where `datasets` is not installed
            rows = datasets.load_dataset(source, hub_config, split=split)
        except Exception as e:
            raise UserError(f"could not load data set '{source}' ({type(e).__name__}) — download it first, "
                            "or pass a local file in the same schema") from e
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    kind = source.lower().rsplit(".", 1)[-1]
    require(os.path.isfile(source) and kind in ("jsonl", "json", "txt"), f"data file {source} is not a "
            ".jsonl, .json (JSON Lines, what datasets' to_json writes) or .txt file — check the path")
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
            require(isinstance(row, dict), f"{source}: line {i} is a {type(row).__name__}, not a JSON "
                    "object — one object per line (JSON Lines, what datasets' to_json writes)")
            rows.append((f"line {i}", row))
    return rows


def parse_rows(source, rows, parse):
    """parse(row) of every row; a missing or mistyped field is named with the row's line."""
    out = []
    for where, row in rows:
        try:
            out.append(parse(row))
        except KeyError as e:
            raise UserError(f"{source}: {where}: field {e} is missing — the file must use the hub schema") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{source}: {where}: {e} — the file must use the hub schema") from e
    return out


def keep_rows(source, rows, filters):
    """The rows that pass every filter ({description: [passes, one per row]}); when none is left, the
    error says how many rows each filter removed."""
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
    """Single-answer rows (`choice_type == "single"`, kept when absent), shuffled with `seed`, the first
    `limit`."""
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
    """(question, aliases): the aliases and the answer value, a list of strings (a string would be an alias
    per character)."""
    aliases, value = row["answer"]["aliases"] or [], row["answer"].get("value") or ""
    if not isinstance(row["question"], str) or not isinstance(aliases, list):
        raise TypeError("question must be text and answer.aliases a list")
    aliases = aliases + [value] if value else aliases
    if not aliases or not all(isinstance(a, str) for a in aliases):
        raise ValueError("the answer has no aliases as a list of strings")
    return row["question"], aliases


def load_triviaqa(source="mandarjoshi/trivia_qa", limit=1000):
    """(question, aliases) pairs from the rc.nocontext validation split."""
    return parse_rows(source, read_rows(source, "rc.nocontext", "validation")[:limit], triviaqa_row)


def load_background(source="OpenAssistant/oasst1", limit=None):
    """OASST1 English assistant replies ranked 0 or 1, at least 50 characters: the general-text corpus."""
    rows = parse_rows(source, read_rows(source, None, "train"), text_field)
    filters = {"lang == 'en'": [r.get("lang", "en") == "en" for r in rows],
               "role == 'assistant'": [r.get("role", "assistant") == "assistant" for r in rows],
               "rank 0 or 1": [r.get("rank", 0) in (0, 1) for r in rows],
               "at least 50 characters": [len(r["text"]) >= 50 for r in rows]}
    return [r["text"] for r in keep_rows(source, rows, filters)][:limit]

# -----------------------------------------------------------------------------------------------------------
# Checkpoints: small files on top of a parent model, staged and renamed into place, read back by load_model

STATS = "background_stats.safetensors"  # a retrofit's background statistics; its SMF runs carry a copy


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
    """A results JSON (it names its model) or a table.md that this tool wrote: rerunning into it is normal."""
    with contextlib.suppress(OSError, ValueError):
        if path.endswith(".md"):
            with open(path) as f:
                return f.readline().startswith("| row |")
        content = read_json(path, "")
        return isinstance(content, dict) and "model" in content
    return False


def check_output(flag, path, reads, folder=False, overwrite=False):
    """The output rule: a path a command writes must not exist, except a checkpoint folder replaced with
    --overwrite that holds only the files its config.json lists, and a results file this tool wrote. It is
    never, nor lies inside, anything the run reads (its model and that model's parents)."""
    real = os.path.realpath(path)
    for read in map(os.path.realpath, reads):
        require(real != read and not real.startswith(read + os.sep),
                f"{flag} {path} is or lies inside {read}, which this run reads — choose another path")
    place = os.path.dirname(real)
    while not os.path.exists(place):
        place = os.path.dirname(place)
    require(os.path.isdir(place) and os.access(place, os.W_OK),
            f"{flag} {path} cannot be written ({place} is not a writable folder) — choose a writable place")
    if not os.path.exists(path):
        return
    if not folder:
        require(os.path.isfile(path) and written_by_smf(path),
                f"{flag} {path} exists and is not a results file of smf — choose a new file name")
        return
    meta = checkpoint_meta(path) if os.path.isdir(path) else None
    require(meta is not None, f"{flag} {path} exists and is not an smf checkpoint — choose a new folder")
    extra = sorted(set(os.listdir(path)) - set(meta.get("files", ())))
    require(not extra, f"{flag} {path} also holds {', '.join(extra)}, which replacing the checkpoint would "
            "delete — move them out, or choose another folder")
    require(overwrite, f"{flag} {path} already holds a checkpoint — pass --overwrite to replace it (once "
            "the new one is complete), or choose a new folder")


@contextlib.contextmanager
def replacing(out, overwrite=False):
    """Yields a staging folder, this run's own, that becomes `out` if the block ends without error: one
    rename, which fails if another run wrote `out` meanwhile; with `overwrite` the old checkpoint is renamed
    aside first, and back if the second rename fails or is interrupted. Before the swap `out` is untouched."""
    place, name = os.path.split(os.path.abspath(out))  # beside `out`, on its file system: a rename moves it
    os.makedirs(place, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=place)
    old = staged + ".old"
    try:
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes 0700 and safetensors 0600: the usual permissions
        for file in os.listdir(staged):
            os.chmod(os.path.join(staged, file), 0o666 & ~umask)
        try:
            if overwrite and os.path.exists(out):
                os.rename(out, old)
            os.rename(staged, out)
        except OSError as e:
            raise UserError(f"{out} was written by another run meanwhile ({e.strerror}) — that checkpoint "
                            "stays; train again into another folder") from e
        finally:
            if os.path.exists(old) and not os.path.exists(out):
                os.rename(old, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def save_checkpoint(folder, meta, tensors, extra=None):
    """weights.safetensors, the `extra` {file: tensors}, and config.json's `smf`: `meta` and the files."""
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
    """A checkpoint's parent: beside it as recorded (moved together), else where it was (copied alone)."""
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


def fingerprint(path):
    """Of a plain parent model: the sha256 of its weight files (a local folder), or None (a hub id: its files
    are content-addressed by the hub's cache). A changed parent under the same path is then caught."""
    if not is_local(path):
        return None
    digest = hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))):
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def provenance(kind, cfg_record, parent, out):
    """config.json's record of where a checkpoint comes from: its parent (relative to the checkpoint, and
    absolute), the parent's id or fingerprint, a fresh id of its own, and the versions it was made with."""
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
    """What an SMF checkpoint stores of its `trained` tensors: of a value table only the rows that changed
    since `before` (as `<name>.index` and `<name>.rows`), anything else (alpha, with --train-scale) whole."""
    patch = {name: t for name, t in trained.items() if name not in before}
    for name in before:
        index = (before[name] != trained[name]).any(dim=1).nonzero()[:, 0]   # exact: a change of 1e-9 counts
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
    require(os.path.isdir(path), f"--model {path}: there is no such folder, and as a hub id it could not be "
            "loaded — check the path")
    require(os.path.isfile(os.path.join(path, "config.json")), f"{path} is neither a Hugging Face model nor "
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
        require(not damaged, f"{damaged[0] if damaged else ''} is damaged — restore it, or download {path} again")
        detail = " ".join(str(e).split())[:150]
        where = "no such local folder, and as a hub id it" if not is_local(path) else "it"
        raise UserError(f"could not load model '{path}': {where} could not be loaded ({type(e).__name__}: "
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
    """(model, tokenizer) for a hub id, a local HF folder, or any checkpoint smf writes (parents first)."""
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
    require(not changed, f"the parent {parent} of {path} has other weights than it was trained from — "
            f"restore that parent, or train {path} again")
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
        for key, t in tensors.items():  # whole tensors, or smf_patch's changed rows of a value table
            if key.endswith(".rows"):
                name = key.removesuffix(".rows")
                params[name][tensors[f"{name}.index"]] = t.to(dtype)
            elif not key.endswith(".index"):
                params[key].copy_(t)
    return merge_lora(model).to(dtype).eval(), tokenizer
