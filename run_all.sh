#!/usr/bin/env bash
# Reproduces every row of the results table (SPEC.md sec. 2) on one GPU, for each seed, then prints the table.
# Every stage writes under $OUT/<row>/seed<S>/; a stage whose eval.json exists is skipped, so a rerun after a
# crash or a killed job continues where it stopped. Override any setting below from the environment, e.g.
#   SEEDS="0" ROWS="base lora" bash run_all.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}              # base model: hub id or local folder
OUT=${OUT:-results}                                     # everything lands here
SEEDS=${SEEDS-"0 1 2"}                                 # the paper uses three seeds
ROWS=${ROWS-all}                                        # "all", or some of the names in ALL_ROWS below
MEDMCQA=${MEDMCQA:-openlifescienceai/medmcqa}           # training data (split train): hub id or local file
MEDMCQA_EVAL=${MEDMCQA_EVAL:-openlifescienceai/medmcqa} # MedMCQA probe (split validation)
WIKITEXT=${WIKITEXT:-Salesforce/wikitext}               # WikiText probe (wikitext-103-v1 test)
TRIVIAQA=${TRIVIAQA:-mandarjoshi/trivia_qa}             # TriviaQA probe (rc.nocontext validation)
BACKGROUND=${BACKGROUND:-OpenAssistant/oasst1}          # retrofit corpus and selector background
MAX_STEPS=${MAX_STEPS:-}                                # empty: full recipes (3 epochs; 2 for retrofit)
LIMIT_TRAIN=${LIMIT_TRAIN:-}                            # empty: 60,000 MedMCQA examples / all of OASST1
EVAL_LIMIT=${EVAL_LIMIT:-1000}                          # examples per probe (lines for WikiText)
BACKGROUND_EXAMPLES=${BACKGROUND_EXAMPLES:-2000}        # single-example batches behind the selectors
MICRO_BATCH=${MICRO_BATCH:-4}                           # x GRAD_ACCUM = effective batch 16
GRAD_ACCUM=${GRAD_ACCUM:-4}
FORWARD_BATCH=${FORWARD_BATCH:-}                        # sequences per forward pass; empty: a whole step (16)
EVAL_BATCH=${EVAL_BATCH:-16}                            # MedMCQA questions per forward (TriviaQA: twice that)
DEVICE=${DEVICE:-}                                      # empty: cuda when available
TRAIN_ARGS=${TRAIN_ARGS:-}                              # extra flags for every train command
SMF_ARGS=${SMF_ARGS:-}                                  # extra flags for the SMF rows (e.g. --optimizer sgd --lr 2)
PYTHON=${PYTHON:-python}

ALL_ROWS="base retrofit_additive retrofit_replacement smf_replacement_kl smf_replacement_tfidf smf_additive_kl smf_additive_tfidf smf_additive_scale_kl smf_additive_scale_tfidf lora full"
[ "$ROWS" = all ] && ROWS=$ALL_ROWS
for row in $ROWS; do
  case " $ALL_ROWS " in *" $row "*) ;; *) echo "error: unknown row '$row' in ROWS — use names from: $ALL_ROWS" >&2; exit 2 ;; esac
done
[ -n "${SEEDS// /}" ] || { echo "error: SEEDS is empty — give one or more seeds, e.g. SEEDS=\"0 1 2\"" >&2; exit 2; }
[ -n "${ROWS// /}" ] || { echo "error: ROWS is empty — give one or more of: $ALL_ROWS" >&2; exit 2; }

common=(--device "${DEVICE:-$($PYTHON -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}")
data=(--eval-medmcqa "$MEDMCQA_EVAL" --wikitext "$WIKITEXT" --triviaqa "$TRIVIAQA" --limit "$EVAL_LIMIT"
      --batch-size "$EVAL_BATCH")
train=(--medmcqa "$MEDMCQA" --background "$BACKGROUND" --micro-batch "$MICRO_BATCH" --grad-accum "$GRAD_ACCUM"
       --background-examples "$BACKGROUND_EXAMPLES" ${MAX_STEPS:+--max-steps "$MAX_STEPS"}
       ${FORWARD_BATCH:+--forward-batch "$FORWARD_BATCH"}
       ${LIMIT_TRAIN:+--limit-train "$LIMIT_TRAIN"} $TRAIN_ARGS)
mkdir -p "$OUT/logs"
t_all=$(date +%s)

# finished ROW SEED: its eval.json exists (written atomically) and holds every probe
finished() { [ -f "$OUT/$1/seed$2/eval.json" ] && ! grep -q '"unfinished"' "$OUT/$1/seed$2/eval.json"; }

# stage ROW SEED CMD...: skipped when finished
stage() {
  local row=$1 seed=$2; shift 2
  local dir="$OUT/$row/seed$seed" log="$OUT/logs/${row}_seed$seed.log" t0
  case " $ROWS " in *" $row "*) ;; *) return 0 ;; esac
  if finished "$row" "$seed"; then echo "skip  $row seed $seed (finished)"; return 0; fi
  mkdir -p "$dir"; t0=$(date +%s)
  if ! "$@" >"$log" 2>&1; then
    echo "FAILED stage $row seed $seed — see $log" >&2; tail -n 3 "$log" >&2; exit 1
  fi
  echo "done  $row seed $seed in $(( $(date +%s) - t0 ))s"
}

# train ROW SEED [FLAGS...]: trains into ROW/seedSEED/model and evaluates it; an existing checkpoint is only evaluated
train_row() {
  local row=$1 seed=$2; shift 2
  local dir="$OUT/$row/seed$seed"
  if [ -f "$dir/model/config.json" ]; then
    $PYTHON smf.py eval --model "$dir/model" "${common[@]}" "${data[@]}" --out "$dir/eval.json"
  else
    $PYTHON smf.py train --out "$dir/model" --seed "$seed" "$@" "${common[@]}" "${train[@]}" "${data[@]}" \
      --eval-out "$dir/eval.json"
  fi
}

# smf ROW SEED MODE [FLAGS...]: sparse finetuning from the retrofit of MODE; TF-IDF reuses the KL run's statistics
smf_row() {
  local row=$1 seed=$2 mode=$3; shift 3
  local parent="$OUT/retrofit_$mode/seed$seed/model" stats="$OUT/${row%_tfidf}_kl/seed$seed/model/background_stats.safetensors"
  [ -f "$parent/config.json" ] || { echo "missing retrofit checkpoint $parent — run its row first" >&2; return 1; }
  train_row "$row" "$seed" --method smf --model "$parent" "$@" $SMF_ARGS $([ -f "$stats" ] && echo --background-stats "$stats")
}

for seed in $SEEDS; do
  stage base "$seed" $PYTHON smf.py eval --model "$MODEL" "${common[@]}" "${data[@]}" --out "$OUT/base/seed$seed/eval.json"
  for mode in additive replacement; do
    stage "retrofit_$mode" "$seed" train_row "retrofit_$mode" "$seed" --method retrofit --model "$MODEL" --memory-mode "$mode"
  done
  for sel in kl tfidf; do
    stage "smf_replacement_$sel" "$seed" smf_row "smf_replacement_$sel" "$seed" replacement --selector "$sel"
    stage "smf_additive_$sel" "$seed" smf_row "smf_additive_$sel" "$seed" additive --selector "$sel"
    stage "smf_additive_scale_$sel" "$seed" smf_row "smf_additive_scale_$sel" "$seed" additive --selector "$sel" --train-scale
  done
  stage lora "$seed" train_row lora "$seed" --method lora --model "$MODEL"
  stage full "$seed" train_row full "$seed" --method full --model "$MODEL"
done
echo "all stages finished in $(( $(date +%s) - t_all ))s"
$PYTHON smf.py table "$OUT"
