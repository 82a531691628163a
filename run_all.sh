#!/usr/bin/env bash
# Reproduces every row of the results table, for each seed, then prints the table. A stage is one row of one
# seed (e.g. smf_additive_kl/seed0); it writes under $OUT/<row>/seed<S>/ and is finished when its eval.json holds
# every probe, so a rerun after a crash or a killed job skips finished stages and continues. Each stage records
# the settings it depends on; a rerun with other settings is refused, never answered with the old results.
# Relative paths (OUT, data, model) are the caller's: run it from any folder.
#   bash run_all.sh --list               the stages, one per line, each after the stage it needs
#   SEEDS=0 ROWS="base lora" bash run_all.sh
#   GPUS="0 1 2 3" bash run_all.sh       stages in parallel, one per GPU, each as soon as its retrofit is done
#   STAGE=smf_additive_kl/seed0 bash run_all.sh    one stage (its retrofit must be finished): for a scheduler
# Override any setting below from the environment. Run it with bash (not sh).
if [ -z "${BASH_VERSION:-}" ]; then echo "error: run_all.sh needs bash — run it with: bash run_all.sh" >&2; exit 2; fi
set -euo pipefail
usage() {
  sed -n '2,/^if \[ -z "\${BASH_VERSION/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "settings (environment variables; the default after :- ):"
  grep -E '^[A-Z_]+=\$\{' "$0" | grep -v '^CPU_THREADS' | sed 's/^/  /'
}
case "$#:${1:-}" in
  0:|1:--list) ;;
  1:-h|1:--help) usage; exit 0 ;;
  *) echo "error: unknown argument(s) '$*' — the only ones are --list and --help; settings are environment variables (bash run_all.sh --help)" >&2; exit 2 ;;
esac
SMF="$(cd "$(dirname "$0")" && pwd)/smf.py"
export HF_HUB_DISABLE_PROGRESS_BARS=${HF_HUB_DISABLE_PROGRESS_BARS:-1}   # stage logs are files: no model-loading bars

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}              # base model: hub id or local folder
OUT=${OUT:-results}                                     # everything lands here
SEEDS=${SEEDS-"0 1 2"}                                  # the paper uses three seeds
ROWS=${ROWS-all}                                        # "all", or some of the names in ALL_ROWS below
GPUS=${GPUS:-}                                          # slots run in parallel: GPU ids, or "cpu"; empty: one at a time
STAGE=${STAGE:-}                                        # run only this stage (see --list)
MEDMCQA=${MEDMCQA:-openlifescienceai/medmcqa}           # training data (split train): hub id or local file
MEDMCQA_EVAL=${MEDMCQA_EVAL:-openlifescienceai/medmcqa} # MedMCQA probe (split validation)
WIKITEXT=${WIKITEXT:-Salesforce/wikitext}               # WikiText probe (wikitext-103-v1 test)
TRIVIAQA=${TRIVIAQA:-mandarjoshi/trivia_qa}             # TriviaQA probe (rc.nocontext validation)
BACKGROUND=${BACKGROUND:-OpenAssistant/oasst1}          # retrofit corpus and selector background
MAX_STEPS=${MAX_STEPS:-}                                # empty: full recipes (3 epochs; 2 for retrofit)
LIMIT_TRAIN=${LIMIT_TRAIN:-}                            # empty: 60,000 MedMCQA examples / all of OASST1
EVAL_LIMIT=${EVAL_LIMIT:-1000}                          # examples per probe (lines for WikiText)
BACKGROUND_EXAMPLES=${BACKGROUND_EXAMPLES:-2000}        # background texts behind the selectors
MICRO_BATCH=${MICRO_BATCH:-4}                           # x GRAD_ACCUM = effective batch 16
GRAD_ACCUM=${GRAD_ACCUM:-4}
FORWARD_TOKENS=${FORWARD_TOKENS:-4096}                  # padded tokens per forward pass (sets a step's memory)
LOSS_CHUNK=${LOSS_CHUNK:-1024}                          # target tokens whose vocabulary logits exist at once
EVAL_BATCH=${EVAL_BATCH:-16}                            # MedMCQA questions per forward (TriviaQA: twice that)
DEVICE=${DEVICE:-}                                      # without GPUS: the device; empty: cuda when available
TRAIN_ARGS=${TRAIN_ARGS:-}                              # extra flags for every train command (e.g. --warmup 0)
MEMORY_ARGS=${MEMORY_ARGS:-}                            # extra flags for the retrofit rows (--memory-*)
SMF_ARGS=${SMF_ARGS:-}                                  # extra flags for the SMF rows (e.g. --optimizer sgd --lr 2)
LORA_ARGS=${LORA_ARGS:-}                                # extra flags for the LoRA row (e.g. --lora-r 8)
FULL_ARGS=${FULL_ARGS:-}                                # extra flags for the full finetuning row
PYTHON=${PYTHON:-python}

ALL_ROWS="base retrofit_additive retrofit_replacement smf_replacement_kl smf_replacement_tfidf smf_additive_kl smf_additive_tfidf smf_additive_scale_kl smf_additive_scale_tfidf lora full"
[ "$ROWS" = all ] && ROWS=$ALL_ROWS
for row in $ROWS; do
  case " $ALL_ROWS " in *" $row "*) ;; *) echo "error: unknown row '$row' in ROWS — use names from: $ALL_ROWS" >&2; exit 2 ;; esac
done
[ -n "${SEEDS// /}" ] || { echo "error: SEEDS is empty — give one or more seeds, e.g. SEEDS=\"0 1 2\"" >&2; exit 2; }
seeds=""   # SEEDS as plain integers (01 is seed 1), each once
for seed in $SEEDS; do
  [[ $seed =~ ^[0-9]+$ ]] || { echo "error: SEEDS=\"$SEEDS\": '$seed' is not a seed — give integers separated by spaces, e.g. SEEDS=\"0 1 2\"" >&2; exit 2; }
  [[ " $seeds " != *" $((10#$seed)) "* ]] || { echo "error: SEEDS=\"$SEEDS\" names seed $((10#$seed)) twice — give each seed once" >&2; exit 2; }
  seeds="$seeds $((10#$seed))"
done
SEEDS="${seeds# }"
# counts and sizes: positive integers (MAX_STEPS and LIMIT_TRAIN may be empty), checked before any work
for name in MAX_STEPS LIMIT_TRAIN EVAL_LIMIT BACKGROUND_EXAMPLES MICRO_BATCH GRAD_ACCUM FORWARD_TOKENS LOSS_CHUNK EVAL_BATCH; do
  v=${!name}
  [[ -z $v && ($name == MAX_STEPS || $name == LIMIT_TRAIN) ]] || [[ $v =~ ^[1-9][0-9]*$ ]] || {
    echo "error: $name=$v is not a positive integer — give one, e.g. $name=2" >&2; exit 2; }
done
# a flag that run_all.sh sets for each row is refused in *_ARGS: it would silently override the row (or the seed)
declare -A SET_BY=([--method]="ROWS (the row's name)" [--memory-mode]="ROWS (the row's name)"
  [--selector]="ROWS (the row's name)" [--train-scale]="ROWS (the row's name)" [--seed]=SEEDS [--model]=MODEL
  [--out]=OUT [--device]="DEVICE or GPUS" [--medmcqa]=MEDMCQA [--background]=BACKGROUND
  [--background-examples]=BACKGROUND_EXAMPLES [--max-steps]=MAX_STEPS [--limit-train]=LIMIT_TRAIN
  [--micro-batch]=MICRO_BATCH [--grad-accum]=GRAD_ACCUM [--forward-tokens]=FORWARD_TOKENS [--loss-chunk]=LOSS_CHUNK)
for name in TRAIN_ARGS MEMORY_ARGS SMF_ARGS LORA_ARGS FULL_ARGS; do
  for arg in ${!name}; do
    flag=${arg%%=*}
    [ -z "${SET_BY[$flag]:-}" ] || { echo "error: $name has $flag, which run_all.sh sets for each row — drop it, and set ${SET_BY[$flag]} instead" >&2; exit 2; }
  done
done
# PYTHON must have torch (looked up, not imported: 0.1 s rather than 2)
$PYTHON -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("torch"))' 2>/dev/null || { echo "error: PYTHON=$PYTHON cannot import torch — install the requirements (README: Quick start), or point PYTHON at the Python that has them" >&2; exit 2; }
[ -n "${ROWS// /}" ] || { echo "error: ROWS is empty — give one or more of: $ALL_ROWS" >&2; exit 2; }
for g in $GPUS; do   # a slot is "cpu" or a GPU id; torch counts the GPUs only where ids are given
  [[ $g == cpu || $g =~ ^[0-9]+$ ]] || { echo "error: GPUS=\"$GPUS\": '$g' is not a slot — give \"cpu\" or GPU ids, e.g. GPUS=\"0 1\"" >&2; exit 2; }
done
# smf.py computes in fp32 on a CPU and in bf16 on a GPU: a table must not pair results of both
[[ " $GPUS " != *cpu* || " $GPUS " != *[0-9]* ]] || { echo "error: GPUS=\"$GPUS\" mixes cpu and GPU slots, which compute in fp32 and bf16 — give only GPU ids, or only cpu" >&2; exit 2; }
if [[ " $GPUS " == *[0-9]* ]]; then
  n_gpus=$($PYTHON -c 'import torch; print(torch.cuda.device_count())')
  for g in $GPUS; do
    fix='give GPUS="cpu" (this torch sees no GPU)'
    [ "$n_gpus" -gt 0 ] && fix="give \"cpu\" or GPU ids below $n_gpus (this torch sees $n_gpus GPUs), e.g. GPUS=\"$(seq -s ' ' 0 $((n_gpus - 1)))\""
    [[ $g == cpu || $g -lt $n_gpus ]] || { echo "error: GPUS=\"$GPUS\": '$g' is not a slot — $fix" >&2; exit 2; }
  done
fi
TABLE_HEADER='<!-- written by `smf.py table` from the eval.json files: rewritten on every run -->'   # smf.py's
# local paths as absolute ones, so that the stages (and their recorded settings) mean the same files from any folder
local_path() { if [ -e "$1" ]; then realpath "$1"; else echo "$1"; fi; }
MODEL=$(local_path "$MODEL") MEDMCQA=$(local_path "$MEDMCQA") MEDMCQA_EVAL=$(local_path "$MEDMCQA_EVAL")
WIKITEXT=$(local_path "$WIKITEXT") TRIVIAQA=$(local_path "$TRIVIAQA") BACKGROUND=$(local_path "$BACKGROUND")
OUT=$(realpath -m "$OUT")
[ ! -e "$OUT" ] || [ -d "$OUT" ] || { echo "error: OUT=$OUT is a file — give a folder (new, or one of an earlier run)" >&2; exit 2; }
# every local data path must exist before the first stage runs (a hub id has one slash and no file extension)
for name in MEDMCQA MEDMCQA_EVAL WIKITEXT TRIVIAQA BACKGROUND; do
  p=${!name}
  if [ ! -e "$p" ] && [[ $p == /* || $p == .* || $p == */*/* || $p == *.json || $p == *.jsonl ]]; then
    echo "error: $name=$p does not exist — give the local file, or a hub id" >&2; exit 2
  fi
done
# a local data file is recorded by its content (sha256 and size), so that a file changed in place is caught like a
# setting and the same file at another path is the same data; where it lay follows as "(at PATH)", not compared
declare -A IDENTITY=()
for name in MEDMCQA MEDMCQA_EVAL WIKITEXT TRIVIAQA BACKGROUND; do
  IDENTITY[$name]=${!name}
  [ ! -f "${!name}" ] || IDENTITY[$name]="sha256 $(sha256sum "${!name}" | cut -c1-16), $(wc -c < "${!name}") bytes (at ${!name})"
done
# the base model by the sha256 of its weight files (a hub id's: of the revision its hub cache holds, as smf.py loads
# it), so that weights changed in place or a new hub revision are caught, and the same weights by folder or hub id agree
hub=${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}/models--${MODEL//\//--}
weights=$MODEL
[ -d "$MODEL" ] || [ ! -f "$hub/refs/main" ] || weights=$hub/snapshots/$(cat "$hub/refs/main")
[ ! -d "$weights" ] || IDENTITY[MODEL]="weights sha256 $(cd "$weights" && find . -maxdepth 1 \( -name '*.safetensors' -o -name '*.bin' \) | sort | xargs -r sha256sum | sha256sum | cut -c1-16) (at $MODEL)"

# needs STAGE: the stage it starts from (an SMF row needs its retrofit), or "-"
needs() {
  local row=${1%/seed*} seed=${1#*/seed}
  case $row in
    smf_replacement_*) echo "retrofit_replacement/seed$seed" ;;
    smf_additive*) echo "retrofit_additive/seed$seed" ;;
    *) echo - ;;
  esac
}

# the requested stages, in an order that respects every dependency (rows in ALL_ROWS order, seed by seed)
STAGES=()
for seed in $SEEDS; do
  for row in $ALL_ROWS; do
    case " $ROWS " in *" $row "*) STAGES+=("$row/seed$seed") ;; esac
  done
done
if [ "${1:-}" = --list ]; then
  for s in "${STAGES[@]}"; do [ "$(needs "$s")" = - ] && echo "$s" || echo "$s  after $(needs "$s")"; done
  exit 0
fi
# every local data file is read now as JSON Lines of objects with the fields smf.py reads, and every eval.json of
# OUT as JSON: a broken data file would stop a run hours in, and a damaged eval.json could pass as finished
$PYTHON - "$OUT" MEDMCQA="$MEDMCQA" MEDMCQA_EVAL="$MEDMCQA_EVAL" WIKITEXT="$WIKITEXT" TRIVIAQA="$TRIVIAQA" BACKGROUND="$BACKGROUND" <<'EOF' || exit 2
import glob, json, os, sys
medmcqa = ["question", "opa", "opb", "opc", "opd", "cop"]
fields = {"MEDMCQA": medmcqa, "MEDMCQA_EVAL": medmcqa, "WIKITEXT": ["text"], "TRIVIAQA": ["question", "answer"],
          "BACKGROUND": ["text"]}
def refuse(name, path, i, what):
    sys.exit(f"error: {name}={path}: line {i} {what} — give a JSON Lines file in the hub's schema (docs/running.md: "
             "Local data, offline)")
for name, path in (arg.split("=", 1) for arg in sys.argv[2:]):
    lines = open(path, encoding="utf-8-sig").read().split("\n") if os.path.isfile(path) else []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            refuse(name, path, i, "is not a JSON object")
        if not isinstance(row, dict):
            refuse(name, path, i, "is not a JSON object")
        for field in fields[name] if row else []:
            if field not in row:
                refuse(name, path, i, f"lacks field {field!r}")
        answer = row.get("answer") if name == "TRIVIAQA" and row else {"aliases": []}
        if not (isinstance(answer, dict) and isinstance(answer.get("aliases"), list)):
            refuse(name, path, i, "has an 'answer' that is not {\"aliases\": [...], \"value\": ...}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "seed*", "eval.json"))):
    try:
        json.load(open(path))
    except ValueError:
        sys.exit(f"error: {path} is damaged (not JSON) — delete it: run_all.sh then evaluates that stage again")
EOF

# finished STAGE: its eval.json holds every probe (an `eval --probe medmcqa` result is not a finished stage); a
# probe's results are a JSON object, whatever the file's indentation
finished() {
  [ -f "$OUT/$1/eval.json" ] || return 1
  for p in medmcqa wikitext triviaqa; do grep -qE "\"$p\"[[:space:]]*:[[:space:]]*\{" "$OUT/$1/eval.json" || return 1; done
}

# has_model STAGE: a finished stage that another starts from still has its model (or says which stage to redo)
has_model() {
  [ -f "$OUT/$1/model/config.json" ] || { echo "error: stage $1 has finished, but its model $OUT/$1/model is missing — move $OUT/$1 away to redo that stage" >&2; return 1; }
}

# settings STAGE: the settings its results depend on, NAME=value a line (an SMF row's include its retrofit's);
# the evaluation's come after the line "# evaluation"; last, after "# recorded, not compared", the budgets that
# change speed and memory, and a result only by float rounding (LoRA's also by its dropout masks)
settings() {
  local names="MODEL PRECISION" train="MAX_STEPS LIMIT_TRAIN MICRO_BATCH GRAD_ACCUM TRAIN_ARGS"
  local memory="BACKGROUND BACKGROUND_EXAMPLES MEMORY_ARGS"
  case ${1%/seed*} in
    base) ;;
    retrofit_*) names="$names $train $memory" ;;
    smf_*) names="$names $train $memory MEDMCQA SMF_ARGS" ;;
    lora) names="$names $train MEDMCQA LORA_ARGS" ;;
    full) names="$names $train MEDMCQA FULL_ARGS" ;;
  esac
  for n in $names "# evaluation" MEDMCQA_EVAL WIKITEXT TRIVIAQA EVAL_LIMIT "# recorded, not compared" FORWARD_TOKENS LOSS_CHUNK EVAL_BATCH; do
    case $n in "#"*) echo "$n" ;; *) echo "$n=${IDENTITY[$n]:-${!n}}" ;; esac
  done
}

# differ STAGE LINES: the diff of STAGE's settings as this run would record them against its settings.txt, over the
# lines the sed script LINES prints; a local file counts by its content, not by where it lay ("(at PATH)")
differ() {
  local same='s/ (at [^)]*)$//'
  diff <(settings "$1" | sed -n "$2" | sed "$same") <(sed -n "$2" "$OUT/$1/settings.txt" | sed "$same")
}

# check_settings STAGE [training]: refuses a stage made before with other settings (or with none recorded); a
# stage whose evaluation has not finished, or a retrofit that an SMF stage starts from ("training"), is checked on
# its training settings only
check_settings() {
  local training='/^# evaluation/q;p' upto='/^# recorded/q;p'
  [ -e "$OUT/$1/model" ] || [ -e "$OUT/$1/eval.json" ] || return 0   # no results yet: nothing to pass off
  [ -f "$OUT/$1/settings.txt" ] || { echo "error: $OUT/$1 holds results with no record of their settings — choose another OUT, or move $OUT/$1 away to redo it" >&2; return 1; }
  finished "$1" && [ "${2:-}" != training ] || upto=$training
  local changes there now fix="move $OUT/$1 away to redo it"
  changes=$(differ "$1" "$upto") && return 0
  there=$(sed -n 's/^> //p' <<< "$changes" | paste -sd ' ' -) now=$(sed -n 's/^< //p' <<< "$changes" | paste -sd ' ' -)
  if [ "$upto" != "$training" ] && differ "$1" "$training" >/dev/null; then   # only evaluation settings changed
    fix="delete $OUT/$1/eval.json to evaluate its model again with these settings"
  fi
  echo "error: stage $1 in $OUT was made with $there; this run has $now — choose another OUT, or $fix" >&2
  return 1
}

# stage_commands STAGE DEVICE: the stage's smf.py commands, one a line (train, unless it only evaluates; then eval),
# each argument shell-quoted; each row gets only the options that apply to it (smf.py refuses the others)
stage_commands() {
  local row=${1%/seed*} seed=${1#*/seed} device=$2 dir="$OUT/$1" model="$OUT/$1/model"
  local data=(--device "$device" --medmcqa "$MEDMCQA_EVAL" --wikitext "$WIKITEXT" --triviaqa "$TRIVIAQA"
              --limit "$EVAL_LIMIT" --batch-size "$EVAL_BATCH")
  local train=(--micro-batch "$MICRO_BATCH" --grad-accum "$GRAD_ACCUM" ${MAX_STEPS:+--max-steps "$MAX_STEPS"}
               --forward-tokens "$FORWARD_TOKENS" --loss-chunk "$LOSS_CHUNK" ${LIMIT_TRAIN:+--limit-train "$LIMIT_TRAIN"}
               $TRAIN_ARGS)
  local how=()
  case $row in
    base) model=$MODEL ;;
    retrofit_*) how=(--method retrofit --model "$MODEL" --memory-mode "${row#retrofit_}" --background "$BACKGROUND"
                     --background-examples "$BACKGROUND_EXAMPLES" $MEMORY_ARGS) ;;
    smf_*) local sel=${row##*_} parent="$OUT/$(needs "$1")/model"  # the retrofit's background statistics are reused
           how=(--method smf --model "$parent" --medmcqa "$MEDMCQA" --selector "$sel" $SMF_ARGS)
           case $row in *_scale_*) how+=(--train-scale) ;; esac ;;
    lora) how=(--method lora --model "$MODEL" --medmcqa "$MEDMCQA" $LORA_ARGS) ;;
    full) how=(--method full --model "$MODEL" --medmcqa "$MEDMCQA" $FULL_ARGS) ;;
  esac
  [ ${#how[@]} -eq 0 ] || { printf '%q ' train --device "$device" --out "$dir/model" --seed "$seed" "${how[@]}" "${train[@]}"; echo; }
  printf '%q ' eval --model "$model" "${data[@]}" --out "$dir/eval.json"; echo
}

# run_stage STAGE DEVICE: trains (unless its checkpoint exists) and evaluates one stage; output to its log
run_stage() {
  local line args
  settings "$1" > "$OUT/$1/settings.txt"   # what its results will depend on (check_settings reads it)
  while IFS= read -r line; do
    eval "args=($line)"
    # trained before and its evaluation did not finish: evaluate only
    [ "${args[0]}" = train ] && [ -f "$OUT/$1/model/config.json" ] && continue
    $PYTHON "$SMF" "${args[@]}" || return
  done < <(stage_commands "$1" "$2")
}

# check_commands STAGE...: every stage's smf.py commands, checked now by smf.py's own option checks (no model
# loads): a typo in *_ARGS or DEVICE fails before the first stage, not when its stage starts hours later
check_commands() {
  local s line args commands rc=0
  commands=$(mktemp)   # each command as its stage's name and its arguments, NUL-separated, then a blank line
  for s in "$@"; do
    while IFS= read -r line; do
      eval "args=($line)"
      printf '%s\0' "$s" "${args[@]}" >> "$commands"
      printf '\n' >> "$commands"
    done < <(stage_commands "$s" "$DEVICE")
  done
  $PYTHON - "$SMF" "$commands" "TRAIN_ARGS=$TRAIN_ARGS" "MEMORY_ARGS=$MEMORY_ARGS" "SMF_ARGS=$SMF_ARGS" \
    "LORA_ARGS=$LORA_ARGS" "FULL_ARGS=$FULL_ARGS" "DEVICE=$DEVICE" <<'PY'
import contextlib, io, json, os, re, sys, tempfile
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import smf
variables = dict(arg.split("=", 1) for arg in sys.argv[3:])
with tempfile.TemporaryDirectory() as tmp:
    for mode in ("additive", "replacement"):   # a retrofit not trained yet: a stand-in with its mode
        os.makedirs(os.path.join(tmp, mode))
        with open(os.path.join(tmp, mode, "config.json"), "w") as f:
            json.dump({"smf": {"kind": "memory", "memory": {"mode": mode}}}, f)
        open(os.path.join(tmp, mode, smf.STATS), "w").close()
    for command in open(sys.argv[2], "rb").read().split(b"\0\n")[:-1]:
        stage, *argv = (os.fsdecode(arg) for arg in command.split(b"\0"))
        argv[argv.index("--out") + 1] = os.path.join(tmp, "out")   # where a stage writes, run_all.sh checks
        model = argv.index("--model") + 1
        if os.path.isabs(argv[model]) and not os.path.isdir(argv[model]):   # not trained yet: a stand-in
            argv[model] = os.path.join(tmp, "replacement" if "replacement" in stage else "additive")
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                smf.check_args(smf.build_parser().parse_args(argv))
        except (SystemExit, smf.UserError) as e:
            why = str(e) if isinstance(e, smf.UserError) else stderr.getvalue().strip().splitlines()[-1]
            why = why.removeprefix("error: ").split(" — see `python")[0]
            words = set(re.findall(r"[\w.-]+", why))
            own = {"retrofit": "MEMORY_ARGS", "smf": "SMF_ARGS", "lora": "LORA_ARGS", "full": "FULL_ARGS"}
            given = ["TRAIN_ARGS", own.get(stage.split("/")[0].split("_")[0]), "DEVICE"] if argv[0] == "train" else ["DEVICE"]
            named = [n for n in given if n and any(w in words for w in [w for w in variables[n].split()
                                                                          if w.startswith("--")] or variables[n].split())]
            source = f" (from {' or '.join(named)})" if named else ""
            sys.exit(f"error: stage {stage}: smf.py {argv[0]} would refuse its options{source}: {why}")
PY
  rc=$?
  rm -f "$commands"
  return $rc
}

# start STAGE SLOT: runs the stage in the background on a slot ("cpu", or a GPU id seen alone through
# CUDA_VISIBLE_DEVICES); sets $started to its pid
start() {
  local log="$OUT/logs/${1/\//_}.log"
  mkdir -p "$OUT/$1" "$OUT/logs"
  echo "start ${1%/seed*} seed ${1#*/seed} on $2 at $(date +%T)"
  echo "== run_all.sh: stage $1 on $2 at $(date '+%F %T')" >> "$log"   # a rerun's lines follow an earlier run's
  if [ "$2" = cpu ]; then OMP_NUM_THREADS=$CPU_THREADS run_stage "$1" cpu >>"$log" 2>&1 &
  elif [ "$2" = default ]; then run_stage "$1" "$DEVICE" >>"$log" 2>&1 &
  else CUDA_VISIBLE_DEVICES=$2 run_stage "$1" cuda >>"$log" 2>&1 &
  fi
  started=$!
}

[ -n "$DEVICE" ] || DEVICE=$($PYTHON -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
# one precision a run (GPUS mixes none), recorded and compared like any setting
PRECISION=$([[ " ${GPUS:-$DEVICE} " == *cpu* ]] && echo "fp32 (cpu)" || echo "bf16 autocast (cuda)")
# lock FILE MODE WHAT: a lock (MODE -x exclusive, -s shared) on FILE, held until this script and its stages end;
# refuses a run when another holds it (flock exits 1). A file system without locks (flock fails otherwise) only
# gets a warning
lock() {
  local fd rc=0
  { exec {fd}>>"$1"; } 2>/dev/null || { echo "error: cannot write $1 — give an OUT you can write to" >&2; exit 2; }
  flock -n "$2" "$fd" || rc=$?
  [ $rc -ne 1 ] || { echo "error: another run_all.sh is running $3 (it holds $1) — wait for it to end, or choose another OUT" >&2; exit 2; }
  [ $rc -eq 0 ] || echo "warning: the file system of $OUT takes no locks (flock exit $rc): a second run into it is not refused" >&2
}
if [ -n "$STAGE" ]; then   # one stage, for a scheduler's job array (any row and seed, whatever ROWS and SEEDS say)
  [[ " $ALL_ROWS " == *" ${STAGE%/seed*} "* && ${STAGE#*/seed} =~ ^[0-9]+$ && $STAGE == */seed* ]] || {
    echo "error: unknown stage '$STAGE' — a stage is <row>/seed<integer> (see bash run_all.sh --list)" >&2; exit 2; }
  STAGE="${STAGE%/seed*}/seed$((10#${STAGE#*/seed}))"   # seed01 is seed1
  dep=$(needs "$STAGE")
  if [ "$dep" != - ] && ! finished "$dep"; then
    echo "error: stage $STAGE needs $dep, which has not finished — run STAGE=$dep first" >&2; exit 2
  fi
  check_settings "$STAGE" || exit 2
  [ "$dep" = - ] || check_settings "$dep" training || exit 2   # the retrofit it starts from, as this run would make it
  [ "$dep" = - ] || has_model "$dep" || exit 2
  finished "$STAGE" || check_commands "$STAGE" || exit 2
  finished "$STAGE" && { echo "skip  ${STAGE%/seed*} seed ${STAGE#*/seed} (finished)"; exit 0; }
  mkdir -p "$OUT/$STAGE" "$OUT/logs"
  lock "$OUT/.run_all.lock" -s "every stage into $OUT"   # shared with STAGE runs, not with a run of every stage
  lock "$OUT/$STAGE/.lock" -x "stage $STAGE"
  run_stage "$STAGE" "$DEVICE" &
  stage_pid=$!
  trap 'pkill -TERM -P $stage_pid 2>/dev/null; wait; echo "stopped: stage $STAGE was stopped" >&2; exit 143' TERM INT
  wait "$stage_pid"
  exit
fi

# The scheduler: each free slot takes the first stage whose dependency has finished. A failing stage stops new
# starts; the running ones finish; then the script exits naming it.
read -ra SLOTS <<< "${GPUS:-default}"
cpu_slots=$(tr ' ' '\n' <<< "$GPUS" | grep -cx cpu || true)   # cpu slots share the cores: their threads
CPU_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / (cpu_slots + (cpu_slots == 0)) ))}   # would contend
[[ $CPU_THREADS =~ ^[0-9]+$ ]] || { echo "error: OMP_NUM_THREADS=$OMP_NUM_THREADS is not a number of threads — give a positive integer, or unset it" >&2; exit 2; }
[ "$CPU_THREADS" -ge 1 ] || CPU_THREADS=1
declare -A pid_on=() stage_on=() t0_on=()
mkdir -p "$OUT"
lock "$OUT/.run_all.lock" -x "into $OUT"
# SIGTERM or Ctrl-C: stop the running stages too (smf.py leaves nothing half-written when stopped), then exit
stop() {
  trap - TERM INT
  for pid in "${pid_on[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; done
  wait
  echo "stopped: the running stages were stopped; finished stages are kept (rerun to continue)" >&2
  exit 143
}
trap stop TERM INT
todo=() bad=0
for s in "${STAGES[@]}"; do
  check_settings "$s" || bad=1
  dep=$(needs "$s")   # a retrofit outside ROWS or SEEDS that an SMF stage starts from: as this run would make it
  [ "$dep" = - ] || [[ " ${STAGES[*]} " == *" $dep "* ]] || check_settings "$dep" training || bad=1
  if [ "$dep" != - ] && [[ " ${STAGES[*]} " != *" $dep "* ]] && ! finished "$dep"; then
    echo "error: stage $s needs $dep, which has not finished and is not in ROWS/SEEDS — add ${dep%/seed*} to ROWS" >&2; bad=1
  fi
  [ "$dep" = - ] || ! finished "$dep" || has_model "$dep" || bad=1
done
# the table pools every seed of a row: a seed of a row in ROWS made with other settings is refused, in SEEDS or not
for row in $ROWS; do
  for dir in "$OUT/$row"/seed*/; do
    s=$row/$(basename "$dir")
    [[ $s =~ /seed[0-9]+$ ]] && [[ " ${STAGES[*]} " != *" $s "* ]] || continue
    check_settings "$s" || bad=1
  done
done
[ $bad -eq 0 ] || exit 2
unfinished=()
for s in "${STAGES[@]}"; do finished "$s" || unfinished+=("$s"); done
[ ${#unfinished[@]} -eq 0 ] || check_commands "${unfinished[@]}" || exit 2
for staging in "$OUT"/*/seed*/.model.tmp*; do   # a SIGKILLed train cannot remove its own
  [ ! -e "$staging" ] || echo "note: $staging is the staging folder of a training that was killed — delete it" >&2
done
for f in table.md figure.svg; do   # written at the end: a file there that table did not write is refused now
  [ ! -e "$OUT/$f" ] || [ "$(head -n 1 "$OUT/$f")" = "$TABLE_HEADER" ] || {
    echo "error: $OUT/$f was not written by smf.py table (no header line) — move it away: the table is written there at the end" >&2; exit 2; }
done
for s in "${STAGES[@]}"; do
  if finished "$s"; then echo "skip  ${s%/seed*} seed ${s#*/seed} (finished)"; else todo+=("$s"); fi
done
t_all=$(date +%s) failed=""
while :; do
  for slot in "${!SLOTS[@]}"; do   # reap the stages that ended
    pid=${pid_on[$slot]:-}
    [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null || continue
    s=${stage_on[$slot]} rc=0
    wait "$pid" || rc=$?
    unset "pid_on[$slot]"
    if [ $rc -eq 0 ] && finished "$s"; then
      echo "done  ${s%/seed*} seed ${s#*/seed} in $(( $(date +%s) - t0_on[$slot] ))s on ${SLOTS[$slot]}"
    else
      echo "FAILED stage ${s%/seed*} seed ${s#*/seed} — see $OUT/logs/${s/\//_}.log" >&2
      tail -n 3 "$OUT/logs/${s/\//_}.log" >&2
      failed="$failed $s"
    fi
  done
  if [ -z "$failed" ]; then   # start what can start
    for slot in "${!SLOTS[@]}"; do
      [ -z "${pid_on[$slot]:-}" ] || continue
      for i in "${!todo[@]}"; do
        dep=$(needs "${todo[$i]}")
        [ "$dep" = - ] || finished "$dep" || continue
        start "${todo[$i]}" "${SLOTS[$slot]}"
        pid_on[$slot]=$started stage_on[$slot]=${todo[$i]} t0_on[$slot]=$(date +%s)
        unset "todo[$i]"; todo=("${todo[@]}")
        break
      done
    done
  fi
  if [ ${#pid_on[@]} -eq 0 ]; then
    [ -n "$failed" ] && { echo "stopped after the failure of:$failed (finished stages are kept; rerun to continue)" >&2; exit 1; }
    [ ${#todo[@]} -eq 0 ] && break
    echo "error: ${todo[*]} need stages that are neither finished nor in ROWS/SEEDS — add them" >&2; exit 2
  fi
  sleep 0.5
done
echo "all stages finished in $(( $(date +%s) - t_all ))s"
$PYTHON "$SMF" table "$OUT"
